//! The integration test binary: one binary, topic modules.

mod common;
mod engine;
mod pipeline;
