r"""Downstream inverse problems with a learned diffusion prior: the evaluation harness and CLI.

The solvers (DPS, ΠGDM, MMPS) are in `flowdiff_jax.solvers` (docs/design.md §2.7).
This module restores a trained run's diffusion prior (`runs.load_run`,
`Method.diffusion_prior_params`), corrupts held-out test images with a task's
operator (`TASKS`: fixed per-index corruption, so every prior and solver sees
the same observations), solves with each solver (and, for flow methods, draws
the run's own amortized posterior), and scores PSNR / SSIM per image.

CLI (restores a trained prior, corrupts held-out test images, solves, scores):

    python -m flowdiff_jax.inverse --workdir=RUN --task=inpaint|denoise|deblur \
        [--num_images=64] [--solvers=dps,pigdm,mmps] [--output_dir=RUN/inverse/TASK]

writes metrics.json, metrics.md and grid.png (rows: observation | one column per
solver | clean). With `--data_path=MEASUREMENTS` (and `--operator=name=...,sigma_y=...`
where they differ from the run's) it restores the user's own measurements
instead, as `flowdiff_jax.export` does, in <output_dir>/<solver>.
`--collect=DIR` gathers every metrics.json under DIR into one comparison table.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from typing import Any

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from flowdiff_jax import (
  data,
  evaluation,
  methods,
  operators,
  parallel,
  paths,
  reporting,
  runs,
  sampling,
  solvers as solvers_lib,
  step as step_lib,
)
from flowdiff_jax.methods import base as method_base

# --------------------------------------------------------------------------
# Tasks: the corruptions of the Fashion-MNIST / CIFAR / CelebA protocols.
# --------------------------------------------------------------------------

# The operator of each task: those of configs/fmnist_inpaint.py, fmnist_noise.py
# and fmnist_blur.py (tests/test_inverse.py checks they agree), σ_y on the
# [-1, 1] scale. `dps_zeta` is the CLI's default DPS step size for the task
# (1000 steps, 28×28 images): the best of ζ ∈ {0.1, 0.3, 1, 3} on Fashion-MNIST
# test images 1000–1003 (outside the experiment table's) with a clean prior,
# PSNR inpaint 18.1 / 18.8 / 18.2 / –, denoise 23.6 / 24.4 / 22.0 / –,
# deblur – / 17.5 / 18.1 / 15.9 dB (experiments/inverse/README.md).
TASKS = {
    "inpaint": dict(operator=dict(name="inpaint_random", drop_prob=0.6, sigma_y=0.01),
                    dps_zeta=0.3),
    "denoise": dict(operator=dict(name="denoise", sigma_y=0.2), dps_zeta=0.3),
    "deblur": dict(operator=dict(name="blur", kernel_size=9, kernel_std=2.0, sigma_y=0.02),
                   dps_zeta=1.0),
}
# The config file whose `operator` each task reproduces.
TASK_CONFIGS = {"inpaint": "fmnist_inpaint", "denoise": "fmnist_noise", "deblur": "fmnist_blur"}

# Seed of the test images' corruption (mask, noise), fixed so that every prior
# and solver sees the same observations: image i of the test split gets
# operators.corrupt(op, x, index=i, seed=CORRUPTION_SEED).
CORRUPTION_SEED = 0


def task_operator(task: str, sigma_y: float | None = None) -> operators.Operator:
  """The forward operator of `task` (a key of TASKS), optionally with another σ_y."""
  if task not in TASKS:
    raise ValueError(f"task={task!r}: unknown task; allowed: {', '.join(TASKS)}")
  cfg = dict(TASKS[task]["operator"])
  if sigma_y is not None:
    cfg["sigma_y"] = float(sigma_y)
  return operators.make_operator(cfg)


# --------------------------------------------------------------------------
# Evaluating a trained run on a task.
# --------------------------------------------------------------------------


def prior_params(state) -> Any:
  """The prior's ε-network params of a TrainState: the EMA score network
  (clean, naive, flowdiff), or the frozen prior of an "amortized" run."""
  return methods.get(state.objective.method).diffusion_prior_params(state)


def evaluate_task(state, images: np.ndarray, index: np.ndarray, op: operators.Operator,
                  solvers: list[solvers_lib.Solver], *, batch_size: int = 32, seed: int = 0,
                  corruption_seed: int = CORRUPTION_SEED, flow: bool = True,
                  flow_samples: int = 16, num_chunks: int = 10, log=print,
                  mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Corrupts clean images with `op`, solves with each solver, and scores the results.

  Args:
    state: a TrainState with a diffusion prior (`prior_params`).
    images: clean test images, float32 [N, H, W, C] in [-1, 1].
    index: their dataset indices [N]: image i is corrupted with
      operators.corrupt(op, ·, index[i], corruption_seed) and solved with
      solvers.example_keys(seed, index)[i], whatever the batching.
    op: the task's operator.
    solvers: DPS / PiGDM / MMPS instances.
    batch_size: images per solve (N must divide by it).
    flow: add the run's amortized flow (flow methods, when `op` is the
      operator it was trained on): one flow sample per image, and the mean of
      `flow_samples` samples.
    num_chunks: progress reports per batch and solver.
    log: None: silent; else progress bars go to stderr (`reporting.ProgressBar`).
    mesh: a mesh with axis "data" to shard the batch over (None: one device).
  Returns:
    {"rows": {name: {"psnr": {mean, sem}, "ssim": {...}, "wall_s", "settings"}},
     "per_image": {name: {"psnr": [N], "ssim": [N]}}, "images": {name: [N, H, W, C]}}
    with rows "observation" (A⁺y), one per solver, "flow_sample"/"flow_mean", and for
    denoising "tweedie" (the prior's exact E[x | y], one network pass).
  """
  n = images.shape[0]
  if n % batch_size:
    raise ValueError(f"num_images={n} must be a multiple of batch_size={batch_size}")
  obj = state.objective
  eps_apply, params = solvers_lib.NetworkEps(obj), prior_params(state)
  use_flow = (flow and methods.get(obj.method).has_posterior and obj.operator == op)
  put = (lambda a: a) if mesh is None else functools.partial(
      jax.device_put, device=parallel.batch_sharding(mesh))
  corrupt = jax.jit(operators.corrupt, static_argnums=0)
  keys_of = jax.jit(solvers_lib.example_keys, static_argnums=0)
  flow_fn = jax.jit(step_lib.posterior_samples, static_argnames="num_samples")
  metrics = jax.jit(lambda a, b: (evaluation.psnr(a, b), evaluation.ssim(a, b)))
  # Denoising has an exact posterior mean under the prior, one pass away
  # (`sampling.tweedie_posterior_mean`).
  tweedie_fn = jax.jit(lambda params, y: sampling.tweedie_posterior_mean(
      lambda x_t, t: eps_apply(params, x_t, t), obj.schedule, y, op.sigma_y))
  out = {"images": {}, "per_image": {}, "wall_s": {}}

  def record(name, x, ref):
    p, q = metrics(x, ref)
    out["images"].setdefault(name, []).append(np.asarray(x))
    out["per_image"].setdefault(name, {"psnr": [], "ssim": []})
    out["per_image"][name]["psnr"].append(np.asarray(p))
    out["per_image"][name]["ssim"].append(np.asarray(q))

  for b in range(0, n, batch_size):
    x = put(jnp.asarray(images[b:b + batch_size], jnp.float32))
    idx = jnp.asarray(index[b:b + batch_size], jnp.int32)
    measured = corrupt(op, x, idx, corruption_seed)
    y = measured.pop("y")
    omega = measured
    record("observation", op.pinv(y, omega), x)
    record("clean", x, x)
    if method_base.tweedie_applies(op, obj.schedule):
      start = time.time()
      mean = jax.block_until_ready(tweedie_fn(params, y))
      out["wall_s"]["tweedie"] = out["wall_s"].get("tweedie", 0.0) + time.time() - start
      record("tweedie", mean, x)
    keys = keys_of(seed, idx)
    for solver in solvers:
      bar = None if log is None else reporting.ProgressBar(
          f"{solver.name} images {b + 1}-{b + batch_size}/{n}", solver.num_steps + 1)
      start = time.time()
      sol = solvers_lib.solve_chunked(solver, eps_apply, params, obj.schedule, op, y, omega,
                                      keys, num_chunks=num_chunks, progress=bar)
      sol = jax.block_until_ready(sol)
      out["wall_s"][solver.name] = out["wall_s"].get(solver.name, 0.0) + time.time() - start
      record(solver.name, sol, x)
    if use_flow:
      start = time.time()
      # The flow's rng per batch: folded from the solver seed and the first index.
      samples = flow_fn(state, {"y": y, "omega": omega},
                        jax.random.fold_in(jax.random.key(seed + 1), int(index[b])),
                        num_samples=flow_samples)
      samples = jax.block_until_ready(samples)
      out["wall_s"]["flow"] = out["wall_s"].get("flow", 0.0) + time.time() - start
      record("flow_sample", samples[0], x)
      record(f"flow_mean{flow_samples}", sampling.posterior_summary(samples)[0], x)

  settings = {s.name: {k: v for k, v in dataclasses.asdict(s).items()} for s in solvers}
  rows = {}
  for name, per in out["per_image"].items():
    if name == "clean":
      continue
    per["psnr"] = np.concatenate(per["psnr"]).tolist()
    per["ssim"] = np.concatenate(per["ssim"]).tolist()
    row = {"psnr": reporting.mean_sem(per["psnr"]), "ssim": reporting.mean_sem(per["ssim"])}
    wall = out["wall_s"].get("flow" if name.startswith("flow") else name)
    if wall is not None:
      row["wall_s"] = wall
    if name in settings:
      row["settings"] = settings[name]
    rows[name] = row
  del out["per_image"]["clean"]
  return {"rows": rows, "per_image": out["per_image"],
          "images": {k: np.concatenate(v) for k, v in out["images"].items()}}


