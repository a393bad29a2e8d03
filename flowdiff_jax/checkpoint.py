"""Checkpoints with orbax: the train state, the data-iterator state and the config.

A checkpoint at step k holds the state after k updates and the position of the
grain iterator after k batches, so restoring it and training on is bit for bit
the run that never stopped. orbax writes each step to a temporary folder and
renames it when complete, so `latest_step` only ever sees complete checkpoints.
"""

from __future__ import annotations

import os

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
