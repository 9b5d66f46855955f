#!/usr/bin/env bash
# One prepared GPU check for a lent GPU machine (see the device tool): engine vs Captum and a
# lean one-forward peer on ResNet-50, VGG16 and ResNet-18 at batch 128, then the whole pipeline
# against the engine. Prints one table per step; also writes JSON under $OUT when set.
#
# Here:   cargo build --release; echo /.whl/ >> .git/info/exclude
#         python3 -m pip download --no-deps --only-binary=:all: -d .whl captum==0.9.0
# There:  carry target/release/saliency-audit and .whl; run: bash benches/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# The binary's rpath names this project's .venv; on the GPU machine libtorch is the system torch's.
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
bin=target/release/saliency-audit
out=${OUT:-/tmp}
for m in resnet50 vgg16 resnet18; do
  timeout 150 "$PY" benches/engine_vs_captum.py --model "$m" --batch 128 --device cuda --iters 10 --warmup 3 --fast \
    --bin "$bin" --json "$out/engine_$m.json" || echo "engine_vs_captum $m failed ($?)"
done
timeout 200 "$PY" benches/pipeline_vs_engine.py --model resnet50 --batch 128 --n 4096 --device cuda:0 --bin "$bin" \
  || echo "pipeline_vs_engine failed ($?)"
