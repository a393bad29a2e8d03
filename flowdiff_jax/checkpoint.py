"""Checkpoints with orbax: the train state, the data-iterator state and the config.

A checkpoint at step k holds the state after k updates and the position of the
grain iterator after k batches, so restoring it and training on is bit for bit
the run that never stopped. orbax writes each step to a temporary folder and
renames it when complete, so `latest_step` only sees finished saves; a save
cut off mid-write leaves that temporary folder behind, and a finished one can
still lose or truncate files later (a full disk, a bad copy). `restore_latest`
therefore restores the newest checkpoint that actually reads back, and moves
the others to <workdir>/corrupt_checkpoints/ with a warning: kept as evidence,
out of reach of orbax's `max_to_keep` rotation, never deleted.

Resuming also checks that the checkpoint's config is this run's, up to the
fields in RESUMABLE_FIELDS (`check_resume_config`, `IncompatibleCheckpointError`),
and that it was written by as many JAX processes as this run has: each process
stores its own data-iterator file, so another process count is refused unless
asked for (`allow_process_count_change`; the data order then continues
unchanged, see `_data_position`).

Reading a finished run back for the tools (`load_run`, `load_prior`) is in
`flowdiff_jax.runs`.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import re
import shutil
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from flowdiff_jax import paths
from flowdiff_jax.step import TrainState

# Config fields that may differ between a run and the checkpoint it resumes.
# They change how long the run goes, what is logged, evaluated or kept and
# when, or where the same files are read from -- never the parameters'
# trajectory (no schedule depends on training.num_train_steps), so the resumed
# run still ends at the parameters of one that never stopped. A trailing ".*"
# covers a whole section.
RESUMABLE_FIELDS = (
    "training.num_train_steps", "training.log_every_steps", "training.eval_every_steps",
    "training.sample_every_steps", "training.checkpoint_every_steps",
    "training.keep_checkpoints", "training.max_consecutive_nonfinite_steps",
    "training.profile_steps", "training.tensorboard",
    "data.data_dir", "data.read_threads", "data.num_eval_examples", "data.reference_path",
    "amortized.eval_num_samples", "eval.*")

# Where unreadable checkpoints go, next to <workdir>/checkpoints.
CORRUPT_DIR = "corrupt_checkpoints"
# orbax's suffix of a step folder that is still being written (or never finished).
_TMP_MARK = ".orbax-checkpoint-tmp"


class IncompatibleCheckpointError(ValueError):
  """The workdir's checkpoints belong to a run with another config or other array shapes."""


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """A CheckpointManager over `workdir/checkpoints` keeping training.keep_checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.training.keep_checkpoints,
                                         create=True)
  return ocp.CheckpointManager(paths.resolve(workdir) / "checkpoints", options=options)


def saved_arrays(state: TrainState) -> dict:
  """The part of `state` a checkpoint holds: its arrays (also as a template to restore into).

  Functions and the objective are not saved: they come from the config.
  """
  return {"step": state.step, "params": state.params, "ema_params": state.ema_params,
          "opt_state": state.opt_state}


def save(manager: ocp.CheckpointManager, state: TrainState, data_iter,
         config: ml_collections.ConfigDict) -> None:
  """Saves at step `state.step` (asynchronously; `manager.wait_until_finished()` to block)."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(saved_arrays(state)),
      data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config.to_dict())))


