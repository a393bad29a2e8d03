r"""A Gaussian prior fitted by EM to Fashion-MNIST *observations*, as a restorer.

  python experiments/gaussian_em/run.py --task denoise|inpaint|blur [--num_train 60000] \
      [--rank 64] [--iters 16] [--out experiments/gaussian_em/results.json] [--name NAME]

Corrupts the training images exactly as training does (each config's operator,
`operators.corrupt` with the example's dataset index and data.corruption_seed),
fits N(μ, Σ) to the observations only (`flowdiff_jax.gaussian_em.fit`; --rank 0
means a dense Σ), then restores the first --num_test test images, corrupted as
the project's evaluation corrupts held-out images (their own indices, same
seed), by the posterior mean. PSNR is the mean over images of the per-image
PSNR on the [-1, 1] scale (peak-to-peak 2), as in flowdiff_jax/evaluate.py.
Prints and merges {name: {psnr_posterior_mean, psnr_observation, wall_fit_s,
settings, ...}} into --out (name defaults to the task).
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from flowdiff_jax import evaluation, gaussian_em, operators
from flowdiff_jax.models import classifier

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fmnist"))
from observations import CONFIGS, corrupt, load, task_operator


def posterior_calibration(fit, op, y, omega, x, mean, num_samples: int, seed: int) -> dict:
  """Residual ratio of exact posterior draws, and how often the error is within k stds.

  coverage_k: the fraction of pixels with |E[x | y] − x| ≤ k · std[x | y], the
  std from num_samples draws (for a calibrated Gaussian posterior 0.683 and
  0.954); residual_ratio: `operators.residual_ratio` of the draws (≈ 1).
  """
  keys = jax.random.split(jax.random.key(seed + 1), num_samples)
  draws = jnp.stack([gaussian_em.posterior_sample(fit, op, y, omega, k) for k in keys])
  std = jnp.std(draws, axis=0)
  err = jnp.abs(mean - x)
  return dict(
      residual_ratio=round(float(jnp.mean(operators.residual_ratio(op, y, omega, draws))), 4),
      coverage_1std=round(float(jnp.mean(err <= std)), 4),
      coverage_2std=round(float(jnp.mean(err <= 2 * std)), 4),
      posterior_std=round(float(jnp.mean(std)), 4))


def prior_fd(fit, num_samples: int, num_reference: int, seed: int) -> dict:
  """FD-FMNIST of num_samples prior draws against the first num_reference clean test images.

  As `flowdiff_jax.evaluate` computes it: 8-bit images, the committed
  Fashion-MNIST classifier's features (experiments/fmnist_classifier).
  """
  feature_fn = classifier.make_feature_fn(classifier.load_params())
  features = lambda images: evaluation.extract_features(
      feature_fn, evaluation.quantize(images), 250)
  reference = features(load("test", num_reference))
  samples = gaussian_em.sample(fit, jax.random.key(seed + 2), num_samples)
  return dict(fd_fmnist=round(evaluation.frechet_distance_of_features(features(samples),
                                                                      reference), 2),
              fd_num_samples=num_samples, fd_num_reference=num_reference)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--task", choices=sorted(CONFIGS), required=True)
  parser.add_argument("--num_train", type=int, default=60_000)
  parser.add_argument("--num_test", type=int, default=256)
  parser.add_argument("--first_test", type=int, default=0,
                      help="first test image restored; 256: the classical restorers' tuning images")
  parser.add_argument("--rank", type=int, default=64, help="0: dense Σ")
  parser.add_argument("--iters", type=int, default=16)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--init_mean", default="pinv", choices=("pinv", "zero"))
  parser.add_argument("--init_var", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_posterior_samples", type=int, default=16,
                      help="exact posterior draws per test image, for std, coverage, residual")
  parser.add_argument("--num_samples", type=int, default=500,
                      help="prior samples for FD-FMNIST (0: skip), as in experiments/fmnist")
  parser.add_argument("--num_reference", type=int, default=1000,
                      help="clean test images FD-FMNIST compares with")
  parser.add_argument("--name", default=None, help="key in --out; default the task")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results.json"))
  args = parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)

  op, seed = task_operator(args.task)
  print(f"{args.task}: {op}, corruption seed {seed}, devices {jax.devices()}", flush=True)
  y, omega = corrupt(op, load("train", args.num_train), seed)
  jax.block_until_ready(y)

  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rank = args.rank or None
  start = time.time()
  fit = gaussian_em.fit(op, y, omega, num_iters=args.iters, rank=rank,
                        init_mean=args.init_mean, init_var=args.init_var,
                        batch_size=args.batch_size, mesh=mesh, seed=args.seed, verbose=True)
  jax.block_until_ready(fit.mean)
  wall = time.time() - start
  del y, omega

  x_test = load("test", args.num_test, first=args.first_test)
  y_test, omega_test = corrupt(op, x_test, seed, first=args.first_test)
  restored = gaussian_em.posterior_mean(fit, op, y_test, omega_test)
  psnr_post = float(jnp.mean(evaluation.psnr(restored, x_test)))
  psnr_obs = float(jnp.mean(evaluation.psnr(op.pinv(y_test, omega_test), x_test)))
  calibration = posterior_calibration(fit, op, y_test, omega_test, x_test, restored,
                                      args.num_posterior_samples, args.seed)
  generation = {} if not args.num_samples else prior_fd(fit, args.num_samples,
                                                        args.num_reference, args.seed)
  ll = fit.loglik / args.num_train
  result = dict(
      psnr_posterior_mean=round(psnr_post, 3), psnr_observation=round(psnr_obs, 3),
      wall_fit_s=round(wall, 1), **calibration, **generation,
      loglik_per_example=[round(float(v), 4) for v in ll],
      settings=dict(operator=repr(op), num_train=args.num_train, num_test=args.num_test,
                    first_test=args.first_test,
                    rank=rank, iters=args.iters, batch_size=args.batch_size,
                    init_mean=args.init_mean, init_var=args.init_var, seed=args.seed,
                    corruption_seed=seed, devices=jax.device_count(),
                    jax=jax.__version__))
  name = args.name or args.task
  print(json.dumps({name: {k: v for k, v in result.items() if k != "loglik_per_example"}}),
        flush=True)
  results = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f)
  results[name] = result
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
