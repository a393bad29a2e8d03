r"""Evaluates a trained run: posterior recovery, generation metrics and figures.

  python -m flowdiff_jax.evaluate --workdir=workdirs/fmnist_noise \
      [--num_samples=10000] [--sampler=ddim --sample_steps=100] \
      [--inception_weights=fid_inception.npz] [--output=DIR]

restores the run's newest checkpoint (or --step) with `runs.load_run`
and writes to --output (default <workdir>/eval):

  metrics.json   every number below, with the settings, the hardware and the wall time;
  metrics.md     the same as Markdown tables;
  posterior.png  (flow methods) rows of observation | 3 posterior samples |
                 posterior mean | per-pixel std (rescaled) | clean;
  samples.png    (methods with a prior) the first 64 prior samples;
  training_curves.png   the loss terms and eval scalars from the run's TensorBoard events.

Posterior recovery (methods "flowdiff", "amortized"): on the first
--num_posterior_images held-out test images, corrupted as in training
(fixed per-index corruption), the mean of --posterior_samples flow samples
against the clean image: PSNR and SSIM, with the observation y and A⁺y as
reference rows, and the mean per-pixel posterior std. For denoising (A = I)
also the diffusion prior's own E[x | y] (Tweedie's formula, one network pass:
`sampling.tweedie_posterior_mean`), which the flow's mean should match.

Generation (methods "flowdiff", "clean", "naive"): --num_samples samples of
the EMA prior (8-bit quantized, as saved images would be) against the first
--num_reference clean test images: Fréchet distance and KID on each feature
network (our Fashion-MNIST classifier: FD-FMNIST / KID-FMNIST, for 28x28x1
Fashion-MNIST runs; the FID Inception: FID / KID, when --inception_weights is
given) and the pixel mean / covariance errors. Two reference rows with the
same number of images bound each metric: the clean training images (what a
perfect prior would score at this sample size) and A⁺y of the corrupted
training observations (what `naive` imitates).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import datetime
import functools
import io
import math
import os
import sys
import time
from typing import Any

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
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
  step as step_lib,
)
from flowdiff_jax.methods import base as method_base
from flowdiff_jax.models import classifier, inception


@dataclasses.dataclass
class Options:
  """What to evaluate and how; None fields take the run's config values (see the flags)."""
  output: str | None = None
  step: int | None = None
  num_samples: int = 10_000
  sampler: str | None = None
  sample_steps: int | None = None
  batch_size: int = 250
  num_reference: int = 10_000
  num_posterior_images: int | None = None
  posterior_samples: int | None = None
  posterior_params: str | None = None
  posterior_batch_size: int = 64
  inception_weights: str | None = None
  classifier_weights: str | None = None
  kid_subsets: int = 100
  kid_subset_size: int = 1000
  reference_rows: bool = True
  curves: bool = True
  seed: int = 0


# What the Fréchet distance and KID on each feature network are called. Only
# the FID Inception's give a FID.
FEATURE_LABELS = {"fmnist": ("FD-FMNIST", "KID-FMNIST"), "inception": ("FID", "KID")}


@dataclasses.dataclass(frozen=True)
class Extractor:
  """A feature network: fn maps images [B, H, W, C] in [-1, 1] to features [B, D]."""
  name: str  # a key of FEATURE_LABELS; the prefix of its metrics in metrics.json
  fn: Callable[[Any], jax.Array]


def feature_extractors(config: ml_collections.ConfigDict, opts: Options) -> list[Extractor]:
  """The feature networks that apply to this run's images."""
  out = []
  shape = data.image_shape(config)
  if config.data.dataset == "fashion_mnist" and shape == classifier.IMAGE_SHAPE:
    params = classifier.load_params(opts.classifier_weights)
    out.append(Extractor("fmnist", classifier.make_feature_fn(params)))
  if opts.inception_weights:
    variables = inception.load_variables(opts.inception_weights)
    out.append(Extractor("inception", inception.make_feature_fn(variables)))
  return out


def _shard(mesh: jax.sharding.Mesh, size: int):
  """Batch sharding when the batch splits over the devices, else replicated."""
  return parallel.batch_sharding(mesh) if size % mesh.size == 0 else parallel.replicated(mesh)


