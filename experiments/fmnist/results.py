r"""experiments/fmnist/results.json and results.md: every method's row, machine-readable.

  python experiments/fmnist/results.py [WORKDIR_ROOT]   # default workdirs/fmnist

Schema (issue 17): {"tasks": {task: {method: {"fd_fmnist", "psnr_posterior_mean",
"wall_s", "source", ...}}}, "classical": {task: {name: psnr}}}, method keys
being `config.method` names (a variant gets its own key). Sources:

* clean / naive / flowdiff_no_warm_start: run.sh's runs (flowdiff with the flow
  base A⁺y, before the configs defaulted to the warm start):
  WORKDIR_ROOT/<run>/eval/metrics.json (written by evaluate.sh) when the
  workdirs are there; otherwise the numbers of table.md, which `table.py`
  printed from those workdirs on 2026-11-29 (the workdirs are not in the
  repository), marked with their source.
* gaussian_em: experiments/gaussian_em/results.json (its run_all.sh), the row
  named after the task.
* flowdiff: the Fashion-MNIST configs' default (since 2026-12-06): the
  Gaussian-EM warm start with entropy annealing and flow lr 1e-3,
  experiments/fmnist/warm_start/<task>_flowdiff_warm_entanneal_flr1e3/metrics.json
  (run_warm.sh's SUFFIX=_entanneal_flr1e3 runs). flowdiff_ema: the same run's
  posterior drawn with the EMA of the flow params (evaluate
  --posterior_params=ema), its posterior_ema.json / posterior_ema64.json.
  flowdiff_beta_ent_constant:
  the warm start with constant β_ent = 1 and flow lr 5e-4 (the default from
  2026-12-02 to 12-06): warm_start/<task>_flowdiff_warm/metrics.json, the
  evaluation of run_warm.sh's plain runs copied from their workdirs (with
  wall_times.txt); the other warm_start/<task>_flowdiff_warm_<variant>/ rows
  (flowdiff_<variant>) change that run by their FLAGS.
  flowdiff_6000 / flowdiff_4000: flowdiff_beta_ent_constant trained 6000
  (denoise, blur) / 4000 (inpaint) steps (STEPS=... run_warm.sh;
  warm_start/<task>_flowdiff_warm_<steps>/), about the wall time of the em_mmps
  rows on this machine. flowdiff_handover: run_warm.sh's runs with the prior
  hand-over (HANDOVER="500 1000"), in warm_start/<task>_flowdiff_handover/.
* em_mmps / em_dps: experiments/fmnist/em/<task>_em_<e_step>/metrics.json
  (the evaluation of run_em.sh's runs) and inverse.json (the E-step's
  sampler restoring the first 64 test observations under the final prior),
  copied from their workdirs, with em/wall_times.txt. The flowdiff_beta_ent_constant row's
  one-sample PSNR and images/s on the same 64 images come from
  warm_start/<task>_flowdiff_warm/inverse.json (its flow_sample row).
* clean_6000 / naive_6000: experiments/fmnist/long/<run>/metrics.json, run.sh's
  runs with STEPS=6000 (any_clean_6000, <task>_naive_6000) evaluated as
  evaluate.sh does, with long/wall_times.txt. A row whose key ends in _<steps>
  measures its gap closed against the naive and clean rows of those steps when
  they exist ("gap_against" names them).
* clean_cosine / naive_cosine / flowdiff_cosine[_<variant>]: the 2000-step runs
  of run.sh / run_warm.sh with DECAY=1 (both learning rates decayed by a
  cosine to 0 at the last step; a variant adds run_warm.sh's FLAGS, named by
  its SUFFIX), evaluated as evaluate.sh does and copied to
  experiments/fmnist/cosine/<run>/ with cosine/wall_times.txt; their gap is
  measured against clean_cosine and naive_cosine (the same schedule).
* clean_tweedie / naive_tweedie / flowdiff_tweedie (denoising): E[x | y] under
  the run's own diffusion prior by Tweedie's formula (one network pass; exact for
  A = I), the "tweedie" row of `python -m flowdiff_jax.inverse --task=denoise
  --solvers= --num_images=256` copied to tweedie/<run>.json; the same number
  for other warm-start runs is their psnr_prior_tweedie (evaluate's
  prior_tweedie row, posterior_tweedie.json in their folder).
* flowdiff_10000 / naive_10000: the 5×-longer pair on blur (the task whose gap
  closes least): run_warm.sh STEPS=10000 with the default's FLAGS/SUFFIX, run.sh
  STEPS=10000 METHODS=naive (warm_start/blur_flowdiff_warm_entanneal_flr1e3_10000/,
  long/blur_naive_10000/).
* classical: experiments/fmnist/classical.json (classical.py).

Standard library only.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from table import gap_closed  # noqa: E402 (the table's headline number, defined once)

TASKS = ("denoise", "inpaint", "blur")
TRAINED = ("clean", "naive", "flowdiff")
TABLE_MD = os.path.join(HERE, "table.md")
GAUSSIAN_EM = os.path.join(HERE, "..", "gaussian_em", "results.json")
CLASSICAL = os.path.join(HERE, "classical.json")


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _from_workdirs(root: str, task: str) -> dict:
  rows = {}
  for method in TRAINED:
    run = "any_clean" if method == "clean" else f"{task}_{method}"
    m = _read_json(os.path.join(root, run, "eval", "metrics.json"))
    if m is None:
      continue
    post = (m.get("posterior") or {}).get("posterior_mean/psnr")
    rows[method] = dict(fd_fmnist=m["generation"]["rows"]["samples"]["fd_fmnist"],
                        psnr_posterior_mean=None if post is None else post["mean"],
                        wall_s=None, steps=m["run"]["step"],
                        source=os.path.join(root, run, "eval", "metrics.json"))
  return rows


def _from_table_md(task: str) -> dict:
  """The rows of table.md's section for `task` (FD-FMNIST and the flow's posterior PSNR)."""
  with open(TABLE_MD) as f:
    text = f.read()
  section = re.search(rf"### {task} .*?(?=\n### |\Z)", text, re.S).group(0)
  rows = {}
  patterns = {"clean": r"\| clean \(oracle[^|]*\| (\d+) \| ([\d.]+) \|",
              "naive": r"\| naive \([^|]*\| (\d+) \| ([\d.]+) \|",
              "flowdiff": r"\| \*\*flowdiff\*\* \| (\d+) \| ([\d.]+) \|"}
  for method, pattern in patterns.items():
    found = re.search(pattern, section)
    if found:
      rows[method] = dict(fd_fmnist=float(found.group(2)), psnr_posterior_mean=None,
                          wall_s=None, steps=int(found.group(1)),
                          source="experiments/fmnist/table.md (runs of 2026-11-28/29)")
  post = re.search(r"\| flowdiff posterior mean \| ([\d.]+) ±", section)
  if post and "flowdiff" in rows:
    rows["flowdiff"]["psnr_posterior_mean"] = float(post.group(1))
  return rows


def _wall_times(path: str) -> dict[str, int]:
  """{"<task> <method>": seconds} from a wall_times.txt of run.sh / run_warm.sh."""
  out = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        found = re.match(r"(\w+ \w+): (\d+) s", line.strip())
        if found:
          out[found.group(1)] = int(found.group(2))
  return out


def _posterior_fields(post: dict) -> dict:
  """The row fields of an evaluation's "posterior" section (None where absent)."""
  get = lambda key: post[key]["mean"] if key in post else None
  return dict(psnr_posterior_mean=get("posterior_mean/psnr"),
              psnr_flow_base=get("flow_base/psnr"), residual_ratio=get("residual_ratio"),
              coverage_1std=get("coverage_1std"), coverage_2std=get("coverage_2std"))


