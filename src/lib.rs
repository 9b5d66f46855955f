//! saliency-audit: Guided Grad-CAM attributions over whole image datasets, written to Parquet.
//!
//! Stages (see ARCHITECTURE.md): source → decode → engine → stats → sink.

pub mod engine;
