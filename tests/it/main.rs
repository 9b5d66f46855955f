//! The integration test binary: one binary, topic modules.

mod audit;
mod common;
mod deploy;
mod engine;
mod pipeline;
mod storage;