def _grid(result: dict[str, Any], num_shown: int) -> np.ndarray:
  """uint8 grid: a row per image, columns observation | solvers | flow | clean."""
  names = [k for k in result["images"] if k not in ("observation", "clean")]
  cols = ["observation", *names, "clean"]
  shown = [result["images"][c][:num_shown] for c in cols]
  stacked = np.stack(shown, axis=1).reshape((-1,) + shown[0].shape[1:])
  return evaluation.image_grid(data.to_uint8(stacked), num_cols=len(cols))


def _markdown(report: dict[str, Any]) -> str:
  op = report["operator"]
  lines = [f"# {report['task']}: prior `{report['prior_method']}` ({report['workdir']}, "
           f"step {report['checkpoint_step']})", "",
           f"Operator {op}; σ_y on the [-1, 1] scale. {report['num_images']} test images "
           f"(indices {report['first_image']}…{report['first_image'] + report['num_images'] - 1}), "
           f"corruption seed {report['corruption_seed']}, solver seed {report['seed']}.", "",
           "| method | PSNR (dB) ↑ | SSIM ↑ | wall (s) | settings |", "|---|---:|---:|---:|---|"]
  for name, row in report["rows"].items():
    settings = ", ".join(f"{k}={v}" for k, v in row.get("settings", {}).items())
    wall = f"{row['wall_s']:.0f}" if "wall_s" in row else ""
    lines.append(f"| {name} | {row['psnr']['mean']:.2f} ± {row['psnr']['sem']:.2f} | "
                 f"{row['ssim']['mean']:.3f} ± {row['ssim']['sem']:.3f} | {wall} | {settings} |")
  lines += ["", f"± is the standard error over images (nan for one image). "
            f"{report['hardware']}, {report['date']}.",
            f"Command: `{report['command']}`", ""]
  return "\n".join(lines)