def restore_latest(manager: ocp.CheckpointManager, state: TrainState, data_iter, *,
                   config: ml_collections.ConfigDict | None = None,
                   allow_config_change: bool = False,
                   allow_process_count_change: bool = False) -> TrainState | None:
  """Restores the newest checkpoint that reads back into (a template of) `state` and `data_iter`.

  Checkpoints are tried newest first; one that does not read back twice in a
  row (a truncated or missing file, an unreadable config) is skipped. Once an
  older one has been restored, the skipped ones are moved to
  <workdir>/corrupt_checkpoints/ with a warning naming their steps: kept as
  evidence, and out of orbax's `max_to_keep` rotation, which could otherwise
  delete the good one in their favour. When none reads back, nothing is moved
  and an error lists them (a broken environment looks the same as damage to
  every file, so the program does not decide to start over). Orbax's
  temporary folders of a save cut off mid-write are moved aside always.

  Args:
    manager: the run's CheckpointManager.
    state: a freshly created state; its arrays give shapes, dtypes and shardings.
    data_iter: the training iterator; its position is set in place.
    config: this run's config; when given, each checkpoint's stored config must
      equal it outside RESUMABLE_FIELDS (see `check_resume_config`).
    allow_config_change: resume despite such differences.
    allow_process_count_change: resume a checkpoint written by another number
      of processes (see `_data_position`); otherwise that raises.

  Returns:
    The restored state, or None when the workdir has no (finished) checkpoint.

  Raises:
    IncompatibleCheckpointError: a checkpoint's config differs (and
      allow_config_change is False), or its arrays have other names or shapes
      than `state`'s; nothing is moved then.
    RuntimeError: there are checkpoints, and none of them reads back.
  """
  directory = os.fspath(manager.directory)
  partial = _set_aside_partial_saves(directory)
  template = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved_arrays(state))
  restored, failed = None, []
  for step in sorted(manager.all_steps(), reverse=True):
    problem = None
    for _ in range(2):  # a second read tells a flaky filesystem from a damaged file
      try:
        restored = _restore_step(manager, step, state, template, data_iter, config,
                                 allow_config_change, allow_process_count_change)
        break
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 (tensorstore, json and grain raise many kinds)
        problem = e
    # Every process must take the same checkpoint (each reads its own data file).
    if _on_every_process(restored is not None):
      break
    restored = None
    text = str(problem).strip().splitlines()[0][:300] if problem and str(problem).strip() else (
        "failed on another process")
    logging.warning("Checkpoint step %d in %s does not read back: %s: %s", step, directory,
                    type(problem).__name__ if problem else "", text)
    failed.append((step, f"{type(problem).__name__ if problem else ''}: {text}"))
  if failed and restored is None:
    raise RuntimeError(
        f"No checkpoint in {directory} reads back:\n"
        + "\n".join(f"  step {step}: {why}" for step, why in failed)
        + "\nNone of them was moved or deleted. If the files are damaged, move the checkpoints "
        "folder away to start from scratch; if the environment is the problem (a filesystem "
        "that is not mounted, another orbax or jax version), fix it and rerun.")
  if failed:
    _set_aside(directory, [str(step) for step, _ in failed])
  if failed or partial:
    manager.reload()  # orbax must forget the moved steps (latest_step, max_to_keep)
  if failed:
    logging.warning("Resuming from step %d, the newest complete checkpoint in %s; skipped "
                    "step %s, moved to %s.", int(jax.device_get(restored.step)), directory,
                    ", ".join(str(step) for step, _ in failed), _corrupt_root(directory))
  return restored


def _restore_step(manager: ocp.CheckpointManager, step: int, state: TrainState, template,
                  data_iter, config: ml_collections.ConfigDict | None,
                  allow_config_change: bool, allow_process_count_change: bool) -> TrainState:
  """One checkpoint: its config, process count and array names checked first, then read."""
  directory = os.fspath(manager.directory)
  if config is not None:
    stored = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
    _check_config(directory, step, stored, config, allow_config_change)
  written_by = _check_process_count(directory, step, allow_process_count_change)
  # Read with a handler of its own: the run's manager has none registered
  # before its first save, and its item_metadata would then return None.
  metadata = ocp.StandardCheckpointHandler().metadata(
      epath.Path(directory) / str(step) / "state")
  _check_arrays(directory, step, getattr(metadata, "tree", metadata), template)
  if written_by == jax.process_count():
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
  else:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template)))
    data_iter.set_state(_data_position(directory, step, written_by))
    logging.warning(
        "Checkpoint step %d was written by %d processes, this run has %d "
        "(--allow_process_count_change): the data order continues from global batch %d, "
        "split over %d processes; the updates match the old layout's up to float rounding.",
        step, written_by, jax.process_count(), data_iter.get_state().get("next_index", -1),
        jax.process_count())
  return state.replace(**restored["state"])


# grain's per-process iterator file in <step>/data/.
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def written_process_count(directory: str, step: int) -> int | None:
  """How many processes wrote checkpoint `step` (its data files); None without any."""
  data = epath.Path(directory) / str(step) / "data"
  counts = {int(m.group(2)) for f in (data.iterdir() if data.exists() else ())
            if (m := _DATA_FILE.fullmatch(f.name))}
  if len(counts) > 1:
    raise ValueError(f"{data} holds iterator files of several process counts: {sorted(counts)}")
  return counts.pop() if counts else None


def _check_process_count(directory: str, step: int, allow: bool) -> int:
  """The process count that wrote `step`; raises if it is not this run's and not `allow`."""
  written_by = written_process_count(directory, step)
  if written_by is None:
    raise FileNotFoundError(f"{directory}/{step}/data has no data-iterator file")
  if written_by != jax.process_count() and not allow:
    raise IncompatibleCheckpointError(
        f"Checkpoint step {step} in {directory} was written by {written_by} JAX "
        f"process(es); this run has {jax.process_count()}. Each process saved its own "
        f"data-iterator position (data/process_<i>-of-{written_by}.json), so it cannot be "
        f"resumed as it is. Either rerun with {written_by} processes, or pass "
        "--allow_process_count_change: every process then takes the position from those "
        "files (they count global batches, so the order of examples does not change) and "
        "the run continues, equal to the old layout up to float rounding, not bit for bit.")
  return written_by


