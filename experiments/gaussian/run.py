r"""The Gaussian oracle at a larger size than CI's: covariance error over training.

  python experiments/gaussian/run.py [--size 6] [--steps 4000] [--every 250] \
      [--operators denoise,inpaint_random] [--out experiments/gaussian]

For each operator, trains `naive` and `flowdiff` with the exact Gaussian
ε-network (model.name="gaussian") on the same corrupted samples of N(μ, Σ)
(size×size×1 images, σ_y = 0.2; inpainting drops half the pixels), and every
`--every` steps measures ‖Ĉ − Σ‖_F/‖Σ‖_F of 4000 samples of the EMA prior
(Heun, 100 steps). Writes results.json and covariance_error.png to --out.
"""

import argparse
import json
import os
import time

import jax
import numpy as np

from flowdiff_jax import oracle, step as step_lib
from flowdiff_jax.configs import default


def make_config(method: str, operator: str, steps: int):
  config = default.get_config()
  config.method = method
  config.model.name = "gaussian"
  config.operator.update(name=operator, sigma_y=0.2, drop_prob=0.5)
  config.flow.update(num_levels=1, num_steps=4, hidden_channels=32, cond_channels=16)
  config.flow_optim.update(learning_rate=2e-3, warmup_steps=100, grad_clip_norm=0.0)
  config.optim.update(learning_rate=3e-3, warmup_steps=100, grad_clip_norm=0.0, ema_decay=0.99)
  config.amortized.update(num_time_samples=4, beta_prior_warmup_steps=steps // 4)
  config.training.update(batch_size=64, num_train_steps=steps)
  return config


def run(method, operator, args, mu, sigma):
  config = make_config(method, operator, args.steps)
  _, data = oracle.corrupted_data(config, mu, sigma, args.examples)
  n = data["y"].shape[0]
  order = np.random.default_rng(0)
  take = lambda idx: jax.tree.map(lambda a: a[idx], data)
  state = step_lib.create_train_state(config, jax.random.key(0), take(np.arange(256)))
  step_fn = jax.jit(step_lib.train_step, donate_argnums=0)
  rng = jax.random.key(1)
  shape = (args.size, args.size, 1)
  curve = []
  for i in range(1, args.steps + 1):
    state, _ = step_fn(state, take(order.integers(0, n, config.training.batch_size)), rng)
    if i % args.every == 0:
      err = oracle.relative_error(oracle.prior_covariance(state, shape), sigma)
      curve.append((i, err))
      print(f"{operator:15s} {method:9s} step {i:6d}: covariance error {err:.3f}", flush=True)
  return curve


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=6)
  parser.add_argument("--steps", type=int, default=4000)
  parser.add_argument("--every", type=int, default=250)
  parser.add_argument("--examples", type=int, default=8192)
  parser.add_argument("--operators", default="denoise,inpaint_random")
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  mu, sigma = oracle.gaussian_problem(args.size)
  # Paths relative to the working directory, not this machine's absolute ones.
  results = {"args": {**vars(args), "out": os.path.relpath(args.out)}, "curves": {},
             "wall_s": {}}
  for operator in args.operators.split(","):
    for method in ("naive", "flowdiff"):
      start = time.time()
      results["curves"][f"{operator}/{method}"] = run(method, operator, args, mu, sigma)
      results["wall_s"][f"{operator}/{method}"] = round(time.time() - start, 1)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  operators = args.operators.split(",")
  fig, axes = plt.subplots(1, len(operators), figsize=(5 * len(operators), 3.6), squeeze=False)
  for ax, operator in zip(axes[0], operators):
    for method in ("naive", "flowdiff"):
      steps, errs = zip(*results["curves"][f"{operator}/{method}"])
      ax.plot(steps, errs, marker="o", ms=3, label=method)
    ax.set(title=f"{operator}, {args.size}x{args.size}, σ_y = 0.2", xlabel="step",
           ylabel="‖Ĉ − Σ‖_F / ‖Σ‖_F", ylim=(0, None))
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "covariance_error.png"), dpi=120)


if __name__ == "__main__":
  main()