def collect_table(directory: str) -> str:
  """A Markdown table of every metrics.json under `directory`: a row per (prior, method),
  a PSNR / SSIM column pair per task. The observation row is shown once when
  every prior saw the same observations (same images and seeds)."""
  reports = [json.loads(path.read_text()) for path in paths.files(directory)
             if path.name == "metrics.json"]
  tasks = [t for t in TASKS if any(r["task"] == t for r in reports)]
  cells: dict[tuple[str, str], dict[str, str]] = {}
  for r in reports:
    label = r.get("label") or r["prior_method"]
    for name, row in r["rows"].items():
      cells.setdefault((label, name), {})[r["task"]] = (
          f"{row['psnr']['mean']:.2f} | {row['ssim']['mean']:.3f}")
  observed = {k: v for k, v in cells.items() if k[1] == "observation"}
  if len({json.dumps(v, sort_keys=True) for v in observed.values()}) == 1:
    for key in observed:
      del cells[key]
    cells = {("(all)", "observation A⁺y"): next(iter(observed.values())), **cells}
  header = "| prior | method | " + " | ".join(f"{t} PSNR | {t} SSIM" for t in tasks) + " |"
  lines = [header, "|---|---|" + "---:|---:|" * len(tasks)]
  for (label, name), row in cells.items():
    lines.append(f"| {label} | {name} | " +
                 " | ".join(row.get(t, "– | –") for t in tasks) + " |")
  return "\n".join(lines) + "\n"


