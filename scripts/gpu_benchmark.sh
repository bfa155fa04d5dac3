#!/usr/bin/env bash
# Issue 15's accelerator figures, in each precision mode of MODES (issue 28), in one command:
#     bash scripts/gpu_benchmark.sh
# LA at the paper's settings (s=10, T=30, K=20) on EfficientNet-Lite0 (embedded weights) and
# ResNet-50 (random weights: the cost does not depend on the values), in images/s with the efficiency
# against the fused gradient step, and the insertion/deletion metric's images/s on Lite0 under both
# protocols. Each part runs once per mode: "float32" (every matmul/convolution at full float32, HIGHEST:
# the library's default) and "float32_fast" (the backend's fast mode: TF32 on NVIDIA Ampere/Hopper,
# bfloat16 passes on TPU). JSON per part and mode in $OUT/<mode>/; scripts/precision_cost.py then prints
# images/s per mode and the slowdown of full float32 (also in $OUT/precision_cost.json).
# Sizing: the defaults aim at about 9 minutes of H100/H200 time for both modes, compilation included
# (estimate from the H100 figures in docs/performance.md: LA 36.7 images/s at T=10, K=6 on Lite0, so
# about a tenth of that at the paper's T=30, K=20; the earlier one-mode run with batches 1 8 32, ResNet
# 1 8, chunks 64 256 took 6-8 minutes). With time to spare: LITE0_BATCHES="1 8 32" RESNET_BATCHES="1 8"
# METRIC_CHUNK="64 256"; under a tighter budget: MODES=float32 or REPEATS=1.
# Tiny CPU check (a CPU runs the same program in both modes: its "slowdowns" are timing noise around 1):
#     MAX_ITER=1 SAMPLING_TIMES=2 LITE0_BATCHES=1 RESNET_BATCHES=1 METRIC_IMAGES=1 \
#     METRIC_CHUNK=8 REPEATS=1 OUT=/tmp/gpu_bench bash scripts/gpu_benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/benchmarks/gpu}
MODES=${MODES:-float32 float32_fast}
MAX_ITER=${MAX_ITER:-30}
SAMPLING_TIMES=${SAMPLING_TIMES:-20}
# The batch and chunk lists: separated by spaces or commas.
LITE0_BATCHES=${LITE0_BATCHES:-1 32}
RESNET_BATCHES=${RESNET_BATCHES:-8}       # K=20 runs x batch 8 = 160 ResNet-50 gradients per step
METRIC_IMAGES=${METRIC_IMAGES:-64}
METRIC_CHUNK=${METRIC_CHUNK:-256}
REPEATS=${REPEATS:-2}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_compilation_cache}
started=$(date +%s)
for mode in $MODES; do
  mkdir -p "$OUT/$mode"
  echo "== precision $mode"
  python scripts/benchmark.py --precision="$mode" --json="$OUT/$mode/la_paper_efficientnet_lite0.json" \
    la --model=efficientnet_lite0 --max_iter="$MAX_ITER" --sampling_times="$SAMPLING_TIMES" \
    --batch="${LITE0_BATCHES// /,}" --repeats="$REPEATS"
  python scripts/benchmark.py --precision="$mode" --json="$OUT/$mode/la_paper_resnet50_random.json" \
    la --model=resnet50 --random_weights --max_iter="$MAX_ITER" --sampling_times="$SAMPLING_TIMES" \
    --batch="${RESNET_BATCHES// /,}" --repeats="$REPEATS"
  python scripts/benchmark.py --precision="$mode" --json="$OUT/$mode/metric_efficientnet_lite0.json" \
    metrics --images="$METRIC_IMAGES" --protocol=la,rise --chunk="${METRIC_CHUNK// /,}" --repeats="$REPEATS"
done
if [[ " $MODES " == *" float32 "* && " $MODES " == *" float32_fast "* ]]; then
  python scripts/precision_cost.py "$OUT"
fi
echo "wall time: $(( $(date +%s) - started )) s on $(python -c 'import jax; d = jax.devices()[0]; print(getattr(d, "device_kind", d.platform))'); JSON in $OUT"
