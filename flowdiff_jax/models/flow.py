"""Multi-scale conditional Glow (docs/design.md §2.1): the amortized posterior q_φ(x | y, ω).

Images are float32 ``[B, H, W, C]``. Per level: squeeze (2x2 space-to-depth),
then ``num_steps`` flow steps of

  ActNorm -> invertible 1x1 convolution (LU) -> conditional coupling,

and, at the end of every level but the last, half of the channels are
factored out as latent. The factored-out pieces are put back in place by
inverting the squeezes, so z has exactly the shape of x: a reversible
re-arrangement (a permutation, unit Jacobian) of the per-level latents.

A conditioning network maps ``cond_input`` [B, H, W, Cc] (see
``conditioning_input``) to features at every level's resolution; every coupling
net of a level sees those features next to its half of the channels.

Sign convention (used by every layer here and by the flow):
  * ``forward``: data -> latent, z = G⁻¹(x); logdet = log|det ∂z/∂x|.
  * ``inverse``: latent -> data, x = G(z); logdet = log|det ∂x/∂z|.
  At corresponding points (z = G⁻¹(x)) the two logdets are negatives of each
  other, and log q(x | c) = log N(z; 0, I) + forward logdet
                          = log N(z; 0, I) − inverse logdet.

Precision: ``dtype`` (config.model.compute_dtype) is the compute dtype of the
coupling and conditioning networks only (their convolutions; parameters stay
float32). What the density depends on stays float32: ActNorm, the 1x1
convolutions (at HIGHEST matmul precision), the coupling's scale and shift
application and every log-determinant. A coupling net sees the same x1 in both
directions, so the flow stays exactly invertible whatever its dtype.
``remat`` recomputes the coupling nets' hidden activations in the backward
pass instead of storing them. Neither changes the parameter tree.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from flowdiff_jax import rng as rng_lib

COUPLINGS = ("affine", "additive")

# Affine couplings use log_scale = B·tanh(raw / B): identity at raw = 0 (so a
# zero-initialised coupling net gives an identity coupling), slope 1 near 0, and
# each coupling scales a channel by at most e^±B, which keeps the inverse and
# the log-determinant finite whatever the net outputs.
_LOG_SCALE_BOUND = 2.0
# ActNorm's data-dependent init divides by the per-channel std plus this.
_ACTNORM_EPS = 1e-6
# Matmuls of the 1x1 convs in full float32 even where the accelerator's default
# is TF32/bf16: the inverse must undo the forward to float32 accuracy.
_PRECISION = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Re-arrangements (no parameters, unit Jacobian).


def squeeze(x: jax.Array) -> jax.Array:
  """Space-to-depth 2x2: [B, H, W, C] -> [B, H/2, W/2, 4C].

  The 4C channels of an output pixel are its 2x2 input block in the order
  (row, column, channel).
  """
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"squeeze needs even H and W, got {h}x{w}")
  x = x.reshape(b, h // 2, 2, w // 2, 2, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze(x: jax.Array) -> jax.Array:
  """Depth-to-space 2x2, the inverse of ``squeeze``: [B, H, W, 4C] -> [B, 2H, 2W, C]."""
  b, h, w, c4 = x.shape
  if c4 % 4:
    raise ValueError(f"unsqueeze needs a channel count divisible by 4, got {c4}")
  c = c4 // 4
  x = x.reshape(b, h, w, 2, 2, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c)


def split_latents(z: jax.Array, num_levels: int) -> list[jax.Array]:
  """Cuts z [B, H, W, C] into the per-level latents, in level order.

  Level l < L-1 gets [B, H/2^(l+1), W/2^(l+1), 2^(l+1) C] (the second half of
  that level's channels, the half that the flow factors out); the last level
  gets [B, H/2^L, W/2^L, 2^(L+1) C] (everything left). The inverse is
  ``merge_latents``; both are permutations of the entries.
  """
  pieces = []
  h = z
  for level in range(num_levels):
    h = squeeze(h)
    if level < num_levels - 1:
      h, out = _halves(h)
      pieces.append(out)
  pieces.append(h)
  return pieces


def merge_latents(pieces: Sequence[jax.Array]) -> jax.Array:
  """Inverse of ``split_latents``: per-level latents -> z with the image's shape."""
  h = pieces[-1]
  for level in reversed(range(len(pieces))):
    if level < len(pieces) - 1:
      h = jnp.concatenate([h, pieces[level]], axis=-1)
    h = unsqueeze(h)
  return h


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Channel split [.., C] -> ([.., C//2], [.., C - C//2])."""
  c = x.shape[-1] // 2
  return x[..., :c], x[..., c:]


def _pixels(x: jax.Array) -> int:
  return x.shape[1] * x.shape[2]


# ---------------------------------------------------------------------------
# Flow layers. Each maps (x, reverse) -> (y, logdet [B]); with reverse=False it
# is the data -> latent direction, and logdet is always log|det| of the map it
# just computed (so the reverse call returns minus the forward logdet).


class ActNorm(nn.Module):
  """Per-channel affine y = (x + bias) · exp(log_scale); logdet = H·W·Σ log_scale.

  Data-dependent initialisation: when the module is initialised in the forward
  direction, bias and log_scale are set so that the initialising batch comes
  out with zero mean and unit variance per channel (over batch, H and W).
  Afterwards they are ordinary parameters; ``apply`` never changes them.
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, reverse: bool = False):
    c = x.shape[-1]
    data_init = self.is_initializing() and not reverse

    def init_bias(rng):
      del rng
      if not data_init:
        return jnp.zeros((c,), jnp.float32)
      return -jnp.mean(jax.lax.stop_gradient(x), axis=(0, 1, 2))

    def init_log_scale(rng):
      del rng
      if not data_init:
        return jnp.zeros((c,), jnp.float32)
      std = jnp.std(jax.lax.stop_gradient(x), axis=(0, 1, 2))
      return -jnp.log(std + _ACTNORM_EPS)

    bias = self.param("bias", init_bias)
    log_scale = self.param("log_scale", init_log_scale)
    logdet = _pixels(x) * jnp.sum(log_scale) * jnp.ones((x.shape[0],), x.dtype)
    if reverse:
      return x * jnp.exp(-log_scale) - bias, -logdet
    return (x + bias) * jnp.exp(log_scale), logdet


class InvConv1x1(nn.Module):
  """Invertible 1x1 convolution y = W x per pixel, W = P L (U + diag(sign·exp(log_s))).

  P (a permutation) and sign (±1 per channel) are constants, not parameters:
  they come with the initial random rotation, drawn from a numpy generator
  seeded by ``seed``, so they are rebuilt identically at every trace, need no
  storage and no optimiser (or weight decay) can touch them. The parameters are
  the strictly lower part of the unit lower-triangular L, the strictly upper
  part of U and log_s, initialised so that W is that rotation.
  logdet = H·W·Σ log_s.
  """
  seed: int = 0

  def _constants(self, c: int):
    rs = np.random.RandomState(self.seed)
    rotation, _ = np.linalg.qr(rs.randn(c, c))
    p, lower, upper = scipy.linalg.lu(rotation)   # rotation = p @ lower @ upper
    diag = np.diag(upper)
    return (p.astype(np.float32), np.tril(lower, -1).astype(np.float32),
            np.triu(upper, 1).astype(np.float32), np.sign(diag).astype(np.float32),
            np.log(np.abs(diag)).astype(np.float32))

  @nn.compact
  def __call__(self, x: jax.Array, *, reverse: bool = False):
    c = x.shape[-1]
    perm, lower0, upper0, sign, log_s0 = self._constants(c)
    lower = self.param("lower", lambda rng: jnp.asarray(lower0))
    upper = self.param("upper", lambda rng: jnp.asarray(upper0))
    log_s = self.param("log_s", lambda rng: jnp.asarray(log_s0))
    eye = jnp.eye(c, dtype=x.dtype)
    l_mat = jnp.tril(lower, -1) + eye
    u_mat = jnp.triu(upper, 1) + jnp.diag(sign * jnp.exp(log_s))
    logdet = _pixels(x) * jnp.sum(log_s) * jnp.ones((x.shape[0],), x.dtype)
    if reverse:
      # W⁻¹ = U⁻¹ L⁻¹ Pᵀ by triangular solves: better conditioned than inv(W).
      l_inv = jax.scipy.linalg.solve_triangular(l_mat, eye, lower=True, unit_diagonal=True)
      u_inv = jax.scipy.linalg.solve_triangular(u_mat, eye, lower=False)
      w_inv = u_inv @ l_inv @ jnp.asarray(perm).T
      y = jnp.einsum("bhwc,dc->bhwd", x, w_inv, precision=_PRECISION)
      return y, -logdet
    w = jnp.asarray(perm) @ jnp.matmul(l_mat, u_mat, precision=_PRECISION)
    y = jnp.einsum("bhwc,dc->bhwd", x, w, precision=_PRECISION)
    return y, logdet


class CouplingNet(nn.Module):
  """conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3.

  [B, H, W, Cin] -> [B, H, W, out_channels]; outputs exactly 0 at init.
  """
  hidden_channels: int
  out_channels: int
  dtype: Any = jnp.float32  # compute dtype; the output is in this dtype too

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    h = nn.relu(nn.Conv(self.hidden_channels, (3, 3), padding="SAME", dtype=self.dtype)(h))
    h = nn.relu(nn.Conv(self.hidden_channels, (1, 1), dtype=self.dtype)(h))
    return nn.Conv(self.out_channels, (3, 3), padding="SAME",
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros, name="zero_out", dtype=self.dtype)(h)


class ConditionalCoupling(nn.Module):
  """Coupling on channel halves x = (x1, x2), conditioned on features ``cond``.

  The net sees [x1, cond] and outputs a shift t (and, for "affine", a raw
  log-scale r, bounded as s = B·tanh(r / B)); x1 passes through unchanged and
    affine:   y2 = x2 · exp(s) + t,  logdet = Σ s,
    additive: y2 = x2 + t,           logdet = 0.
  A fresh coupling (zero-initialised last layer) is the identity.
  x [B, H, W, C >= 2], cond [B, H, W, Cf] or None. The net computes in
  ``dtype``; t and s are cast back to x's dtype before they are applied.
  """
  hidden_channels: int
  coupling: str = "affine"
  dtype: Any = jnp.float32   # compute dtype of the coupling net
  remat: bool = False        # recompute the net's activations in the backward pass

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array | None = None, *,
               reverse: bool = False):
    if self.coupling not in COUPLINGS:
      raise ValueError(f"flow.coupling must be one of {COUPLINGS}, got {self.coupling!r}")
    x1, x2 = _halves(x)
    c2 = x2.shape[-1]
    h = x1 if cond is None else jnp.concatenate([x1, cond.astype(x1.dtype)], axis=-1)
    affine = self.coupling == "affine"
    # nn.remat keeps the name "net": the same parameter tree either way.
    net_cls = nn.remat(CouplingNet) if self.remat else CouplingNet
    out = net_cls(self.hidden_channels, 2 * c2 if affine else c2, dtype=self.dtype,
                  name="net")(h).astype(x.dtype)
    shift = out[..., :c2]
    if affine:
      log_scale = _LOG_SCALE_BOUND * jnp.tanh(out[..., c2:] / _LOG_SCALE_BOUND)
      logdet = jnp.sum(log_scale, axis=(1, 2, 3))
    else:
      log_scale = None
      logdet = jnp.zeros((x.shape[0],), x.dtype)
    if reverse:
      y2 = x2 - shift
      if affine:
        y2 = y2 * jnp.exp(-log_scale)
      return jnp.concatenate([x1, y2], axis=-1), -logdet
    y2 = x2 * jnp.exp(log_scale) if affine else x2
    return jnp.concatenate([x1, y2 + shift], axis=-1), logdet


class FlowStep(nn.Module):
  """ActNorm -> 1x1 conv -> coupling (data -> latent order); reverse runs them backwards."""
  hidden_channels: int
  coupling: str
  seed: int
  dtype: Any = jnp.float32   # of the coupling net only
  remat: bool = False

  def setup(self):
    self.actnorm = ActNorm()
    self.conv = InvConv1x1(seed=self.seed)
    self.couple = ConditionalCoupling(self.hidden_channels, self.coupling, dtype=self.dtype,
                                      remat=self.remat)

  def __call__(self, x, cond, *, reverse: bool = False):
    layers = (self.actnorm, self.conv, lambda h, reverse: self.couple(h, cond, reverse=reverse))
    logdet = jnp.zeros((x.shape[0],), x.dtype)
    for layer in (reversed(layers) if reverse else layers):
      x, ld = layer(x, reverse=reverse)
      logdet = logdet + ld
    return x, logdet


class ConditioningNet(nn.Module):
  """h(cond_input): [B, H, W, Cc] -> features [B, H/2^(l+1), W/2^(l+1), channels], l < num_levels.

  conv3x3 stem, then per level a stride-2 conv3x3 and a conv3x3 (ReLU after each).
  Features are in ``dtype``.
  """
  num_levels: int
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, c: jax.Array) -> list[jax.Array]:
    conv = lambda *args, **kwargs: nn.Conv(*args, dtype=self.dtype, **kwargs)
    h = nn.relu(conv(self.channels, (3, 3), padding="SAME", name="stem")(c))
    feats = []
    for level in range(self.num_levels):
      h = nn.relu(conv(self.channels, (3, 3), strides=(2, 2), padding="SAME",
                       name=f"down_{level}")(h))
      h = nn.relu(conv(self.channels, (3, 3), padding="SAME", name=f"conv_{level}")(h))
      feats.append(h)
    return feats


# ---------------------------------------------------------------------------
# The flow.


class ConditionalGlow(nn.Module):
  """Multi-scale conditional Glow; z is a re-arrangement with the shape of x.

  Sign convention:
    forward(x, c) -> (z, logdet): z = G⁻¹(x; c), logdet = log|det ∂z/∂x|   [B];
    inverse(z, c) -> (x, logdet): x = G(z; c),  logdet = log|det ∂x/∂z|   [B];
    at corresponding points the two logdets are negatives of each other, and
    log q(x | c) = log N(z; 0, I) + forward logdet.

  ``__call__`` is ``forward``; ``init`` goes through it, which is where ActNorm's
  data-dependent initialisation happens: initialise with a representative
  batch of x (or of x − x̂₀ when the flow models a residual).

  Shapes: x, z [B, H, W, C] float32 with H, W divisible by 2**num_levels;
  cond_input [B, H, W, Cc] (see ``conditioning_input``).
  """
  num_levels: int = 2
  num_steps: int = 4          # K flow steps per level
  hidden_channels: int = 64   # coupling-net width
  cond_channels: int = 32     # conditioning features per level
  coupling: str = "affine"    # "affine" | "additive"
  dtype: Any = jnp.float32    # compute dtype of the coupling/conditioning nets (module doc)
  remat: bool = False         # recompute coupling-net activations in the backward pass

  def setup(self):
    if self.num_levels < 1:
      raise ValueError(f"flow.num_levels must be >= 1, got {self.num_levels}")
    if self.num_steps < 1:
      raise ValueError(f"flow.num_steps must be >= 1, got {self.num_steps}")
    if self.coupling not in COUPLINGS:
      raise ValueError(f"flow.coupling must be one of {COUPLINGS}, got {self.coupling!r}")
    self.cond_net = ConditioningNet(self.num_levels, self.cond_channels, dtype=self.dtype)
    self.steps = [
        FlowStep(self.hidden_channels, self.coupling, seed=level * self.num_steps + k,
                 dtype=self.dtype, remat=self.remat)
        for level in range(self.num_levels) for k in range(self.num_steps)]

  def _check(self, x: jax.Array, cond_input: jax.Array) -> None:
    if x.ndim != 4:
      raise ValueError(f"ConditionalGlow expects [B, H, W, C] inputs, got {x.shape}")
    factor = 2**self.num_levels
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f"image size {x.shape[1]}x{x.shape[2]} must be divisible by "
          f"2**flow.num_levels = {factor}")
    if cond_input.ndim != 4 or cond_input.shape[:3] != x.shape[:3]:
      raise ValueError(
          f"cond_input must be [B, H, W, Cc] matching x {x.shape}, got {cond_input.shape}")

  def _level_steps(self, level: int):
    return self.steps[level * self.num_steps:(level + 1) * self.num_steps]

  def __call__(self, x: jax.Array, cond_input: jax.Array):
    return self.forward(x, cond_input)

  def forward(self, x: jax.Array, cond_input: jax.Array):
    """z = G⁻¹(x; c) [B, H, W, C] and logdet = log|det ∂z/∂x| [B]."""
    self._check(x, cond_input)
    feats = self.cond_net(cond_input)
    logdet = jnp.zeros((x.shape[0],), x.dtype)
    pieces = []
    h = x
    for level in range(self.num_levels):
      h = squeeze(h)
      for step in self._level_steps(level):
        h, ld = step(h, feats[level])
        logdet = logdet + ld
      if level < self.num_levels - 1:
        h, out = _halves(h)
        pieces.append(out)
    pieces.append(h)
    return merge_latents(pieces), logdet

  def inverse(self, z: jax.Array, cond_input: jax.Array):
    """x = G(z; c) [B, H, W, C] and logdet = log|det ∂x/∂z| [B]."""
    self._check(z, cond_input)
    feats = self.cond_net(cond_input)
    pieces = split_latents(z, self.num_levels)
    logdet = jnp.zeros((z.shape[0],), z.dtype)
    h = pieces[-1]
    for level in reversed(range(self.num_levels)):
      if level < self.num_levels - 1:
        h = jnp.concatenate([h, pieces[level]], axis=-1)
      for step in reversed(self._level_steps(level)):
        h, ld = step(h, feats[level], reverse=True)
        logdet = logdet + ld
      h = unsqueeze(h)
    return h, logdet


# ---------------------------------------------------------------------------
# Pure helpers used by the losses.


def conditioning_input(op: Any, y: jax.Array, omega: dict,
                       x_hat: jax.Array | None = None) -> jax.Array:
  """[x̂₀, mask]: [B, H, W, C + 1]; the mask is omega["mask"] or ones [B, H, W, 1].

  x_hat: the restoration x̂₀(y) [B, H, W, C] the flow is conditioned on; A⁺y when None.
  """
  x_hat = op.pinv(y, omega) if x_hat is None else x_hat
  if "mask" in omega:
    mask = omega["mask"].astype(x_hat.dtype)
  else:
    mask = jnp.ones(x_hat.shape[:3] + (1,), x_hat.dtype)
  return jnp.concatenate([x_hat, mask], axis=-1)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
  """log N(z; 0, I) summed over all but the leading axis: [N, ...] -> [N]."""
  z = z.reshape(z.shape[0], -1)
  return -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def tile_samples(a: jax.Array, n: int) -> jax.Array:
  """[B, ...] -> [n * B, ...], sample-major (row s*B + b is a[b])."""
  return jnp.broadcast_to(a[None], (n,) + a.shape).reshape((n * a.shape[0],) + a.shape[1:])


def sample(flow: ConditionalGlow, params: Any, rng: jax.Array, cond_input: jax.Array,
           num_samples: int, base: jax.Array | None = None, *,
           axis_name: str | None = None):
  """Reparametrised draws from q(x | c) for every conditioning input.

  z ~ N(0, I); x = G(z; c), plus ``base`` x̂₀ [B, H, W, C] when given (the flow
  then models x − x̂₀; the shift leaves the density unchanged).
  Args:
    params: the variables dict from ``flow.init`` ({"params": ...}); without
      ``base`` the image channel count is read from its shapes.
    rng: key for z; under shard_map/pmap the same on every device.
    cond_input: [B, H, W, Cc].
    axis_name: None under jit (B is the global batch); inside shard_map/pmap
      the mapped batch axis: each device then draws its rows of the global z
      (`flowdiff_jax.rng`), so samples do not depend on the device count.
  Returns:
    x [num_samples, B, H, W, C] and log q(x | c) = log N(z; 0, I) − log|det ∂x/∂z|,
    [num_samples, B]. Both are differentiable in params.
  """
  b, h, w = cond_input.shape[:3]
  if base is not None:
    channels = base.shape[-1]
  else:
    # Read the image channel count from the params: the last level's 1x1 conv
    # acts on 2^(L+1)·C channels.
    lower = params["params"][f"steps_{flow.num_levels * flow.num_steps - 1}"]["conv"]["lower"]
    channels = lower.shape[-1] // 2**(flow.num_levels + 1)
  # Drawn as [num_samples, B, ...] so that B is the sharded axis; jax draws by
  # linear index, so flattening gives the same z as a [num_samples·B, ...] draw.
  z = rng_lib.normal(rng, (num_samples, b, h, w, channels), jnp.float32, batch_axis=1,
                     axis_name=axis_name).reshape((num_samples * b, h, w, channels))
  x, logdet = flow.apply(params, z, tile_samples(cond_input, num_samples), method=flow.inverse)
  log_q = standard_normal_log_prob(z) - logdet
  x = x.reshape((num_samples, b, h, w, channels))
  if base is not None:
    x = x + base[None]
  return x, log_q.reshape(num_samples, b)


def log_prob(flow: ConditionalGlow, params: Any, x: jax.Array, cond_input: jax.Array,
             base: jax.Array | None = None) -> jax.Array:
  """log q(x | c) [B] for x [B, H, W, C] (x − base when a residual base is given)."""
  if base is not None:
    x = x - base
  z, logdet = flow.apply(params, x, cond_input, method=flow.forward)
  return standard_normal_log_prob(z) + logdet


def flow_from_config(cfg: Any, *, dtype: Any = jnp.float32,
                     remat: bool = False) -> ConditionalGlow:
  """ConditionalGlow from ``config.flow`` (num_levels, num_steps, hidden_channels,
  cond_channels, coupling; missing fields take the class defaults); ``dtype``
  and ``remat`` (from config.model.compute_dtype, config.training.remat): see
  the module docstring."""
  d = ConditionalGlow()
  get = cfg.get
  coupling = str(get("coupling", d.coupling))
  if coupling not in COUPLINGS:
    raise ValueError(f"flow.coupling must be one of {COUPLINGS}, got {coupling!r}")
  fields = {}
  for name in ("num_levels", "num_steps", "hidden_channels", "cond_channels"):
    value = int(get(name, getattr(d, name)))
    if value < 1:
      raise ValueError(f"flow.{name} must be >= 1, got {value}")
    fields[name] = value
  return ConditionalGlow(coupling=coupling, dtype=dtype, remat=bool(remat), **fields)
