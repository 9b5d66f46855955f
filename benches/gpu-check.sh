#!/usr/bin/env bash
# One prepared GPU check for a lent GPU machine (see the device tool): engine vs Captum and a
# lean one-forward peer (fp32, then bf16 + channels-last) at batch 128, then the whole pipeline
# (JPEG files -> Parquet) against the engine alone on ResNet-50. Prints one table per step and
# writes JSON under $OUT when set.
#
# Here:   cargo build --release --bin saliency-audit
#         mkdir -p .gpu && cp target/release/saliency-audit .gpu/ && strip .gpu/saliency-audit
#         python3 -m pip download --no-deps --only-binary=:all: -d .whl captum==0.9.0
#         (.gpu and .whl are in .git/info/exclude; the stripped binary is ~35 MB, under the
#         device tool's 64 MiB limit, the unstripped one is not)
# There:  carry .gpu and .whl; run: bash benches/gpu-check.sh
# MODELS (default "resnet50 vgg16"), JPEGS (default 8192), ENGINE_FLAGS (default
# "--ablation --unfolded") and PIPELINE_FLAGS (default "--variants") change the work.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# The binary's rpath names this project's .venv; on the GPU machine libtorch is the system torch's.
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "cpu cores: $(nproc)"
bin=${BIN:-.gpu/saliency-audit}
[ -x "$bin" ] || bin=target/release/saliency-audit
out=${OUT:-/tmp}
t0=$SECONDS
for m in ${MODELS:-resnet50 vgg16}; do
  timeout 170 "$PY" benches/engine_vs_captum.py --model "$m" --batch 128 --device cuda --iters 10 --warmup 3 --fast \
    ${ENGINE_FLAGS:---ablation --unfolded} --bin "$bin" --json "$out/engine_$m.json" || echo "engine_vs_captum $m failed ($?)"
  echo "[$((SECONDS - t0)) s]"
done
timeout 200 "$PY" benches/pipeline_vs_engine.py --model resnet50 --batch 128 --n "${JPEGS:-8192}" --device cuda:0 \
  ${PIPELINE_FLAGS---variants} --bin "$bin" --json "$out/pipeline_resnet50.json" || echo "pipeline_vs_engine failed ($?)"
echo "[$((SECONDS - t0)) s]"
