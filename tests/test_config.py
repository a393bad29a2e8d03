"""Configs load, validate, override from the command line, and bad values name their field."""

import glob
import os

from absl import flags
from ml_collections import config_flags
import pytest

from configs import default, tiny
from flowdiff_jax.validate import ConfigError, validate_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                      if not p.endswith("__init__.py"))


def _load(path):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, flag_values=fv)
  fv(["prog"])
  return fv.config


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_is_valid(path):
  config = _load(path)
  if config.method == "amortized" and config.amortized.prior == "diffusion":
    # The prior run's workdir is the user's to give.
    with pytest.raises(ConfigError, match="config.amortized.prior_workdir=None"):
      validate_config(config)
    config.amortized.prior_workdir = "workdirs/fmnist_clean"
  if config.data.dataset in ("npz", "folder"):
    # The measurements are the user's to give.
    with pytest.raises(ConfigError, match="config.data.path=None"):
      validate_config(config)
    config.data.path = "my_measurements/"
  validate_config(config)


def test_experiment_configs_state_their_protocol():
  cifar = _load(os.path.join(CONFIG_DIR, "cifar_noise.py"))
  assert (cifar.data.dataset, cifar.operator.name, cifar.operator.sigma_y) == ("cifar10", "denoise", 0.2)
  inpaint = _load(os.path.join(CONFIG_DIR, "cifar_inpaint.py"))
  assert (inpaint.operator.name, inpaint.operator.drop_prob) == ("inpaint_random", 0.6)
  blur = _load(os.path.join(CONFIG_DIR, "celeba_blur.py"))
  assert (blur.data.dataset, blur.data.image_size, blur.operator.kernel_size,
          blur.operator.kernel_std) == ("celeb_a", 64, 9, 2.0)


def test_every_default_field_is_commented():
  """Each field assignment in default.py has a comment line right above it (or a section)."""
  lines = open(os.path.join(CONFIG_DIR, "default.py")).read().splitlines()
  for i, line in enumerate(lines):
    stripped = line.strip()
    if "=" in stripped and stripped.split("=")[0].strip().count(".") == 1 and \
        not stripped.startswith(("#", "config.")) and "ConfigDict" not in stripped:
      above = lines[i - 1].strip()
      assert above.startswith("#") or "=" in above, f"uncommented field: {stripped}"


def test_command_line_overrides():
  fv = flags.FlagValues()
  path = os.path.join(CONFIG_DIR, "cifar_noise.py")
  argv = ["prog", f"--config={path}", "--config.training.batch_size=64",
          "--config.operator.sigma_y=0.1", "--config.method=clean"]
  # As in main: config_flags registers the overrides from the command line it is given.
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  assert fv.config.training.batch_size == 64
  assert fv.config.operator.sigma_y == 0.1
  assert fv.config.method == "clean"


@pytest.mark.parametrize("field,value,message", [
    ("operator.sigma_y", -0.1, "config.operator.sigma_y=-0.1: must be a number >= 0"),
    ("data.dataset", "imagenet", "allowed: fashion_mnist, mnist, cifar10, celeb_a"),
    ("operator.name", "deblur", "allowed: denoise, blur, inpaint_random, inpaint_box"),
    ("method", "ambient",
     "config.method='ambient': unknown value; allowed: clean, naive, amortized, flowdiff"),
    ("diffusion.kind", "sigmoid", "allowed: linear, cosine"),
    ("eval.sampler", "euler", "allowed: ancestral, ddim, heun"),
    ("model.channel_mult", (1, 2, 2, 2), "image size divisible by 8, but the image size is 28"),
    ("model.attn_resolutions", (16,), "allowed: [28, 14]"),
    ("operator.drop_prob", 1.5, "config.operator.drop_prob=1.5"),
    ("optim.ema_decay", 1.0, "config.optim.ema_decay=1.0"),
    ("training.batch_size", 0, "config.training.batch_size=0"),
    ("model.name", "mlp", "config.model.name='mlp': unknown value; allowed: unet, gaussian"),
    ("amortized.time_sampling", "normal", "allowed: log_snr, uniform"),
    ("amortized.prior_gradient", "approx", "allowed: exact, sds"),
    ("amortized.beta_prior_warmup_steps", -1, "config.amortized.beta_prior_warmup_steps=-1"),
    ("flowdiff.flow_updates_per_score_update", 0,
     "config.flowdiff.flow_updates_per_score_update=0: must be an integer > 0"),
])
def test_bad_values_name_the_field_and_allowed_values(field, value, message):
  config = tiny.get_config()
  config.method = "flowdiff"
  section, _, name = field.rpartition(".")
  node = config[section] if section else config
  node[name] = value
  with pytest.raises(ConfigError) as err:
    validate_config(config)
  assert message in str(err.value)


def test_blur_kernel_must_be_odd():
  config = tiny.get_config()
  config.operator.name = "blur"
  config.operator.kernel_size = 8
  with pytest.raises(ConfigError, match="config.operator.kernel_size=8: must be odd"):
    validate_config(config)


def test_batch_must_split_over_devices():
  config = tiny.get_config()
  config.training.batch_size = 6
  with pytest.raises(ConfigError, match=r"config.training.batch_size=6: must be divisible "
                     r"by the number of devices \(4\); allowed: multiples of 4"):
    validate_config(config, num_devices=4)
  validate_config(default.get_config(), num_devices=4)


def test_amortized_settings_are_checked():
  config = tiny.get_config()
  config.method = "amortized"
  validate_config(config)
  config.operator.sigma_y = 0.0
  with pytest.raises(ConfigError, match=r"config.operator.sigma_y=0.0: must be a number > 0"):
    validate_config(config)
  config.operator.sigma_y = 0.2
  config.amortized.prior = "flow"
  with pytest.raises(ConfigError, match="allowed: diffusion, gaussian"):
    validate_config(config)
  config.amortized.prior = "gaussian"
  config.flow.num_levels = 3  # 28 is not divisible by 8
  with pytest.raises(ConfigError, match="config.flow.num_levels=3"):
    validate_config(config)