def _batches(config: ml_collections.ConfigDict, split: str, num: int, batch_size: int, *,
             whole: bool = False) -> list[dict[str, np.ndarray]]:
  """The first `num` images of `split`: raw batches {"image": uint8, "index": int32}, one process.

  Batches hold `batch_size` images except a shorter last one, so exactly
  min(num, len(split)) images come back; with `whole`, only whole batches
  (the jitted consumer then compiles once).
  """
  cfg = ml_collections.ConfigDict(config.to_dict())
  source = data.make_source(cfg, split)
  num = min(num, len(source))
  # eval_batches keeps whole batches only: read batches of the largest divisor
  # of `num` up to batch_size, then regroup.
  cfg.data.num_eval_examples = num
  cfg.eval.batch_size = max(d for d in range(1, min(batch_size, num) + 1) if num % d == 0)
  out, buffer = [], []
  for piece in data.eval_batches(cfg, source, process_index=0, process_count=1):
    buffer.append(piece)
    merged = {k: np.concatenate([b[k] for b in buffer]) for k in piece}
    while len(merged["index"]) >= batch_size:
      out.append({k: v[:batch_size] for k, v in merged.items()})
      merged = {k: v[batch_size:] for k, v in merged.items()}
    buffer = [merged] if len(merged["index"]) else []
  if buffer and not whole:
    out.append(buffer[0])
  return out


# --------------------------------------------------------------------------
# Posterior recovery.
# --------------------------------------------------------------------------


def _prior_tweedie(state: step_lib.TrainState, y: jax.Array) -> jax.Array | None:
  """E[x | y] [B, H, W, C] under the run's diffusion prior, for denoising only; else None.

  One pass of the prior's ε-network (EMA params; `sampling.tweedie_posterior_mean`):
  the MMSE restoration the prior itself implies, beside the flow's posterior
  mean. Where the two differ, the flow has not learned the prior's posterior.
  """
  obj = state.objective
  if not method_base.tweedie_applies(obj.operator, obj.schedule):
    return None
  try:
    score_params = methods.get(obj.method).diffusion_prior_params(state)
  except ValueError:  # an "amortized" run with an analytic Gaussian prior
    return None
  return sampling.tweedie_posterior_mean(method_base.eps_fn(obj, score_params), obj.schedule,
                                         y, obj.operator.sigma_y)


def _posterior_fn(num_samples: int, num_shown: int):
  def fn(state, batch, rng):
    samples = step_lib.posterior_samples(state, batch, rng, num_samples)
    mean, std = sampling.posterior_summary(samples)
    x, y = batch["x"], batch["y"]
    pinv = state.objective.operator.pinv(y, batch["omega"])
    per_example = {"posterior_std": jnp.mean(std, axis=(1, 2, 3))}
    rows = [("posterior_mean", mean), ("observation", y), ("pinv", pinv)]
    if state.objective.flow_base != "pinv":  # the flow's own base, e.g. a Gaussian's E[x | y]
      rows.append(("flow_base", method_base.flow_estimate(state.objective, state.params, y,
                                                          batch["omega"])))
    tweedie = _prior_tweedie(state, y)
    if tweedie is not None:
      rows.append(("prior_tweedie", tweedie))
    for name, estimate in rows:
      per_example[f"{name}/psnr"] = evaluation.psnr(estimate, x)
      per_example[f"{name}/ssim"] = evaluation.ssim(estimate, x)
    # Calibration: how often the error is within k posterior stds (0.683 / 0.954
    # for a calibrated Gaussian posterior), and the samples' data consistency
    # (≈ 1 for exact posterior samples; `operators.residual_ratio`).
    err = jnp.abs(mean - x)
    for k in (1, 2):
      per_example[f"coverage_{k}std"] = jnp.mean(err <= k * std, axis=(1, 2, 3))
    per_example["residual_ratio"] = jnp.mean(operators.residual_ratio(
        state.objective.operator, y, batch["omega"], samples), axis=0)
    columns = {"y": y, "samples": samples[:num_shown], "mean": mean, "std": std, "x": x}
    return per_example, columns
  return jax.jit(fn)


