#!/bin/bash
# The flowdiff_warm_start runs (run_warm.sh) on the 64 test observations of the
# em rows' inverse reports: the flow's amortized sample (flow_sample row: one
# network pass per image) and MMPS (32 steps, 1 CG iteration) under the
# flowdiff prior, the em rows' E-step sampler. Copied to
# warm_start/<task>_flowdiff_warm/inverse.json for results.py.
#   bash experiments/fmnist/run_flow_inverse.sh [PYTHON] [WORKDIR_ROOT] [TASK ...]
# STEPS=6000 does the same for run_warm.sh's 6000-step runs.
set -e
STEPS=${STEPS:-2000}
PY=${1:-.venv/bin/python}
ROOT=${2:-workdirs/fmnist}
shift 2 || true
TASKS=${*:-denoise blur inpaint}
for task in $TASKS; do
  itask=$task; [ $task = blur ] && itask=deblur
  run=${task}_flowdiff_warm
  [ "$STEPS" = 2000 ] || run=${run}_$STEPS
  $PY -m flowdiff_jax.inverse --workdir=$ROOT/$run --task=$itask --num_images=64 \
    --solvers=mmps --mmps_steps=32 --mmps_cg_iters=1 --label=flowdiff_warm_start
  cp $ROOT/$run/inverse/$itask/metrics.json experiments/fmnist/warm_start/$run/inverse.json
done
