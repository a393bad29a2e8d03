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
