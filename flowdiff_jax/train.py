"""The training loop: mesh, data, state create/restore, the jitted step, logging, checkpoints.

Everything a step computes lives in `step.py` and `methods/`; this file only feeds it,
writes what it returns and saves what it produced.

Outputs under the workdir:
  checkpoints/<step>/   orbax checkpoints (state, data-iterator position, config)
  samples/step_<step>.png   grids of samples from the EMA diffusion prior
    (methods clean, naive, flowdiff)
  posterior/step_<step>.png   rows of [observation | flow samples | mean | std |
    clean] for held-out images (methods amortized, flowdiff)
  events.out.tfevents.*   TensorBoard scalars and images (clu metric writers)
  em/lap_<k>/chunk_<c>.npy   the EM method's posterior samples of each lap
    (`flowdiff_jax.methods.em`)
  corrupt_checkpoints/<step>/   checkpoints that did not read back, set aside
    when resuming (see checkpoint.restore_latest)

A run that stops early raises a `RunStopped` (`Preempted` after SIGTERM/SIGINT,
with a checkpoint of the last step; `Diverged` after too many non-finite steps
in a row); `main.py` turns it into a one-line message and an exit code.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
import time

from absl import logging
from clu import metric_writers, periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowdiff_jax import (
  checkpoint,
  data,
  evaluation,
  methods,
  operators,
  parallel,
  paths,
  runs,
  sampling,
  step as step_lib,
)
from flowdiff_jax.validate import validate_config


def _make_prepare(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                  for_eval: bool):
  """Jitted raw-batch -> step-batch function (scale, corrupt, drop what the method may not see)."""
  op = operators.make_operator(config.operator)
  keep = ("x", "y", "omega") if for_eval else methods.get(config.method).inputs

  def prepare(raw):
    batch = data.prepare_batch(raw, op, config.data.corruption_seed,
                               keep_clean="x" in keep)
    # Measurement files have "x" only where a clean reference set was given.
    return {k: batch[k] for k in keep if k in batch}

  sharding = parallel.batch_sharding(mesh)
  prepare = jax.jit(prepare, out_shardings=sharding)
  return lambda local: prepare(data.global_batch(local, sharding))


def _make_stack(mesh: jax.sharding.Mesh):
  """Jitted [K step-batches] -> one batch with a leading K axis, as `train_steps` takes it."""
  stack = lambda batches: jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  return jax.jit(stack, out_shardings=parallel.stacked_batch_sharding(mesh))


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Averages a list of metric dicts; the only host sync of the training metrics."""
  stacked = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *history)
  return {k: float(v) for k, v in jax.device_get(stacked).items()}


def evaluate(state: step_lib.TrainState, eval_step, eval_batches,
             rng: jax.Array) -> dict[str, float]:
  """Mean eval metrics over the held-out batches (the same draws every time)."""
  return _mean_metrics([eval_step(state, batch, jax.random.fold_in(rng, i))
                        for i, batch in enumerate(eval_batches)])


def posterior_grid(state: step_lib.TrainState, batch: step_lib.Batch, rng: jax.Array,
                   num_shown: int = 3, num_mean: int = 16) -> jax.Array:
  """Rows of [observation | num_shown samples | mean | std | clean], [B*(n+4), H, W, C].

  Without clean images (measurement files without a reference) the clean
  column is left out: [B*(n+3), H, W, C]. The std column is rescaled to
  [-1, 1] over the whole grid so it is visible.
  """
  samples = step_lib.posterior_samples(state, batch, rng, max(num_shown, num_mean))
  mean, std = sampling.posterior_summary(samples)
  return sampling.posterior_panel(batch["y"], samples[:num_shown], mean, std, batch.get("x"))


def load_fixed_prior(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, train_source):
  """(prior_params, prior_config) of the "amortized" method; (None, None) otherwise.

  train_source: the clean training images, used only to fit the oracle Gaussian.
  """
  if not methods.get(config.method).frozen_prior:
    return None, None
  if config.amortized.prior == "diffusion":
    prior_config, params = runs.load_prior(config.amortized.prior_workdir)
    if data.image_shape(prior_config) != data.image_shape(config):
      raise ValueError(f"The prior in {config.amortized.prior_workdir} models images of shape "
                       f"{data.image_shape(prior_config)}, this run {data.image_shape(config)}.")
    logging.info("Prior: EMA score network of %s (%s run).", config.amortized.prior_workdir,
                 prior_config.method)
    return jax.device_put(params, parallel.replicated(mesh)), prior_config
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
  return jax.device_put(params, parallel.replicated(mesh)), None


