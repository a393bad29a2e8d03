r"""Writes the restoration of every measurement of a trained run to files.

  python -m flowdiff_jax.export --workdir=workdirs/byom \
      [--output_dir=workdirs/byom/restored] [--num_samples=16] [--save_samples=0] \
      [--data_path=other_measurements/ [--mask_dir=...]] [--reference_path=...]

For a `flowdiff` or `amortized` run (a posterior sampler q(x | y)), or with
`--sampler=mmps|dps|pigdm` for any run with a diffusion prior (that solver
under the prior; `--operator=name=...,sigma_y=...` for measurements of another
operator or noise level): draws `num_samples` posterior samples for each
measurement of the run's data set (or of `--data_path`, read with the run's
operator, σ_y and value rule) and writes, in the measurements' own units and
order (the value rule of `flowdiff_jax.measurements`, inverted):

* a folder of images `<name>.<ext>` as input: per image `<name>_mean.<ext>`
  (the posterior mean), `<name>_std.<ext>` (the per-pixel posterior std,
  scaled so that `std_full_scale` in export.json, the largest std of the set
  in the file's units, is the dtype's maximum; float files hold the std
  itself) and `<name>_sample<k>.<ext>` for k < `--save_samples`. <ext> is
  .png for 8-bit images (and 16-bit greyscale), else .tif in the input's dtype;
  integer outputs are rounded and clipped to the dtype's range;
* `restorations.npz` (folder input) or `<stem>_restored.npz` (an .npz input
  `<stem>.npz`): float32 `mean`, `std` [N, H, W, C] and `samples`
  [N, save_samples, H, W, C] in the file's units, with `names` and the
  per-measurement `residual_ratio`;
* `export.json`: the ground-truth-free summary, the data consistency
  `residual_ratio` = mean ‖y − A x‖² / (m σ_y²) of the samples (≈ 1 for a
  calibrated posterior, see `operators.residual_ratio`), the same of the
  posterior mean, the mean posterior std, per-measurement values, and the
  PSNR of the posterior mean when a clean reference is given.

Runs in one process over its local devices (a ragged last batch is padded).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from flowdiff_jax import (
  data,
  evaluation,
  measurements,
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

# --sampler values besides the solvers' names: the run's own amortized flow.
FLOW = "flow"


def _output_suffix(dtype: np.dtype, channels: int) -> str:
  """.png where PNG holds the data exactly (8-bit, 1-4 channels; 16-bit greyscale), else .tif."""
  if dtype == np.uint8 and channels <= 4 or dtype == np.uint16 and channels == 1:
    return ".png"
  return ".tif"


def _restore_fn(state: step_lib.TrainState, mesh: jax.sharding.Mesh, num_samples: int,
                save_samples: int, solver: solvers_lib.Solver | None = None,
                op: operators.Operator | None = None, seed: int = 0):
  """Jitted (state, batch, rng, index [B]) -> (samples [B, K, ...], mean, std, ratio [B],
  ratio_mean [B]).

  solver None: samples of the run's flow (`rng` draws them); else `num_samples`
  solves of `solver` under the run's diffusion prior with operator `op`, sample
  s of measurement i from fold_in(example_keys(seed, index)[i], s), whatever
  the batching.
  """
  op = op or state.objective.operator

  def draw(state, batch, rng, index):
    if solver is None:
      return step_lib.posterior_samples(state, batch, rng, num_samples)  # [S, B, H, W, C]
    obj = state.objective
    params = methods.get(obj.method).diffusion_prior_params(state)
    eps_fn = lambda x_t, t: obj.score_net.apply({"params": params}, x_t, t, train=False)
    keys = solvers_lib.example_keys(seed, index)
    # A loop over the samples, not a batch S times larger: memory stays that of one solve.
    return jax.lax.map(lambda s: solvers_lib.solve(
        solver, eps_fn, obj.schedule, op, batch["y"], batch["omega"],
        jax.vmap(lambda k: jax.random.fold_in(k, s))(keys)), jnp.arange(num_samples))

  def restore(state, batch, rng, index):
    samples = draw(state, batch, rng, index)
    mean, std = sampling.posterior_summary(samples)
    ratio = jnp.mean(operators.residual_ratio(op, batch["y"], batch["omega"], samples), axis=0)
    ratio_mean = operators.residual_ratio(op, batch["y"], batch["omega"], mean)
    kept = jnp.moveaxis(samples[:save_samples], 0, 1)
    return kept, mean, std, ratio, ratio_mean

  rep, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(restore, in_shardings=(rep, data_sharding, rep, data_sharding))


def export(workdir: str, output_dir: str | None = None, *, num_samples: int = 16,
           save_samples: int = 0, batch_size: int = 0, data_path: str | None = None,
           mask_dir: str | None = None, reference_path: str | None = None,
           seed: int = 0, sampler: str = FLOW, solver_steps: int = 64, cg_iters: int = 1,
           dps_zeta: float = 1.0, eta: float = 1.0,
           operator: dict[str, Any] | None = None) -> dict[str, Any]:
  """Restores every measurement with a posterior sampler and writes the files above.

  Args:
    workdir: the trained run (its newest checkpoint is used).
    output_dir: where to write; default <workdir>/restored.
    num_samples: posterior samples per measurement (mean and std).
    save_samples: how many samples per measurement to write as well (<= num_samples).
    batch_size: measurements per batch; 0: the run's eval.batch_size.
    data_path, mask_dir, reference_path: other measurements than the run's
      (kind from the suffix: .npz or a folder), their masks, a clean reference.
    seed: seed of the posterior samples.
    sampler: "flow", the run's amortized posterior (flowdiff, amortized), or a
      solver of `flowdiff_jax.solvers` ("mmps", "dps", "pigdm") under the
      run's diffusion prior (clean, naive, flowdiff, em), with solver_steps
      steps, cg_iters (MMPS), dps_zeta (DPS) and DDIM eta.
    operator: fields of config.operator to replace (e.g. {"name": "blur",
      "sigma_y": 0.05}): measurements of another operator or noise level than
      the run's. Solvers only: the flow is conditioned on its own operator.

  Returns:
    The summary written to export.json.
  """
  if num_samples < 1 or not 0 <= save_samples <= num_samples:
    raise ValueError(f"--num_samples={num_samples}, --save_samples={save_samples}: need "
                     "num_samples >= 1 and 0 <= save_samples <= num_samples.")
  mesh = parallel.make_mesh(jax.local_devices())
  config, state = runs.load_run(workdir, sharding=parallel.replicated(mesh))
  method = methods.get(config.method)
  if sampler == FLOW and not method.has_posterior:
    raise ValueError(f"The run in {workdir} has method {config.method!r}, which learns a prior "
                     f"only; --sampler=flow needs a run with method "
                     f"{' or '.join(methods.with_posterior())}. For its prior, pick a solver: "
                     f"--sampler={'|'.join(solvers_lib.SOLVERS)}.")
  if sampler != FLOW:
    if sampler not in solvers_lib.SOLVERS:
      raise ValueError(f"--sampler={sampler!r}: allowed: {FLOW}, "
                       f"{', '.join(solvers_lib.SOLVERS)}")
    if not method.has_prior:
      raise ValueError(f"The run in {workdir} (method {config.method!r}) has no diffusion "
                       f"prior for --sampler={sampler}; runs of {', '.join(methods.with_prior())} "
                       "do.")
  if operator:
    if sampler == FLOW:
      raise ValueError("--operator: the flow restores the operator it was trained on "
                       f"({config.operator.name}); another operator needs a solver "
                       f"(--sampler={'|'.join(solvers_lib.SOLVERS)}).")
    unknown = sorted(set(operator) - set(config.operator))
    if unknown:
      raise ValueError(f"--operator: unknown fields {unknown}; allowed: "
                       f"{', '.join(config.operator)}")
    config.operator.update(operator)
  op = operators.make_operator(config.operator)
  solver = None
  if sampler != FLOW:
    solver = {"dps": lambda: solvers_lib.DPS(zeta=dps_zeta, num_steps=solver_steps, eta=eta),
              "pigdm": lambda: solvers_lib.PiGDM(num_steps=solver_steps, eta=eta),
              "mmps": lambda: solvers_lib.MMPS(num_steps=solver_steps, eta=eta,
                                               cg_iters=cg_iters)}[sampler]()
  trained_shape = data.image_shape(config)
  if data_path:
    config.data.dataset = "npz" if data_path.lower().endswith(".npz") else "folder"
    config.data.path, config.data.mask_dir = data_path, mask_dir
    config.data.reference_path = reference_path
  elif not data.is_measured(config):
    raise ValueError(f"The run in {workdir} trained on {config.data.dataset!r}, not on "
                     "measurement files: give the measurements to restore with --data_path.")
  elif reference_path:
    config.data.reference_path = reference_path
  m = measurements.load(config)
  if m.image_shape != tuple(trained_shape):
    raise measurements.DataError(
        f"The measurements in {m.path} are {m.image_shape} (H, W, C); the run in {workdir} "
        f"was trained on {tuple(trained_shape)}.")

  devices = mesh.size
  batch_size = batch_size or config.eval.batch_size
  batch_size = max(devices, min(batch_size, len(m)) // devices * devices)
  restore = _restore_fn(state, mesh, num_samples, save_samples, solver, op, seed)
  root = jax.random.key(seed)
  outputs = []
  bar = reporting.ProgressBar("Posterior samples of the measurements", len(m), unit="images")
  for k, start in enumerate(range(0, len(m), batch_size)):
    idx = np.arange(start, start + batch_size)
    idx = np.minimum(idx, len(m) - 1)  # pad the last batch with its last measurement
    batch = {"y": m.y[idx], "omega": {} if m.mask is None else {"mask": m.mask[idx]}}
    batch, index = jax.device_put((batch, idx.astype(np.int32)), parallel.batch_sharding(mesh))
    out = jax.device_get(restore(state, batch, jax.random.fold_in(root, k), index))
    keep = min(batch_size, len(m) - start)
    outputs.append([a[:keep] for a in out])
    bar(start + keep)
  samples, mean, std, ratio, ratio_mean = (np.concatenate(parts) for parts in zip(*outputs))

  output_dir = paths.as_str(output_dir or os.path.join(workdir, "restored"))
  lo, hi = m.value_range
  unit = (hi - lo) / 2.0  # file units per model unit
  from_model = functools.partial(measurements.from_model_units, value_range=m.value_range,
                                 dtype=np.float32)
  mean_f, std_f, samples_f = from_model(mean), (std * unit).astype(np.float32), from_model(samples)
  std_full_scale = float(std_f.max()) or 1.0
  arrays = {"mean": mean_f, "std": std_f, "samples": samples_f, "names": np.array(m.names),
            "residual_ratio": ratio.astype(np.float32)}
  if config.data.dataset == "npz":
    stem = os.path.splitext(os.path.basename(m.path))[0]
    npz_path = os.path.join(output_dir, f"{stem}_restored.npz")
  else:
    npz_path = os.path.join(output_dir, "restorations.npz")
    suffix = _output_suffix(m.dtype, m.image_shape[-1])
    integer = np.issubdtype(m.dtype, np.integer)
    for i, name in enumerate(m.names):
      base = os.path.join(output_dir, os.path.splitext(name)[0])
      paths.write_image(f"{base}_mean{suffix}",
                  measurements.from_model_units(mean[i], m.value_range, m.dtype))
      if integer:  # the std's full scale is the dtype's maximum (stated in export.json)
        top = np.iinfo(m.dtype).max
        std_image = np.clip(np.round(std_f[i] / std_full_scale * top), 0, top).astype(m.dtype)
      else:
        std_image = std_f[i]
      paths.write_image(f"{base}_std{suffix}", std_image)
      for j in range(save_samples):
        paths.write_image(f"{base}_sample{j}{suffix}",
                    measurements.from_model_units(samples[i, j], m.value_range, m.dtype))
  paths.write_npz(npz_path, **arrays)

  summary = {
      "workdir": paths.as_str(workdir), "step": int(jax.device_get(state.step)),
      "method": config.method, "data_path": m.path, "num_measurements": len(m),
      "num_samples": num_samples, "sampler": sampler,
      "solver": None if solver is None else {"name": solver.name, **dataclasses.asdict(solver)},
      "operator": config.operator.name,
      "sigma_y": float(config.operator.sigma_y), "value_range": [lo, hi],
      "residual_ratio": float(np.mean(ratio)),
      "residual_ratio_mean": float(np.mean(ratio_mean)),
      "posterior_std": float(np.mean(std)),  # [-1, 1] scale
      "posterior_std_file_units": float(np.mean(std_f)),
      "std_full_scale": std_full_scale, "arrays": npz_path,
      "per_measurement": [{"name": n, "residual_ratio": float(r),
                           "posterior_std": float(s)}
                          for n, r, s in zip(m.names, ratio, std.reshape(len(m), -1).mean(1))],
  }
  if m.x is not None:
    summary["psnr_posterior_mean"] = float(np.mean(evaluation.psnr(mean, m.x)))
    summary["psnr_observation"] = float(np.mean(evaluation.psnr(m.y, m.x)))
  paths.write_json(os.path.join(output_dir, "export.json"), summary)
  logging.info("Restored %d measurements of %s into %s: data consistency "
               "‖y − A x‖²/(m σ_y²) = %.3f for posterior samples (≈ 1 when calibrated), "
               "%.3f for the mean; mean "
               "posterior std %.4g ([-1, 1] scale)%s.", len(m), m.path, output_dir,
               summary["residual_ratio"], summary["residual_ratio_mean"],
               summary["posterior_std"],
               f"; PSNR of the mean {summary['psnr_posterior_mean']:.2f} dB (observation "
               f"{summary['psnr_observation']:.2f} dB)" if m.x is not None else "")
  if not math.isfinite(summary["residual_ratio"]):
    logging.warning("The data consistency is not finite: is operator.sigma_y > 0?")
  return summary


# The flags that are keyword arguments of `export`, besides --workdir and --output_dir.
_EXPORT_FLAGS = ("num_samples", "save_samples", "batch_size", "data_path", "mask_dir",
                 "reference_path", "seed", "sampler", "solver_steps", "cg_iters", "dps_zeta",
                 "eta")


def _define_flags() -> None:
  """Defines the command-line flags; only when run as a program (`cli`), so importing this
  module next to the other tools (which also have --workdir) does not clash."""
  flags.DEFINE_string("workdir", None, "Workdir of the trained flowdiff/amortized run.")
  flags.DEFINE_string("output_dir", None, "Where the restorations go; default: <workdir>/restored.")
  flags.DEFINE_integer("num_samples", 16, "Posterior samples per measurement for the mean and std.")
  flags.DEFINE_integer("save_samples", 0, "How many of them to write per measurement as well.")
  flags.DEFINE_integer("batch_size", 0, "Measurements per batch; 0: eval.batch_size.")
  flags.DEFINE_string("data_path", None, "Restore these measurements (.npz file or image folder) "
                      "instead of the run's data.path; read with the run's operator, σ_y and "
                      "value rule.")
  flags.DEFINE_string("mask_dir", None, "Masks of --data_path (folder input).")
  flags.DEFINE_string("reference_path", None,
                      "Clean reference of the measurements, for PSNR only.")
  flags.DEFINE_integer("seed", 0, "Seed of the posterior samples.")
  define_sampler_flags()


def define_sampler_flags() -> None:
  """The posterior sampler and operator flags (shared with `inverse --data_path`)."""
  flags.DEFINE_string("sampler", FLOW, "flow: the run's amortized posterior (flowdiff, "
                      "amortized); mmps, dps or pigdm: that solver under the run's diffusion "
                      "prior (any run with one, e.g. clean, naive, em).")
  flags.DEFINE_integer("solver_steps", 64, "Solver steps (+1 final step).")
  flags.DEFINE_integer("cg_iters", 1, "MMPS: conjugate-gradient iterations per step.")
  flags.DEFINE_float("dps_zeta", 1.0, "DPS: step size ζ.")
  flags.DEFINE_float("eta", 1.0, "DDIM η of the solver: 1 ancestral, 0 deterministic.")
  flags.DEFINE_list("operator", [], "Solvers: config.operator fields to replace, as "
                    "name=value pairs (e.g. name=blur,sigma_y=0.05): measurements of another "
                    "operator or σ_y than the run's.")


def operator_overrides(pairs: list[str]) -> dict[str, Any]:
  """--operator's name=value pairs as config.operator fields (numbers parsed)."""
  out = {}
  for pair in pairs:
    if "=" not in pair:
      raise app.UsageError(f"--operator: {pair!r} is not name=value")
    key, value = pair.split("=", 1)
    try:
      out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    except ValueError:
      out[key] = value
  return out


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required: the workdir of a trained flowdiff run.")
  summary = export(f.workdir, f.output_dir, operator=operator_overrides(f.operator),
                   **{name: f[name].value for name in _EXPORT_FLAGS})
  print(f"residual_ratio={summary['residual_ratio']:.4f} "
        f"posterior_std={summary['posterior_std']:.4f} "
        f"wrote {summary['num_measurements']} restorations to "
        f"{os.path.dirname(summary['arrays'])}")


def cli() -> None:
  """`flowdiff-export` and `python -m flowdiff_jax.export`: defines the flags, runs `main`."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF is only a tfds helper here
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
