#!/bin/bash
# The Fashion-MNIST rows of experiments/gaussian_em/README.md and of
# experiments/fmnist/results.json: every task, all 60k corrupted training
# images, evaluated on the first 256 test observations. The settings are the
# best on the 32 tuning images of sweep.sh (sweep.json), never the evaluated
# ones. Resumable by name: a row already in results.json is skipped.
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=experiments/gaussian_em/results.json
run() {
  name=$1; shift
  if [ -e $OUT ] && grep -q "\"$name\"" $OUT; then echo "skip $name"; return; fi
  nice $PY experiments/gaussian_em/run.py --out $OUT --name "$name" "$@" | tail -1
}
run denoise --task denoise --rank 0 --init_var 0.01 --iters 16
run blur --task blur --rank 0 --init_var 0.1 --iters 64
run inpaint --task inpaint --rank 64 --init_var 1.0 --iters 48