def _warm_start_row(task: str, steps: int = 2000, name: str = "flowdiff_warm",
                    folder: str = "warm_start") -> dict | None:
  """run_warm.sh's run of `steps` training steps (named with the steps unless 2000);
  name "flowdiff_handover" for its runs with HANDOVER=..., "flowdiff_warm_cosine"
  (folder "cosine") for those with DECAY=1."""
  folder = os.path.join(HERE, folder)
  run = name if steps == 2000 else f"{name}_{steps}"
  m = _read_json(os.path.join(folder, f"{task}_{run}", "metrics.json"))
  if m is None:
    return None
  row = dict(fd_fmnist=m["generation"]["rows"]["samples"]["fd_fmnist"],
             **_posterior_fields(m["posterior"]),
             wall_s=_wall_times(os.path.join(folder, "wall_times.txt")).get(
                 f"{task} {run}"),
             steps=m["run"]["step"],
             source=os.path.relpath(os.path.join(folder, f"{task}_{run}", "metrics.json"),
                                    os.path.join(HERE, "..", "..")))
  # The posterior mean of 64 flow samples instead of 16 (evaluate --num_samples=0
  # --posterior_samples=64), where it was run: its metrics.json, copied as posterior64.json.
  p64 = _read_json(os.path.join(folder, f"{task}_{run}", "posterior64.json"))
  if p64 is not None:
    row["psnr_posterior_mean_64"] = p64["posterior"]["posterior_mean/psnr"]["mean"]
  # Denoising: the diffusion prior's own E[x | y] (Tweedie, one pass) on the same 256
  # images, from a later posterior-only evaluation copied as posterior_tweedie.json.
  tw = _read_json(os.path.join(folder, f"{task}_{run}", "posterior_tweedie.json"))
  if tw is not None:
    row["psnr_prior_tweedie"] = tw["posterior"]["prior_tweedie/psnr"]["mean"]
  # The flow's amortized sample on the 64 test images of the em rows' sampler.
  flow = _inverse_rows(os.path.join(folder, f"{task}_{run}", "inverse.json")) or {}
  if "flow_sample" in flow:
    row["psnr_posterior_sample_64"] = flow["flow_sample"]["psnr"]
    row["posterior_images_per_s"] = flow["flow_sample"]["images_per_s"]
  return row