def _data_position(directory: str, step: int, written_by: int) -> dict:
  """The iterator state for any process count, from a checkpoint written by `written_by`.

  Process p of n reads the p-th slice of each global batch (data._process_batches),
  so after k global batches every process's state is {"next_index": k}: the
  same number in every file, and valid for any other n. Files that disagree
  (another pipeline) are refused rather than guessed at.
  """
  data = epath.Path(directory) / str(step) / "data"
  states = [json.loads((data / f"process_{p}-of-{written_by}.json").read_text())
            for p in range(written_by)]
  if any(s != states[0] for s in states[1:]) or set(states[0]) != {"next_index"}:
    raise IncompatibleCheckpointError(
        f"The data-iterator files of checkpoint step {step} in {directory} are not one "
        f"shared position ({states}); it cannot be resumed with another process count.")
  return states[0]


def _on_every_process(ok: bool) -> bool:
  """`ok` and-ed over all processes (one host sync; only used when resuming)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _corrupt_root(directory: str) -> epath.Path:
  return paths.resolve(directory).parent / CORRUPT_DIR


def _set_aside(directory: str, names: list[str]) -> list[str]:
  """Moves `directory`/<name> to <workdir>/corrupt_checkpoints/ (on process 0); the new paths.

  Every process calls it with the same names; they all wait until the moves are done.
  """
  _sync("flowdiff_before_set_aside")  # every process has listed `directory`
  root, moved = _corrupt_root(directory), []
  for name in names:
    dest, n = root / name, 1
    while dest.exists():  # the same step may go bad twice
      dest, n = root / f"{name}.{n}", n + 1
    if jax.process_index() == 0:
      root.mkdir(parents=True, exist_ok=True)
      _move_tree(paths.resolve(directory) / name, dest)
    moved.append(os.fspath(dest))
  _sync("flowdiff_after_set_aside")
  return moved


def _move_tree(src: epath.Path, dest: epath.Path) -> None:
  """Moves the folder `src` to `dest`: a rename on a local disk; on a bucket (no
  folders, no renames of them) a copy of every file, then the delete."""
  if not paths.is_uri(src):
    shutil.move(os.fspath(src), os.fspath(dest))
    return
  for path in paths.files(src):
    target = dest / path.relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(path.read_bytes())
  src.rmtree()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


def _set_aside_partial_saves(directory: str) -> list[int]:
  """Moves orbax's unfinished step folders aside; their steps.

  At start-up no save of this run is in flight, so such a folder is a save
  that was cut off (preemption, a full disk, a kill during the write).
  """
  folder = paths.resolve(directory)
  names = sorted(p.name for p in (folder.iterdir() if folder.is_dir() else [])
                 if _TMP_MARK in p.name and p.name.split(".")[0].isdigit())
  if not names:
    return []
  for name, where in zip(names, _set_aside(directory, names)):
    logging.warning("Checkpoint step %s in %s was never finished (a save cut off mid-write: "
                    "%s); moved it to %s.", name.split(".")[0], directory, name, where)
  return [int(name.split(".")[0]) for name in names]


def _array_names(tree, from_metadata: bool) -> dict[str, tuple[tuple[int, ...], str]]:
  """{orbax's "a.b.c" name: (shape, dtype)} of a state template or of stored metadata."""
  if from_metadata:
    return {leaf.name: (tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(tree)
            if hasattr(leaf, "name")}
  def name(key) -> str:
    for attr in ("idx", "key", "name"):  # Sequence/Dict/FlattenedIndex/GetAttr keys
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in flat}


def _check_arrays(directory: str, step: int, stored_tree, template) -> None:
  """Raises IncompatibleCheckpointError when the stored arrays are not the template's."""
  stored = _array_names(stored_tree, from_metadata=True)
  wanted = _array_names(template, from_metadata=False)
  if stored == wanted:
    return
  lines = [f"  {k}: {_shape_text(stored.get(k))} in the checkpoint, {_shape_text(wanted.get(k))} "
           "in this run" for k in sorted(set(stored) | set(wanted), key=_params_first)
           if stored.get(k) != wanted.get(k)]
  more = f"\n  ... and {len(lines) - 8} more" if len(lines) > 8 else ""
  raise IncompatibleCheckpointError(
      f"Checkpoint step {step} in {directory} holds other arrays than this run's state "
      f"({len(lines)} differ):\n" + "\n".join(lines[:8]) + more +
      "\nA config change that alters the networks or the optimiser cannot be resumed, even with "
      "--allow_config_change: use a new --workdir.")


def _params_first(name: str) -> tuple[bool, str]:
  # ema_params and opt_state repeat the params' differences: list those first.
  return not name.startswith("params."), name


def _shape_text(entry) -> str:
  return "absent" if entry is None else f"{entry[1]}{list(entry[0])}"


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _as_stored(config: ml_collections.ConfigDict | Mapping) -> dict:
  """A config as a checkpoint holds it: plain JSON values (tuples become lists)."""
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  return json.loads(json.dumps(tree))


def is_resumable_field(field: str) -> bool:
  """Whether `field` ("training.num_train_steps") may differ on resume (RESUMABLE_FIELDS)."""
  return any(field == f or (f.endswith(".*") and field.startswith(f[:-1]))
             for f in RESUMABLE_FIELDS)


_ABSENT = "<absent>"


def config_diff(stored: Mapping, config: ml_collections.ConfigDict | Mapping
                ) -> list[tuple[str, Any, Any]]:
  """[(field, value in the checkpoint, value now)] of every differing config field, sorted.

  A field added to configs/default.py after the checkpoint was written counts
  with its default value there; a field missing on either side shows as "<absent>".
  """
  from flowdiff_jax.configs import default  # noqa: PLC0415

  before = _flat(_as_stored(default.get_config()))
  before.update(_flat(_as_stored(stored)))
  now = _flat(_as_stored(config))
  return [(k, before.get(k, _ABSENT), now.get(k, _ABSENT)) for k in sorted(set(before) | set(now))
          if before.get(k, _ABSENT) != now.get(k, _ABSENT)]


def _check_config(directory: str, step: int, stored: Mapping,
                  config: ml_collections.ConfigDict, allow_config_change: bool,
                  log: bool = False) -> None:
  """Raises IncompatibleCheckpointError for differences outside RESUMABLE_FIELDS."""
  diff = config_diff(stored, config)
  blocking = [d for d in diff if not is_resumable_field(d[0])]
  lines = "\n".join(f"  config.{k}: {a!r} -> {b!r}" for k, a, b in blocking)
  if blocking and not allow_config_change:
    raise IncompatibleCheckpointError(
        f"The checkpoints in {directory} (step {step}) were written with another config; "
        f"{len(blocking)} field(s) differ (checkpoint -> this run):\n{lines}\n"
        "Resuming would not continue that run. Use a new --workdir for a new run, or pass "
        "--allow_config_change to resume this one with the new values (changes of network or "
        "optimiser shapes cannot be resumed even then). Fields that may change on resume "
        f"without it: {', '.join(RESUMABLE_FIELDS)}.")
  if log and blocking:
    logging.warning("--allow_config_change: resuming step %d in %s with %d changed field(s) "
                    "(checkpoint -> this run); the run is no longer the one that wrote the "
                    "checkpoint:\n%s", step, directory, len(blocking), lines)
  free = [d for d in diff if is_resumable_field(d[0])]
  if log and free:
    logging.info("Resuming step %d with changed %s.", step,
                 ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in free))


