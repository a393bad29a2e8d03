r"""The `gaussian_em` rows of the Gaussian oracle: EM's covariance error on run.py's data.

  python experiments/gaussian/gaussian_em_rows.py [--size 4] [--examples 4096] \
      [--operators denoise,inpaint_random,blur]

The same corrupted samples of N(μ, Σ) as run.py (its make_config: σ_y = 0.2,
half the pixels dropped, the data seed), fitted by exact EM with a dense Σ
from the observations alone (`flowdiff_jax.gaussian_em.fit`, Σ₀ = I). For
each number of EM iterations: ‖Σ̂ − Σ‖_F/‖Σ‖_F (the README's metric, but
of the fitted Σ̂ itself, not of prior samples), the wall time of the fit,
and the floor: the same error of the sample covariance of the *clean* x.
The blur rows use a 3×3 kernel of std 1 (the 9×9 of the Fashion-MNIST
configs does not fit a 4×4 image). Writes gaussian_em.json beside this file.
"""

import argparse
import datetime
import json
import os
import sys
import time

import jax
import numpy as np

from flowdiff_jax import gaussian_em, operators, oracle, reporting

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import make_config

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=4)
  parser.add_argument("--examples", type=int, default=4096)
  parser.add_argument("--operators", default="denoise,inpaint_random,blur")
  parser.add_argument("--iters", default="1,2,4,8,16,32,64")
  args = parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  mu, sigma = oracle.gaussian_problem(args.size)
  rows = {}
  for name in args.operators.split(","):
    config = make_config("naive", name, 1)
    if name == "blur":
      config.operator.update(kernel_size=3, kernel_std=1.0)
    x, data = oracle.corrupted_data(config, mu, sigma, args.examples)
    op = operators.make_operator(config.operator)
    floor = oracle.relative_error(
        np.cov(np.asarray(x, np.float64).reshape(args.examples, -1).T), sigma)
    pinv = np.asarray(op.pinv(data["y"], data["omega"]), np.float64)
    naive_cov = oracle.relative_error(np.cov(pinv.reshape(args.examples, -1).T), sigma)
    curve = []
    for iters in map(int, args.iters.split(",")):
      start = time.time()
      fit = gaussian_em.fit(op, data["y"], data["omega"], num_iters=iters, final_loglik=False)
      err = oracle.relative_error(np.asarray(fit.covariance(), np.float64), sigma)
      curve.append(dict(iters=iters, covariance_error=round(err, 4),
                        wall_s=round(time.time() - start, 2)))
      print(f"{name:15s} EM {iters:3d} iterations: covariance error {err:.3f} "
            f"(clean-sample floor {floor:.3f}, cov of A⁺y {naive_cov:.3f})", flush=True)
    rows[name] = dict(operator=repr(op), curve=curve, clean_sample_floor=round(floor, 4),
                      pinv_sample_covariance_error=round(naive_cov, 4))
  out = dict(date=datetime.date.today().isoformat(), hardware=reporting.hardware(),
             command=" ".join(["python", *sys.argv]), args=vars(args), rows=rows)
  with open(os.path.join(HERE, "gaussian_em.json"), "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