def _ema_row(task: str, flowdiff: dict) -> dict | None:
  """The `flowdiff` run's posterior drawn with the EMA of its flow params
  (evaluate --posterior_params=ema, 16 and 64 samples: posterior_ema.json,
  posterior_ema64.json in its folder); its prior, FD and wall time are the run's."""
  folder = os.path.join(HERE, "warm_start", f"{task}_flowdiff_warm_entanneal_flr1e3")
  m = _read_json(os.path.join(folder, "posterior_ema.json"))
  if m is None:
    return None
  row = dict(fd_fmnist=flowdiff["fd_fmnist"], **_posterior_fields(m["posterior"]),
             wall_s=flowdiff["wall_s"], steps=m["run"]["step"],
             source=os.path.relpath(os.path.join(folder, "posterior_ema.json"),
                                    os.path.join(HERE, "..", "..")))
  m64 = _read_json(os.path.join(folder, "posterior_ema64.json"))
  if m64 is not None:
    row["psnr_posterior_mean_64"] = m64["posterior"]["posterior_mean/psnr"]["mean"]
  return row


TWEEDIE = os.path.join(HERE, "tweedie")


def _tweedie_row(task: str, method: str, rows: dict) -> dict | None:
  """Denoising: E[x | y] under `method`'s own diffusion prior (Tweedie, one network pass,
  the "tweedie" row of `python -m flowdiff_jax.inverse --task=denoise --solvers=` on the
  first 256 test images), copied to tweedie/<run>.json. FD and wall time are those of
  the method's row (the same protocol; clean and naive were retrained for it)."""
  run = "any_clean" if method == "clean" else f"{task}_{method}"
  m = _read_json(os.path.join(TWEEDIE, f"{run}.json"))
  if m is None or "tweedie" not in m["rows"]:
    return None
  base = rows.get(method, {})
  return dict(fd_fmnist=base.get("fd_fmnist"),
              psnr_posterior_mean=m["rows"]["tweedie"]["psnr"]["mean"],
              wall_s=base.get("wall_s"), steps=m["checkpoint_step"],
              source=f"experiments/fmnist/tweedie/{run}.json")


def _reference_row(task: str, method: str, suffix: str, folder: str) -> dict | None:
  """run.sh's clean / naive run named with `suffix` ("_6000": STEPS=6000, "_cosine":
  DECAY=1), copied to <folder>/<run>/."""
  run = f"any_clean{suffix}" if method == "clean" else f"{task}_{method}{suffix}"
  m = _read_json(os.path.join(HERE, folder, run, "metrics.json"))
  if m is None:
    return None
  key = f"any clean{suffix}" if method == "clean" else f"{task} {method}{suffix}"
  return dict(fd_fmnist=m["generation"]["rows"]["samples"]["fd_fmnist"],
              psnr_posterior_mean=None, steps=m["run"]["step"],
              wall_s=_wall_times(os.path.join(HERE, folder, "wall_times.txt")).get(key),
              source=f"experiments/fmnist/{folder}/{run}/metrics.json")


def _references(method: str, rows: dict) -> tuple[str, str] | None:
  """The naive and clean rows a row's gap is measured against: those of its schedule
  (a key with "_cosine") or step count (a key ending in _<steps>); None for a row
  of other steps than 2000 without references of its own."""
  if "_cosine" in method:
    suffix = "_cosine"
  elif re.search(r"_\d+$", method):
    suffix = method[method.rindex("_"):]
  else:
    return "naive", "clean"
  if f"naive{suffix}" in rows and f"clean{suffix}" in rows:
    return f"naive{suffix}", f"clean{suffix}"
  return None


