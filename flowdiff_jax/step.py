"""The generic step: TrainState, the pure train/eval steps and their sharded jitted forms.

`train_step(state, batch, rng) -> (state, metrics)` is a pure function: no host
syncs, no globals, no Python side effects. It knows nothing about the loop,
files or logging, so it can be imported into other JAX projects and used under
plain `jax.jit`, `jax.jit` with shardings over a mesh, `jax.shard_map` or
`jax.pmap` (pass `axis_name` there so gradients and metrics are averaged over
the mapped axis).

The step is the same for every method: the method (`flowdiff_jax.methods`,
one module each, chosen by `objective.method`) gives the loss as named terms,
its gradient norms and its eval metrics; the step takes the gradient,
averages it over devices, drops a non-finite update, applies the optimiser
and the EMA.

Randomness: `rng` is the run's root training key; the step folds in
`state.step`, so a resumed run draws exactly what an uninterrupted one would.
Per-example draws come from `flowdiff_jax.rng`: under shard_map/pmap a device
takes its rows of the global draw, so every form of the step computes the same
update as `jax.jit` on the global batch (up to float reduction order). The
U-Net's dropout masks are the exception: they are drawn per device, so with
dropout > 0 the forms agree in distribution, not in value.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from flowdiff_jax import diffusion, methods, parallel
from flowdiff_jax.methods import base

Batch = base.Batch
Metrics = base.Metrics
Objective = base.Objective


class TrainState(flax.struct.PyTreeNode):
  """Parameters, optimiser state and EMA; what uses them is in the static fields.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: {"score": U-Net params} for "clean"/"naive"; {"flow": flow variables,
      "prior": frozen prior params} for "amortized"; {"flow", "score"} for "flowdiff".
    ema_params: exponential moving average of `params`, used for evaluation.
    opt_state: optax state of `tx`.
    tx: the optimiser over the whole `params` tree (one transform per network).
    objective: networks, schedule, operator, method and loss settings.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: optax.OptState
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  objective: Objective = flax.struct.field(pytree_node=False)


def make_objective(config: ml_collections.ConfigDict, channels: int,
                   prior_config: ml_collections.ConfigDict | None = None) -> Objective:
  """The static part of the state (`methods.get(config.method).objective`); for
  "amortized" + "diffusion" the score net and schedule come from the prior run's config."""
  return methods.get(config.method).objective(config, channels, prior_config)


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array, sample_batch: Batch,
                       *, prior_params: Any = None,
                       prior_config: ml_collections.ConfigDict | None = None,
                       fitted_params: dict[str, Any] | None = None) -> TrainState:
  """Initialises a TrainState; no data loader, loop or devices involved.

  Args:
    config: a validated config (see `flowdiff_jax.validate`).
    rng: init key.
    sample_batch: a batch as `train_step` takes it ({"x"} or {"y", "omega"});
      gives the image shape, and the flow's ActNorm layers initialise on it.
    prior_params: "amortized" only: the frozen prior, i.e. the score network's
      params (prior "diffusion") or {"mean": [H, W, C], "scale_tril": [D, D]}
      (prior "gaussian", D = H·W·C).
    prior_config: "amortized" + "diffusion": the config of the run that
      trained the prior (its U-Net and schedule).
    fitted_params: what `Method.fit_params` fitted to the training
      observations (e.g. {"gaussian_em": ...} with config.flow.base
      "gaussian_em"); held fixed by the optimiser.
  """
  method = methods.get(config.method)
  obj = method.objective(config, base.images_shape(sample_batch)[-1], prior_config)
  params = method.init_params(obj, config, rng, sample_batch, prior_params,
                              fitted_params=fitted_params)
  tx = method.optimizer(config)
  # The EMA gets its own buffers: params and ema_params are donated separately.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    tx=tx, objective=obj)


def make_loss_fn(obj: Objective, batch: Batch, step: jax.Array, rng: jax.Array,
                 axis_name: str | None = None):
  """The method's loss as a function of all params: params -> (loss, terms).

  `rng` is the step's key (the root key with the step folded in); `step` sets
  the β schedules. terms are per-dimension scalars (see `train_step`). Its
  gradient is what `train_step` applies, before averaging over `axis_name`.
  """
  return methods.get(obj.method).loss_fn(obj, batch, step, rng, axis_name)


