r"""The Fashion-MNIST results table from the evaluations of experiments/fmnist.

  python experiments/fmnist/table.py [WORKDIR_ROOT]   # default workdirs/fmnist

Reads WORKDIR_ROOT/<run>/eval/metrics.json (written by evaluate.sh) for the
runs any_clean, <task>_naive and <task>_flowdiff and prints, per task, the
generation metrics of each prior, the reference rows, the posterior-mean
PSNR/SSIM of flowdiff's flow and the headline number

  gap closed = (FD_naive − FD_flowdiff) / (FD_naive − FD_clean)

on FD-FMNIST: 0 is no better than training on the corrupted data, 1 is as
good as training on clean data. Tasks whose runs are missing are listed as
not run. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys

TASKS = ("denoise", "inpaint", "blur")


def _load(root: str, run: str) -> dict | None:
  path = os.path.join(root, run, "eval", "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def gap_closed(fd_naive: float, fd_flowdiff: float, fd_clean: float) -> float:
  """(FD_naive − FD_flowdiff) / (FD_naive − FD_clean); nan when naive is not worse than clean."""
  denominator = fd_naive - fd_clean
  return (fd_naive - fd_flowdiff) / denominator if denominator > 0 else float("nan")


def _generation_row(label: str, row: dict, steps: int | None) -> str:
  return (f"| {label} | {'' if steps is None else steps} | {row['fd_fmnist']:.2f} | "
          f"{row['kid_fmnist']:.2f} ± {row['kid_fmnist_std']:.2f} | "
          f"{row['pixel_mean_rmse']:.3f} | {row['pixel_cov_rel_error']:.3f} |")


def task_table(task: str, clean: dict, naive: dict | None, flowdiff: dict | None) -> list[str]:
  """Markdown lines for one task: generation rows, posterior rows, the gap closed."""
  if naive is None or flowdiff is None:
    missing = [m for m, r in (("naive", naive), ("flowdiff", flowdiff)) if r is None]
    return [f"### {task}", "", f"Not evaluated yet: {', '.join(missing)}.", ""]
  g = {name: r["generation"] for name, r in
       (("clean", clean), ("naive", naive), ("flowdiff", flowdiff))}
  s = g["naive"]["settings"]
  lines = [f"### {task} (operator `{naive['run']['operator']}`, σ_y = {naive['run']['sigma_y']})",
           "", f"Prior samples: {s['num_samples']}, {s['sampler']} sampler, "
           f"{s['sample_steps']} steps, against {s['num_reference']} clean test images.", "",
           "| prior samples of | step | FD-FMNIST ↓ | KID-FMNIST ↓ | pixel mean RMSE ↓ | "
           "pixel cov. rel. error ↓ |", "|---|---:|---:|---:|---:|---:|"]
  for name in ("clean", "naive", "flowdiff"):
    run = {"clean": clean, "naive": naive, "flowdiff": flowdiff}[name]
    label = {"clean": "clean (oracle: trained on clean images)",
             "naive": "naive (trained on A⁺y)", "flowdiff": "**flowdiff**"}[name]
    lines.append(_generation_row(label, g[name]["rows"]["samples"], run["run"]["step"]))
  refs = g["naive"]["rows"]
  lines.append(_generation_row("*reference:* clean training images", refs["clean_train"], None))
  lines.append(_generation_row("*reference:* A⁺y of the corrupted training images",
                               refs["pinv_train"], None))
  fd = {k: g[k]["rows"]["samples"]["fd_fmnist"] for k in g}
  lines += ["", f"**Gap closed** (FD-FMNIST): "
            f"({fd['naive']:.2f} − {fd['flowdiff']:.2f}) / ({fd['naive']:.2f} − "
            f"{fd['clean']:.2f}) = **{gap_closed(fd['naive'], fd['flowdiff'], fd['clean']):.0%}**",
            ""]
  post = flowdiff.get("posterior")
  if post:
    lines += [f"Posterior recovery by the flow ({post['num_images']} held-out test images, "
              f"mean of {post['num_samples']} flow samples):", "",
              "| estimate | PSNR (dB) ↑ | SSIM ↑ |", "|---|---:|---:|"]
    for key, label in (("posterior_mean", "flowdiff posterior mean"),
                       ("observation", "observation y"), ("pinv", "A⁺y")):
      p, q = post[f"{key}/psnr"], post[f"{key}/ssim"]
      lines.append(f"| {label} | {p['mean']:.2f} ± {p['sem']:.2f} | "
                   f"{q['mean']:.3f} ± {q['sem']:.3f} |")
    lines.append("")
  return lines


def main(root: str) -> str:
  clean = _load(root, "any_clean")
  if clean is None:
    raise SystemExit(f"No {root}/any_clean/eval/metrics.json: run experiments/fmnist/"
                     "evaluate.sh after experiments/fmnist/run.sh.")
  lines = ["## Fashion-MNIST: clean vs naive vs flowdiff", "",
           f"{clean['hardware']}, jax {clean['jax']}. ± is the std over KID subsets, "
           "the standard error over images for PSNR/SSIM. FD-FMNIST and KID-FMNIST use our "
           "Fashion-MNIST classifier's features: they are not FIDs.", ""]
  for task in TASKS:
    lines += task_table(task, clean, _load(root, f"{task}_naive"),
                        _load(root, f"{task}_flowdiff"))
  return "\n".join(lines)


if __name__ == "__main__":
  print(main(sys.argv[1] if len(sys.argv) > 1 else "workdirs/fmnist"))
