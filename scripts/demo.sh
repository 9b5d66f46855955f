#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the main job: the demo audit of a small CNN that
# learned a planted shortcut, then its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin saliency-audit
bin=target/release/saliency-audit
.venv/bin/python scripts/make_demo.py .cache/demo
set +e
"$bin" run jobs/demo.toml
code=$?
set -e
# 0: every sample ok; 1: some samples failed (their rows say why); anything else is fatal.
if [ "$code" -gt 1 ]; then exit "$code"; fi
"$bin" report out/demo
echo "open out/demo/_report/index.html in a browser"