def _device_varying(tree: Any, axis_name: str) -> Any:
  """Marks replicated leaves as varying over `axis_name` (a no-op for the values).

  Under shard_map, autodiff sums the gradient of a replicated input over the
  axis by itself; the gradient of a varying copy is this device's own, as
  under pmap, so the explicit pmean below gives the mean in both.
  """
  def cast(x):
    if axis_name in getattr(jax.typeof(x), "vma", frozenset()):
      return x
    return jax.lax.pcast(x, axis_name, to="varying")
  return jax.tree.map(cast, tree)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """One update of every network the method trains.

  Args:
    state: the current TrainState.
    batch: {"x": [B, H, W, C]} for "clean"; {"y": [B, H, W, C], "omega": {...}}
      for the methods that see only corrupted data; images in [-1, 1].
    rng: the run's root training key (the step index is folded in here).
    axis_name: name of a mapped axis (shard_map / pmap) to average gradients
      and metrics over; None under jit, where the batch is global.

  Returns:
    The new state and scalar metrics, averaged over the global batch, all
    prefixed "train/". Losses are per dimension (nats for likelihood terms):
      clean/naive: dsm_loss (squared ε error), grad_norm;
      amortized: data_fidelity, prior_nll, log_q, loss, the β weights in use,
        prior_nll_bpd and posterior_entropy_bpd (bits/dim, `losses.bits_per_dim`),
        grad_norm;
      flowdiff: the amortized terms plus dsm_loss (the score network on the
        flow's samples), flow_loss, loss (the sum), grad_norm_flow and
        grad_norm_score.
    Gradient norms are of the averaged gradient, before clipping.
    update_skipped: 1.0 when the update was not applied because a loss term
      or the gradient was not finite (NaN/inf, or a gradient norm beyond
      float32's range); params, opt_state and ema_params are then
      returned unchanged, and step still advances (the next call takes the
      next key); else 0.0. The training program stops after
      training.max_consecutive_nonfinite_steps such steps in a row.
  """
  obj = state.objective
  rng = jax.random.fold_in(rng, state.step)
  loss_fn = make_loss_fn(obj, batch, state.step, rng, axis_name)
  params = state.params if axis_name is None else _device_varying(state.params, axis_name)
  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if axis_name is not None:
    grads, terms = jax.lax.pmean((grads, terms), axis_name)
  method = methods.get(obj.method)
  metrics = {f"train/{k}": v for k, v in terms.items()}
  metrics.update(method.grad_metrics(grads))
  # One NaN or inf would spread into the params, Adam's moments and the EMA
  # for good, so such an update is dropped whole. The check runs on device (no
  # host sync) on values already averaged over `axis_name`, so every device
  # and every form of the step makes the same choice. A gradient norm is
  # finite iff every element is (short of overflow), and the norms exist
  # already (a flag per array would be a thousand-operand reduction, slow to
  # compile); from finite, clipped gradients AdamW's update is finite too.
  ok = functools.reduce(jnp.logical_and, [jnp.isfinite(v) for v in metrics.values()])

  def update(params, ema_params, opt_state):
    updates, opt_state = state.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, optax.incremental_update(params, ema_params, 1.0 - obj.ema_decay), opt_state

  # A cond, not a select per array: as cheap to compile as the plain update.
  params, ema_params, opt_state = jax.lax.cond(
      ok, update, lambda *old: old, state.params, state.ema_params, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params,
                            ema_params=ema_params, opt_state=opt_state)
  metrics["train/update_skipped"] = 1.0 - ok.astype(jnp.float32)
  metrics.update(method.step_metrics(terms))
  return new_state, metrics


