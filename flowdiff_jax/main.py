r"""Command line: trains and evaluates one run.

  python -m flowdiff_jax.main --config=configs/cifar_noise.py \
      [--workdir=workdirs/cifar_noise] [--config.training.batch_size=64 ...]

Without --config it runs the embedded CPU quickstart (configs/quickstart.py).
Without --workdir it writes to workdirs/<config file name>. Rerunning the same
command resumes from the newest checkpoint in the workdir.

Exit codes: 0 finished; 130 / 143 stopped by SIGINT / SIGTERM after saving the
last step (rerun to resume); 3 diverged (too many non-finite steps in a row);
2 the workdir holds another run's checkpoints (see --allow_config_change), or
ones written by another number of processes (see --allow_process_count_change);
1 any other error.

Many hosts: run the same command in every process (every TPU VM worker, every
SLURM/MPI task); with --distributed=auto (the default) `distributed_reason`
decides whether this is such a launch and jax.distributed.initialize() joins
the processes. Elsewhere (one machine, one process) nothing is initialized.
"""

from collections.abc import Mapping
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF is only a clu/tfds helper here

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_DEFAULT_CONFIG = os.path.join(_CONFIGS, "quickstart.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (checkpoints, TensorBoard events, sample grids); "
    "default: workdirs/<config name>.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize() (one JAX process of several): 'auto' when the "
    "environment is a multi-process launch (JAX_COORDINATOR_ADDRESS, a SLURM step or "
    "Open MPI job of >1 tasks, a Cloud TPU VM), 'on' always, 'off' never.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a workdir whose checkpoints were written with a config that differs in fields "
    "other than the run length, logging, evaluation and checkpoint frequencies "
    "(checkpoint.RESUMABLE_FIELDS). Without it such a resume stops with the list of "
    "differing fields. Changes of network or optimiser shapes cannot be resumed either way.")
_ALLOW_PROCESS_COUNT_CHANGE = flags.DEFINE_bool(
    "allow_process_count_change", False,
    "Resume a workdir whose checkpoints were written by another number of JAX processes "
    "(e.g. a pod slice of another size). The data order continues where it stopped; the "
    "run then equals the old layout's up to float rounding, not bit for bit. Without it "
    "such a resume stops with an explanation.")

# The variables jax's SLURM detection reads (jax/_src/clusters/slurm_cluster.py);
# all are set in the tasks of an `srun` step, not in the batch script itself.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def distributed_reason(mode: str, env: Mapping[str, str], on_cloud_tpu_vm: bool) -> str | None:
  """Why this process should call jax.distributed.initialize(); None when it should not.

  Args:
    mode: the --distributed flag, "auto", "on" or "off".
    env: the process environment.
    on_cloud_tpu_vm: jax found libtpu and TPU chips here (set at `import jax`).

  In "auto", only launches that initialize() can complete by itself count, so a
  plain machine (one process over all its CPUs or GPUs) never waits for peers:
  * JAX_COORDINATOR_ADDRESS set: a hand-made launch (jax reads it; JAX_NUM_PROCESSES
    and JAX_PROCESS_ID, read by `initialize_distributed`, give the rest where no
    cluster does);
  * a SLURM step or Open MPI (mpirun) job with more than one task;
  * a Cloud TPU VM whose workers jax can list: from the GCE metadata server, or
    TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES on GKE. A one-host slice then
    initializes a one-process group, which costs nothing and keeps the command
    the same for every slice size.
  Kubernetes GPU jobs and non-Open-MPI launchers need "on" plus jax's variables.
  """
  if mode == "off":
    return None
  if mode == "on":
    return "--distributed=on"
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}"
  if all(env.get(v) for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
    return f"SLURM job {env['SLURM_JOB_ID']}, {env['SLURM_NTASKS']} tasks"
  if env.get("OMPI_MCA_orte_hnp_uri") and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return f"Open MPI, {env['OMPI_COMM_WORLD_SIZE']} ranks"
  if on_cloud_tpu_vm and (env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")
                          or "TPU_SKIP_MDS_QUERY" not in env):
    return "Cloud TPU VM"
  return None


def _on_cloud_tpu_vm() -> bool:
  # jax decides this at import (libtpu present and TPU chips on the PCI bus)
  # without starting a backend; it has no public name.
  try:
    from jax._src import cloud_tpu_init  # noqa: PLC0415 (optional, private)
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize_distributed(mode: str) -> None:
  """Joins the other JAX processes when `distributed_reason` says so; logs the topology.

  Must run before anything starts a JAX backend (jax.devices(), any computation).
  """
  import jax  # noqa: PLC0415 (this program imports jax only once flags are parsed)

  reason = distributed_reason(mode, os.environ, _on_cloud_tpu_vm())
  if reason is not None:
    # CPU processes all-reduce through gloo: jax's default in 0.10, unset in
    # some older releases (then every cross-process CPU computation fails).
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jax reads JAX_COORDINATOR_ADDRESS itself but has no variables for these two.
    known = {arg: int(os.environ[var]) for arg, var in
             (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
             if os.environ.get(var)}
    jax.distributed.initialize(**known)
  logging.info("jax.distributed %s: process %d of %d, %d local and %d global %s devices.",
               f"initialized ({reason})" if reason else "not initialized",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from flowdiff_jax import reporting  # noqa: PLC0415 (keeps --help free of jax)
  reporting.quiet_library_logs()
  # TensorFlow (used by tfds/clu only) must not take accelerator memory from JAX.
  try:
    import tensorflow as tf  # noqa: PLC0415 (optional)
    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass
  initialize_distributed(_DISTRIBUTED.value)

  from flowdiff_jax import checkpoint, paths, train  # noqa: PLC0415 (after jax.distributed)

  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  name = os.path.splitext(os.path.basename(config_path))[0]
  workdir = paths.as_str(_WORKDIR.value or os.path.join("workdirs", name))
  logging.info("Config %s, workdir %s", config_path, workdir)
  try:
    train.train_and_evaluate(_CONFIG.value, workdir,
                             allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                             allow_process_count_change=_ALLOW_PROCESS_COUNT_CHANGE.value)
  except train.RunStopped as e:  # preempted or diverged: a message, not a traceback
    logging.error("%s", e)
    sys.exit(e.exit_code)
  except checkpoint.IncompatibleCheckpointError as e:
    logging.error("%s", e)
    sys.exit(2)


def cli() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  cli()
