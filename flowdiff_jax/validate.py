"""Config validation: run before anything compiles, fail with the field's name.

Every check raises `ConfigError` with a message of the form
`config.<field>=<value>: <what is wrong>; allowed: <values>` so that a typo on
the command line is fixed in one go, not after minutes of compilation.
"""

from __future__ import annotations

import math

import ml_collections

from flowdiff_jax import configcheck, diffusion, measurements, methods, operators
from flowdiff_jax.configcheck import ConfigError  # noqa: F401 (callers import it from here)
from flowdiff_jax.methods.base import POSTERIOR_PARAMS, SCORE_MODELS
from flowdiff_jax.models.flow import COUPLINGS
from flowdiff_jax.models.unet import COMPUTE_DTYPES

DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "celeb_a") + measurements.KINDS
NATIVE_IMAGE_SIZE = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32, "celeb_a": 64}


_fail = configcheck.fail
_get = configcheck.get
_choice = configcheck.choice
_positive = configcheck.positive
_optimizer = configcheck.optimizer


def _measurement_fields(config) -> None:
  """The data.* fields of measurements in files (data.dataset "npz" or "folder")."""
  d = config.data
  if not d.get("path") or not isinstance(d.path, str):
    _fail("data.path", d.get("path"), f"data.dataset={d.dataset!r} needs the measurements: an "
          ".npz file (dataset 'npz') or a folder of images (dataset 'folder')")
  needed = methods.get(config.method).clean_images_needed(config)
  if needed:
    field, problem = needed
    if field == "method":
      problem += "; allowed here: " + ", ".join(
          m for m in methods.NAMES if "x" not in methods.get(m).inputs)
    _fail(field, _get(config, field), problem)
  value_range = d.get("value_range")
  if value_range is not None and (
      len(value_range) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                       and math.isfinite(v) for v in value_range)
      or not value_range[0] < value_range[1]):
    _fail("data.value_range", value_range, "must be None (by dtype) or (lo, hi) with lo < hi")
  _positive(config, "data.value_margin", strict=False)
  _positive(config, "data.channels", strict=False, integer=True)
  if not isinstance(d.get("estimate_sigma_y"), bool):
    _fail("data.estimate_sigma_y", d.get("estimate_sigma_y"), "must be True or False")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int = 1,
                    num_processes: int = 1) -> None:
  """Checks every field the program uses; raises ConfigError naming the first bad one.

  Args:
    config: the run's config.
    num_devices: devices the global batch is split over.
    num_processes: JAX processes (hosts) that each read part of the batch.
  """
  _choice(config, "method", methods.NAMES)
  _positive(config, "seed", strict=False, integer=True)

  # Data.
  _choice(config, "data.dataset", DATASET_NAMES)
  _positive(config, "data.image_size", strict=False, integer=True)
  _positive(config, "data.max_train_examples", strict=False, integer=True)
  _positive(config, "data.num_eval_examples", integer=True)
  _positive(config, "data.corruption_seed", strict=False, integer=True)
  _positive(config, "data.shuffle_seed", strict=False, integer=True)
  _positive(config, "data.read_threads", integer=True)
  measured = config.data.dataset in measurements.KINDS
  if measured:
    _measurement_fields(config)
  # 0 for measurement files until `data.resolve_config` has read their size
  # (the training program does that first); the size checks below then wait.
  size = config.data.image_size or NATIVE_IMAGE_SIZE.get(config.data.dataset, 0)

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
  # (Measured data bring their own masks: box_size is unused there.)
  if config.operator.name == "inpaint_box" and not measured and config.operator.box_size >= size:
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
    channels = config.data.get("channels") or (
        1 if config.data.dataset in ("fashion_mnist", "mnist") else 3)
    dims = size * size * channels
    if dims > 1024:
      _fail("model.name", "gaussian", f"needs a {dims}×{dims} Cholesky per example; it is "
            "meant for small images (H·W·C <= 1024); allowed here: unet")
  # U-Net: every level must be reachable by halving, and GroupNorm must divide channels.
  mult = tuple(config.model.channel_mult)
  if not mult or any(not isinstance(m, int) or m <= 0 for m in mult):
    _fail("model.channel_mult", mult, "must be a non-empty tuple of positive integers")
  downsamples = len(mult) - 1
  if size and size % (2 ** downsamples):
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
    if size and r not in resolutions:
      _fail("model.attn_resolutions", tuple(config.model.attn_resolutions),
            f"{r} is not a resolution of this U-Net; allowed: {resolutions}")
  dropout = config.model.dropout
  if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
    _fail("model.dropout", dropout, "must lie in [0, 1)")
  _choice(config, "model.compute_dtype", tuple(COMPUTE_DTYPES))

  # Optimisers.
  _optimizer(config, "optim")
  ema = config.optim.ema_decay
  if not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0:
    _fail("optim.ema_decay", ema, "must lie in [0, 1)")

  # Conditional flow and amortized inference.
  method = methods.get(config.method)
  if method.has_posterior:
    for field in ("num_levels", "num_steps", "hidden_channels", "cond_channels"):
      _positive(config, f"flow.{field}", integer=True)
    _choice(config, "flow.coupling", COUPLINGS)
    if size and size % 2 ** config.flow.num_levels:
      _fail("flow.num_levels", config.flow.num_levels,
            f"the image size {size} must be divisible by 2**num_levels")
    _optimizer(config, "flow_optim")
    _positive(config, "operator.sigma_y")  # the flow's likelihood divides by σ_y²
    _choice(config, "amortized.time_sampling", diffusion.TIME_SAMPLINGS)
    _choice(config, "amortized.prior_gradient", diffusion.PRIOR_GRADIENTS)
    if "posterior_params" in config.amortized:
      _choice(config, "amortized.posterior_params", POSTERIOR_PARAMS)
    _positive(config, "amortized.beta_ent_init", strict=False)
    for field in ("beta_prior_warmup_steps", "beta_ent_anneal_steps"):
      _positive(config, f"amortized.{field}", strict=False, integer=True)
    for field in ("beta_data", "beta_prior", "beta_ent"):
      _positive(config, f"amortized.{field}", strict=False)
    for field in ("num_flow_samples", "num_time_samples", "eval_num_samples"):
      _positive(config, f"amortized.{field}", integer=True)
  method.validate(config)

  # Training loop.
  _positive(config, "training.batch_size", integer=True)
  for field in ("num_train_steps", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "max_consecutive_nonfinite_steps"):
    _positive(config, f"training.{field}", integer=True)
  for field in ("eval_every_steps", "sample_every_steps", "profile_steps"):
    _positive(config, f"training.{field}", strict=False, integer=True)
  if not isinstance(_get(config, "training.remat"), bool):
    _fail("training.remat", config.training.remat, "must be True or False")
  _positive(config, "training.steps_per_dispatch", integer=True)
  # The loop acts only between dispatches, so every event must fall on one.
  per_dispatch = config.training.steps_per_dispatch
  for field in ("num_train_steps", "log_every_steps", "eval_every_steps", "sample_every_steps",
                "checkpoint_every_steps"):
    value = config.training[field]
    if value % per_dispatch:
      _fail(f"training.{field}", value, f"must be a multiple of "
            f"training.steps_per_dispatch={per_dispatch} (the loop logs, evaluates and saves "
            f"only between dispatches); allowed: multiples of {per_dispatch}")
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
