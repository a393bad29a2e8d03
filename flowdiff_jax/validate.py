"""Config validation: run before anything compiles, fail with the field's name.

Every check raises `ConfigError` with a message of the form
`config.<field>=<value>: <what is wrong>; allowed: <values>` so that a typo on
the command line is fixed in one go, not after minutes of compilation.
"""

from __future__ import annotations

import math

import ml_collections

from flowdiff_jax import diffusion, operators
from flowdiff_jax.models.flow import COUPLINGS
from flowdiff_jax.train_step import FLOW_METHODS, METHODS, PRIORS, SCORE_MODELS

DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "celeb_a")
NATIVE_IMAGE_SIZE = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32, "celeb_a": 64}


class ConfigError(ValueError):
  """A config field has a value the program cannot run with."""


def _fail(field: str, value, problem: str) -> None:
  raise ConfigError(f"config.{field}={value!r}: {problem}")


def _choice(config, field: str, allowed) -> None:
  value = _get(config, field)
  if value not in allowed:
    _fail(field, value, f"unknown value; allowed: {', '.join(map(str, allowed))}")


def _positive(config, field: str, *, strict: bool = True, integer: bool = False) -> None:
  value = _get(config, field)
  ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
  if isinstance(value, bool) or not ok_type or not math.isfinite(value) or (
      value <= 0 if strict else value < 0):
    kind = "an integer" if integer else "a number"
    _fail(field, value, f"must be {kind} {'> 0' if strict else '>= 0'}")


def _get(config, field: str):
  node = config
  for part in field.split("."):
    if part not in node:
      raise ConfigError(f"config.{field} is missing (is the config based on configs/default.py?)")
    node = node[part]
  return node