def fit_before_training(method, config: ml_collections.ConfigDict, run_data: data.RunData,
                        mesh: jax.sharding.Mesh) -> dict | None:
  """`Method.fit_params` on every training observation (the same on every process)."""
  start = time.time()
  fitted = method.fit_params(config, run_data.observations, mesh)
  logging.info("Fitted %s to the training observations before training (%.1f s).",
               ", ".join(fitted), time.time() - start)
  return jax.device_put(fitted, parallel.replicated(mesh))


def _log_sigma_report(config: ml_collections.ConfigDict, report: dict, workdir: str) -> None:
  """Logs the σ_y estimate of measurement files and writes it to <workdir>/sigma_y_estimate.json."""
  logging.info("σ_y of %s: Haar-MAD estimate %.4g ([-1, 1] scale; %.4g in file units, %d "
               "blocks); using %s = %.4g.", config.data.path, report["sigma_y_estimate"],
               report["sigma_y_estimate_file_units"], report["blocks_used"],
               "the estimate" if config.data.get("estimate_sigma_y", False) else
               "operator.sigma_y", report["sigma_y_used"])
  if jax.process_index() == 0:
    paths.write_json(os.path.join(workdir, "sigma_y_estimate.json"), report)


def write_grid(images: jax.Array, step: int, workdir: str, folder: str,
               writer: metric_writers.MetricWriter, num_cols: int | None = None) -> str:
  """Writes images [N, H, W, C] in [-1, 1] to <workdir>/<folder>/step_<step>.png and TensorBoard."""
  grid = evaluation.image_grid(data.to_uint8(jax.device_get(images)), num_cols=num_cols)
  path = os.path.join(workdir, folder, f"step_{step:07d}.png")
  if jax.process_index() == 0:
    paths.write_image(path, grid)
  writer.write_images(step, {folder: grid[None]})
  return path


class RunStopped(Exception):
  """The run stopped before training.num_train_steps; the command exits with `exit_code`."""
  exit_code = 1


