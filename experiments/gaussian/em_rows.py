r"""The EM peers on the Gaussian oracle: covariance error against steps and wall time.

  python experiments/gaussian/em_rows.py [--size 4] [--steps 6000] [--lap 500] \
      [--examples 4096] [--out experiments/gaussian]

The data, network family (the exact Gaussian ε-network), optimiser and
measurement are those of run.py's naive/flowdiff rows (`run.make_config`):
4096 corrupted samples of N(μ, Σ), σ_y = 0.2, denoising and masks dropping
half the pixels; every lap, ‖Ĉ − Σ‖_F/‖Σ‖_F of 4000 samples of the EMA prior
(Heun, 100 steps). EM (method "em"): laps of an E-step over all 4096
observations (64 sampler steps; MMPS with 1 CG iteration, Rozet et al.'s
setting, or DPS with step size ζ) and `--lap` DSM updates on its samples.
Lap 0 is started from A⁺y (`em.warm_start="pinv"`, i.e. `naive`), not from the
Gaussian-EM fit, which on this problem would already be the answer (its error
is in the gaussian_em rows). Wall time counts the E-steps and updates, not the
error measurements. Writes em.json to --out.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import make_config

from flowdiff_jax import oracle, step as step_lib
from flowdiff_jax.methods import em

VARIANTS = {"em_mmps": dict(e_step="mmps", cg_iters=1),
            "em_dps_zeta1": dict(e_step="dps", dps_zeta=1.0),
            "em_dps_zeta3": dict(e_step="dps", dps_zeta=3.0)}


def run(variant, operator, args, mu, sigma):
  config = make_config("em", operator, args.steps)
  config.em.update(warm_start="pinv", num_steps=64, steps_per_lap=args.lap, sample_with="ema",
                   **VARIANTS[variant])
  _, data = oracle.corrupted_data(config, mu, sigma, args.examples)
  y, omega = data["y"], data["omega"]
  n = y.shape[0]
  obj = step_lib.make_objective(config, 1)
  state = step_lib.create_train_state(config, jax.random.key(0),
                                      jax.tree.map(lambda a: a[:8], data))
  step_fn = jax.jit(step_lib.train_step, donate_argnums=0)
  solver = em.make_solver(config)
  sample = jax.jit(lambda p, y, omega, k: em.e_step(solver, obj, p, y, omega, k))
  order = np.random.default_rng(0)
  shape = (args.size, args.size, 1)
  curve, wall = [], 0.0
  for lap in range(args.steps // args.lap):
    start = time.time()
    if lap == 0:
      samples = obj.operator.pinv(y, omega)
    else:
      samples = sample(state.ema_params["score"], y, omega, em.lap_keys(0, lap, jnp.arange(n)))
    for _ in range(args.lap):
      batch = {em.SAMPLES_KEY: samples[order.integers(0, n, config.training.batch_size)]}
      state, _ = step_fn(state, batch, jax.random.key(1))
    jax.block_until_ready(state.params)
    wall += time.time() - start
    err = oracle.relative_error(oracle.prior_covariance(state, shape), sigma)
    step = (lap + 1) * args.lap
    curve.append((step, round(wall, 1), err))
    print(f"{operator:15s} {variant:13s} step {step:6d} ({wall:6.1f} s): covariance error "
          f"{err:.3f}", flush=True)
  return curve


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=4)
  parser.add_argument("--steps", type=int, default=6000)
  parser.add_argument("--lap", type=int, default=500)
  parser.add_argument("--examples", type=int, default=4096)
  parser.add_argument("--operators", default="denoise,inpaint_random")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  mu, sigma = oracle.gaussian_problem(args.size)
  results = {"args": {**vars(args), "out": os.path.relpath(args.out)},
             "curves": {}, "columns": ["step", "wall_s", "covariance_error"],
             "hardware": f"{os.cpu_count()}-core CPU, jax {jax.__version__}",
             "date": time.strftime("%Y-%m-%d")}
  for operator in args.operators.split(","):
    for variant in args.variants.split(","):
      results["curves"][f"{operator}/{variant}"] = run(variant, operator, args, mu, sigma)
      with open(os.path.join(args.out, "em.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
