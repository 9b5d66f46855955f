//! The integration test binary: one binary, topic modules.

mod audit;
mod benches;
mod common;
mod decode;
mod deploy;
mod engine;
mod pipeline;
mod storage;
