r"""The classical restorers on the Fashion-MNIST test observations: the rows to beat.

  python experiments/fmnist/classical.py [--num_test 256] [--num_tune 32] \
      [--out experiments/fmnist/results.json]

For each task the test observations are the ones the project's evaluation
restores (`observations.corrupt`: each config's operator and corruption seed).
Each restorer is scikit-image's, given the true operator and σ_y, its one
parameter tuned by grid search for mean PSNR on the --num_tune test images
that follow the evaluated ones (never on the evaluated ones):

* denoise: total variation (`denoise_tv_chambolle`, weight tuned); the
  Gaussian posterior mean with the closed-form MLE of the noisy images
  (`gaussian_em.denoise_mle`: Wiener filtering with N(ȳ, C_y − σ_y² I)).
* inpaint: biharmonic inpainting of the dropped pixels (`inpaint_biharmonic`,
  no parameter).
* blur: Wiener deconvolution with the true kernel (`wiener`, balance tuned);
  the project's Tikhonov pseudo-inverse A⁺y (`op.pinv`, as configured).

PSNR is the mean over images of the per-image PSNR on the [-1, 1] scale
(peak-to-peak 2), as `flowdiff_jax.evaluate` reports it; ± the standard error
over images. Writes {"classical": {task: {name: psnr}}} into --out (keeps the
file's other keys) and a detailed classical.json beside this script.
"""

import argparse
import datetime
import json
import os
import sys
import time

import jax
import numpy as np
from skimage import restoration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from observations import CONFIGS, corrupt, load, task_operator

from flowdiff_jax import evaluation, gaussian_em, reporting

HERE = os.path.dirname(os.path.abspath(__file__))


def _to01(a) -> np.ndarray:
  return (np.asarray(a, np.float64) + 1.0) / 2.0


def _from01(a) -> np.ndarray:
  return np.asarray(a, np.float32) * 2.0 - 1.0


def _psnr(restored: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Per-image PSNR [N] on the [-1, 1] scale."""
  return np.asarray(evaluation.psnr(restored, x))


def _per_image(fn, y: np.ndarray, *extra) -> np.ndarray:
  """fn applied to each [H, W] image of y [N, H, W, 1] (in [0, 1]), back to [-1, 1] [N, H, W, 1]."""
  out = [fn(_to01(y[i, ..., 0]), *(e[i] for e in extra)) for i in range(y.shape[0])]
  return _from01(np.stack(out)[..., None])


def _tuned(name: str, restore, grid, y_tune, x_tune, tune_extra=()):
  """(best parameter, its tuning PSNR) of restore(y, param, *extra) over grid."""
  scores = [float(np.mean(_psnr(restore(y_tune, p, *tune_extra), x_tune))) for p in grid]
  best = int(np.argmax(scores))
  print(f"  {name}: tuning PSNR { {p: round(s, 2) for p, s in zip(grid, scores)}} -> {grid[best]}",
        flush=True)
  if best in (0, len(grid) - 1):
    print(f"  warning: {name}'s best parameter is at the edge of its grid", flush=True)
  return grid[best]


def restorers(task: str, op, sigma_y: float, y_train_moments):
  """{name: (restore(y [N,H,W,1], param, omega_mask?) -> [N,H,W,1], grid or None)} of a task."""
  if task == "denoise":
    tv = lambda y, w, *_: _per_image(lambda im: restoration.denoise_tv_chambolle(im, weight=w), y)
    fit = gaussian_em.denoise_mle(y_train_moments, sigma_y)
    wiener_mle = lambda y, _p, *_: np.asarray(gaussian_em.posterior_mean(fit, op, y, {}))
    return {"tv_chambolle": (tv, [0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3]),
            "gaussian_mle_wiener": (wiener_mle, None)}
  if task == "inpaint":
    def biharmonic(y, _p, mask):
      return _per_image(lambda im, m: restoration.inpaint_biharmonic(im, m[..., 0] < 0.5),
                        y, mask)
    return {"biharmonic": (biharmonic, None)}
  if task == "blur":
    psf = np.asarray(op.kernel(), np.float64)
    wiener = lambda y, b, *_: _per_image(
        lambda im: restoration.wiener(im, psf, balance=b, clip=False), y)
    pinv = lambda y, _p, *_: np.asarray(op.pinv(y, {}))
    return {"wiener": (wiener, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]),
            "tikhonov_pinv": (pinv, None)}
  raise ValueError(task)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", default="denoise,inpaint,blur")
  parser.add_argument("--num_test", type=int, default=256)
  parser.add_argument("--num_tune", type=int, default=32)
  parser.add_argument("--num_train_moments", type=int, default=60_000,
                      help="noisy training images for the denoising Gaussian MLE")
  parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
  args = parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  start = time.time()
  summary, detail = {}, {}
  for task in args.tasks.split(","):
    assert task in CONFIGS, task
    op, seed = task_operator(task)
    sigma_y = float(op.sigma_y)
    n = args.num_test
    x_all = load("test", n + args.num_tune)
    y_all, omega = corrupt(op, x_all, seed)
    x_all, y_all = np.asarray(x_all), np.asarray(y_all)
    mask = np.asarray(omega["mask"]) if "mask" in omega else None
    extra = lambda sl, mask=mask: () if mask is None else (mask[sl],)
    test, tune = slice(0, n), slice(n, n + args.num_tune)
    moments = None
    if task == "denoise":
      y_train, _ = corrupt(op, load("train", args.num_train_moments), seed)
      moments = y_train
    print(f"{task}: {op}", flush=True)
    summary[task], detail[task] = {}, {}
    for name, (restore, grid) in restorers(task, op, sigma_y, moments).items():
      param = None if grid is None else _tuned(name, restore, grid, y_all[tune], x_all[tune],
                                              extra(tune))
      t0 = time.time()
      psnr = _psnr(restore(y_all[test], param, *extra(test)), x_all[test])
      stats = reporting.mean_sem(psnr)
      print(f"  {name}: {stats['mean']:.2f} ± {stats['sem']:.2f} dB "
            f"(param {param}, {time.time() - t0:.1f} s)", flush=True)
      summary[task][name] = round(stats["mean"], 3)
      detail[task][name] = dict(psnr=stats, param=param, grid=grid)
  meta = dict(date=datetime.date.today().isoformat(), hardware=reporting.hardware(),
              command=" ".join(["python", *sys.argv]), wall_s=round(time.time() - start, 1),
              num_test=args.num_test, num_tune=args.num_tune,
              tuned_on=f"test images {args.num_test}..{args.num_test + args.num_tune - 1}")
  with open(os.path.join(HERE, "classical.json"), "w") as f:
    json.dump(dict(meta, results=detail), f, indent=1)
  results = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f)
  results.setdefault("classical", {}).update(summary)
  results.setdefault("classical_settings", {}).update(meta)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