def posterior_metrics(state: step_lib.TrainState, config: ml_collections.ConfigDict, opts: Options,
                      mesh: jax.sharding.Mesh, rng: jax.Array
                      ) -> tuple[dict[str, Any], np.ndarray]:
  """PSNR/SSIM of the flow's posterior mean (and of y, A⁺y) on held-out images; the grid.

  Returns:
    (metrics, grid): metrics {"num_images", "num_samples", "flow_params"
    ("params" or "ema"), "<row>/<metric>": {"mean", "sem"}, "posterior_std":
    {...}}; grid uint8 [rows, cols, C] of
    the first 8 images.
  """
  num_images = opts.num_posterior_images or config.data.num_eval_examples
  num_samples = opts.posterior_samples or config.amortized.eval_num_samples
  op = operators.make_operator(config.operator)
  prepare = jax.jit(functools.partial(data.prepare_batch, op=op,
                                      corruption_seed=config.data.corruption_seed,
                                      keep_clean=True))
  fn = _posterior_fn(num_samples, num_shown=3)
  per_example, grid = {}, None
  raw_batches = _batches(config, data.DATASETS[config.data.dataset].eval_split, num_images,
                         opts.posterior_batch_size, whole=True)
  if not raw_batches:
    raise ValueError(f"No held-out batch of {opts.posterior_batch_size} images.")
  bar = reporting.ProgressBar("Posterior samples of held-out images",
                              sum(len(b["index"]) for b in raw_batches), unit="images")
  done = 0
  for i, raw in enumerate(raw_batches):
    batch = prepare(jax.device_put(raw, _shard(mesh, len(raw["index"]))))
    batch = {k: batch[k] for k in ("x", "y", "omega")}
    values, columns = fn(state, batch, jax.random.fold_in(rng, i))
    for k, v in jax.device_get(values).items():
      per_example.setdefault(k, []).append(np.asarray(v))
    done += len(raw["index"])
    bar(done)
    if grid is None:
      grid = _posterior_grid(jax.device_get(columns), rows=8)
  metrics = {k: reporting.mean_sem(np.concatenate(v)) for k, v in per_example.items()}
  metrics.update(num_images=int(sum(len(b["index"]) for b in raw_batches)),
                 num_samples=num_samples, flow_params=state.objective.posterior_params)
  return metrics, grid


