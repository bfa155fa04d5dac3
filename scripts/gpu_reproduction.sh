#!/usr/bin/env bash
# The reproduction at the papers' settings on one GPU, in one command (issue 18), sized for about
# 9 minutes of H100/H200 time including compilation (estimate from the H100 figures in docs/performance.md:
# LA 36.7 images/s at quick settings, the metric 48.6 images/s per map and protocol):
#     bash scripts/gpu_reproduction.sh
# Every method, + IProp, + the gamma = 0 control, protocols la and rise, LA over 3 seeds; the
# section lands in results/reproduction/$NAME and results/REPRODUCTION.md is regenerated.
# Resumable: rerun the same command after an interruption. A persistent JAX compilation cache
# inside the run folder makes a rerun skip compilation.
# Tiny CPU check: NUM_IMAGES=2 BATCH_SIZE=2 SETTINGS=quick METHODS=sm,la LA_SEEDS=2 NAME=cpu_smoke \
#     HPARAMS=la.max_iter=2,la.sampling_times=2 RESULTS_DIR=/tmp/r bash scripts/gpu_reproduction.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_IMAGES=${NUM_IMAGES:-256}
BATCH_SIZE=${BATCH_SIZE:-32}
SETTINGS=${SETTINGS:-paper}
STRIDE=${STRIDE:-3}                       # 256 images spread over la1000's 1000
LA_SEEDS=${LA_SEEDS:-3}
DATA=${DATA:-la1000:../shared/data/la1000}
NAME=${NAME:-gpu_${SETTINGS}_${NUM_IMAGES}}
RUNS_DIR=${RUNS_DIR:-runs}
RESULTS_DIR=${RESULTS_DIR:-results}
METHODS=${METHODS:-}
HPARAMS=${HPARAMS:-}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$RUNS_DIR/jax_compilation_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
started=$(date +%s)
python -m experiments.reproduce --name="$NAME" --data="$DATA" --num_images="$NUM_IMAGES" --stride="$STRIDE" \
  --batch_size="$BATCH_SIZE" --settings="$SETTINGS" --protocol=la,rise --la_seeds="$LA_SEEDS" \
  ${METHODS:+--method="$METHODS"} ${HPARAMS:+--hparams="$HPARAMS"} \
  --runs_dir="$RUNS_DIR" --results_dir="$RESULTS_DIR" --progress=false
echo "wall time: $(( $(date +%s) - started )) s on $(python -c 'import jax; d = jax.devices()[0]; print(getattr(d, "device_kind", d.platform))')"