def run(workdir: str, task: str, *, output_dir: str | None = None, num_images: int = 64,
        first_image: int = 0, batch_size: int = 32, solvers: tuple[str, ...] = ("dps", "pigdm"),
        dps_zeta: float | None = None, dps_steps: int = 1000, pigdm_steps: int = 100,
        pigdm_data_var: float = 1.0, mmps_steps: int = 64, mmps_cg_iters: int = 1,
        eta: float = 1.0, seed: int = 0, corruption_seed: int = CORRUPTION_SEED,
        step: int | None = None, flow_samples: int = 16,
        num_shown: int = 8, label: str = "", command: str = "",
        log=print) -> dict[str, Any]:
  """The CLI: restores `workdir`'s prior, solves `task` on held-out test images, writes the report.

  Writes output_dir/metrics.json, metrics.md and grid.png (default
  output_dir: workdir/inverse/<task>) and returns the report (metrics.json).
  """
  op = task_operator(task)
  config, state = runs.load_run(workdir, step=step)
  if config.data.dataset not in data.DATASETS:
    raise ValueError(f"The run's data ({config.data.dataset!r}) have no clean test images; "
                     "the benchmark needs a dataset with clean images. To restore "
                     "measurements with the run's prior, pass them as --data_path.")
  zeta = TASKS[task]["dps_zeta"] if dps_zeta is None else dps_zeta
  make = {"dps": lambda: solvers_lib.DPS(zeta=zeta, num_steps=dps_steps, eta=eta),
          "pigdm": lambda: solvers_lib.PiGDM(num_steps=pigdm_steps, eta=eta,
                                             data_var=pigdm_data_var),
          "mmps": lambda: solvers_lib.MMPS(num_steps=mmps_steps, eta=eta,
                                           cg_iters=mmps_cg_iters)}
  unknown = [s for s in solvers if s not in make]
  if unknown:
    raise ValueError(f"--solvers: unknown {unknown}; allowed: {', '.join(make)}")
  images, index = load_test_images(config, first_image, num_images)
  mesh = parallel.make_mesh() if batch_size % jax.device_count() == 0 else None
  start = time.time()
  result = evaluate_task(state, images, index, op, [make[s]() for s in solvers],
                         batch_size=batch_size, seed=seed, corruption_seed=corruption_seed,
                         flow_samples=flow_samples, log=log, mesh=mesh)
  report = {
      "workdir": workdir, "label": label,
      "checkpoint_step": int(jax.device_get(state.step)), "prior_method": config.method,
      "run_operator": dict(config.operator), "task": task,
      "operator": {"name": op.name, **dataclasses.asdict(op)},
      "num_images": num_images, "first_image": first_image, "batch_size": batch_size,
      "corruption_seed": corruption_seed, "seed": seed, "rows": result["rows"],
      "per_image": result["per_image"], "wall_s_total": time.time() - start,
      "hardware": reporting.hardware(), "date": datetime.date.today().isoformat(),
      "command": command}
  output_dir = output_dir or os.path.join(workdir, "inverse", task)
  reporting.write_report(output_dir, report, _markdown(report),
                         {"grid.png": _grid(result, num_shown)})
  if log is not None:
    log(_markdown(report))
    log(f"Wrote {output_dir}/metrics.json, metrics.md, grid.png")
  return report


