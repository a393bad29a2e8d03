"""DDPM-style epsilon-prediction U-Net (Ho et al. 2020) in Flax Linen.

Layout (Ho et al.'s CIFAR-10 model with the defaults, about 35.7M params at 32x32x3):
sinusoidal time embedding -> MLP; conv3x3 stem; per resolution level
``num_res_blocks`` ResBlocks (+ self-attention where the height is in
``attn_resolutions``) and a stride-2 conv downsample between levels; a
ResBlock-Attention-ResBlock middle; an upsampling path with
``num_res_blocks + 1`` ResBlocks per level, each fed the matching skip
activation by concatenation, and nearest-neighbour upsample + conv3x3
between levels; GroupNorm-SiLU-conv3x3 head.

``dtype`` is the compute dtype of the convolutions, dense layers and the
activations between them (e.g. bfloat16 for speed on accelerators); the
parameters are always float32, GroupNorm statistics and attention softmaxes
are computed in float32, and eps_hat is returned in the input's dtype.
``remat`` recomputes each ResBlock's and AttnBlock's activations in the
backward pass instead of storing them (less memory, about one more forward).
Neither changes the parameter tree.

The layers whose output is added to a residual stream (second conv of each
ResBlock, attention output projection) and the head are zero-initialised, so
a fresh network is an identity on the residual stream and outputs eps_hat = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# DDPM's initialiser: variance scaling 1.0, fan-average, uniform (Glorot).
_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_zero_init = nn.initializers.zeros
# config.model.compute_dtype -> the dtype the networks compute in (params stay float32).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding [B, dim] of (already scaled) times t [B].

  Frequencies are geometric from 1 down to 1/10000; sines then cosines.
  """
  if dim % 2:
    raise ValueError(f"time-embedding dim must be even, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) /
                  max(half - 1, 1))
  angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _group_norm(channels: int, num_groups: int, name: str | None = None,
                dtype: Any = jnp.float32):
  groups = min(num_groups, channels)
  if channels % groups:
    raise ValueError(f"GroupNorm: {channels} channels do not divide into "
                     f"{groups} groups (model.num_groups={num_groups})")
  # flax computes the statistics in float32 whatever `dtype` (the output's) is.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, name=name, dtype=dtype)


def _conv3x3(features: int, *, strides: int = 1, zero: bool = False,
             name: str | None = None, dtype: Any = jnp.float32):
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding="SAME",
                 kernel_init=_zero_init if zero else _default_init, name=name,
                 dtype=dtype)


def _dense(features: int, *, zero: bool = False, name: str | None = None,
           dtype: Any = jnp.float32):
  return nn.Dense(features, kernel_init=_zero_init if zero else _default_init,
                  name=name, dtype=dtype)


class ResBlock(nn.Module):
  """GN-SiLU-conv3x3, + Dense(temb), GN-SiLU-dropout-conv3x3 (zero init), + skip.

  x [B,H,W,Cin], temb [B,D] -> [B,H,W,out_channels]; the skip is a 1x1
  projection when Cin != out_channels. `train` is positional so that
  ``nn.remat`` can mark it static.
  """
  out_channels: int
  dropout: float
  num_groups: int
  dtype: Any = jnp.float32  # compute dtype (params stay float32)

  @nn.compact
  def __call__(self, x, temb, train: bool):
    dt = self.dtype
    h = nn.silu(_group_norm(x.shape[-1], self.num_groups, dtype=dt)(x))
    h = _conv3x3(self.out_channels, dtype=dt)(h)
    # Time conditioning as a per-channel bias between the two convs.
    h = h + _dense(self.out_channels, dtype=dt)(
        nn.silu(temb))[:, None, None, :]
    h = nn.silu(_group_norm(self.out_channels, self.num_groups, dtype=dt)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv3x3(self.out_channels, zero=True, dtype=dt)(h)
    if x.shape[-1] != self.out_channels:
      x = _dense(self.out_channels, dtype=dt, name="skip")(x)
    return x + h


class AttnBlock(nn.Module):
  """GroupNorm + single-head self-attention over all H*W positions, residual.

  x [B,H,W,C] -> [B,H,W,C]; logits in float32 for a stable softmax.
  """
  num_groups: int
  dtype: Any = jnp.float32  # compute dtype (params stay float32)

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    dt = self.dtype
    h = _group_norm(c, self.num_groups, dtype=dt)(x)
    q = _dense(c, dtype=dt, name="q")(h)
    k = _dense(c, dtype=dt, name="k")(h)
    v = _dense(c, dtype=dt, name="v")(h)
    q, k, v = (a.reshape(b, hgt * wid, c) for a in (q, k, v))
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(c), axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hgt, wid, c)
    h = _dense(c, zero=True, dtype=dt, name="proj_out")(h)
    return x + h


