"""Finished (or running) training runs, read back from their workdirs.

The tools that take a trained run (evaluation, inverse problems, export) and
the "amortized" method's frozen diffusion prior load it from here: its config
(`load_config`), its whole TrainState (`load_run`) or just its diffusion prior
(`load_prior`). Nothing but the workdir is needed: no data, no prior workdir of
a prior, no training program. Every loader fills the fields added to
configs/default.py since the run was written with today's defaults, so a
config reads the same whichever loader read it.

Writing checkpoints, restoring them to resume, and the resume-compatibility
check are in `flowdiff_jax.checkpoint`.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from flowdiff_jax import checkpoint, data, methods, operators, parallel, step as step_lib
from flowdiff_jax.configs import default


def _stored_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config saved with `step`, with today's defaults for fields added since it was written."""
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


def _checked_step(manager: ocp.CheckpointManager, directory: str, step: int | None,
                  hint: str = "") -> int:
  """`step`, or the newest when None; FileNotFoundError (ending in `hint`) when there is none."""
  chosen = manager.latest_step() if step is None else step
  if chosen is None or chosen not in manager.all_steps():
    manager.close()
    raise FileNotFoundError(f"No checkpoint{'' if step is None else f' at step {step}'} in "
                            f"{directory}; steps there: {list(manager.all_steps())}.{hint}")
  return chosen


def load_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config of the run in `workdir` (of checkpoint `step`; the newest when None).

  Raises:
    FileNotFoundError: `workdir` has no (such) checkpoint.
  """
  manager, directory = checkpoint.read_only_manager(workdir)
  config = _stored_config(manager, _checked_step(manager, directory, step))
  manager.close()
  return config


def load_run(workdir: str, step: int | None = None,
             sharding: jax.sharding.Sharding | None = None
             ) -> tuple[ml_collections.ConfigDict, step_lib.TrainState]:
  """The config and full TrainState of a finished or running training run.

  Args:
    workdir: the run's workdir (the one passed to `flowdiff_jax.main`).
    step: the checkpoint to load; the newest when None.
    sharding: where the arrays go; replicated over all local devices when None.

  Returns:
    (config, state) with `state.params` and `state.ema_params` as trained.

  Raises:
    FileNotFoundError: `workdir` has no (such) checkpoint.
  """
  manager, directory = checkpoint.read_only_manager(workdir)
  step = _checked_step(manager, directory, step)
  config = _stored_config(manager, step)
  stored = manager.item_metadata(step)["state"]
  stored = getattr(stored, "tree", stored)
  shape = data.image_shape(config)
  op = operators.make_operator(config.operator)
  prior_params = prior_config = None
  if methods.get(config.method).frozen_prior:
    # The frozen prior's shapes come from the checkpoint itself, so the run
    # that trained it need not exist any more; its U-Net settings are in the
    # prior workdir's config only when that run is still there.
    prior_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                stored["params"]["prior"])
    if config.amortized.prior == "diffusion":
      prior_config = load_config(config.amortized.prior_workdir)

  # Params fitted before training (the flow's Gaussian-EM base) are in the checkpoint.
  fitted = methods.get(config.method).fitted_params_shapes(config, shape)

  def init(prior_params, fitted_params):
    raw = {"image": jax.numpy.zeros((1, *shape), jax.numpy.uint8),
           "index": jax.numpy.zeros((1,), jax.numpy.int32)}
    batch = data.prepare_batch(raw, op, 0, keep_clean=True)
    return step_lib.create_train_state(config, jax.random.key(0), batch,
                                       prior_params=prior_params, prior_config=prior_config,
                                       fitted_params=fitted_params)

  abstract = jax.eval_shape(init, prior_params, fitted)
  if sharding is None:
    sharding = parallel.replicated(parallel.make_mesh(jax.local_devices()))
  template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          checkpoint.saved_arrays(abstract))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template)))["state"]
  manager.close()
  return config, abstract.replace(**restored)


def load_prior(workdir: str) -> tuple[ml_collections.ConfigDict, Any]:
  """The config and diffusion-prior ε-network params of the newest checkpoint in `workdir`.

  A prior is the score network a run trained (its EMA params): a run whose
  method has one (`Method.has_prior`: clean, naive, flowdiff). The params
  come from `Method.diffusion_prior_params`, as prior sampling takes them, on
  the first local device.

  Raises:
    FileNotFoundError: `workdir` has no checkpoint.
    ValueError: the run trains no diffusion prior.
  """
  hint = (" For a prior: train a clean or naive run there first (--config.method=clean "
          "--workdir=...; a flowdiff run's prior works too) and pass that workdir as "
          "--config.amortized.prior_workdir.")
  manager, directory = checkpoint.read_only_manager(workdir)
  step = _checked_step(manager, directory, None, hint)
  config = _stored_config(manager, step)
  manager.close()
  method = methods.get(config.method)
  if not method.has_prior:
    # Checked before the state is read: a frozen prior's own config is in yet another workdir.
    raise ValueError(f"The run in {workdir} has method {config.method!r}, which trains no "
                     "diffusion prior; a prior comes from a run with method "
                     f"{', '.join(methods.with_prior())}.")
  _, state = load_run(workdir, step,
                      sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return config, method.diffusion_prior_params(state)
