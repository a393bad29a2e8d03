r"""Command line: trains and evaluates one run.

  python -m flowdiff_jax.main --config=configs/cifar_noise.py \
      [--workdir=workdirs/cifar_noise] [--config.training.batch_size=64 ...]

Without --config it runs the embedded CPU quickstart (configs/quickstart.py).
Without --workdir it writes to workdirs/<config file name>. Rerunning the same
command resumes from the newest checkpoint in the workdir.
"""

import logging as logging_std
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF is only a clu/tfds helper here

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_DEFAULT_CONFIG = os.path.join(_CONFIGS, "quickstart.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (checkpoints, TensorBoard events, sample grids); "
    "default: workdirs/<config name>.")


class _QuietLibraries:
  """Drops INFO records of orbax and other chatty libraries; our INFO lines stay.

  orbax logs ~30 INFO lines per checkpoint through absl, which buries the
  metrics; its warnings and errors still pass.
  """
  _CHATTY = ("/orbax/", "/jax/_src/", "/grain/")

  def filter(self, record) -> bool:
    return record.levelno > logging_std.INFO or not any(
        part in record.pathname for part in self._CHATTY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # TensorFlow (used by tfds/clu only) must not take accelerator memory from JAX.
  try:
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass
  import jax

  from flowdiff_jax import train

  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  name = os.path.splitext(os.path.basename(config_path))[0]
  workdir = _WORKDIR.value or os.path.join("workdirs", name)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  logging.info("Config %s, workdir %s", config_path, os.path.abspath(workdir))
  train.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == "__main__":
  app.run(main)