EM_RUNS = os.path.join(HERE, "em")
INVERSE_TASK = {"denoise": "denoise", "inpaint": "inpaint", "blur": "deblur"}


def _inverse_rows(path: str) -> dict | None:
  """{row: {"psnr", "wall_s", "images_per_s"}} of an `inverse` metrics.json (64 test images)."""
  m = _read_json(path)
  if m is None:
    return None
  out = {}
  for name, r in m["rows"].items():
    wall = r.get("wall_s")
    out[name] = dict(psnr=r["psnr"]["mean"], wall_s=wall,
                     images_per_s=m["num_images"] / wall if wall else None)
  return out


def _em_row(task: str, e_step: str) -> dict | None:
  """The `em` run of run_em.sh (metrics and inverse report copied to experiments/fmnist/em)."""
  folder = os.path.join(EM_RUNS, f"{task}_em_{e_step}")
  m = _read_json(os.path.join(folder, "metrics.json"))
  if m is None:
    return None
  inverse = _inverse_rows(os.path.join(folder, "inverse.json")) or {}
  sampler = inverse.get(e_step, {})
  return dict(fd_fmnist=m["generation"]["rows"]["samples"]["fd_fmnist"],
              psnr_posterior_mean=None, psnr_posterior_sample_64=sampler.get("psnr"),
              posterior_images_per_s=sampler.get("images_per_s"),
              wall_s=_wall_times(os.path.join(EM_RUNS, "wall_times.txt")).get(
                  f"{task} em_{e_step}"),
              steps=m["run"]["step"], settings=_read_json(os.path.join(folder, "config.json")),
              source=f"experiments/fmnist/em/{task}_em_{e_step}/")


def _runs(folder: str, pattern: str) -> list[tuple[str, str]]:
  """(run, its pattern's group 1) of the run folders in experiments/fmnist/<folder>
  whose name matches `pattern` in full, sorted."""
  path = os.path.join(HERE, folder)
  names = sorted(os.listdir(path)) if os.path.isdir(path) else []
  return [(name, m.group(1)) for name in names if (m := re.fullmatch(pattern, name))]


def build(root: str) -> dict:
  gem = _read_json(GAUSSIAN_EM) or {}
  classical = _read_json(CLASSICAL)
  tasks = {}
  for task in TASKS:
    rows = _from_workdirs(root, task) or _from_table_md(task)
    if "flowdiff" in rows:  # run.sh's flowdiff: the flow base A⁺y
      rows["flowdiff_no_warm_start"] = rows.pop("flowdiff")
    if task in gem:
      g = gem[task]
      rows["gaussian_em"] = dict(
          fd_fmnist=g.get("fd_fmnist"), psnr_posterior_mean=g["psnr_posterior_mean"],
          wall_s=g["wall_fit_s"], residual_ratio=g.get("residual_ratio"),
          coverage_1std=g.get("coverage_1std"), coverage_2std=g.get("coverage_2std"),
          settings=g["settings"], source="experiments/gaussian_em/results.json")
    # 2000 steps, and the same run trained for about the em_mmps rows' wall time
    # (budget (a) of issue 18).
    for steps, key in ((2000, "flowdiff"), (4000, "flowdiff_4000"), (6000, "flowdiff_6000")):
      warm = _warm_start_row(task, steps)
      if warm is not None:
        rows[key] = warm
    handover = _warm_start_row(task, 2000, "flowdiff_handover")
    if handover is not None:
      rows["flowdiff_handover"] = handover
    # run_warm.sh's variants (FLAGS=... SUFFIX=_<variant>), at the 2000-step protocol.
    for run in _runs("warm_start", rf"{task}_flowdiff_warm_([a-z]\w*)"):
      rows[f"flowdiff_{run[1]}"] = _warm_start_row(task, 2000, run[0][len(task) + 1:])
    # Since 2026-12-06 the configs' default is entropy annealing with flow lr 1e-3:
    # run_warm.sh's SUFFIX=_entanneal_flr1e3 run. Its plain run (pinned to the
    # earlier default, constant β_ent = 1 and flow lr 5e-4) keeps its own key.
    if "flowdiff_entanneal_flr1e3" in rows:
      if "flowdiff" in rows:
        rows["flowdiff_beta_ent_constant"] = rows.pop("flowdiff")
      rows["flowdiff"] = rows.pop("flowdiff_entanneal_flr1e3")
      ema = _ema_row(task, rows["flowdiff"])
      if ema is not None:
        rows["flowdiff_ema"] = ema
    # The 5x-longer pair (issue 17 item 6): the default flowdiff and naive at 10000 steps.
    if "flowdiff_entanneal_flr1e3_10000" in rows:
      rows["flowdiff_10000"] = rows.pop("flowdiff_entanneal_flr1e3_10000")
    for method in ("clean", "naive", "flowdiff") if task == "denoise" else ():
      row = _tweedie_row(task, method, rows)
      if row is not None:
        rows[f"{method}_tweedie"] = row
    for e_step in ("mmps", "dps"):
      row = _em_row(task, e_step)
      if row is not None:
        rows[f"em_{e_step}"] = row
    for run in _runs("cosine", rf"{task}_flowdiff_warm_cosine(\w*)"):
      rows[f"flowdiff_cosine{run[1]}"] = _warm_start_row(task, 2000, run[0][len(task) + 1:],
                                                         folder="cosine")
    # The references at the 6000-step rows' budget and at the cosine rows' schedule.
    for suffix, folder in (("_6000", "long"), ("_10000", "long"), ("_cosine", "cosine")):
      for method in ("clean", "naive"):
        row = _reference_row(task, method, suffix, folder)
        if row is not None:
          rows[f"{method}{suffix}"] = row
    tasks[task] = rows
  for rows in tasks.values():
    for method, r in rows.items():
      if re.fullmatch(r"(clean|naive)(_\d+|_cosine)?", method) or _references(method, rows) is None:
        continue
      naive, clean = _references(method, rows)
      if naive in rows and clean in rows \
          and r["fd_fmnist"] is not None:
        r["gap_closed"] = round(gap_closed(rows[naive]["fd_fmnist"], r["fd_fmnist"],
                                           rows[clean]["fd_fmnist"]), 4)
        r["gap_against"] = [naive, clean]
  out = {"tasks": tasks}
  if classical:
    out["classical"] = {t: {k: round(v["psnr"]["mean"], 3) for k, v in r.items()}
                        for t, r in classical["results"].items()}
    out["classical_settings"] = {k: v for k, v in classical.items() if k != "results"}
  return out


