#!/bin/bash
# The Fashion-MNIST rows of experiments/gaussian_em/README.md: every task, 60k
# observations, 16 EM iterations; dense Σ where the operator is shared
# (denoise, blur: the E-step is N-independent there) and rank 64 + diagonal.
# Resumable by name: a row already in results.json is skipped.
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
run() {
  name=$1; shift
  if [ -e experiments/gaussian_em/results.json ] && grep -q "\"$name\"" experiments/gaussian_em/results.json; then
    echo "skip $name"; return; fi
  nice $PY experiments/gaussian_em/run.py --name "$name" "$@"
}
run denoise_dense --task denoise --rank 0
run blur_dense --task blur --rank 0
run denoise_r64 --task denoise --rank 64
run blur_r64 --task blur --rank 64
run inpaint_r64 --task inpaint --rank 64
