#!/bin/bash
# flowdiff with the Gaussian-EM warm start (config.flow.base=gaussian_em) at the
# protocol of run.sh (2000 steps of batch 32, same U-Net, flow and optimiser),
# then its evaluation at the protocol of evaluate.sh. Before training, N(μ, Σ) is
# fitted by EM to the 60k corrupted training images (its time is inside the
# run's wall time); its posterior mean replaces A⁺y as the flow's base. The EM
# settings per task are the best on the tuning images in
# experiments/gaussian_em/sweep.json (never the evaluated ones).
# Run from the repository root:
#   bash experiments/fmnist/run_warm.sh [PYTHON] [WORKDIR_ROOT] [TASK ...]
# Rerunning resumes unfinished runs; the key in results.json is
# flowdiff_beta_ent_constant (the Fashion-MNIST configs' default until
# 2026-12-06, see below; run.sh's flowdiff is flowdiff_no_warm_start).
# STEPS=6000 bash ... trains 6000 steps instead (the run is named
# <task>_flowdiff_warm_6000, key flowdiff_6000): about the wall time
# of the em_mmps rows on this machine, for the equal-wall-time comparison.
# HANDOVER="G H" adds flowdiff's prior hand-over: the flow's prior term is the
# fitted Gaussian for G steps, then moves to the diffusion prior over H steps
# (flowdiff.gaussian_prior_steps / handover_steps, no β_prior warm-up); the run
# is named <task>_flowdiff_handover[_<steps>], key flowdiff_handover[_<steps>].
# DECAY=1 decays both learning rates (score network and flow) by a cosine to 0 at
# the last step (optim/flow_optim.decay_steps = STEPS); "_cosine" is appended to
# the run's name (key flowdiff_cosine[SUFFIX], from experiments/fmnist/cosine/).
# run.sh's DECAY=1 gives naive the same schedule.
# FLAGS="--config.a=b ..." SUFFIX=_name: any other flags, the run named with SUFFIX.
# The runs pin β_ent = 1 (constant) and flow lr 5e-4, the configs' defaults when
# these runs began (2026-12-02), so every run keeps its meaning; since 2026-12-06
# the configs default to entropy annealing and flow lr 1e-3, which is
#   FLAGS="--config.amortized.beta_ent_init=0.1 --config.amortized.beta_ent_anneal_steps=1500 \
#     --config.flow_optim.learning_rate=1e-3" SUFFIX=_entanneal_flr1e3
# (results.json's `flowdiff` key; the pinned run is `flowdiff_beta_ent_constant`).
# FLAGS come after the pins: later flags win.
set -e
STEPS=${STEPS:-2000}
HANDOVER=${HANDOVER:-}
DECAY=${DECAY:-0}
PY=${1:-.venv/bin/python}
ROOT=${2:-workdirs/fmnist}
shift 2 || true
TASKS=${*:-inpaint blur denoise}
COMMON="--config.model.base_channels=16 --config.model.num_groups=4 \
 --config.training.batch_size=32 --config.training.num_train_steps=$STEPS \
 --config.training.eval_every_steps=1000 --config.training.sample_every_steps=1000 \
 --config.training.checkpoint_every_steps=250 --config.optim.learning_rate=1e-3 \
 --config.optim.warmup_steps=100 --config.optim.ema_decay=0.995 --config.eval.num_samples=36 \
 --config.eval.sample_steps=100 --config.amortized.beta_prior_warmup_steps=300 \
 --config.flow.base=gaussian_em \
 --config.amortized.beta_ent_init=1.0 --config.amortized.beta_ent_anneal_steps=0 \
 --config.flow_optim.learning_rate=5e-4"
declare -A CONFIG=([denoise]=fmnist_noise [inpaint]=fmnist_inpaint [blur]=fmnist_blur)
declare -A EM=(
  [inpaint]="--config.gaussian_em.rank=64 --config.gaussian_em.init_var=1.0 --config.gaussian_em.num_iters=48"
  [blur]="--config.gaussian_em.rank=0 --config.gaussian_em.init_var=0.1 --config.gaussian_em.num_iters=64"
  [denoise]="--config.gaussian_em.rank=0 --config.gaussian_em.init_var=0.01 --config.gaussian_em.num_iters=16")
mkdir -p $ROOT
EXTRA=""
NAME=flowdiff_warm
if [ -n "$HANDOVER" ]; then
  read -r HOLD RAMP <<< "$HANDOVER"
  EXTRA="--config.flowdiff.gaussian_prior_steps=$HOLD --config.flowdiff.handover_steps=$RAMP \
 --config.amortized.beta_prior_warmup_steps=0"
  NAME=flowdiff_handover
fi
if [ "$DECAY" = 1 ]; then
  EXTRA="$EXTRA --config.optim.decay_steps=$STEPS --config.flow_optim.decay_steps=$STEPS"
  NAME=${NAME}_cosine
fi
EXTRA="$EXTRA ${FLAGS:-}"
NAME=$NAME${SUFFIX:-}
for task in $TASKS; do
  run=${task}_$NAME
  [ "$STEPS" = 2000 ] || run=${run}_$STEPS
  if [ ! -e "$ROOT/$run/checkpoints/$STEPS" ]; then  # finished runs are not rerun
    start=$(date +%s)
    $PY -m flowdiff_jax.main --config=configs/${CONFIG[$task]}.py $COMMON ${EM[$task]} $EXTRA \
      --config.method=flowdiff --workdir=$ROOT/$run
    echo "$task ${run#${task}_}: $(( $(date +%s) - start )) s" | tee -a $ROOT/wall_times.txt
  fi
  if [ ! -e $ROOT/$run/eval/metrics.json ]; then
    start=$(date +%s)
    $PY -m flowdiff_jax.evaluate --workdir=$ROOT/$run --num_samples=500 \
      --sampler=ancestral --sample_steps=250 --num_reference=1000 --kid_subset_size=100
    echo "evaluate $run: $(( $(date +%s) - start )) s" | tee -a $ROOT/wall_times.txt
  fi
done
