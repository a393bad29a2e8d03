"""Checkpoints with orbax: the train state, the data-iterator state and the config.

A checkpoint at step k holds the state after k updates and the position of the
grain iterator after k batches, so restoring it and training on is bit for bit
the run that never stopped. orbax writes each step to a temporary folder and
renames it when complete, so `latest_step` only ever sees complete checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from flowdiff_jax.train_step import TrainState


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """A CheckpointManager over `workdir/checkpoints` keeping training.keep_checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.training.keep_checkpoints,
                                         create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def _arrays(state: TrainState) -> dict:
  # Only the arrays are saved; functions and the objective come from the config.
  return {"step": state.step, "params": state.params, "ema_params": state.ema_params,
          "opt_state": state.opt_state}


def save(manager: ocp.CheckpointManager, state: TrainState, data_iter,
         config: ml_collections.ConfigDict) -> None:
  """Saves at step `state.step` (asynchronously; `manager.wait_until_finished()` to block)."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_arrays(state)),
      data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config.to_dict())))


def restore_latest(manager: ocp.CheckpointManager, state: TrainState,
                   data_iter) -> TrainState | None:
  """Restores the newest checkpoint into (a template of) `state` and `data_iter`.

  Args:
    manager: the run's CheckpointManager.
    state: a freshly created state; its arrays give shapes, dtypes and shardings.
    data_iter: the training iterator; its position is set in place.

  Returns:
    The restored state, or None when the workdir has no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  template = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(state))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template),
      data=grain.checkpoint.CheckpointRestore(data_iter)))
  return state.replace(**restored["state"])


def _read_only_manager(workdir: str) -> tuple[ocp.CheckpointManager, str]:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "config": ocp.JsonCheckpointHandler()})
  return manager, directory


def _stored_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config saved with `step`, with today's defaults for fields added since it was written."""
  from configs import default  # noqa: PLC0415

  stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  config = default.get_config()

  def merge(into: ml_collections.ConfigDict, values: dict) -> None:
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(into.get(key), ml_collections.ConfigDict):
        merge(into[key], value)
      else:
        with into.unlocked():
          into[key] = value

  merge(config, stored)
  return config


def load_run(workdir: str, step: int | None = None,
             sharding: jax.sharding.Sharding | None = None
             ) -> tuple[ml_collections.ConfigDict, TrainState]:
  """The config and full TrainState of a finished or running training run.

  For tools that use a trained run (evaluation, inverse problems, export): no
  data, prior workdir or training program is needed, only `workdir`.

  Args:
    workdir: the run's workdir (the one passed to `flowdiff_jax.main`).
    step: the checkpoint to load; the newest when None.
    sharding: where the arrays go; replicated over all local devices when None.

  Returns:
    (config, state) with `state.params` and `state.ema_params` as trained.

  Raises:
    FileNotFoundError: `workdir` has no (such) checkpoint.
  """
  from flowdiff_jax import data, operators, train_step as ts  # noqa: PLC0415 (import cycle)

  manager, directory = _read_only_manager(workdir)
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    manager.close()
    raise FileNotFoundError(f"No checkpoint{'' if step is None else f' at step {step}'} in "
                            f"{directory}; steps there: {list(manager.all_steps())}.")
  config = _stored_config(manager, step)
  stored = manager.item_metadata(step)["state"]
  stored = getattr(stored, "tree", stored)
  shape = data.image_shape(config)
  op = operators.make_operator(config.operator)
  prior_params = prior_config = None
  if config.method == "amortized":
    # The frozen prior's shapes come from the checkpoint itself, so the run
    # that trained it need not exist any more; its U-Net settings are in the
    # prior workdir's config only when that run is still there.
    prior_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                stored["params"]["prior"])
    if config.amortized.prior == "diffusion":
      prior_config = load_prior_config(config.amortized.prior_workdir)

  def init(prior_params):
    raw = {"image": jax.numpy.zeros((1, *shape), jax.numpy.uint8),
           "index": jax.numpy.zeros((1,), jax.numpy.int32)}
    batch = data.prepare_batch(raw, op, 0, keep_clean=True)
    return ts.create_train_state(config, jax.random.key(0), batch, prior_params=prior_params,
                                 prior_config=prior_config)

  abstract = jax.eval_shape(init, prior_params)
  if sharding is None:
    sharding = ts.replicated(ts.make_mesh(jax.local_devices()))
  template = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), _arrays(abstract))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template)))["state"]
  manager.close()
  return config, abstract.replace(**restored)


def load_prior_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the newest checkpoint in `workdir` (of the run that trained a prior)."""
  manager, directory = _read_only_manager(workdir)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {directory}.")
  config = _stored_config(manager, step)
  manager.close()
  return config


def load_prior(workdir: str) -> tuple[ml_collections.ConfigDict, Any]:
  """The config and EMA score params of the newest checkpoint of a clean/naive run.

  Raises:
    FileNotFoundError: `workdir` has no checkpoint.
    ValueError: the run is not a diffusion-prior run.
  """
  from flowdiff_jax import data, train_step as ts  # noqa: PLC0415 (avoid an import cycle)

  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
        f"No checkpoint in {directory}: train a clean or naive run there first "
        "(--config.method=clean --workdir=...) and pass that workdir as "
        "--config.amortized.prior_workdir.")
  config = ml_collections.ConfigDict(
      manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
  if config.method not in ("clean", "naive"):
    raise ValueError(f"The run in {workdir} has method {config.method!r}; a prior comes from "
                     "a 'clean' or 'naive' run.")
  shape = data.image_shape(config)
  abstract = jax.eval_shape(lambda: ts.create_train_state(
      config, jax.random.key(0), {"x": jax.numpy.zeros((1, *shape))}))
  template = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(abstract))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template)))["state"]
  manager.close()
  return config, restored["ema_params"]["score"]
