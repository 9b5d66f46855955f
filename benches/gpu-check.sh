#!/usr/bin/env bash
# One prepared GPU check for a lent GPU machine (see the device tool): the whole pipeline (JPEG
# files -> Parquet) against the engine alone on ResNet-50, with its variants (statistics on the
# host and on the device, one worker, batch_size = "auto", a batch of 4096 that runs out of
# device memory and is split: the "OOM cap" column); then engine vs Captum and a lean
# one-forward peer (fp32, then bf16 + channels-last) at batch 128 per model. Prints one table per
# step and writes JSON under $OUT when set. The whole script keeps within BUDGET_S seconds (each
# step's timeout is cut to what is left), so one device call of 8 minutes holds it.
#
# Here:   cargo build --release --bin saliency-audit
#         mkdir -p .gpu && cp target/release/saliency-audit .gpu/ && strip .gpu/saliency-audit
#         git rev-parse HEAD > .gpu/COMMIT; git status --short | grep -q . && echo dirty >> .gpu/COMMIT
#         python3 -m pip download --no-deps --only-binary=:all: -d .whl captum==0.9.0
#         (.gpu and .whl are ignored (.gitignore); the stripped binary is ~32 MB, under the
#         device tool's 64 MiB limit, the unstripped one is not)
# There:  carry .gpu and .whl; run: bash benches/gpu-check.sh (the log is also in $OUT)
#
# Knobs (environment): MODELS (default "resnet50 vgg16"), PIPELINE_MODEL (resnet50), JPEGS
# (8192), BATCH (128), SIZE (224, engine step), ITERS (10), WARMUP (3), DEVICE (cuda:0),
# ENGINE_FLAGS (default "--skip-lean": the lean PyTorch peers, measured in the third session,
# cost two fresh CUDA processes a model; "--ablation --unfolded" adds the NCHW, IEEE-fp32, cuDNN
# benchmark off and unfolded engine variants, measured in the third session except benchmark
# off: then give the steps more than BUDGET_S's default), PIPELINE_FLAGS (default "--variants"),
# BUDGET_S (450), PYTHON (python3), BIN (.gpu/saliency-audit).
# The test suite runs this script on the CPU with small values (tests/it/benches.rs).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
device=${DEVICE:-cuda:0}
batch=${BATCH:-128}
budget=${BUDGET_S:-450}
out=${OUT:-/tmp}
# Everything also into a log that comes back whole, however long the output (waited for at
# the end, so that its last lines are in the file).
exec > >(tee "$out/gpu-check.log") 2>&1
tee_pid=$!
t0=$SECONDS
if [ -d .whl ] && ! "$PY" -c 'import captum' 2>/dev/null; then
  site=$(mktemp -d)
  # Captum is pure Python: without pip its wheel is unpacked as it is.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl 2>/dev/null \
    || for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$site"; done
  export PYTHONPATH=$site
fi
# Before any step: what every step needs. A missing piece stops here, with its reason; Captum
# only the engine step's peer needs (its rows say so if it fails).
"$PY" -c 'import numpy, PIL, pyarrow, torch, torchvision; print("python:", torch.__version__)' \
  || { echo "gpu-check: the python above lacks a package the steps import"; exit 2; }
"$PY" -c 'import captum.attr' || echo "gpu-check: captum does not import: the engine step's Captum rows will fail" 
# The binary's rpath names this project's .venv; on the GPU machine libtorch is the system torch's.
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
  || { echo "gpu-check: cannot find torch's libraries"; exit 2; }
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin=${BIN:-.gpu/saliency-audit}
"$bin" --version || { echo "gpu-check: $bin does not run (carry .gpu, see the top of this file)"; exit 2; }
sha256sum "$bin" 2>/dev/null | cut -c1-16 | sed 's/^/binary sha256: /'
commit_file="$(dirname "$bin")/COMMIT"
if [ -f "$commit_file" ]; then echo "commit: $(tr '\n' ' ' < "$commit_file")"; else echo "commit: unknown (no $commit_file)"; fi
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
"$PY" -c 'import torch, torchvision; print("torchvision:", torchvision.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())' || true
case $device in
  cuda*) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true ;;
esac
echo "cpu cores: $(nproc)"
failed=0
# step CAP_S NAME COMMAND...: runs COMMAND with a timeout of CAP_S or what is left of the budget.
step() {
  local cap=$1 name=$2
  shift 2
  local left=$((budget - (SECONDS - t0)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped (${left} s of the ${budget} s budget left)"
    failed=1
    return
  fi
  # A run stopped at its limit finishes its batches in flight on SIGTERM: killed 10 s later,
  # so that it does not overlap the next step's timings.
  timeout -k 10 "$limit" "$@" || { echo "$name failed or timed out ($?, limit $limit s)"; failed=1; }
  echo "[$((SECONDS - t0)) s]"
}
# Caps: the pipeline step at most 230 s; each engine step then an equal share of what is left
# (with the default two models, at least 110 s each), so that time the pipeline step did not use
# goes to both.
step 230 "pipeline_vs_engine ${PIPELINE_MODEL:-resnet50}" \
  "$PY" benches/pipeline_vs_engine.py --model "${PIPELINE_MODEL:-resnet50}" --batch "$batch" --n "${JPEGS:-8192}" \
  --device "$device" --iters "${ITERS:-10}" --warmup "${WARMUP:-3}" ${PIPELINE_FLAGS---variants} --bin "$bin" --json "$out/pipeline_${PIPELINE_MODEL:-resnet50}.json"
models=(${MODELS:-resnet50 vgg16})
for i in "${!models[@]}"; do
  m=${models[$i]}
  cap=$(((budget - (SECONDS - t0)) / (${#models[@]} - i)))
  step "$cap" "engine_vs_captum $m" \
    "$PY" benches/engine_vs_captum.py --model "$m" --batch "$batch" --size "${SIZE:-224}" --device "$device" \
    --iters "${ITERS:-10}" --warmup "${WARMUP:-3}" --fast ${ENGINE_FLAGS---skip-lean} --bin "$bin" \
    --json "$out/engine_$m.json"
done
echo "gpu-check: $((SECONDS - t0)) s in all"
exec >&- 2>&-
wait "$tee_pid"
exit $failed
