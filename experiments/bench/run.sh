#!/bin/bash
# The benchmark runs quoted in experiments/bench/README.md, in order. Run from
# the repository root on an otherwise idle machine:
#   bash experiments/bench/run.sh [PYTHON] [OUT]
# Each step writes OUT/<name>.json (every number, the hardware, the date) and
# prints a Markdown table; OUT/tables.md collects the tables.
set -e
PY=${1:-.venv/bin/python}
OUT=${2:-experiments/bench/results}
mkdir -p "$OUT"
: > "$OUT/tables.md"
bench() {  # name, bench.py arguments...
  name=$1; shift
  echo "## $name: bench.py $*" | tee -a "$OUT/tables.md"
  "$PY" experiments/bench/bench.py --output="$OUT/$name.json" "$@" | tee -a "$OUT/tables.md"
  echo | tee -a "$OUT/tables.md"
}
# 1. The small configs, both methods, two batch sizes, with the whole loop.
bench small --configs=quickstart,fmnist_noise --methods=flowdiff,clean --batch_sizes=8,32 --loop
# 2. The CIFAR config's joint and clean steps at batch 32 (issue 7's target).
bench cifar --configs=cifar_noise --methods=flowdiff,clean --batch_sizes=32 --warmup=1 --repeats=3
# 3. The options, one at a time, on the Fashion-MNIST joint step at batch 32.
bench opt_remat --configs=fmnist_noise --methods=flowdiff --batch_sizes=32 --loop \
  --set training.remat=True
bench opt_k4 --configs=fmnist_noise --methods=flowdiff --batch_sizes=32 --loop \
  --set training.steps_per_dispatch=4
bench opt_bf16 --configs=fmnist_noise --methods=flowdiff --batch_sizes=32 \
  --set model.compute_dtype=bfloat16
# 4. Per-device throughput with 1, 2 and 4 fake CPU devices (global batch 8 per device).
bench devices --configs=quickstart --methods=clean,flowdiff --batch_sizes=8 --device_counts=1,2,4