def _optimizer(config, section: str) -> None:
  _positive(config, f"{section}.learning_rate")
  _positive(config, f"{section}.warmup_steps", strict=False, integer=True)
  _positive(config, f"{section}.weight_decay", strict=False)
  _positive(config, f"{section}.grad_clip_norm", strict=False)


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int = 1,
                    num_processes: int = 1) -> None:
  """Checks every field the program uses; raises ConfigError naming the first bad one.

  Args:
    config: the run's config.
    num_devices: devices the global batch is split over.
    num_processes: JAX processes (hosts) that each read part of the batch.
  """
  _choice(config, "method", METHODS)
  _positive(config, "seed", strict=False, integer=True)

  # Data.
  _choice(config, "data.dataset", DATASET_NAMES)
  _positive(config, "data.image_size", strict=False, integer=True)
  _positive(config, "data.max_train_examples", strict=False, integer=True)
  _positive(config, "data.num_eval_examples", integer=True)
  _positive(config, "data.corruption_seed", strict=False, integer=True)
  _positive(config, "data.shuffle_seed", strict=False, integer=True)
  _positive(config, "data.read_threads", integer=True)
  size = config.data.image_size or NATIVE_IMAGE_SIZE[config.data.dataset]

  # Operator.
  _choice(config, "operator.name", operators.OPERATORS)
  _positive(config, "operator.sigma_y", strict=False)
  # All operator fields are checked, not only the chosen operator's: a bad value
  # is a typo waiting for the day that operator is selected.
  _positive(config, "operator.kernel_size", integer=True)
  if config.operator.kernel_size % 2 == 0:
    _fail("operator.kernel_size", config.operator.kernel_size, "must be odd (a centred kernel)")
  _positive(config, "operator.kernel_std")
  _positive(config, "operator.pinv_reg")
  p = config.operator.drop_prob
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
    _fail("operator.drop_prob", p, "must be a probability in [0, 1)")
  _positive(config, "operator.box_size", integer=True)
  if config.operator.name == "inpaint_box" and config.operator.box_size >= size:
    _fail("operator.box_size", config.operator.box_size,
          f"must be smaller than the image size {size}")

  # Diffusion.
  _choice(config, "diffusion.kind", diffusion.SCHEDULE_KINDS)
  _positive(config, "diffusion.beta_min")
  _positive(config, "diffusion.beta_max")
  if config.diffusion.beta_max <= config.diffusion.beta_min:
    _fail("diffusion.beta_max", config.diffusion.beta_max,
          f"must exceed diffusion.beta_min={config.diffusion.beta_min}")
  _positive(config, "diffusion.num_timesteps", integer=True)
  _positive(config, "diffusion.cosine_s")
  t_min = config.diffusion.t_min
  if not isinstance(t_min, (int, float)) or not 0.0 < t_min < 1.0:
    _fail("diffusion.t_min", t_min, "must lie in (0, 1)")

  _choice(config, "model.name", SCORE_MODELS)
  if config.model.name == "gaussian":
    channels = 1 if config.data.dataset in ("fashion_mnist", "mnist") else 3
    dims = size * size * channels
    if dims > 1024:
      _fail("model.name", "gaussian", f"needs a {dims}×{dims} Cholesky per example; it is "
            "meant for small images (H·W·C <= 1024); allowed here: unet")
  # U-Net: every level must be reachable by halving, and GroupNorm must divide channels.
  mult = tuple(config.model.channel_mult)
  if not mult or any(not isinstance(m, int) or m <= 0 for m in mult):
    _fail("model.channel_mult", mult, "must be a non-empty tuple of positive integers")
  downsamples = len(mult) - 1
  if size % (2 ** downsamples):
    allowed = [k for k in range(1, len(mult) + 1) if size % 2 ** (k - 1) == 0]
    _fail("model.channel_mult", mult,
          f"{downsamples} downsamplings need an image size divisible by {2 ** downsamples}, "
          f"but the image size is {size}; allowed: a channel_mult of length "
          f"{', '.join(map(str, allowed))}, or another data.image_size")
  _positive(config, "model.base_channels", integer=True)
  _positive(config, "model.num_res_blocks", integer=True)
  _positive(config, "model.num_groups", integer=True)
  for m in mult:
    if (config.model.base_channels * m) % config.model.num_groups:
      _fail("model.num_groups", config.model.num_groups,
            f"must divide every level's channel count "
            f"({[config.model.base_channels * m for m in mult]})")
  resolutions = [size // 2 ** i for i in range(len(mult))]
  for r in config.model.attn_resolutions:
    if r not in resolutions:
      _fail("model.attn_resolutions", tuple(config.model.attn_resolutions),
            f"{r} is not a resolution of this U-Net; allowed: {resolutions}")
  dropout = config.model.dropout
  if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
    _fail("model.dropout", dropout, "must lie in [0, 1)")

  # Optimisers.
  _optimizer(config, "optim")
  ema = config.optim.ema_decay
  if not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0:
    _fail("optim.ema_decay", ema, "must lie in [0, 1)")

  # Conditional flow and amortized inference.
  if config.method in FLOW_METHODS:
    for field in ("num_levels", "num_steps", "hidden_channels", "cond_channels"):
      _positive(config, f"flow.{field}", integer=True)
    _choice(config, "flow.coupling", COUPLINGS)
    if size % 2 ** config.flow.num_levels:
      _fail("flow.num_levels", config.flow.num_levels,
            f"the image size {size} must be divisible by 2**num_levels")
    _optimizer(config, "flow_optim")
    _positive(config, "operator.sigma_y")  # the flow's likelihood divides by σ_y²
    _choice(config, "amortized.time_sampling", diffusion.TIME_SAMPLINGS)
    _choice(config, "amortized.prior_gradient", diffusion.PRIOR_GRADIENTS)
    _positive(config, "amortized.beta_ent_init", strict=False)
    for field in ("beta_prior_warmup_steps", "beta_ent_anneal_steps"):
      _positive(config, f"amortized.{field}", strict=False, integer=True)
    for field in ("beta_data", "beta_prior", "beta_ent"):
      _positive(config, f"amortized.{field}", strict=False)
    for field in ("num_flow_samples", "num_time_samples", "eval_num_samples"):
      _positive(config, f"amortized.{field}", integer=True)
  if config.method == "flowdiff":
    _positive(config, "flowdiff.flow_updates_per_score_update", integer=True)
  if config.method == "amortized":
    _choice(config, "amortized.prior", PRIORS)
    if config.amortized.prior == "diffusion" and not config.amortized.prior_workdir:
      _fail("amortized.prior_workdir", config.amortized.prior_workdir,
            "the diffusion prior needs the workdir of a finished clean or naive run")
    _positive(config, "amortized.gaussian_fit_examples", integer=True)

  # Training loop.
  _positive(config, "training.batch_size", integer=True)
  for field in ("num_train_steps", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints"):
    _positive(config, f"training.{field}", integer=True)
  for field in ("eval_every_steps", "sample_every_steps"):
    _positive(config, f"training.{field}", strict=False, integer=True)
  for field, batch in (("training.batch_size", config.training.batch_size),
                       ("eval.batch_size", config.eval.batch_size)):
    if batch % num_devices:
      _fail(field, batch, f"must be divisible by the number of devices ({num_devices}); "
            f"allowed: multiples of {num_devices}")
    if batch % num_processes:
      _fail(field, batch, f"must be divisible by the number of processes ({num_processes})")

  # Sampling / evaluation.
  _choice(config, "eval.sampler", diffusion.SAMPLERS)
  _positive(config, "eval.sample_steps", integer=True)
  _positive(config, "eval.num_samples", integer=True)
  _positive(config, "eval.batch_size", integer=True)
  _positive(config, "eval.nll_time_samples", integer=True)
  if config.data.num_eval_examples < config.eval.batch_size:
    _fail("data.num_eval_examples", config.data.num_eval_examples,
          f"must be at least eval.batch_size={config.eval.batch_size} "
          "(evaluation uses whole batches)")
