#!/bin/bash
# Choosing gaussian_em's two settings (initial variance, EM iterations) on the
# 32 tuning images (test images 256..287, the ones the classical restorers are
# tuned on), never on the 256 evaluated ones. Rows go to sweep.json.
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=experiments/gaussian_em/sweep.json
run() {
  name=$1; shift
  if [ -e $OUT ] && grep -q "\"$name\"" $OUT; then echo "skip $name"; return; fi
  nice $PY experiments/gaussian_em/run.py --out $OUT --first_test 256 --num_test 32 --name "$name" "$@" | tail -1
}
for task in blur denoise; do
  for v in 1.0 0.3 0.1 0.03 0.01; do
    for it in 16 64; do run ${task}_dense_v${v}_it${it} --task $task --rank 0 --init_var $v --iters $it; done
  done
done
for v in 1.0 0.3 0.1; do run inpaint_r64_v${v}_it16 --task inpaint --rank 64 --init_var $v --iters 16; done
run inpaint_r64_v1.0_it48 --task inpaint --rank 64 --init_var 1.0 --iters 48
