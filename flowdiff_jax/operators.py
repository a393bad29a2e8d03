"""Forward operators A_ω, their adjoints and pseudo-inverses, and the fixed
per-example corruption draw (docs/design.md §1, §2.5).

Conventions
-----------
* Images ``x`` are float32 ``[B, H, W, C]`` with values in [-1, 1].
* ``sigma_y`` is the standard deviation of the Gaussian measurement noise
  **on the [-1, 1] image scale** (sigma_y = 0.2 here is 0.1 on a [0, 1] scale).
* Every operator is linear and its observation has the image's shape,
  ``y = A_ω x + sigma_y ε`` with ``ε ~ N(0, I)``.
* ``Omega = dict[str, jax.Array]`` holds the per-example operator parameters.
  ``sample_omega`` returns one example's (unbatched) parameters; ``apply``,
  ``adjoint``, ``pinv`` and ``measure`` take them batched, leaves ``[B, ...]``.
  Operators without parameters use ``{}``.
* Masks are float32 ``[..., H, W, 1]``: 1 = observed, 0 = dropped, shared by
  all channels. Masking operators put noise only on observed pixels, so
  ``y = mask * (x + sigma_y ε)`` is exactly 0 where a pixel is dropped.

Operators are frozen dataclasses, hence hashable, so they can be passed to
``jax.jit`` as static arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

Omega = dict[str, jax.Array]

OPERATORS = ("denoise", "blur", "inpaint_random", "inpaint_box")


def _check_sigma_y(sigma_y: float) -> None:
  if not sigma_y >= 0:
    raise ValueError(f"operator.sigma_y must be >= 0, got {sigma_y!r}")


class _MaskOperator:
  """Shared linear algebra of the masking operators: A = Aᵀ = A⁺ = diag(mask)."""

  sigma_y: float

  def apply(self, x: jax.Array, omega: Omega) -> jax.Array:
    """A_ω x = mask * x. x: [B, H, W, C]; omega["mask"]: [B, H, W, 1]."""
    return omega["mask"].astype(x.dtype) * x

  def adjoint(self, y: jax.Array, omega: Omega) -> jax.Array:
    """A_ωᵀ y = mask * y (a 0/1 diagonal operator is self-adjoint)."""
    return omega["mask"].astype(y.dtype) * y

  def pinv(self, y: jax.Array, omega: Omega) -> jax.Array:
    """A_ω⁺ y = mask * y: the Moore-Penrose inverse of a 0/1 diagonal."""
    return omega["mask"].astype(y.dtype) * y

  def measure(self, key: jax.Array, x: jax.Array, omega: Omega) -> jax.Array:
    """y = mask * (x + sigma_y ε); exactly 0 on dropped pixels. x: [B, H, W, C]."""
    noise = jax.random.normal(key, x.shape, x.dtype)
    return omega["mask"].astype(x.dtype) * (x + self.sigma_y * noise)


@dataclasses.dataclass(frozen=True)
class Denoise:
  """A = I: observe the image plus Gaussian noise of std sigma_y ([-1, 1] scale)."""

  sigma_y: float
  name: ClassVar[str] = "denoise"

  def __post_init__(self):
    _check_sigma_y(self.sigma_y)

  def sample_omega(self, key: jax.Array, image_shape: tuple[int, ...]) -> Omega:
    """No parameters: returns {}."""
    del key, image_shape
    return {}

  def apply(self, x: jax.Array, omega: Omega) -> jax.Array:
    """A x = x. x: [B, H, W, C]."""
    del omega
    return x

  def adjoint(self, y: jax.Array, omega: Omega) -> jax.Array:
    """Aᵀ y = y."""
    del omega
    return y

  def pinv(self, y: jax.Array, omega: Omega) -> jax.Array:
    """A⁺ y = y."""
    del omega
    return y

  def measure(self, key: jax.Array, x: jax.Array, omega: Omega) -> jax.Array:
    """y = x + sigma_y ε. x: [B, H, W, C]."""
    del omega
    return x + self.sigma_y * jax.random.normal(key, x.shape, x.dtype)


@dataclasses.dataclass(frozen=True)
class GaussianBlur:
  """Depthwise Gaussian blur with a **circular (periodic) boundary**.

  A x is the circular cross-correlation of every channel of x with the same
  ``[kernel_size, kernel_size]`` Gaussian kernel (std ``kernel_std`` pixels,
  normalised to sum 1, centred on the output pixel; ``kernel_size`` must be
  odd). The circular boundary makes A diagonal in the 2-D DFT basis, which
  gives an exact, cheap Tikhonov pseudo-inverse and keeps A mean-preserving.
  No per-example parameters (omega = {}). Noise std sigma_y is on the [-1, 1]
  scale.
  """

  sigma_y: float
  kernel_size: int = 9
  kernel_std: float = 2.0
  pinv_reg: float = 1e-3
  name: ClassVar[str] = "blur"

  def __post_init__(self):
    _check_sigma_y(self.sigma_y)
    if self.kernel_size < 1 or self.kernel_size % 2 != 1:
      raise ValueError(
          f"operator.kernel_size must be a positive odd integer, got {self.kernel_size!r}")
    if not self.kernel_std > 0:
      raise ValueError(f"operator.kernel_std must be > 0, got {self.kernel_std!r}")
    if not self.pinv_reg > 0:
      # reg = 0 would divide by the (near-)zeros of the blur's transfer function.
      raise ValueError(f"operator.pinv_reg must be > 0, got {self.pinv_reg!r}")

  def _kernel_np(self) -> np.ndarray:
    r = self.kernel_size // 2
    d = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (d / self.kernel_std) ** 2)
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)

  def kernel(self) -> jax.Array:
    """The normalised (sum 1), symmetric blur kernel, float32 [k, k]."""
    return jnp.asarray(self._kernel_np())

  def sample_omega(self, key: jax.Array, image_shape: tuple[int, ...]) -> Omega:
    """No parameters: returns {}."""
    del key, image_shape
    return {}

  def _correlate(self, x: jax.Array, k2d: np.ndarray) -> jax.Array:
    """Circular depthwise cross-correlation of x [B, H, W, C] with k2d [k, k]."""
    r = self.kernel_size // 2
    c = x.shape[-1]
    # Wrap padding + VALID correlation == circular correlation, also when the
    # kernel is wider than the image (the padding then wraps more than once).
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="wrap")
    rhs = jnp.broadcast_to(jnp.asarray(k2d, x.dtype)[:, :, None, None],
                           (self.kernel_size, self.kernel_size, 1, c))
    return jax.lax.conv_general_dilated(
        xp, rhs, window_strides=(1, 1), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        # Accelerators otherwise default to reduced-precision (TF32/bf16) convs,
        # which would break the adjoint identity and the FFT pseudo-inverse.
        precision=jax.lax.Precision.HIGHEST)

  def apply(self, x: jax.Array, omega: Omega) -> jax.Array:
    """A x: circular Gaussian blur of x [B, H, W, C], per channel."""
    del omega
    return self._correlate(x, self._kernel_np())

  def adjoint(self, y: jax.Array, omega: Omega) -> jax.Array:
    """Aᵀ y: circular correlation with the flipped kernel (the exact transpose;
    for this symmetric kernel it equals A)."""
    del omega
    return self._correlate(y, self._kernel_np()[::-1, ::-1])

  def transfer(self, height: int, width: int) -> np.ndarray:
    """rfft2 of the kernel embedded circularly in an [height, width] grid with
    its centre at (0, 0); complex [height, width // 2 + 1].

    With ``Hf`` this array, ``rfft2(A x) = conj(Hf) * rfft2(x)`` and
    ``rfft2(Aᵀ y) = Hf * rfft2(y)`` (per channel, over axes H, W).
    """
    r = self.kernel_size // 2
    h = np.zeros((height, width), np.float64)
    off = np.arange(-r, r + 1)
    rows = (off % height)[:, None]
    cols = (off % width)[None, :]
    # np.add.at accumulates taps that land on the same cell when k > H or W.
    np.add.at(h, (np.broadcast_to(rows, (self.kernel_size,) * 2),
                  np.broadcast_to(cols, (self.kernel_size,) * 2)),
              self._kernel_np().astype(np.float64))
    return np.fft.rfft2(h)

  def pinv(self, y: jax.Array, omega: Omega) -> jax.Array:
    """Tikhonov pseudo-inverse A⁺y = (AᵀA + pinv_reg I)⁻¹ Aᵀ y of y [B, H, W, C].

    Exact (up to float32 FFT rounding): under the circular boundary AᵀA is
    diagonal in Fourier with entries |Hf|², so the solve is a division.
    """
    del omega
    height, width = y.shape[1], y.shape[2]
    hf = self.transfer(height, width)
    # Computed in float64 on the host, then cast: static, so free under jit.
    gain = jnp.asarray(hf / (np.abs(hf) ** 2 + self.pinv_reg), jnp.complex64)
    yf = jnp.fft.rfft2(y, axes=(1, 2))
    x = jnp.fft.irfft2(yf * gain[None, :, :, None], s=(height, width), axes=(1, 2))
    return x.astype(y.dtype)

  def measure(self, key: jax.Array, x: jax.Array, omega: Omega) -> jax.Array:
    """y = A x + sigma_y ε. x: [B, H, W, C]."""
    return self.apply(x, omega) + self.sigma_y * jax.random.normal(key, x.shape, x.dtype)


@dataclasses.dataclass(frozen=True)
class RandomInpaint(_MaskOperator):
  """Random pixel mask: each pixel (all channels together) is dropped
  independently with probability ``drop_prob``. omega = {"mask": [H, W, 1]}
  (batched [B, H, W, 1]). Noise std sigma_y on the [-1, 1] scale, observed
  pixels only."""

  sigma_y: float
  drop_prob: float = 0.6
  name: ClassVar[str] = "inpaint_random"

  def __post_init__(self):
    _check_sigma_y(self.sigma_y)
    if not 0.0 <= self.drop_prob <= 1.0:
      raise ValueError(f"operator.drop_prob must be in [0, 1], got {self.drop_prob!r}")

  def sample_omega(self, key: jax.Array, image_shape: tuple[int, ...]) -> Omega:
    """One example's mask, float32 [H, W, 1] (1 = observed); image_shape = (H, W, C)."""
    height, width = image_shape[0], image_shape[1]
    keep = jax.random.bernoulli(key, 1.0 - self.drop_prob, (height, width, 1))
    return {"mask": keep.astype(jnp.float32)}


@dataclasses.dataclass(frozen=True)
class BoxInpaint(_MaskOperator):
  """One missing ``box_size x box_size`` square per example, at a uniformly
  random position lying fully inside the image. omega = {"mask": [H, W, 1]}
  (batched [B, H, W, 1]). Noise std sigma_y on the [-1, 1] scale, observed
  pixels only."""

  sigma_y: float
  box_size: int = 8
  name: ClassVar[str] = "inpaint_box"

  def __post_init__(self):
    _check_sigma_y(self.sigma_y)
    if self.box_size < 1:
      raise ValueError(f"operator.box_size must be >= 1, got {self.box_size!r}")

  def sample_omega(self, key: jax.Array, image_shape: tuple[int, ...]) -> Omega:
    """One example's mask, float32 [H, W, 1] (1 = observed); image_shape = (H, W, C)."""
    height, width = image_shape[0], image_shape[1]
    b = self.box_size
    if b > height or b > width:
      raise ValueError(
          f"operator.box_size={b} does not fit in a {height}x{width} image")
    k_top, k_left = jax.random.split(key)
    # maxval is exclusive: top-left corners 0 .. H - b keep the box inside.
    top = jax.random.randint(k_top, (), 0, height - b + 1)
    left = jax.random.randint(k_left, (), 0, width - b + 1)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = ((rows >= top) & (rows < top + b)) & ((cols >= left) & (cols < left + b))
    return {"mask": (~inside).astype(jnp.float32)[:, :, None]}


Operator = Denoise | GaussianBlur | RandomInpaint | BoxInpaint

_CLASSES = {cls.name: cls for cls in (Denoise, GaussianBlur, RandomInpaint, BoxInpaint)}
assert tuple(_CLASSES) == OPERATORS


def make_operator(cfg: Any) -> Operator:
  """Builds the operator named ``cfg.name`` from an ``operator`` ConfigDict.

  Reads ``name``, ``sigma_y`` and whichever of ``kernel_size``, ``kernel_std``,
  ``pinv_reg``, ``drop_prob``, ``box_size`` the operator takes (missing ones
  fall back to the dataclass defaults). Raises ValueError naming the field.
  """
  name = cfg["name"]
  if name not in _CLASSES:
    raise ValueError(
        f"operator.name={name!r} is not a known operator; allowed values: "
        f"{', '.join(OPERATORS)}")
  if "sigma_y" not in cfg:
    raise ValueError("operator.sigma_y is required")
  cls = _CLASSES[name]
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name in cfg and cfg[field.name] is not None:
      kwargs[field.name] = cfg[field.name]
  # Plain Python scalars keep the operator hashable and jit-static.
  for k, v in kwargs.items():
    kwargs[k] = int(v) if k in ("kernel_size", "box_size") else float(v)
  return cls(**kwargs)


def corrupt(op: Operator, x: jax.Array, index: jax.Array, seed: Any) -> dict[str, jax.Array]:
  """The fixed per-example corruption of docs/design.md §2.5.

  Example i gets key ``fold_in(jax.random.key(seed), index[i])``, split into
  (omega key, noise key); its (omega, y) therefore depend only on
  (seed, index[i]) and its clean image — never on its batch position, the
  batch composition, the device count or the epoch.

  Args:
    op: an operator (static under jit).
    x: clean images, float32 [B, H, W, C] in [-1, 1].
    index: int32 [B], the examples' dataset indices.
    seed: the data seed (int or int32 scalar).
  Returns:
    ``dict(y=[B, H, W, C], **omega)`` with omega leaves batched [B, ...].
  """
  root = jax.random.key(seed)

  def one(xi, i):
    k_omega, k_noise = jax.random.split(jax.random.fold_in(root, i))
    omega = op.sample_omega(k_omega, xi.shape)
    # Operators take batches; run this example as a batch of one.
    y = op.measure(k_noise, xi[None], jax.tree.map(lambda a: a[None], omega))[0]
    return dict(y=y, **omega)

  return jax.vmap(one)(x, jnp.asarray(index, jnp.int32))


def measured_dims(x_shape: tuple[int, ...], omega: Omega) -> jax.Array:
  """Number of measured dimensions per example, float32 [B], for images of shape [B, H, W, C].

  H·W·C for operators without a mask; (observed pixels)·C with omega["mask"].
  """
  b, h, w, c = x_shape
  if "mask" in omega:
    return jnp.sum(omega["mask"].astype(jnp.float32), axis=(1, 2, 3)) * c
  return jnp.full((b,), h * w * c, jnp.float32)


def residual_ratio(op: Operator, y: jax.Array, omega: Omega, x: jax.Array) -> jax.Array:
  """Data consistency of images x with their measurements: ‖y − A_ω x‖² / (m σ_y²), [..., B].

  y: [B, H, W, C]; x: [B, H, W, C] or [S, B, H, W, C] (S posterior samples);
  m: the example's number of measured dimensions (`measured_dims`).

  Needs no ground truth. For x drawn from the exact posterior p(x | y), the
  pair (x, y) has the joint law of (clean image, measurement), so y − A x has
  the law of the noise and the ratio averages to 1 over a data set, whatever
  the prior. Well below 1: the samples fit the noise; well above 1: they
  ignore the data (or σ_y is too small). The posterior *mean* sits closer to y
  than the samples do, so its ratio is below 1 (for denoising with a Gaussian
  prior of variance s², σ_y² / (s² + σ_y²) on average).
  """
  batched = x.reshape((-1,) + y.shape[1:])
  n = batched.shape[0] // y.shape[0]
  tile = lambda a: jnp.broadcast_to(a[None], (n,) + a.shape).reshape((-1,) + a.shape[1:])
  y_t, omega_t = tile(y), jax.tree.map(tile, omega)
  r = y_t - op.apply(batched, omega_t)
  sq = jnp.sum(jnp.square(r), axis=(1, 2, 3))
  ratio = sq / (measured_dims(batched.shape, omega_t) * jnp.square(op.sigma_y))
  return ratio.reshape(x.shape[:-4] + (y.shape[0],))
