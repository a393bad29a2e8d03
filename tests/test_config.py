"""Configs load, validate, override from the command line, and bad values name their field."""

import ast
import glob
import inspect
import io
import os
import re
import tokenize

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from flowdiff_jax.configs import default, tiny
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
  assert (cifar.data.dataset, cifar.operator.name, cifar.operator.sigma_y) == (
      "cifar10", "denoise", 0.2)
  inpaint = _load(os.path.join(CONFIG_DIR, "cifar_inpaint.py"))
  assert (inpaint.operator.name, inpaint.operator.drop_prob) == ("inpaint_random", 0.6)
  blur = _load(os.path.join(CONFIG_DIR, "celeba_blur.py"))
  assert (blur.data.dataset, blur.data.image_size, blur.operator.kernel_size,
          blur.operator.kernel_std) == ("celeb_a", 64, 9, 2.0)


def _leaf_paths(config, prefix=()):
  """Paths (tuples of names) of the non-ConfigDict fields of `config`."""
  for name in config.keys():
    value = config[name]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaf_paths(value, prefix + (name,))
    else:
      yield prefix + (name,)


def _is_config_dict_call(node) -> bool:
  name = getattr(node.func, "attr", None) or getattr(node.func, "id", None) \
      if isinstance(node, ast.Call) else None
  return name == "ConfigDict"


def _field_spans(source: str) -> dict[tuple[str, ...], tuple[int, int]]:
  """{field path: (first line, last line)} of every field that get_config() in `source` sets.

  Understands what default.py does: `config = ConfigDict()`, sections
  `config.data = data = ConfigDict()` (aliases), assignments `data.x = ...`
  or `config.data.x = ...`, and entries of `ConfigDict(dict(k=v, ...))` or
  `ConfigDict({"k": v, ...})`, each entry spanning the lines of its value.
  """
  func = next(node for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.FunctionDef) and node.name == "get_config")
  aliases, spans = {}, {}

  def resolve(node):
    if isinstance(node, ast.Name):
      return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
      base = resolve(node.value)
      return None if base is None else base + (node.attr,)
    return None

  def entries(call, path):
    """The fields a ConfigDict(...) call sets below `path`."""
    for arg in call.args:
      if isinstance(arg, ast.Call) and getattr(arg.func, "id", None) == "dict":
        items = [(kw.arg, kw, kw.value) for kw in arg.keywords]
      elif isinstance(arg, ast.Dict):
        items = [(k.value, k, v) for k, v in zip(arg.keys, arg.values)
                 if isinstance(k, ast.Constant)]
      else:
        continue
      for name, start, value in items:
        if _is_config_dict_call(value):
          entries(value, path + (name,))
        else:
          spans[path + (name,)] = (start.lineno, value.end_lineno)

  for stmt in ast.walk(func):
    if not isinstance(stmt, ast.Assign):
      continue
    if _is_config_dict_call(stmt.value):
      paths = [resolve(t) for t in stmt.targets if isinstance(t, ast.Attribute)]
      path = paths[0] if paths and paths[0] is not None else ()
      for target in stmt.targets:  # `config = ...` is the root, `data = ...` an alias
        if isinstance(target, ast.Name):
          aliases[target.id] = path
      entries(stmt.value, path)
      continue
    for target in stmt.targets:
      path = resolve(target)
      if path:
        spans[path] = (stmt.lineno, stmt.end_lineno)
  return spans


def _explanatory_comments(source: str) -> tuple[set[int], set[int]]:
  """(lines with a trailing comment, lines that are only a comment) of `source`.

  Empty comments and section rulers (`# --- Data ---`) explain nothing and
  are not counted.
  """
  lines = source.splitlines()
  trailing, standalone = set(), set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type != tokenize.COMMENT:
      continue
    text = tok.string.lstrip("#").strip()
    if not text or re.fullmatch(r"-{2,}.*-{2,}", text):
      continue
    row = tok.start[0]
    (standalone if lines[row - 1].lstrip().startswith("#") else trailing).add(row)
  return trailing, standalone


def _uncommented_default_fields(source: str) -> tuple[list[str], list[str]]:
  """(fields of default.get_config() not found in `source`, fields without a comment there).

  A field is commented when one of its lines has a trailing `# ...` or the
  line directly above its first line is a comment line.
  """
  spans = _field_spans(source)
  trailing, standalone = _explanatory_comments(source)
  leaves = sorted(_leaf_paths(default.get_config()))
  unmapped = [".".join(p) for p in leaves if p not in spans]
  uncommented = [".".join(p) for p in leaves if p in spans and not (
      spans[p][0] - 1 in standalone or trailing & set(range(spans[p][0], spans[p][1] + 1)))]
  return unmapped, uncommented


_DEFAULT_SOURCE = inspect.getsourcefile(default)


def test_every_default_field_is_commented():
  """Every leaf field of default.get_config() has an explanatory comment on or above its line."""
  with open(_DEFAULT_SOURCE) as f:
    unmapped, uncommented = _uncommented_default_fields(f.read())
  assert not unmapped, f"fields of get_config() not set by a plain assignment in " \
      f"{_DEFAULT_SOURCE} (teach _field_spans their form): {unmapped}"
  assert not uncommented, f"fields of {_DEFAULT_SOURCE} without a comment on their line or " \
      f"directly above it: {uncommented}"


def test_comment_check_sees_a_missing_comment():
  """The check above is not vacuous: without one field's comment, it names that field."""
  with open(_DEFAULT_SOURCE) as f:
    lines = f.read().splitlines(keepends=True)
  unmapped, uncommented = _uncommented_default_fields("".join(lines))
  first, _ = _field_spans("".join(lines))[("data", "read_threads")]
  assert lines[first - 2].lstrip().startswith("#")  # the comment line directly above it
  assert "data.read_threads" not in uncommented
  without = lines[:first - 2] + lines[first - 1:]
  assert _uncommented_default_fields("".join(without)) == (
      unmapped, sorted(uncommented + ["data.read_threads"]))
  # A trailing comment counts as well.
  trailing = lines[:first - 2] + [lines[first - 1].rstrip("\n") + "  # read threads\n"] \
      + lines[first:]
  assert _uncommented_default_fields("".join(trailing)) == (unmapped, uncommented)
  # A section ruler is no explanation.
  ruler = lines[:first - 2] + ["  # --- Reading ---\n"] + lines[first - 1:]
  assert "data.read_threads" in _uncommented_default_fields("".join(ruler))[1]


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
    # tiny's warm-up is 2 steps: a decay must end after it.
    ("optim.decay_steps", 2, "config.optim.decay_steps=2: must be 0 (no decay) or > "
     "optim.warmup_steps (2)"),
    ("flow_optim.decay_steps", -1, "config.flow_optim.decay_steps=-1: must be an integer >= 0"),
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


def test_shared_score_pass_needs_the_exact_prior_gradient():
  config = tiny.get_config()
  config.method = "flowdiff"
  config.flowdiff.shared_score_pass = True
  validate_config(config)
  config.amortized.prior_gradient = "sds"
  with pytest.raises(ConfigError, match=r"shared_score_pass=True: .*prior_gradient='exact'"):
    validate_config(config)


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
