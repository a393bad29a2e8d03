"""The training loop: mesh, data, state create/restore, the jitted step, logging, checkpoints.

Everything a step computes lives in `train_step.py`; this file only feeds it,
writes what it returns and saves what it produced.

Outputs under the workdir:
  checkpoints/<step>/   orbax checkpoints (state, data-iterator position, config)
  samples/step_<step>.png   grids of samples from the EMA diffusion prior
    (methods clean, naive, flowdiff)
  posterior/step_<step>.png   rows of [observation | flow samples | mean | std |
    clean] for held-out images (methods amortized, flowdiff)
  events.out.tfevents.*   TensorBoard scalars and images (clu metric writers)
"""

from __future__ import annotations

import functools
import os

from absl import logging
from clu import metric_writers, periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowdiff_jax import checkpoint, data, evaluation, operators, train_step as ts
from flowdiff_jax.validate import validate_config


def _make_prepare(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                  for_eval: bool):
  """Jitted raw-batch -> step-batch function (scale, corrupt, drop what the method may not see)."""
  op = operators.make_operator(config.operator)
  keep = ("x", "y", "omega") if for_eval else ts.METHOD_INPUTS[config.method]

  def prepare(raw):
    batch = data.prepare_batch(raw, op, config.data.corruption_seed,
                               keep_clean="x" in keep)
    return {k: batch[k] for k in keep}

  sharding = ts.batch_sharding(mesh)
  prepare = jax.jit(prepare, out_shardings=sharding)
  return lambda local: prepare(data.global_batch(local, sharding))


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Averages a list of metric dicts; the only host sync of the training metrics."""
  stacked = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *history)
  return {k: float(v) for k, v in jax.device_get(stacked).items()}


def evaluate(state: ts.TrainState, eval_step, eval_batches, rng: jax.Array) -> dict[str, float]:
  """Mean eval metrics over the held-out batches (the same draws every time)."""
  return _mean_metrics([eval_step(state, batch, jax.random.fold_in(rng, i))
                        for i, batch in enumerate(eval_batches)])


def posterior_grid(state: ts.TrainState, batch: ts.Batch, rng: jax.Array,
                   num_shown: int = 3, num_mean: int = 16) -> jax.Array:
  """Rows of [observation | num_shown samples | mean | std | clean] for the batch, [B*(n+4), H, W, C].

  The std column is rescaled to [-1, 1] over the whole grid so it is visible.
  """
  samples = ts.posterior_samples(state, batch, rng, max(num_shown, num_mean))
  mean, std = jnp.mean(samples, axis=0), jnp.std(samples, axis=0)
  std = 2.0 * std / jnp.maximum(jnp.max(std), 1e-6) - 1.0
  columns = [batch["y"], *samples[:num_shown], mean, std, batch["x"]]
  return jnp.stack(columns, axis=1).reshape((-1,) + batch["x"].shape[1:])


def load_fixed_prior(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, train_source):
  """(prior_params, prior_config) of the "amortized" method; (None, None) otherwise.

  train_source: the clean training images, used only to fit the oracle Gaussian.
  """
  if config.method != "amortized":
    return None, None
  if config.amortized.prior == "diffusion":
    prior_config, params = checkpoint.load_prior(config.amortized.prior_workdir)
    if data.image_shape(prior_config) != data.image_shape(config):
      raise ValueError(f"The prior in {config.amortized.prior_workdir} models images of shape "
                       f"{data.image_shape(prior_config)}, this run {data.image_shape(config)}.")
    logging.info("Prior: EMA score network of %s (%s run).", config.amortized.prior_workdir,
                 prior_config.method)
    return jax.device_put(params, ts.replicated(mesh)), prior_config
  # Oracle Gaussian prior: mean and covariance of clean training images.
  n = min(config.amortized.gaussian_fit_examples, len(train_source))
  x = np.stack([train_source[i]["image"] for i in range(n)]).astype(np.float64) / 127.5 - 1.0
  mean = x.mean(0)
  flat = x.reshape(n, -1) - mean.reshape(1, -1)
  # A small ridge keeps the always-black borders of (Fashion-)MNIST well posed.
  cov = flat.T @ flat / max(n - 1, 1) + 1e-4 * np.eye(flat.shape[1])
  params = {"mean": mean.astype(np.float32),
            "scale_tril": np.linalg.cholesky(cov).astype(np.float32)}
  logging.info("Prior: Gaussian fitted to %d clean training images (an oracle check).", n)
  return jax.device_put(params, ts.replicated(mesh)), None


def write_grid(images: jax.Array, step: int, workdir: str, folder: str,
               writer: metric_writers.MetricWriter, num_cols: int | None = None) -> str:
  """Writes images [N, H, W, C] in [-1, 1] as <workdir>/<folder>/step_<step>.png and to TensorBoard."""
  grid = evaluation.image_grid(data.to_uint8(jax.device_get(images)), num_cols=num_cols)
  path = os.path.join(workdir, folder, f"step_{step:07d}.png")
  if jax.process_index() == 0:
    evaluation.save_png(path, grid)
  writer.write_images(step, {folder: grid[None]})
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> ts.TrainState:
  """Trains `config.method` in `workdir`, resuming from its newest checkpoint.

  Returns:
    The final TrainState.
  """
  validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  jax.config.update("jax_threefry_partitionable", True)
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  mesh = ts.make_mesh()
  rep = ts.replicated(mesh)
  image_shape = data.image_shape(config)
  init_rng, train_rng, eval_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 4)

  prepare_train = _make_prepare(config, mesh, for_eval=False)
  prepare_eval = _make_prepare(config, mesh, for_eval=True)
  train_source = data.make_source(config, "train")  # read once, used three times
  # A first batch from a separate iterator: shapes, and the flow's ActNorm init.
  sample_batch = prepare_train(next(iter(data.train_dataset(config, train_source))))
  prior_params, prior_config = load_fixed_prior(config, mesh, train_source)
  # Created directly with replicated output sharding: no host copy of the params.
  # Init is replicated, so the partitionable threefry lowering buys nothing
  # there, and the classic one compiles ~3x faster on CPU.
  with jax.threefry_partitionable(False):
    state = jax.jit(functools.partial(ts.create_train_state, config, prior_config=prior_config),
                    out_shardings=rep)(init_rng, sample_batch, prior_params=prior_params)
  train_iter = iter(data.train_dataset(config, train_source))
  manager = checkpoint.make_manager(workdir, config)
  restored = checkpoint.restore_latest(manager, state, train_iter)
  if restored is not None:
    state = restored
    logging.info("Resumed from step %d in %s", int(state.step), workdir)
  else:
    writer.write_hparams(dict(_flatten(config.to_dict())))
  initial_step = int(jax.device_get(state.step))

  step_fn = ts.make_train_step(config, mesh)
  eval_fn = ts.make_eval_step(config, mesh)
  has_flow = config.method in ts.FLOW_METHODS
  has_score = config.method in ts.SCORE_METHODS
  tr, ev = config.training, config.eval
  eval_batches = None
  if tr.eval_every_steps or has_flow:
    eval_batches = [prepare_eval(b) for b in data.eval_batches(config)]
    if not eval_batches:
      raise ValueError(f"No held-out batch of eval.batch_size={ev.batch_size}: the "
                       f"{config.data.dataset} test split has fewer images than that; "
                       "lower eval.batch_size (and data.num_eval_examples).")
  grid_fns = {}  # folder -> (jitted (state, rng) -> images, rows of its grid or None)
  if has_flow:
    # Posterior grids of the first held-out observations.
    grid_batch = jax.tree.map(lambda a: a[:8], eval_batches[0])
    grid_fns["posterior"] = (jax.jit(lambda state, rng: posterior_grid(state, grid_batch, rng)),
                             8)
  if has_score:
    num_samples = ev.num_samples
    grid_fns["samples"] = (jax.jit(
        functools.partial(ts.sample_prior, num_samples=num_samples, image_shape=image_shape,
                          sampler=ev.sampler, num_steps=ev.sample_steps),
        out_shardings=(ts.batch_sharding(mesh) if num_samples % jax.device_count() == 0
                       else rep)), None)

  report = periodic_actions.ReportProgress(num_train_steps=tr.num_train_steps, writer=writer)
  history = []
  logging.info("Training %s on %s/%s from step %d to %d on %d devices.", config.method,
               config.data.dataset, config.operator.name, initial_step, tr.num_train_steps,
               jax.device_count())
  for step in range(initial_step + 1, tr.num_train_steps + 1):
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      batch = prepare_train(next(train_iter))
      state, metrics = step_fn(state, batch, train_rng)
    history.append(metrics)
    report(step)
    last = step == tr.num_train_steps
    if step % tr.log_every_steps == 0 or last:
      writer.write_scalars(step, _mean_metrics(history))
      history = []
    # Flow methods always evaluate at the end: their posterior PSNR is a result.
    if eval_batches and ((tr.eval_every_steps and step % tr.eval_every_steps == 0) or last):
      with report.timed("eval"):
        writer.write_scalars(step, evaluate(state, eval_fn, eval_batches, eval_rng))
    if tr.sample_every_steps and (step % tr.sample_every_steps == 0 or last):
      with report.timed("sample"):
        for folder, (grid_fn, rows) in grid_fns.items():
          images = grid_fn(state, jax.random.fold_in(sample_rng, step))
          write_grid(images, step, workdir, folder, writer,
                     num_cols=images.shape[0] // rows if rows else None)
    if step % tr.checkpoint_every_steps == 0 or last:
      with report.timed("checkpoint"):
        checkpoint.save(manager, state, train_iter, config)
  manager.wait_until_finished()
  manager.close()
  writer.flush()
  return state


def _flatten(tree: dict, prefix: str = ""):
  """Yields ("a.b.c", value) for a nested dict; sequences become strings for hparams."""
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _flatten(value, name + ".")
    else:
      yield name, value if isinstance(value, (int, float, str, bool)) else str(value)
