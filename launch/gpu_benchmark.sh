#!/usr/bin/env bash
# The ImageNet-64 benchmark on one H100/H200 in bf16, at the largest global batch that fits:
# teacher, stage-one and progressive steps and sampling (guided teacher at 16 steps = 32 NFE vs
# the student at 16 and 1). Each step kind tries the batches of $BATCHES in turn: XLA's memory
# analysis of a compiled step above the device's limit skips to the largest batch it predicts
# will fit, and an out-of-memory error at run time moves to the next. Budget: 10 minutes
# including compilation (the python run is killed at $LIMIT_S seconds).
#
#   bash launch/gpu_benchmark.sh                 # writes ${OUT:-./benchmark_out}/benchmark.{json,md}
#   GDISTILL_BENCH_DRY=1 bash launch/gpu_benchmark.sh   # CPU dry run: tiny model and batches
#
# Extra arguments are passed on to gdistill.benchmark (e.g. --config.model.remat=true).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-./benchmark_out}"
LIMIT_S="${LIMIT_S:-560}"
mkdir -p "$OUT_DIR"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

if [[ "${GDISTILL_BENCH_DRY:-0}" == "1" ]]; then
  # The same code path on a CPU in a few minutes: a small U-Net of the ImageNet-64 family, the
  # teacher step and sampling only, and a fake 64 MiB memory limit that the first batch's
  # compiled step exceeds, so the fit check moves to a smaller batch.
  BATCHES="${BATCHES:-64,32,16,8}"
  EXTRA=(--config.model.ch=16 --config.model.ch_mult="(1,2)" --config.model.num_res_blocks=1
         --config.model.attn_resolutions="(8,)" --config.model.head_dim=16
         --config.model.num_groups=8 --config.model.image_size=16 --config.model.dtype=float32
         --config.progressive.start_steps=4 --memory_limit_bytes=$((64 * 2 ** 20))
         --only=teacher,sample --sample_batch=8 --sample_steps=2 --steps=2 --warmup=1
         --sample_repeats=1)
else
  BATCHES="${BATCHES:-512,384,256,192,128,96,64,48,32}"
  EXTRA=(--config.model.dtype=bfloat16 --sample_batch=64 --sample_steps=16 --steps=10
         --warmup=3 --sample_repeats=2)
fi

python -c "import jax; print('devices:', jax.devices())"
timeout --signal=TERM "$LIMIT_S" python -m gdistill.benchmark --config=configs/imagenet64.py \
  --batch_sizes="$BATCHES" --out="$OUT_DIR" "${EXTRA[@]}" "$@" 2>&1 | tee "$OUT_DIR/benchmark.log"