class UNet(nn.Module):
  """Epsilon-prediction U-Net: (x_t [B,H,W,C], t [B] in [0,1]) -> eps_hat [B,H,W,out].

  H and W must be divisible by 2**(len(channel_mult) - 1); attention is used
  at levels whose height is in ``attn_resolutions``. Dropout draws from the
  'dropout' rng stream when ``train=True``. ``dtype`` and ``remat``: see the
  module docstring.
  """
  base_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)  # spatial sizes (height) with self-attention
  dropout: float = 0.1
  num_groups: int = 32  # GroupNorm groups: min(num_groups, channels), must divide
  out_channels: int | None = None  # default: input channels
  time_scale: float = 1000.0  # t in [0,1] is embedded as sinusoidal(t * time_scale)
  dtype: Any = jnp.float32  # compute dtype of convs/dense layers; params stay float32
  remat: bool = False  # recompute block activations in the backward pass

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, train: bool) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"UNet expects x of shape [B,H,W,C], got {x.shape}")
    batch, height, width, in_ch = x.shape
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    num_levels = len(self.channel_mult)
    factor = 2**(num_levels - 1)
    if height % factor or width % factor:
      raise ValueError(
          f"image size {height}x{width} must be divisible by {factor} "
          f"(2**(len(channel_mult)-1), channel_mult={tuple(self.channel_mult)})")
    out_ch = self.out_channels or in_ch
    attn_at = set(int(r) for r in self.attn_resolutions)
    dt = self.dtype
    # Blocks are named as flax would auto-name the plain classes (ResBlock_0,
    # ...), so the parameter tree is the same with and without remat, and a
    # checkpoint of either resumes in the other. `train` (argument 3, counting
    # self) is a Python bool and must stay static under remat.
    res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock
    res_ids, attn_ids = itertools.count(), itertools.count()
    res_block = lambda ch: res_cls(ch, self.dropout, self.num_groups, dtype=dt,
                                   name=f"ResBlock_{next(res_ids)}")
    attn_block = lambda: attn_cls(self.num_groups, dtype=dt,
                                  name=f"AttnBlock_{next(attn_ids)}")

    temb_dim = 4 * self.base_channels
    temb = timestep_embedding(t * self.time_scale, self.base_channels)
    temb = _dense(temb_dim, dtype=dt)(temb)
    temb = _dense(temb_dim, dtype=dt)(nn.silu(temb))

    # Downsampling path; every intermediate activation is kept for a skip.
    h = _conv3x3(self.base_channels, dtype=dt)(x)
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res_block(self.base_channels * mult)(h, temb, train)
        if h.shape[1] in attn_at:
          h = attn_block()(h)
        skips.append(h)
      if level != num_levels - 1:
        h = _conv3x3(h.shape[-1], strides=2, dtype=dt)(h)
        skips.append(h)

    h = res_block(h.shape[-1])(h, temb, train)
    h = attn_block()(h)
    h = res_block(h.shape[-1])(h, temb, train)

    # Upsampling path: one extra block per level consumes the downsample skip.
    for level in reversed(range(num_levels)):
      for _ in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(self.base_channels * self.channel_mult[level])(h, temb, train)
        if h.shape[1] in attn_at:
          h = attn_block()(h)
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = _conv3x3(h.shape[-1], dtype=dt)(h)
    assert not skips, "every skip activation must be consumed"

    h = nn.silu(_group_norm(h.shape[-1], self.num_groups, dtype=dt)(h))
    # The loss and the samplers work in the input's dtype (float32).
    return _conv3x3(out_ch, zero=True, dtype=dt)(h).astype(x.dtype)


def unet_from_config(cfg: Any, channels: int, *, remat: bool = False) -> UNet:
  """UNet from ``config.model`` (base_channels, channel_mult, num_res_blocks,
  attn_resolutions, dropout, num_groups; optional time_scale, compute_dtype);
  ``channels`` = image channels, used for the output; ``remat`` comes from
  config.training.remat."""
  d = UNet()
  get = cfg.get
  compute_dtype = str(get("compute_dtype", "float32"))
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"model.compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, "
                     f"got {compute_dtype!r}")
  return UNet(
      base_channels=int(get("base_channels", d.base_channels)),
      channel_mult=tuple(int(m) for m in get("channel_mult", d.channel_mult)),
      num_res_blocks=int(get("num_res_blocks", d.num_res_blocks)),
      attn_resolutions=tuple(
          int(r) for r in get("attn_resolutions", d.attn_resolutions)),
      dropout=float(get("dropout", d.dropout)),
      num_groups=int(get("num_groups", d.num_groups)),
      out_channels=int(channels),
      time_scale=float(get("time_scale", d.time_scale)),
      dtype=COMPUTE_DTYPES[compute_dtype],
      remat=bool(remat),
  )