class Preempted(RunStopped):
  """SIGTERM/SIGINT: the last step was finished and saved; rerun the command to resume."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal


class Diverged(RunStopped):
  """Too many consecutive non-finite steps; the newest checkpoint predates the divergence."""
  exit_code = 3


def _jax_preemption_service() -> bool:
  """Whether jax.distributed started JAX's preemption service (which then owns SIGTERM)."""
  try:
    from jax._src import distributed  # noqa: PLC0415 (no public name for this)
  except ImportError:
    return False
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class _StopSignals:
  """SIGTERM / SIGINT -> finish the current step, save, stop (a context manager).

  One process: a Python handler notes the signal and the loop reads that flag
  after every dispatch, i.e. every step, or every training.steps_per_dispatch
  steps (host memory only: no device sync). Under jax.distributed
  (several processes, or a one-host TPU slice) JAX's preemption service
  catches SIGTERM and picks one dispatch at which every process stops, read through
  `CheckpointManager.reached_preemption`; SIGINT is handed to it as a SIGTERM,
  so all processes save the same step. A second signal stops at once, without
  a checkpoint.
  """

  def __init__(self):
    self.signum = None
    self.coordinated = False
    self._previous = {}

  def __enter__(self) -> _StopSignals:
    self.coordinated = _jax_preemption_service()
    if threading.current_thread() is not threading.main_thread():
      return self  # Python takes signals in the main thread only: default behaviour then
    # Overriding SIGTERM would silence JAX's own handler, which it relies on.
    for sig in (signal.SIGINT,) if self.coordinated else (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> bool:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def _handle(self, signum: int, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      logging.warning("Second %s: stopping now, without a checkpoint.", name)
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    logging.warning("%s: finishing the current step(s), then saving a checkpoint and stopping "
                    "(send it again to stop at once, without a checkpoint).", name)
    if self.coordinated:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells the other processes

  def should_stop(self, dispatch: int, manager) -> bool:
    """Whether to save and stop now (called after every dispatch, on every process).

    `dispatch` counts the loop's dispatches, one more at each call and the same
    on every process (the step when one step goes per dispatch): JAX's sync
    point is the first counter past every process's count at the signal.
    """
    if self.coordinated:
      return manager.reached_preemption(dispatch)
    return self.signum is not None


class _NonFiniteGuard:
  """Follows skipped (non-finite) updates on the host, from the metrics fetched for logging."""

  def __init__(self, limit: int):
    self.limit = limit
    self.total = 0
    self.streak: list[int] = []  # steps of the current run of skipped updates
    self.terms: dict[str, int] = {}  # metric -> first step of the run where it was not finite

  def update(self, steps, values: list[dict[str, float]]) -> list[int]:
    """Takes the host metrics of consecutive `steps`; returns those whose update was skipped."""
    skipped = []
    for step, metrics in zip(steps, values, strict=True):
      if not metrics.get("train/update_skipped"):
        self.streak, self.terms = [], {}
        continue
      skipped.append(step)
      self.streak.append(step)
      for name, value in metrics.items():
        if not math.isfinite(value):
          self.terms.setdefault(name, step)
    self.total += len(skipped)
    return skipped

  @property
  def diverged(self) -> bool:
    return len(self.streak) >= self.limit

  def culprits(self) -> str:
    """The non-finite metrics of the current run of skipped steps, loss terms first."""
    names = sorted(self.terms, key=lambda k: ("grad_norm" in k, self.terms[k], k))
    return ", ".join(f"{k} (from step {self.terms[k]})" for k in names) or "none logged"


def _fetch_metrics(history: list[step_lib.Metrics]) -> list[dict[str, float]]:
  """The per-step metrics of `history` on the host, with one host sync for all of them.

  An entry holds one step's scalars (`train_step`) or several steps' [K] values
  (`train_steps`); the result has one dict per step, in order.
  """
  if not history:
    return []
  stacked = jax.device_get({k: jnp.concatenate([jnp.reshape(m[k], (-1,)) for m in history])
                            for k in history[0]})
  num_steps = len(next(iter(stacked.values())))
  return [{k: float(v[i]) for k, v in stacked.items()} for i in range(num_steps)]


def _window_mean(window: list[dict[str, float]]) -> dict[str, float]:
  """Means of the steps since the last log: terms over the applied updates (one skipped
  step's NaN would hide the others), update_skipped over all (the fraction skipped)."""
  applied = [m for m in window if not m.get("train/update_skipped")] or window
  means = {k: float(np.mean([m[k] for m in applied])) for k in window[0]}
  if "train/update_skipped" in means:
    means["train/update_skipped"] = float(np.mean([m["train/update_skipped"] for m in window]))
  return means


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False,
                       allow_process_count_change: bool = False) -> step_lib.TrainState:
  """Trains `config.method` in `workdir`, resuming from its newest readable checkpoint.

  While it runs, SIGTERM and SIGINT make it finish the current dispatch (one
  step, or training.steps_per_dispatch steps), save a checkpoint and raise
  `Preempted` (see `_StopSignals`).

  Args:
    config: the run's config.
    workdir: the run's folder; its checkpoints, if any, are resumed.
    allow_config_change: resume checkpoints whose config differs from `config`
      outside checkpoint.RESUMABLE_FIELDS (otherwise that raises
      checkpoint.IncompatibleCheckpointError before anything compiles).
    allow_process_count_change: resume checkpoints written by another number
      of JAX processes, continuing the same data order (otherwise that raises
      checkpoint.IncompatibleCheckpointError before anything compiles).

  Returns:
    The final TrainState.

  Raises:
    Preempted: stopped by a signal, after saving the last step.
    Diverged: training.max_consecutive_nonfinite_steps skipped steps in a row.
    checkpoint.IncompatibleCheckpointError: see allow_config_change.
  """
  with _StopSignals() as stop:
    return _train_and_evaluate(config, workdir, stop, allow_config_change,
                               allow_process_count_change)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stop: _StopSignals,
                        allow_config_change: bool,
                        allow_process_count_change: bool) -> step_lib.TrainState:
  """`train_and_evaluate` with its signal handlers installed."""
  workdir = paths.as_str(workdir)  # absolute if local; gs://... as it is
  # Measurement files decide the image shape (and σ_y when estimated): read
  # and checked here, first, so the saved config holds them.
  config, sigma_report = data.resolve_config(config)
  validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  # A workdir of another run fails here, in seconds, not after compiling.
  checkpoint.check_resume_config(workdir, config, allow_config_change=allow_config_change,
                                 allow_process_count_change=allow_process_count_change)
  jax.config.update("jax_threefry_partitionable", True)
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0 or not config.training.tensorboard)
  if sigma_report is not None:
    _log_sigma_report(config, sigma_report, workdir)

  mesh = parallel.make_mesh()
  rep = parallel.replicated(mesh)
  run_data = data.RunData.open(config, sigma_report)
  image_shape = run_data.image_shape
  init_rng, train_rng, eval_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 4)

  prepare_train = _make_prepare(config, mesh, for_eval=False)
  prepare_eval = _make_prepare(config, mesh, for_eval=True)
  # A first batch from a separate iterator: shapes, and the flow's ActNorm init.
  sample_batch = prepare_train(next(iter(run_data.train_dataset())))
  prior_params, prior_config = load_fixed_prior(config, mesh, run_data.train_source)
  manager = checkpoint.make_manager(workdir, config)
  method = methods.get(config.method)

  def create_state(fitted_params):
    # Created directly with replicated output sharding: no host copy of the params.
    # Init is replicated, so the partitionable threefry lowering buys nothing
    # there, and the classic one compiles ~3x faster on CPU.
    with jax.threefry_partitionable(False):
      init = functools.partial(step_lib.create_train_state, config, prior_config=prior_config)
      return jax.jit(init, out_shardings=rep)(init_rng, sample_batch, prior_params=prior_params,
                                              fitted_params=fitted_params)

  # Params fitted to the observations before training (the flow's Gaussian-EM
  # base): zeros as a template when a checkpoint will overwrite them.
  shapes = method.fitted_params_shapes(config, image_shape)
  resuming = manager.latest_step() is not None
  fitted = (None if shapes is None else
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes) if resuming
            else fit_before_training(method, config, run_data, mesh))
  state = create_state(fitted)
  train_iter = iter(run_data.train_dataset())
  restored = checkpoint.restore_latest(manager, state, train_iter, config=config,
                                       allow_config_change=allow_config_change,
                                       allow_process_count_change=allow_process_count_change)
  if restored is None and shapes is not None and resuming:
    # No checkpoint read back: start over, with a real fit.
    state = create_state(fit_before_training(method, config, run_data, mesh))
  if restored is not None:
    state = restored
    logging.info("Resumed from step %d in %s", int(state.step), workdir)
  else:
    writer.write_hparams(dict(_flatten(config.to_dict())))
  initial_step = int(jax.device_get(state.step))
  # The EM method's posterior samples; None: batches of the training set.
  source = method.batch_source(config, run_data, mesh, workdir)

  def train_batch(step: int) -> step_lib.Batch:
    """The batch of the update step -> step + 1."""
    return prepare_train(next(train_iter)) if source is None else source.batch(step)

  step_fn = step_lib.make_train_step(config, mesh)
  # Replicated once here, not copied to every device by each step call. (A
  # jitted identity, as the step itself took it: device_put cannot target the
  # devices of other processes.)
  train_rng = jax.jit(lambda key: key, in_shardings=rep, out_shardings=rep)(train_rng)
  per_dispatch = config.training.steps_per_dispatch
  if per_dispatch > 1:
    steps_fn, stack = step_lib.make_train_steps(config, mesh), _make_stack(mesh)
  eval_fn = step_lib.make_eval_step(config, mesh)
  has_flow, has_score = method.has_posterior, method.has_prior
  tr, ev = config.training, config.eval
  eval_batches = None
  if tr.eval_every_steps or has_flow:
    eval_batches = [prepare_eval(b) for b in run_data.eval_batches()]
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
        functools.partial(step_lib.sample_prior, num_samples=num_samples, image_shape=image_shape,
                          sampler=ev.sampler, num_steps=ev.sample_steps),
        out_shardings=(parallel.batch_sharding(mesh) if num_samples % jax.device_count() == 0
                       else rep)), None)

  report = periodic_actions.ReportProgress(num_train_steps=tr.num_train_steps, writer=writer)
  profile = (_StepProfile(tr.profile_steps, workdir, initial_step, per_dispatch,
                          tr.num_train_steps)
             if tr.get("profile_steps", 0) and jax.process_index() == 0 else None)
  history = []  # per-step metrics on device, not yet fetched
  window = []  # fetched to the host, not yet written
  guard = _NonFiniteGuard(tr.max_consecutive_nonfinite_steps)

  def finish():
    if profile is not None:
      profile.close()
    manager.wait_until_finished()
    manager.close()
    writer.flush()

  logging.info("Training %s on %s/%s from step %d to %d on %d devices.", config.method,
               config.data.dataset, config.operator.name, initial_step, tr.num_train_steps,
               jax.device_count())
  step, dispatch = initial_step, initial_step
  while step < tr.num_train_steps:
    if source is not None and source.needs_e_step(step):
      # The E-step of a new lap. Its prior must be restorable, so that a run
      # stopped during it redraws the missing samples with the same network.
      if manager.latest_step() != step:
        checkpoint.save(manager, state, train_iter, config)
        manager.wait_until_finished()

      def e_step_should_stop():
        nonlocal dispatch
        dispatch += 1
        return stop.should_stop(dispatch, manager)

      with report.timed("e_step"):
        e_metrics = source.e_step(state, step, e_step_should_stop)
      if e_metrics is None:
        finish()
        how = (f"by {signal.Signals(stop.signum).name}" if stop.signum is not None
               else "at the preemption sync point (SIGTERM to one of the processes)")
        raise Preempted(
            f"Stopped {how} during the E-step at step {step} of {tr.num_train_steps}; the "
            f"samples drawn so far are in {source.directory} and checkpoint step {step} is "
            f"in {manager.directory}. Run the same command again to resume.",
            stop.signum or signal.SIGTERM)
      writer.write_scalars(step, e_metrics)
    # K steps per dispatch from a multiple of K, so that every interval (a
    # multiple of K, see validate) ends on a dispatch boundary. A run resumed
    # from a step that is not one (saved at a preemption under another K)
    # takes single steps until it is.
    k = per_dispatch if step % per_dispatch == 0 else 1
    step += k
    dispatch += 1
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      if k == 1:
        state, metrics = step_fn(state, train_batch(step - 1), train_rng)
      else:
        batches = stack([train_batch(s) for s in range(step - k, step)])
        state, metrics = steps_fn(state, batches, train_rng)
    history.append(metrics)
    report(step)
    if profile is not None:
      profile(step, metrics)
    last = step == tr.num_train_steps
    preempted = stop.should_stop(dispatch, manager) and not last
    save = step % tr.checkpoint_every_steps == 0 or last or preempted
    if step % tr.log_every_steps == 0 or save:
      # Skipped (non-finite) steps are judged only where the loop syncs anyway:
      # at log time and before a checkpoint is written, never once per step.
      fetched = _fetch_metrics(history)
      history = []
      window += fetched
      skipped = guard.update(range(step - len(fetched) + 1, step + 1), fetched)
      if skipped:
        logging.warning("Skipped the non-finite update of step(s) %s (%d in a row; "
                        "training.max_consecutive_nonfinite_steps=%d). Non-finite: %s.",
                        ", ".join(map(str, skipped)), len(guard.streak), guard.limit,
                        guard.culprits())
      if guard.diverged:
        writer.write_scalars(step, _window_mean(window))
        finish()
        newest = manager.latest_step()
        raise Diverged(
            f"Training diverged: the updates of the last {len(guard.streak)} steps "
            f"({guard.streak[0]}-{guard.streak[-1]}) were skipped as non-finite, and "
            f"training.max_consecutive_nonfinite_steps={guard.limit}. Non-finite: "
            f"{guard.culprits()}. {guard.total} update(s) were skipped in this run. "
            + (f"The newest checkpoint, step {newest} in {manager.directory}, holds finite "
               "parameters; nothing was saved after the divergence. "
               if newest is not None else "No checkpoint was written. ")
            + "Resuming with the same config diverges again: lower optim.learning_rate / "
            "flow_optim.learning_rate or the loss weights, and pass --allow_config_change.")
    if window and (step % tr.log_every_steps == 0 or last or preempted):
      writer.write_scalars(step, _window_mean(window))
      window = []
    # Flow methods always evaluate at the end: their posterior PSNR is a result.
    if eval_batches and ((tr.eval_every_steps and step % tr.eval_every_steps == 0) or last):
      with report.timed("eval"):
        scalars = evaluate(state, eval_fn, eval_batches, eval_rng)
        writer.write_scalars(step, scalars)
      if last and "eval/psnr_posterior_mean" in scalars:
        logging.info("Step %d: the posterior mean restores the held-out observations to %.2f dB "
                     "PSNR (the observation y: %.2f dB, A⁺y: %.2f dB).", step,
                     scalars["eval/psnr_posterior_mean"], scalars["eval/psnr_observation"],
                     scalars["eval/psnr_pinv"])
        if "eval/psnr_prior_tweedie" in scalars:
          logging.info("Step %d: the diffusion prior's own E[x | y] (Tweedie, one pass) "
                       "restores them to %.2f dB.", step, scalars["eval/psnr_prior_tweedie"])
    if tr.sample_every_steps and (step % tr.sample_every_steps == 0 or last):
      with report.timed("sample"):
        for folder, (grid_fn, rows) in grid_fns.items():
          images = grid_fn(state, jax.random.fold_in(sample_rng, step))
          write_grid(images, step, workdir, folder, writer,
                     num_cols=images.shape[0] // rows if rows else None)
    if save:
      with report.timed("checkpoint"):
        checkpoint.save(manager, state, train_iter, config)
    if preempted:
      finish()
      how = (f"by {signal.Signals(stop.signum).name}" if stop.signum is not None
             else "at the preemption sync point (SIGTERM to one of the processes)")
      raise Preempted(
          f"Stopped {how} after step {step} of {tr.num_train_steps}; saved checkpoint step "
          f"{step} in {manager.directory}. Run the same command again to resume.",
          stop.signum or signal.SIGTERM)
  finish()
  return state


class _StepProfile:
  """training.profile_steps: a jax.profiler trace of that many steps, by clu's Profile action.

  It starts after the run's third dispatch (the first compiles the step, the
  second may take single steps up to a multiple of steps_per_dispatch) and
  writes WORKDIR/plugins/profile/<time>/<host>.xplane.pb. While it runs, each
  step waits for the device, so the trace holds every traced step's device work.
  """

  def __init__(self, num_steps: int, logdir: str, initial_step: int, per_dispatch: int,
               num_train_steps: int):
    first = initial_step
    for _ in range(3):  # the loop's own step sequence (see the train loop)
      first += per_dispatch if first % per_dispatch == 0 else 1
    self.first, self.last = first, first + num_steps
    self.folder = os.path.join(logdir, "plugins", "profile")
    if self.last > num_train_steps:
      logging.warning("training.profile_steps=%d: the run ends at step %d, before the "
                      "profile's last step %d.", num_steps, num_train_steps, self.last)
    self.action = periodic_actions.Profile(
        logdir=logdir, num_profile_steps=num_steps, profile_duration_ms=None,
        first_profile=first, every_steps=None, every_secs=None)
    self.running = False

  def __call__(self, step: int, outputs) -> None:
    if self.first <= step <= self.last:
      jax.block_until_ready(outputs)
    self.action(step)
    if step == self.first:
      self.running = True
      logging.info("Profiling steps %d-%d into %s.", self.first + 1, self.last, self.folder)
    elif step >= self.last:
      self.running = False

  def close(self) -> None:
    """Ends a trace that the run's end cut short."""
    if self.running:
      jax.profiler.stop_trace()
      self.running = False
      logging.warning("The run ended before the profile's last step; the trace is shorter.")


def _flatten(tree: dict, prefix: str = ""):
  """Yields ("a.b.c", value) for a nested dict; sequences become strings for hparams."""
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _flatten(value, name + ".")
    else:
      yield name, value if isinstance(value, (int, float, str, bool)) else str(value)
