r"""Rows without a learned prior for the downstream table: classical restorers and gaussian_em.

  python experiments/inverse/classical.py [--num_images 32] [--out experiments/inverse/results]

On the inverse problems of `flowdiff_jax.inverse.TASKS`, the same test images
(0 … num_images − 1) and corruptions (`inverse.CORRUPTION_SEED`) as
experiments/inverse/run.sh, two kinds of rows that `inverse --collect` puts
beside the diffusion priors:

* label "classical": scikit-image's restorers of experiments/fmnist/classical.py
  (TV and the denoising Gaussian MLE; biharmonic inpainting; Wiener and the
  Tikhonov pseudo-inverse), each with the parameter experiments/fmnist/classical.json
  chose on test images 256-287 (never the ones scored here; the tasks'
  operators are those configs', which tests/test_inverse.py checks).
* label "gaussian_em": the Gaussian prior N(μ̂, Σ̂) fitted by EM to the noisy
  training images alone (the data the learned priors of run.sh's denoising
  runs saw; configs/fmnist_noise.py's warm-start settings), used as a prior
  for every task: its exact posterior mean E[x | y] (row posterior_mean) and
  one exact posterior sample (row posterior_sample).

Writes OUT/<label>/<task>/metrics.json and metrics.md in `inverse`'s report
format, then run `python -m flowdiff_jax.inverse --collect=OUT --output_dir=OUT`.
"""

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FMNIST_DIR = os.path.join(HERE, "..", "fmnist")
sys.path.insert(0, FMNIST_DIR)
import classical as fmnist_classical  # noqa: E402 (experiments/fmnist/classical.py)
from observations import corrupt, load  # noqa: E402

from flowdiff_jax import evaluation, gaussian_em, inverse, reporting  # noqa: E402
from flowdiff_jax.configs import fmnist_noise  # noqa: E402

# The inverse task of each experiments/fmnist task, whose restorers apply.
FMNIST_TASK = {"denoise": "denoise", "inpaint": "inpaint", "deblur": "blur"}


def _scores(restored, x) -> dict:
  """{"psnr": [N], "ssim": [N]} per image, as `inverse.evaluate_task` scores."""
  restored, x = jnp.asarray(restored, jnp.float32), jnp.asarray(x, jnp.float32)
  return {"psnr": np.asarray(evaluation.psnr(restored, x)).tolist(),
          "ssim": np.asarray(evaluation.ssim(restored, x)).tolist()}


def _report(label: str, task: str, op, args, per_image: dict, wall: dict, settings: dict,
            command: str) -> dict:
  rows = {}
  for name, per in per_image.items():
    rows[name] = {"psnr": reporting.mean_sem(per["psnr"]), "ssim": reporting.mean_sem(per["ssim"])}
    if name in wall:
      rows[name]["wall_s"] = wall[name]
    if name in settings:
      rows[name]["settings"] = settings[name]
  return {"workdir": None, "label": label, "checkpoint_step": None, "prior_method": label,
          "task": task, "operator": {"name": op.name, **dataclasses.asdict(op)},
          "num_images": args.num_images, "first_image": 0, "batch_size": args.num_images,
          "corruption_seed": inverse.CORRUPTION_SEED, "seed": 0, "rows": rows,
          "per_image": per_image, "hardware": reporting.hardware(),
          "date": datetime.date.today().isoformat(), "command": command}


def _markdown(report: dict) -> str:
  lines = [f"# {report['task']}: {report['label']} (no learned prior)", "",
           f"Operator {report['operator']}; {report['num_images']} test images from index 0, "
           f"corruption seed {report['corruption_seed']}.", "",
           "| method | PSNR (dB) ↑ | SSIM ↑ | wall (s) | settings |", "|---|---:|---:|---:|---|"]
  for name, row in report["rows"].items():
    wall = f"{row['wall_s']:.1f}" if "wall_s" in row else ""
    lines.append(f"| {name} | {row['psnr']['mean']:.2f} ± {row['psnr']['sem']:.2f} | "
                 f"{row['ssim']['mean']:.3f} ± {row['ssim']['sem']:.3f} | {wall} | "
                 f"{json.dumps(row.get('settings', {}))} |")
  lines += ["", f"{report['hardware']}, {report['date']}. Command: `{report['command']}`", ""]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=32)
  parser.add_argument("--num_train", type=int, default=60_000,
                      help="noisy training images the Gaussian is fitted to")
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  args = parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  command = " ".join(["python", *sys.argv])
  with open(os.path.join(FMNIST_DIR, "classical.json")) as f:
    tuned = json.load(f)["results"]

  # The Gaussian prior: fitted to the noisy training images of the denoising
  # protocol (configs/fmnist_noise.py: operator, corruption seed, EM settings).
  cfg = fmnist_noise.get_config()
  noise_op = inverse.task_operator("denoise")
  start = time.time()
  y_train, omega_train = corrupt(noise_op, load("train", args.num_train),
                                 cfg.data.corruption_seed)
  gem = cfg.gaussian_em
  fit = gaussian_em.fit(noise_op, y_train, omega_train, rank=gem.rank or None,
                        num_iters=gem.num_iters, init_var=gem.init_var,
                        batch_size=gem.batch_size)
  fit_s = time.time() - start
  print(f"gaussian_em: fitted to {args.num_train} noisy training images in {fit_s:.1f} s",
        flush=True)

  x = load("test", args.num_images)
  for task in inverse.TASKS:
    op = inverse.task_operator(task)
    y, omega = corrupt(op, x, inverse.CORRUPTION_SEED)
    observation = _scores(op.pinv(y, omega), x)
    fm_task = FMNIST_TASK[task]
    moments = y_train if fm_task == "denoise" else None  # the same operator and seed
    mask = np.asarray(omega["mask"]) if "mask" in omega else None
    extra = () if mask is None else (mask,)
    per, wall, settings = {"observation": observation}, {}, {}
    for name, (restore, _grid) in fmnist_classical.restorers(
        fm_task, op, float(op.sigma_y), moments).items():
      param = tuned[fm_task][name]["param"]
      t0 = time.time()
      per[name] = _scores(restore(np.asarray(y), param, *extra), x)
      wall[name], settings[name] = time.time() - t0, {"param": param}
    report = _report("classical", task, op, args, per, wall, settings, command)
    reporting.write_report(os.path.join(args.out, "classical", task), report, _markdown(report))

    t0 = time.time()
    mean = jax.block_until_ready(gaussian_em.posterior_mean(fit, op, y, omega))
    mean_s = time.time() - t0
    sample = gaussian_em.posterior_sample(fit, op, y, omega, jax.random.key(0))
    per = {"observation": observation, "posterior_mean": _scores(mean, x),
           "posterior_sample": _scores(sample, x)}
    fit_settings = {"rank": gem.rank, "num_iters": gem.num_iters, "init_var": gem.init_var,
                    "fitted_to": f"{args.num_train} noisy training images (sigma_y "
                                 f"{float(noise_op.sigma_y)})", "fit_s": round(fit_s, 1)}
    report = _report("gaussian_em", task, op, args, per, {"posterior_mean": mean_s},
                     {"posterior_mean": fit_settings}, command)
    reporting.write_report(os.path.join(args.out, "gaussian_em", task), report,
                           _markdown(report))
    print(f"{task}: " + ", ".join(
        f"{k} {np.mean(v['psnr']):.2f} dB" for k, v in per.items()), flush=True)


if __name__ == "__main__":
  main()
