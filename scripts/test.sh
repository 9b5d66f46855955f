#!/usr/bin/env bash
# Sets everything up (idempotent) and runs every test: Rust unit and integration tests, which
# generate their models and Captum references with the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin saliency-audit
cargo test --no-fail-fast "$@"
