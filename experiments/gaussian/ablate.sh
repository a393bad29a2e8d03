#!/bin/bash
# Issue 17, item 6: what limits flowdiff on the 16x16 Gaussian oracle, one
# change at a time from the flowdiff_handover row of results_16x16.json (hold
# 1000, hand-over 1000, the make_config settings). One JSON + PNG per variant
# in ablations/; a variant whose PNG exists is skipped, so rerunning the
# script resumes the sweep. About 4 min per run and operator on one core
# (8 for the larger flow):
#   nohup taskset -c 1 nice -n 10 bash experiments/gaussian/ablate.sh > logs/ablate.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/gaussian/ablations
common=(--size 16 --steps 6000 --every 500 --examples 16384 --measure params --out "$out")
run() {
  local name=$1; shift
  if [ -e "$out/$name.png" ]; then echo "== $name: done, skipped"; return; fi
  echo "== $name: $*"
  python experiments/gaussian/run.py "${common[@]}" --name "$name" "$@"
}
# The Gaussian as the flow's prior term throughout: the score network learns
# from the flow's samples of the fitted Gaussian's posterior and never feeds
# back; what is left is the flow's error as a posterior sampler.
run no_handover --methods flowdiff_handover --operators denoise,inpaint_random,blur \
  --hold 6000 --handover 0
# The same with a larger flow (8 steps, 64 hidden channels instead of 4 and 32).
run no_handover_big_flow --methods flowdiff_handover --operators denoise,blur \
  --hold 6000 --handover 0 --set flow.num_steps=8 --set flow.hidden_channels=64
# The Gaussian throughout with a 10x slower score network: is the error left
# the flow's samples, or the score network's noisy fit to them? (The run also
# records the flow samples' own covariance error, which does not depend on
# the score network here.)
run no_handover_score_lr_3e-4 --methods flowdiff_handover --operators denoise,blur \
  --hold 6000 --handover 0 --set optim.learning_rate=3e-4
# The drift after the hand-over: more flow steps per score step, a slower score network.
run flow_updates_4 --methods flowdiff_handover --operators denoise,blur \
  --set flowdiff.flow_updates_per_score_update=4
run score_lr_3e-4 --methods flowdiff_handover --operators denoise,blur \
  --set optim.learning_rate=3e-4
# Between the two: lr 1e-3 with the Gaussian throughout.
run no_handover_score_lr_1e-3 --methods flowdiff_handover --operators denoise,blur \
  --hold 6000 --handover 0 --set optim.learning_rate=1e-3
# The oracle's rate 3e-3 decayed along a cosine to 0 at step 6000 (optim.decay_steps):
# with the Gaussian throughout, and with a later hand-over (hold 3000, over 1000 more).
run no_handover_cosine --methods flowdiff_handover --operators denoise,blur \
  --hold 6000 --handover 0 --set optim.decay_steps=6000
run late_handover_cosine --methods flowdiff_handover --operators denoise,blur \
  --hold 3000 --handover 1000 --set optim.decay_steps=6000
# The cosine schedule on the random masks, with the Gaussian throughout.
run no_handover_cosine_masks --methods flowdiff_handover --operators inpaint_random \
  --hold 6000 --handover 0 --set optim.decay_steps=6000
# Both learning rates decayed (the flow's 2e-3 too: flow_optim.decay_steps), the
# Gaussian throughout: is the flow samples' error its constant learning rate's noise?
run no_handover_cosine_both --methods flowdiff_handover --operators denoise,blur,inpaint_random \
  --hold 6000 --handover 0 --set optim.decay_steps=6000 --set flow_optim.decay_steps=6000
