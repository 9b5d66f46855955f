//! saliency-audit: Guided Grad-CAM attributions over whole image datasets, written to Parquet.
//!
//! Stages (see ARCHITECTURE.md): source → decode → engine → stats → sink, wired by `pipeline`.

pub mod decode;
pub mod engine;
pub mod exit;
pub mod job;
pub mod logging;
pub mod pipeline;
pub mod report;
pub mod run;
pub mod sample;
pub mod sink;
pub mod source;
pub mod stats;
pub mod store;