def _fmt(v, digits=2) -> str:
  return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown(results: dict) -> str:
  lines = ["## Fashion-MNIST: every method and the classical restorers", "",
           "Generated by `python experiments/fmnist/results.py` from results.json's sources "
           "(see its docstring). FD-FMNIST: 500 prior samples against 1000 clean test images, "
           "our classifier's features. Posterior PSNR: mean over the first 256 test "
           "observations (dB), of the mean of 16 flow samples (64 where stated); "
           "*_tweedie rows and the Tweedie column (denoising): E[x|y] under the run's own "
           "diffusion prior, one network pass (Tweedie's formula). "
           "Coverage: fraction of pixels with |E[x|y] − x| within 1 / 2 "
           "posterior stds.", ""]
  for task, rows in results["tasks"].items():
    lines += [f"### {task}", "", "| method | FD-FMNIST ↓ | gap closed | posterior-mean PSNR ↑ "
              "| … of 64 flow samples ↑ | prior's Tweedie E[x|y] ↑ "
              "| one posterior sample, PSNR (64 images) ↑ | posterior images/s "
              "| residual ratio | coverage 1σ / 2σ | wall (s) | source |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for method, r in rows.items():
      cov = (f"{_fmt(r.get('coverage_1std'), 3)} / {_fmt(r.get('coverage_2std'), 3)}"
             if r.get("coverage_1std") is not None else "")
      gap = f"{r['gap_closed']:.0%}" if "gap_closed" in r else ""
      lines.append(f"| {method} | {_fmt(r['fd_fmnist'])} | {gap} | "
                   f"{_fmt(r['psnr_posterior_mean'])} | "
                   f"{_fmt(r.get('psnr_posterior_mean_64'))} | "
                   f"{_fmt(r.get('psnr_prior_tweedie'))} | "
                   f"{_fmt(r.get('psnr_posterior_sample_64'))} | "
                   f"{_fmt(r.get('posterior_images_per_s'), 1)} | "
                   f"{_fmt(r.get('residual_ratio'), 3)} | {cov} | {_fmt(r['wall_s'], 1)} | "
                   f"{r['source']} |")
    for name, psnr in (results.get("classical") or {}).get(task, {}).items():
      lines.append(f"| *classical:* {name} |  |  | {_fmt(psnr)} |  |  |  |  |  |  |  | "
                   "classical.json |")
    lines.append("")
  return "\n".join(lines)


def main(root: str) -> None:
  results = build(root)
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  text = markdown(results)
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "workdirs/fmnist")