def load_test_images(config, first_image: int, num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """Held-out images first_image … first_image + num_images − 1 of the run's dataset:
  (float32 [N, H, W, C] in [-1, 1], their indices int32 [N])."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.num_eval_examples = first_image + num_images
    cfg.eval.batch_size = 1  # every image, in order (eval_batches keeps whole batches only)
  batches = data.eval_batches(cfg, process_index=0, process_count=1)[first_image:]
  if len(batches) < num_images:
    raise ValueError(f"The test split has only {first_image + len(batches)} images; asked for "
                     f"{num_images} from index {first_image}.")
  images = np.concatenate([b["image"] for b in batches])
  index = np.concatenate([b["index"] for b in batches]).astype(np.int32)
  return np.asarray(data.to_model_range(images)), index


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  f = flags.FLAGS
  if f.collect:
    table = collect_table(f.collect)
    print(table)
    if f.output_dir:
      paths.write_text(os.path.join(f.output_dir, "table.md"), table)
    return
  if f.workdir and f.data_path:
    restore_measurements(f)
    return
  if not f.workdir or not f.task:
    raise app.UsageError("--workdir and --task are required (or --collect=DIR, or "
                         "--data_path=MEASUREMENTS).")
  run(f.workdir, f.task, output_dir=f.output_dir, num_images=f.num_images,
      first_image=f.first_image, batch_size=f.batch_size, solvers=tuple(f.solvers),
      dps_zeta=f.dps_zeta, dps_steps=f.dps_steps, pigdm_steps=f.pigdm_steps,
      pigdm_data_var=f.pigdm_data_var, mmps_steps=f.mmps_steps,
      mmps_cg_iters=f.mmps_cg_iters, eta=f.eta, seed=f.seed,
      corruption_seed=f.corruption_seed, step=f.step, flow_samples=f.flow_samples,
      num_shown=f.num_shown, label=f.label,
      command="python -m flowdiff_jax.inverse " + " ".join(sys.argv[1:]))


def restore_measurements(f) -> None:
  """--data_path: the user's own measurements, restored by each of --solvers under the run's
  prior, written as `flowdiff_jax.export` writes (mean, std, samples, data consistency;
  PSNR only with --reference_path) to <output_dir>/<solver>."""
  from flowdiff_jax import export  # noqa: PLC0415 (its flags are not this program's)

  steps = {"dps": f.dps_steps, "pigdm": f.pigdm_steps, "mmps": f.mmps_steps}
  root = f.output_dir or os.path.join(f.workdir, "restored")
  for solver in f.solvers:
    if solver not in steps:
      raise app.UsageError(f"--solvers: unknown {solver!r}; allowed: {', '.join(steps)}")
    summary = export.export(
        f.workdir, os.path.join(root, solver), num_samples=f.num_samples,
        save_samples=f.save_samples, batch_size=f.batch_size, data_path=f.data_path,
        mask_dir=f.mask_dir, reference_path=f.reference_path, seed=f.seed, sampler=solver,
        solver_steps=steps[solver], cg_iters=f.mmps_cg_iters,
        dps_zeta=1.0 if f.dps_zeta is None else f.dps_zeta, eta=f.eta,
        operator=export.operator_overrides(f.operator))
    print(f"{solver}: residual_ratio={summary['residual_ratio']:.4f} wrote "
          f"{summary['num_measurements']} restorations to {os.path.join(root, solver)}")


def _define_flags() -> None:
  """Defines the command-line flags; only when run as a program (`cli`), so importing this
  module next to the other tools (which also have --workdir) does not clash."""
  flags.DEFINE_string("workdir", None, "Workdir of the trained run (a method with a diffusion "
                      "prior: clean, naive, flowdiff, em).")
  flags.DEFINE_enum("task", None, list(TASKS), "Inverse problem; its operator is in TASKS.")
  flags.DEFINE_string("output_dir", None, "Where the report goes; default WORKDIR/inverse/TASK. "
                      "With --collect: where table.md goes (optional).")
  flags.DEFINE_integer("num_images", 64, "Number of held-out test images.")
  flags.DEFINE_integer("first_image", 0, "Index of the first test image (e.g. 1000 to tune on "
                       "images the table does not use).")
  flags.DEFINE_integer("batch_size", 32, "Images solved together (num_images must divide by it).")
  flags.DEFINE_list("solvers", ["dps", "pigdm"], "Solvers to run: dps, pigdm, mmps.")
  flags.DEFINE_float("dps_zeta", None, "DPS step size ζ; default: the task's (TASKS).")
  flags.DEFINE_integer("dps_steps", 1000, "DPS steps (+1 final step).")
  flags.DEFINE_integer("pigdm_steps", 100, "ΠGDM steps (+1 final step).")
  flags.DEFINE_float("pigdm_data_var", 1.0, "ΠGDM's prior variance v in r_t² (paper: 1).")
  flags.DEFINE_integer("mmps_steps", 64, "MMPS steps (+1 final step).")
  flags.DEFINE_string("data_path", None, "Restore these measurements (.npz or an image folder) "
                      "with the run's prior instead of benchmarking on test images; outputs as "
                      "flowdiff_jax.export writes them, in <output_dir>/<solver>.")
  flags.DEFINE_string("mask_dir", None, "--data_path: masks of a folder of measurements.")
  flags.DEFINE_string("reference_path", None, "--data_path: clean reference, for PSNR only.")
  flags.DEFINE_integer("num_samples", 8, "--data_path: solver samples per measurement.")
  flags.DEFINE_integer("save_samples", 0, "--data_path: samples per measurement written.")
  flags.DEFINE_list("operator", [], "--data_path: config.operator fields of the measurements "
                    "where they differ from the run's, as name=value pairs (e.g. "
                    "name=blur,sigma_y=0.05).")
  flags.DEFINE_integer("mmps_cg_iters", 1, "MMPS conjugate-gradient iterations per step.")
  flags.DEFINE_float("eta", 1.0, "DDIM η of the solvers: 1 ancestral, 0 deterministic.")
  flags.DEFINE_integer("seed", 0, "Solver seed (image i uses fold_in(key(seed), index i)).")
  flags.DEFINE_integer("corruption_seed", CORRUPTION_SEED, "Seed of the test corruption.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
  flags.DEFINE_integer("flow_samples", 16, "Flow samples averaged for the flow_mean row.")
  flags.DEFINE_integer("num_shown", 8, "Images (rows) in grid.png.")
  flags.DEFINE_string("label", "", "Name of the prior in --collect tables (default its method).")
  flags.DEFINE_string("collect", None, "Instead of solving: gather every metrics.json under "
                      "this folder into one table.")


def cli() -> None:
  """`flowdiff-inverse` and `python -m flowdiff_jax.inverse`: defines the flags, runs `main`."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF is only a tfds helper here
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
