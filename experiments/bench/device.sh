#!/bin/bash
# Every number issue 19 asks of one accelerator, in one run, into one JSON:
#   bash experiments/bench/device.sh [--smoke] [OUT] [bench.py arguments ...]
# OUT (default experiments/bench/results/device) gets one bench.py JSON per
# step, device.json (all of them, the datasheet fractions and the targets) and
# device.md (the summary device_report.py prints). Steps:
#   cifar_bf16 / cifar_f32  the CIFAR joint (flowdiff) and clean steps at batch
#                           128 and 256, bf16 compute (against a measured bf16
#                           matmul) and float32 (against a float32 matmul);
#   fmnist_k1 / fmnist_k4   the Fashion-MNIST joint step and the whole training
#                           loop with 1 and 4 steps per dispatch, and the data
#                           pipeline's images/s.
# --smoke runs the same steps at toy sizes (the tests' tiny config with a one-level
# U-Net and flow, batch 8, 2 timed steps): a check, on CPU, that the script and its report
# work; its numbers mean nothing. Extra arguments go to every bench.py call.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
smoke=0
if [ "${1:-}" = --smoke ]; then smoke=1; shift; fi
OUT=${1:-$REPO/experiments/bench/results/device}
shift || true
mkdir -p "$OUT"
if [ $smoke = 1 ]; then
  CIFAR="--configs=tiny --batch_sizes=8 --warmup=1 --repeats=2 --matmul_size=256"
  FMNIST=$CIFAR
  SMALL=(--set "model.channel_mult=(1,)" --set "model.attn_resolutions=()" --set flow.num_levels=1)
  # One joint-step compile in all (they dominate): the other steps time `clean`.
  F32_METHODS=clean; FMNIST_METHODS=clean
else
  CIFAR="--configs=cifar_noise --batch_sizes=128,256 --warmup=2 --repeats=10 --matmul_size=8192"
  FMNIST="--configs=fmnist_noise --batch_sizes=128 --warmup=3 --repeats=20 --matmul_size=8192"
  SMALL=()
  F32_METHODS=flowdiff,clean; FMNIST_METHODS=flowdiff
fi
start=$(date +%s)
bench() {  # name, bench.py arguments...
  name=$1; shift
  echo "## $name" >&2
  (cd "$REPO" && "$PY" experiments/bench/bench.py --output="$OUT/$name.json" "$@" \
      ${SMALL[@]+"${SMALL[@]}"} "${EXTRA[@]}")
}
EXTRA=("$@")
# shellcheck disable=SC2086 (word splitting of the argument lists is intended)
bench cifar_bf16 $CIFAR --methods=flowdiff,clean --dtype=bfloat16 --set model.compute_dtype=bfloat16
# shellcheck disable=SC2086
bench cifar_f32 $CIFAR --methods=$F32_METHODS --dtype=float32
# shellcheck disable=SC2086
bench fmnist_k1 $FMNIST --methods=$FMNIST_METHODS --loop --data
# shellcheck disable=SC2086
bench fmnist_k4 $FMNIST --methods=$FMNIST_METHODS --loop --set training.steps_per_dispatch=4
"$PY" "$REPO/experiments/bench/device_report.py" "$OUT" --wall_s=$(( $(date +%s) - start )) \
    | tee "$OUT/device.md"