def train_steps(state: TrainState, batches: Batch, rng: jax.Array, *,
                axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """K consecutive `train_step`s in one call: a `lax.scan` over the batches' leading axis.

  Args:
    state, rng, axis_name: as in `train_step`.
    batches: K batches of `train_step` stacked on a new leading axis:
      {"x": [K, B, H, W, C]} or {"y": [K, B, H, W, C], "omega": {leaves [K, B, ...]}}.

  Returns:
    The state after the K updates, and the metrics of `train_step` for each of
    the K steps, stacked: every value [K], in step order.

  Each step folds its own `state.step` into `rng`, so the result is that of K
  calls of `train_step` up to float rounding: XLA fuses the loop body
  differently from a lone step, and some float32 reductions round otherwise
  (~1e-7 relative; tests/test_perf_options.py). One dispatch instead of K
  saves the per-call host overhead, which matters when a step takes a few
  milliseconds.

  The scan is unrolled: XLA:CPU ran the body of a rolled loop (a while loop)
  6.5x slower than the same step alone (quickstart clean step, batch 8: 988
  vs 151 ms per step; unrolled 138 ms). The price is compile time, about K
  times a step's, so K is meant to be small.
  """
  body = functools.partial(train_step, rng=rng, axis_name=axis_name)
  return jax.lax.scan(lambda s, batch: body(s, batch), state, batches, unroll=True)


def posterior_samples(state: TrainState, batch: Batch, rng: jax.Array,
                      num_samples: int, *, axis_name: str | None = None) -> jax.Array:
  """Draws [num_samples, B, H, W, C] from the flow's q(x | y, ω) ("amortized", "flowdiff").

  With the flow params that amortized.posterior_params names: the current
  ones (default) or their EMA (`base.posterior_params`).
  """
  params = base.posterior_params(state.objective, state.params, state.ema_params)
  return base.flow_samples(state.objective, params, batch, rng, num_samples,
                           axis_name=axis_name)


def eval_step(state: TrainState, batch: Batch, rng: jax.Array, *,
              axis_name: str | None = None, num_posterior_samples: int = 16,
              nll_time_samples: int = 1) -> Metrics:
  """Held-out metrics; `batch` has "y", "omega" and, where clean images exist, "x" ([B, H, W, C]).

  Methods with a trained score network ("clean", "naive", "flowdiff"), using
  its EMA params, on the *clean* held-out images (comparable across methods:
  how well each prior fits clean data; only with "x"):
    eval/dsm_loss_clean: the DSM loss (squared ε error per dimension);
    eval/nll_bpd_clean: the diffusion ELBO bound on −log p(x) in bits/dim
      (`losses.bits_per_dim`), `nll_time_samples` draws per image.
  Methods with a flow ("amortized", "flowdiff"), from `num_posterior_samples`
  flow samples; without ground truth:
    eval/residual_ratio: ‖y − A x‖² / (m σ_y²) of the samples
      (`operators.residual_ratio`): ≈ 1 for a calibrated posterior;
    eval/residual_ratio_mean: the same of the posterior mean (below 1);
    eval/posterior_std: the mean per-pixel posterior std;
  and with "x": PSNR (dB, images in [-1, 1]) against the clean images of the
  posterior mean (eval/psnr_posterior_mean), of the observation y and of A⁺y.
  """
  return methods.get(state.objective.method).eval_metrics(
      state, batch, rng, axis_name=axis_name, num_posterior_samples=num_posterior_samples,
      nll_time_samples=nll_time_samples)


def sample_prior(state: TrainState, rng: jax.Array, num_samples: int,
                 image_shape: tuple[int, int, int], *, sampler: str,
                 num_steps: int) -> jax.Array:
  """Samples [num_samples, H, W, C] in [-1, 1] from the run's diffusion prior (the EMA
  score network of the methods that train one)."""
  params = methods.get(state.objective.method).diffusion_prior_params(state)
  eps_fn = base.eps_fn(state.objective, params)
  return diffusion.sample(eps_fn, state.objective.schedule, rng, (num_samples, *image_shape),
                          sampler=sampler, num_steps=num_steps)


# --------------------------------------------------------------------------
# Sharded, jitted forms used by the training program.
# --------------------------------------------------------------------------


def _check_batch_splits(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  for field, size in (("training.batch_size", config.training.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
    if size % mesh.size:
      raise ValueError(f"config.{field}={size} does not split over the mesh's {mesh.size} "
                       f"devices; allowed: multiples of {mesh.size}")


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """`train_step` jitted over `mesh`: batch sharded on "data", state replicated and donated.

  Returns a function (state, batch, rng) -> (state, metrics) for global arrays
  (`parallel.batch_sharding(mesh)` for the batch, `parallel.replicated(mesh)` for the rest). The
  state passed in is donated: use the returned one.
  """
  _check_batch_splits(config, mesh)
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                 donate_argnums=0)


def make_train_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """`train_steps` jitted over `mesh`: several steps per dispatch (training.steps_per_dispatch).

  Returns a function (state, batches, rng) -> (state, metrics) where `batches`
  holds K batches stacked on a leading axis (`parallel.stacked_batch_sharding(mesh)`)
  and every metric is [K]; K is read from the batches' shape (one compilation
  per K). The state passed in is donated: use the returned one.
  """
  _check_batch_splits(config, mesh)
  rep = parallel.replicated(mesh)
  return jax.jit(train_steps, in_shardings=(rep, parallel.stacked_batch_sharding(mesh), rep),
                 out_shardings=(rep, rep), donate_argnums=0)


def make_eval_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """`eval_step` jitted over `mesh`, with the config's posterior and NLL sample counts."""
  _check_batch_splits(config, mesh)
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  step = functools.partial(eval_step, num_posterior_samples=config.amortized.eval_num_samples,
                           nll_time_samples=config.eval.nll_time_samples)
  return jax.jit(step, in_shardings=(rep, data, rep), out_shardings=rep)