def check_resume_config(workdir: str, config: ml_collections.ConfigDict, *,
                        allow_config_change: bool = False,
                        allow_process_count_change: bool = False) -> int | None:
  """Checks, before anything compiles, that `config` may resume `workdir`.

  Compares `config` with the config stored in the newest checkpoint whose
  config reads back. Fields in RESUMABLE_FIELDS may differ; any other
  difference raises, unless allow_config_change (then it is logged). That
  checkpoint must also have been written by jax.process_count() processes,
  unless allow_process_count_change.

  Returns:
    That checkpoint's step, or None when the workdir has none.

  Raises:
    IncompatibleCheckpointError: naming every differing field with both values,
      or both process counts.
  """
  directory = os.path.join(paths.as_str(workdir), "checkpoints")
  found = epath.Path(directory).is_dir()
  # Every process must take the same branch (the manager below has barriers), so
  # none may go on and create the directory (make_manager) before all have looked:
  # on a fresh workdir a slower process would otherwise see process 0's new
  # directory and wait at a barrier the others never reach.
  _sync("flowdiff_resume_check")
  if not found:
    return None
  manager, _ = read_only_manager(workdir)
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        stored = manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]
      except Exception:  # noqa: BLE001 (restore_latest reports and sets it aside)
        continue
      _check_config(directory, step, stored, config, allow_config_change, log=True)
      if written_process_count(directory, step) is not None:
        _check_process_count(directory, step, allow_process_count_change)
      return step
    return None
  finally:
    manager.close()


def read_only_manager(workdir: str) -> tuple[ocp.CheckpointManager, str]:
  """(A manager that only reads `workdir`/checkpoints, that directory); close it when done."""
  directory = os.path.join(paths.as_str(workdir), "checkpoints")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "config": ocp.JsonCheckpointHandler()})
  return manager, directory