def _posterior_grid(columns: dict[str, np.ndarray], rows: int) -> np.ndarray:
  """uint8 grid of rows [y | samples | mean | std | x] (`sampling.posterior_panel`) of the
  first `rows` examples; std rescaled to [-1, 1] over those rows."""
  c = {k: np.asarray(v)[..., :rows, :, :, :] if k == "samples" else np.asarray(v)[:rows]
       for k, v in columns.items()}
  panel = np.asarray(sampling.posterior_panel(c["y"], c["samples"], c["mean"], c["std"], c["x"]))
  return evaluation.image_grid(data.to_uint8(panel), num_cols=len(panel) // len(c["x"]))


# --------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------


class _ImageSet:
  """Features (per extractor) and pixel moments of a stream of image batches."""

  def __init__(self, extractors: list[Extractor], pool: int, batch_size: int):
    self.extractors, self.batch_size = extractors, batch_size
    self.features = {e.name: [] for e in extractors}
    self.moments = evaluation.PixelMoments(pool)
    self.first = []  # the first images, for a grid

  def add(self, images: np.ndarray) -> None:
    images = evaluation.quantize(images)
    for e in self.extractors:
      self.features[e.name].append(evaluation.extract_features(e.fn, images, self.batch_size))
    self.moments.add(images)
    if sum(len(a) for a in self.first) < 64:
      self.first.append(images[:64])

  def feature_array(self, name: str) -> np.ndarray:
    return np.concatenate(self.features[name])

  @property
  def count(self) -> int:
    return self.moments.count


def _compare(images: _ImageSet, reference: _ImageSet, opts: Options) -> dict[str, float]:
  out = {"num_images": images.count}
  for e in images.extractors:
    f, ref = images.feature_array(e.name), reference.feature_array(e.name)
    out[f"fd_{e.name}"] = evaluation.frechet_distance_of_features(f, ref)
    out[f"kid_{e.name}"], out[f"kid_{e.name}_std"] = evaluation.kid(
        f, ref, num_subsets=opts.kid_subsets, subset_size=opts.kid_subset_size, seed=opts.seed)
  out.update(evaluation.pixel_moment_errors(images.moments, reference.moments))
  return out


def generation_metrics(state: step_lib.TrainState, config: ml_collections.ConfigDict, opts: Options,
                       extractors: list[Extractor], mesh: jax.sharding.Mesh, rng: jax.Array
                       ) -> tuple[dict[str, Any], np.ndarray]:
  """Fréchet distances, KIDs and pixel-moment errors of prior samples (and reference rows).

  Returns:
    (metrics, grid): metrics {"settings": {...}, "rows": {"samples": {...},
    "clean_train": {...}, "pinv_train": {...}}}; grid: uint8 grid of the
    first 64 samples.
  """
  shape = data.image_shape(config)
  pool = evaluation.pixel_pool_for(shape)
  sampler = opts.sampler or config.eval.sampler
  steps = opts.sample_steps or config.eval.sample_steps
  chunk = min(opts.batch_size, opts.num_samples)
  new_set = lambda: _ImageSet(extractors, pool, opts.batch_size)

  start = time.time()
  reference = new_set()
  raw_batches = _batches(config, data.DATASETS[config.data.dataset].eval_split,
                         opts.num_reference, opts.batch_size)
  bar = reporting.ProgressBar("Features of clean test images",
                              sum(len(b["index"]) for b in raw_batches), unit="images")
  for raw in raw_batches:
    reference.add(np.asarray(data.to_model_range(raw["image"])))
    bar(reference.count)
  logging.info("Reference: %d clean test images (%.0f s).", reference.count, time.time() - start)

  sample_fn = jax.jit(
      functools.partial(step_lib.sample_prior, num_samples=chunk, image_shape=shape,
                        sampler=sampler,
                        num_steps=steps),
      out_shardings=_shard(mesh, chunk))
  samples = new_set()
  start = time.time()
  bar = reporting.ProgressBar(f"Prior samples ({sampler}, {steps} steps)", opts.num_samples,
                              unit="images")
  for i in range(math.ceil(opts.num_samples / chunk)):
    images = np.asarray(jax.device_get(sample_fn(state, jax.random.fold_in(rng, i))))
    samples.add(images[:opts.num_samples - samples.count])
    bar(samples.count)
  sample_wall = time.time() - start
  logging.info("Samples: %d (%.0f s).", samples.count, sample_wall)
  rows = {"samples": _compare(samples, reference, opts)}

  if opts.reference_rows:
    op = operators.make_operator(config.operator)

    @jax.jit
    def pinv_of_observation(raw):
      # The training example's own fixed corruption (same index and seed), then A⁺.
      batch = data.prepare_batch(raw, op, config.data.corruption_seed, keep_clean=False)
      return op.pinv(batch["y"], batch["omega"])

    clean, pinv = new_set(), new_set()
    raw_batches = _batches(config, "train", opts.num_samples, opts.batch_size)
    bar = reporting.ProgressBar("Features of training images and their A⁺y",
                                sum(len(b["index"]) for b in raw_batches), unit="images")
    for raw in raw_batches:
      clean.add(np.asarray(data.to_model_range(raw["image"])))
      pinv.add(np.asarray(jax.device_get(pinv_of_observation(raw))))
      bar(clean.count)
    rows["clean_train"] = _compare(clean, reference, opts)
    rows["pinv_train"] = _compare(pinv, reference, opts)

  settings = {"sampler": sampler, "sample_steps": steps, "num_samples": samples.count,
              "num_reference": reference.count, "sampling_wall_s": round(sample_wall, 1),
              "pixel_stats_pool": pool, "feature_networks": [e.name for e in extractors],
              "kid_subsets": opts.kid_subsets,
              "kid_subset_size": min(opts.kid_subset_size, samples.count, reference.count)}
  first = np.concatenate(samples.first)[:64]
  return {"settings": settings, "rows": rows}, evaluation.image_grid(data.to_uint8(first))


# --------------------------------------------------------------------------
# Training curves.
# --------------------------------------------------------------------------


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every scalar in the run's TensorBoard event files: {tag: (steps [n], values [n])}.

  A resumed run has several event files; a step written twice keeps its last value.
  """
  from tensorboard.backend.event_processing import event_file_loader  # noqa: PLC0415
  from tensorboard.util import tensor_util  # noqa: PLC0415

  series: dict[str, dict[int, float]] = {}
  for path in sorted(paths.resolve(workdir).glob("events.out.tfevents.*")):
    for event in event_file_loader.EventFileLoader(os.fspath(path)).Load():
      for value in event.summary.value:
        if value.HasField("tensor"):
          array = tensor_util.make_ndarray(value.tensor)
          if array.ndim != 0 or array.dtype.kind not in "fiu":
            continue  # images, text
          number = float(array)
        elif value.HasField("simple_value"):
          number = value.simple_value
        else:
          continue
        series.setdefault(value.tag, {})[int(event.step)] = number
  return {tag: (np.array(sorted(s)), np.array([s[k] for k in sorted(s)]))
          for tag, s in series.items()}


def plot_curves(scalars: dict[str, tuple[np.ndarray, np.ndarray]], path: str, title: str) -> bool:
  """One panel per train/ and eval/ scalar (weights and schedules left out); False if none."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415

  tags = sorted(t for t in scalars if t.startswith(("train/", "eval/"))
                and not t.startswith("train/beta_"))
  if not tags:
    return False
  cols = 4
  rows = math.ceil(len(tags) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
  for ax, tag in zip(axes.flat, tags):
    steps, values = scalars[tag]
    ax.plot(steps, values, marker="." if len(steps) < 20 else None)
    ax.set_title(tag, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(tags):]:
    ax.axis("off")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  paths.write_bytes(path, buffer.getvalue())
  return True


# --------------------------------------------------------------------------
# Reports.
# --------------------------------------------------------------------------


def _pm(stat: dict[str, float], digits: int) -> str:
  return f"{stat['mean']:.{digits}f} ± {stat['sem']:.{digits}f}"


def to_markdown(results: dict[str, Any]) -> str:
  """The metrics of `evaluate_run` as Markdown tables."""
  run = results["run"]
  lines = [f"# Evaluation of `{run['workdir']}`", "",
           f"Method `{run['method']}`, step {run['step']}; {run['dataset']} "
           f"{run['image_shape'][0]}×{run['image_shape'][1]}, operator `{run['operator']}`, "
           f"σ_y = {run['sigma_y']} on the [-1, 1] scale. "
           f"{results['hardware']}, {results['date']}, {results['wall_s']:.0f} s.", "",
           f"    {results['command']}", ""]
  post = results.get("posterior")
  if post:
    lines += [f"## Posterior recovery ({post['num_images']} held-out test images, "
              f"{post['num_samples']} flow samples each, flow params "
              f"{post.get('flow_params', 'params')})", "",
              "| estimate | PSNR (dB) ↑ | SSIM ↑ |", "|---|---:|---:|"]
    for key, label in (("posterior_mean", "posterior mean"), ("observation", "observation y"),
                       ("pinv", "A⁺y"), ("flow_base", "the flow's base x̂₀(y)"),
                       ("prior_tweedie", "the diffusion prior's E[x | y] (Tweedie, one pass)")):
      if key + "/psnr" not in post:
        continue
      lines.append(f"| {label} | {_pm(post[key + '/psnr'], 2)} | {_pm(post[key + '/ssim'], 4)} |")
    lines += ["", f"Mean per-pixel posterior std: {_pm(post['posterior_std'], 4)} "
              "([-1, 1] scale). ± is the standard error over images.", ""]
    if "coverage_1std" in post:
      lines += [f"Calibration: the error is within 1 / 2 posterior stds at "
                f"{_pm(post['coverage_1std'], 3)} / {_pm(post['coverage_2std'], 3)} of the "
                "pixels (0.683 / 0.954 if calibrated and Gaussian); residual ratio of the "
                f"samples ‖y − A x‖²/(m σ_y²) {_pm(post['residual_ratio'], 3)} (≈ 1 for exact "
                "posterior samples).", ""]
  gen = results.get("generation")
  if gen:
    s = gen["settings"]
    header = ["images"]
    for name in s["feature_networks"]:
      header += [f"{label} ↓" for label in FEATURE_LABELS[name]]
    header += ["pixel mean RMSE ↓", "pixel cov. rel. error ↓"]
    lines += [f"## Generation ({s['num_samples']} samples, {s['sampler']} {s['sample_steps']} "
              f"steps, against {s['num_reference']} clean test images)", "",
              "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    row_labels = {"samples": "**prior samples**", "clean_train": "clean training images",
                  "pinv_train": "A⁺y of training observations"}
    for key, row in gen["rows"].items():
      cells = [f"{row_labels[key]} ({row['num_images']})"]
      for name in s["feature_networks"]:
        cells += [f"{row[f'fd_{name}']:.3f}",
                  f"{row[f'kid_{name}']:.4g} ± {row[f'kid_{name}_std']:.2g}"]
      cells += [f"{row['pixel_mean_rmse']:.4f}", f"{row['pixel_cov_rel_error']:.4f}"]
      lines.append("| " + " | ".join(cells) + " |")
    pool = s["pixel_stats_pool"]
    fmnist_note = ("FD-FMNIST/KID-FMNIST use the penultimate features of our Fashion-MNIST "
                   "classifier (experiments/fmnist_classifier), not Inception: they are not "
                   "FIDs. " if "fmnist" in s["feature_networks"] else "")
    lines += ["",
              f"KID: mean ± std over {s['kid_subsets']} subsets of {s['kid_subset_size']}. "
              + fmnist_note + "Pixel errors: RMS of the mean-image difference, and "
              "‖Σ − Σ_ref‖_F / ‖Σ_ref‖_F"
              + (f" on {pool}×{pool}-averaged images" if pool > 1 else "") + ". The "
              "reference rows bound each metric at this sample size: clean training "
              "images (a perfect prior) and A⁺y of the corrupted training data (what "
              "`naive` learns).", ""]
  if results.get("figures"):
    lines += ["Figures: " + ", ".join(f"[{f}]({f})" for f in results["figures"]), ""]
  return "\n".join(lines)


def sections(method: str) -> tuple[str, ...]:
  """What a method is evaluated on: "posterior" (it has a flow), "generation" (a trained prior).

  "amortized" has a flow but its prior is frozen (another run's or an oracle
  Gaussian), so it is not evaluated for generation.
  """
  m = methods.get(method)
  return tuple(name for name, has in (("posterior", m.has_posterior),
                                      ("generation", m.has_prior)) if has)


def evaluate_run(workdir: str, opts: Options, command: str = "") -> dict[str, Any]:
  """Evaluates the run in `workdir`; writes metrics.json, metrics.md and figures to opts.output.

  Returns:
    The results dict written to metrics.json.
  """
  start = time.time()
  output = paths.as_str(opts.output or os.path.join(workdir, "eval"))
  mesh = parallel.make_mesh(jax.local_devices())
  config, state = runs.load_run(workdir, step=opts.step, sharding=parallel.replicated(mesh))
  if config.data.dataset not in data.DATASETS:
    raise ValueError(f"{workdir} trained on measurement files (data.dataset="
                     f"{config.data.dataset!r}): there are no clean test images to evaluate "
                     "against. flowdiff_jax.evaluate takes runs on "
                     f"{', '.join(sorted(data.DATASETS))}.")
  step = int(jax.device_get(state.step))
  logging.info("Loaded %s (method %s) at step %d.", workdir, config.method, step)
  if opts.posterior_params is not None and state.objective.flow is not None:
    # The objective is static: a copy that draws with the other flow params.
    state = state.replace(objective=dataclasses.replace(
        state.objective, posterior_params=opts.posterior_params))
  post_rng, sample_rng = jax.random.split(jax.random.key(opts.seed))
  results: dict[str, Any] = {
      "run": {"workdir": workdir, "method": config.method, "step": step,
              "dataset": config.data.dataset, "image_shape": list(data.image_shape(config)),
              "operator": config.operator.name, "sigma_y": config.operator.sigma_y},
      "options": dataclasses.asdict(opts), "figures": []}
  grids = {}

  todo = sections(config.method)
  if "posterior" in todo:
    t = time.time()
    results["posterior"], grid = posterior_metrics(state, config, opts, mesh, post_rng)
    results["posterior"]["wall_s"] = round(time.time() - t, 1)
    grids["posterior.png"] = grid
    results["figures"].append("posterior.png")
    logging.info("Posterior: %s", results["posterior"])
  if "generation" in todo and opts.num_samples > 0:
    t = time.time()
    extractors = feature_extractors(config, opts)
    results["generation"], grid = generation_metrics(state, config, opts, extractors, mesh,
                                                     sample_rng)
    results["generation"]["settings"]["wall_s"] = round(time.time() - t, 1)
    grids["samples.png"] = grid
    results["figures"].append("samples.png")
    logging.info("Generation: %s", results["generation"])
  if opts.curves:
    title = f"{paths.resolve(workdir).name} ({config.method})"
    if plot_curves(read_scalars(workdir), os.path.join(output, "training_curves.png"), title):
      results["figures"].append("training_curves.png")

  results.update(wall_s=round(time.time() - start, 1), hardware=reporting.hardware(),
                 date=datetime.date.today().isoformat(), jax=jax.__version__,
                 command=command or f"python -m flowdiff_jax.evaluate --workdir={workdir}")
  reporting.write_report(output, results, to_markdown(results), grids)
  logging.info("Wrote %s (%.0f s).", os.path.join(output, "metrics.md"), results["wall_s"])
  return results


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------

_DEFAULTS = Options()


def _define_flags() -> None:
  """Defines the command-line flags; only when run as a program (`cli`), so importing this
  module next to the other tools (which also have --workdir) does not clash."""
  flags.DEFINE_string("workdir", None,
                      "Workdir of the run to evaluate (as given to flowdiff_jax.main).")
  flags.DEFINE_string("output", None, "Where to write metrics and figures; default <workdir>/eval.")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default the newest.")
  flags.DEFINE_integer("num_samples", _DEFAULTS.num_samples,
                       "Prior samples for the generation metrics (0: skip generation).")
  flags.DEFINE_enum("sampler", None, ["ancestral", "ddim", "heun"],
                    "Sampler of the prior; default the run's config.eval.sampler.")
  flags.DEFINE_integer("sample_steps", None,
                       "Sampler steps; default the run's config.eval.sample_steps.")
  flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size,
                       "Images per batch of sampling and feature extraction.")
  flags.DEFINE_integer("num_reference", _DEFAULTS.num_reference,
                       "Clean held-out images the samples are compared with (all if fewer).")
  flags.DEFINE_integer("num_posterior_images", None,
                       "Held-out images for posterior recovery; default "
                       "config.data.num_eval_examples.")
  flags.DEFINE_integer("posterior_samples", None,
                       "Flow samples per image; default config.amortized.eval_num_samples.")
  flags.DEFINE_enum("posterior_params", None, list(method_base.POSTERIOR_PARAMS),
                    "Flow params of the posterior samples: the current ones or their EMA; "
                    "default config.amortized.posterior_params.")
  flags.DEFINE_integer("posterior_batch_size", _DEFAULTS.posterior_batch_size,
                       "Held-out images per posterior batch (whole batches only).")
  flags.DEFINE_string("inception_weights", None,
                      "FID Inception weights (.npz from scripts/convert_fid_inception.py or "
                      ".msgpack); FID and KID are computed only when given.")
  flags.DEFINE_string("classifier_weights", None,
                      "Fashion-MNIST classifier weights for FD-FMNIST; default the committed ones.")
  flags.DEFINE_integer("kid_subsets", _DEFAULTS.kid_subsets, "KID: number of subsets.")
  flags.DEFINE_integer("kid_subset_size", _DEFAULTS.kid_subset_size, "KID: subset size.")
  flags.DEFINE_bool("reference_rows", _DEFAULTS.reference_rows,
                    "Also score clean training images and A⁺y of training observations.")
  flags.DEFINE_bool("curves", _DEFAULTS.curves, "Plot the training curves from the event files.")
  flags.DEFINE_integer("seed", _DEFAULTS.seed,
                       "Seed of the posterior and prior samples and of the KID subsets.")
  flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  jax.config.update("jax_threefry_partitionable", True)
  f = flags.FLAGS
  opts = Options(**{field.name: getattr(f, field.name) for field in dataclasses.fields(Options)})
  results = evaluate_run(f.workdir, opts, command="python -m flowdiff_jax.evaluate "
                         + " ".join(sys.argv[1:]))
  print(to_markdown(results))


def cli() -> None:
  """`flowdiff-evaluate` and `python -m flowdiff_jax.evaluate`: defines the flags, runs `main`."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF is only a tfds helper here
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
