#!/usr/bin/env bash
# Sets everything up (idempotent) and runs every test: Rust unit and integration tests, which
# generate their models and Captum references with the project's .venv, run the example jobs,
# and open the report in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing Debian's chromium for the report test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "test: chromium is not installed and cannot be installed here (need root and apt-get)" >&2
    exit 2
  fi
fi
# The shard a run takes comes from these when set (an Indexed Job, a Slurm array, AWS Batch):
# tests run inside such a job must not shard every run they start.
unset JOB_COMPLETION_INDEX SLURM_ARRAY_TASK_ID SLURM_ARRAY_TASK_MAX SLURM_ARRAY_TASK_MIN SLURM_ARRAY_TASK_COUNT \
  NUM_SHARDS AWS_BATCH_JOB_ARRAY_INDEX AWS_BATCH_JOB_ARRAY_SIZE
# One build: the integration tests run the binary that `cargo test` builds with them (a separate
# `cargo build` would compile the dependencies a second time, with the test build's features).
cargo test --release --no-fail-fast "$@"
