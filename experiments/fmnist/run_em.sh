#!/bin/bash
# The EM peers (method "em", flowdiff_jax/methods/em.py) at the protocol of
# run_warm.sh (same U-Net, optimiser, batch 32, 2000 score-network updates,
# the same Gaussian-EM fit per task), at about the same wall time on this
# machine as the flowdiff row (the warm start) of the task (budget (a) of issue 18):
# lap 0 trains on exact posterior samples of the fitted Gaussian (Rozet et
# al.'s warm start), lap 1 on the E-step's samples under the lap-0 prior, 1000
# updates each. The number of observations sampled per lap is what fits the
# budget at the measured E-step speed (em.num_observations, below); the E-step
# sampler has 32 steps (+1), MMPS with 1 CG iteration, DPS with the ζ of
# DPS_ZETA. Then the evaluation of evaluate.sh's protocol, and the E-step's
# sampler restoring the first 64 test observations under the final prior (inverse).
# Run from the repository root:
#   bash experiments/fmnist/run_em.sh [PYTHON] [WORKDIR_ROOT] [E_STEP] [TASK ...]
# Rerunning resumes unfinished runs; the key in results.json is em_<E_STEP>.
set -e
PY=${1:-.venv/bin/python}
ROOT=${2:-workdirs/fmnist}
ESTEP=${3:-mmps}
shift 3 || true
TASKS=${*:-denoise blur inpaint}
COMMON="--config.model.base_channels=16 --config.model.num_groups=4 \
 --config.training.batch_size=32 --config.training.num_train_steps=2000 \
 --config.training.eval_every_steps=1000 --config.training.sample_every_steps=1000 \
 --config.training.checkpoint_every_steps=250 --config.optim.learning_rate=1e-3 \
 --config.optim.warmup_steps=100 --config.optim.ema_decay=0.995 --config.eval.num_samples=36 \
 --config.eval.sample_steps=100 --config.method=em --config.em.e_step=$ESTEP \
 --config.em.warm_start=gaussian_em --config.em.steps_per_lap=1000 --config.em.num_steps=32 \
 --config.em.cg_iters=1 --config.em.batch_size=64"
declare -A CONFIG=([denoise]=fmnist_noise [inpaint]=fmnist_inpaint [blur]=fmnist_blur)
declare -A EM=(
  [inpaint]="--config.gaussian_em.rank=64 --config.gaussian_em.init_var=1.0 --config.gaussian_em.num_iters=48"
  [blur]="--config.gaussian_em.rank=0 --config.gaussian_em.init_var=0.1 --config.gaussian_em.num_iters=64"
  [denoise]="--config.gaussian_em.rank=0 --config.gaussian_em.init_var=0.01 --config.gaussian_em.num_iters=16")
# Observations per lap that fit the flowdiff row (the warm start)'s wall time (513 /
# 1176 / 559 s for denoise / inpaint / blur, experiments/fmnist/warm_start/wall_times.txt).
declare -A NUM=([mmps]="denoise=640 inpaint=960 blur=640" [dps]="denoise=1280 inpaint=1920 blur=1280")
# DPS ζ at 32 steps, the best of {1, 3, 10} (denoise) and {1, 3, 10, 30} (blur) on test
# images 1000-1031 (never the evaluated ones) under a 200-step prior; inpaint: as denoise.
declare -A DPS_ZETA=([denoise]=3 [inpaint]=3 [blur]=10)
mkdir -p $ROOT
for task in $TASKS; do
  n=$(echo ${NUM[$ESTEP]} | tr ' ' '\n' | grep "^$task=" | cut -d= -f2)
  run=${task}_em_${ESTEP}
  start=$(date +%s)
  $PY -m flowdiff_jax.main --config=configs/${CONFIG[$task]}.py $COMMON ${EM[$task]} \
    --config.em.num_observations=$n --config.em.dps_zeta=${DPS_ZETA[$task]} --workdir=$ROOT/$run
  echo "$task em_$ESTEP: $(( $(date +%s) - start )) s" | tee -a $ROOT/wall_times.txt
  if [ ! -e $ROOT/$run/eval/metrics.json ]; then
    start=$(date +%s)
    $PY -m flowdiff_jax.evaluate --workdir=$ROOT/$run --num_samples=500 \
      --sampler=ancestral --sample_steps=250 --num_reference=1000 --kid_subset_size=100
    echo "evaluate $run: $(( $(date +%s) - start )) s" | tee -a $ROOT/wall_times.txt
  fi
  # The E-step sampler as a restorer of the first 64 test observations, under the final prior.
  itask=$task; [ $task = blur ] && itask=deblur
  if [ ! -e $ROOT/$run/inverse/$itask/metrics.json ]; then
    $PY -m flowdiff_jax.inverse --workdir=$ROOT/$run --task=$itask --num_images=64 \
      --solvers=$ESTEP --mmps_steps=32 --mmps_cg_iters=1 --dps_steps=32 \
      --dps_zeta=${DPS_ZETA[$task]} --label=em_$ESTEP
  fi
  # What results.py reads, copied out of the (ignored) workdir.
  out=experiments/fmnist/em/$run
  mkdir -p $out
  cp $ROOT/$run/eval/metrics.json $out/metrics.json
  cp $ROOT/$run/inverse/$itask/metrics.json $out/inverse.json
  grep "^$task em_$ESTEP\|^evaluate $run" $ROOT/wall_times.txt | tail -2 >> experiments/fmnist/em/wall_times.txt
  $PY -c "import json, sys; from flowdiff_jax import runs; c = runs.load_config(sys.argv[1]); \
json.dump({k: c[k].to_dict() for k in ('em', 'gaussian_em', 'training', 'optim')}, \
open(sys.argv[2], 'w'), indent=1)" $ROOT/$run $out/config.json
done
