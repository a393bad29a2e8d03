"""Micro-benchmark: one 3x3 'SAME' convolution, forward + backward, four ways.

Issue 19 traced the gap to PyTorch's U-Net step to the 3x3 convolutions
(XLA:CPU runs them through Eigen's spatial convolution; PyTorch through
oneDNN). This times the same convolution written as

  nhwc    lax.conv_general_dilated, NHWC / HWIO (what flax.linen.Conv emits),
  nchw    the same op in NCHW / OIHW (PyTorch's layout),
  shift9  nine shifted (N*H*W, C_in) @ (C_in, C_out) matmuls, summed,
  im2col  the nine shifts concatenated into one (N*H*W, 9*C_in) @ (9*C_in, C_out),
  dw9     nhwc forward and input gradient, the kernel gradient as nine
          (C_in, N*H*W) @ (N*H*W, C_out) matmuls (a custom_vjp),

each as loss = sum(conv(x, w) * g) differentiated in x and w (the training
step's work for one layer), checks they agree with nhwc, and prints ms per
call and GFLOP/s (3 convolutions' worth of FLOPs: forward, dx, dw). Rounds
alternate the variants so background load falls on all of them.

  python experiments/bench/conv.py --batch 32 --size 32 --channels 128 --rounds 5

--step ARGS runs experiments/bench/bench.py with ARGS instead, after putting
dw9 into every stride-1 3x3 convolution of the U-Net (flax.linen.Conv's
conv_general_dilated field; parameters unchanged), to time whole training steps:

  python experiments/bench/conv.py --step "--configs cifar_noise --methods clean --batch_sizes 8"

What it found (experiments/bench/README.md, 2026-12-06): XLA:CPU's forward conv
and input gradient run near its matmul rate, its kernel gradient 4-5x slower;
dw9 halves that at 128 channels, but the whole-step gain is 4-9 % at CIFAR
size for 2.4x the temporary memory, and it is 1.1-1.3x slower on the
16-channel Fashion-MNIST U-Net, so the package does not use it.
"""

import argparse
import json
import os
import runpy
import shlex
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


def conv_nhwc(x, w):
  """x: (N, H, W, C_in), w: (3, 3, C_in, C_out) -> (N, H, W, C_out)."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_nchw(x, w):
  """Same shapes in and out as conv_nhwc; transposes to NCHW/OIHW inside."""
  y = jax.lax.conv_general_dilated(
      x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), (1, 1), "SAME",
      dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return y.transpose(0, 2, 3, 1)


def _shifts(x):
  """The nine (dy, dx) windows of the zero-padded x, each (N, H, W, C)."""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]


def conv_shift9(x, w):
  """Sum over the nine taps of window @ w[tap]."""
  taps = w.reshape(9, *w.shape[2:])
  return sum(jnp.einsum("nhwc,cd->nhwd", s, taps[k])
             for k, s in enumerate(_shifts(x)))


def conv_im2col(x, w):
  """One matmul against the (9*C_in, C_out) kernel."""
  cols = jnp.concatenate(_shifts(x), axis=-1)
  return jnp.einsum("nhwk,kd->nhwd", cols, w.reshape(-1, w.shape[-1]))


def _kernel_grad(x, g):
  """x: (N, H, W, I), g: (N, H, W, O) -> dw: (3, 3, I, O), one dot per tap."""
  n, h, w, i = x.shape
  g2 = g.reshape(n * h * w, g.shape[-1])
  taps = [s.reshape(n * h * w, i).T @ g2 for s in _shifts(x)]
  return jnp.stack(taps).reshape(3, 3, i, g.shape[-1])


@jax.custom_vjp
def conv_dw9(x, w):
  """conv_nhwc, with its kernel gradient as nine matmuls."""
  return conv_nhwc(x, w)


def _dw9_fwd(x, w):
  return conv_nhwc(x, w), (x, w)


def _dw9_bwd(res, g):
  x, w = res
  # Input gradient: the correlation with the flipped, in/out-swapped kernel.
  dx = conv_nhwc(g, jnp.flip(w, (0, 1)).swapaxes(2, 3))
  return dx.astype(x.dtype), _kernel_grad(x, g).astype(w.dtype)


conv_dw9.defvjp(_dw9_fwd, _dw9_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """lax.conv_general_dilated (flax's Conv calls it); 3x3 stride-1 'SAME' as dw9."""
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if (rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1) and padding == "SAME"
      and feature_group_count == 1 and not kwargs and dimension_numbers == nhwc
      and all(d in (None, (1, 1)) for d in (lhs_dilation, rhs_dilation))):
    return conv_dw9(lhs, rhs)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)


def run_bench_with_dw9(bench_args: str) -> None:
  """bench.py's main with every stride-1 3x3 conv of the U-Net as dw9."""
  import flax.linen as nn

  from flowdiff_jax.models import unet
  # The U-Net builds its convolutions through this private helper: replacing
  # it swaps the convolution without touching the package.
  original = unet._conv3x3  # noqa: SLF001
  inits = {True: unet._zero_init, False: unet._default_init}  # noqa: SLF001

  def conv3x3(features, *, strides=1, zero=False, name=None, dtype=jnp.float32):
    if strides != 1:
      return original(features, strides=strides, zero=zero, name=name, dtype=dtype)
    return nn.Conv(features, (3, 3), padding="SAME", name=name, dtype=dtype,
                   kernel_init=inits[zero], conv_general_dilated=conv_general_dilated)

  unet._conv3x3 = conv3x3  # noqa: SLF001
  here = os.path.dirname(os.path.abspath(__file__))
  # Relative to the working directory: bench.py records its command line.
  sys.argv = [os.path.relpath(os.path.join(here, "bench.py")), *shlex.split(bench_args)]
  runpy.run_path(sys.argv[0], run_name="__main__")


VARIANTS = {"nhwc": conv_nhwc, "nchw": conv_nchw, "shift9": conv_shift9,
            "im2col": conv_im2col, "dw9": conv_dw9}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--channels", type=int, default=128)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--calls", type=int, default=3, help="timed calls per round")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--output", default=None, help="write the numbers to this JSON")
  p.add_argument("--step", default=None,
                 help="bench.py's arguments: time training steps with dw9 instead")
  a = p.parse_args()
  if a.step is not None:
    run_bench_with_dw9(a.step)
    return
  n, s, c = a.batch, a.size, a.channels
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (n, s, s, c))
  w = jax.random.normal(kw, (3, 3, c, c)) / np.sqrt(9 * c)
  g = jax.random.normal(kg, (n, s, s, c))
  names = a.variants.split(",")
  steps = {}
  for name in names:
    f = VARIANTS[name]
    steps[name] = jax.jit(jax.value_and_grad(
        lambda x, w, f=f: jnp.sum(f(x, w) * g), argnums=(0, 1)))
  ref = jax.block_until_ready(steps["nhwc"](x, w)) if "nhwc" in steps else None
  compile_s, err = {}, {}
  for name in names:
    t0 = time.perf_counter()
    out = jax.block_until_ready(steps[name](x, w))
    compile_s[name] = time.perf_counter() - t0
    if ref is not None:  # relative max error of the value and both gradients
      err[name] = max(float(jnp.max(jnp.abs(o - r)) / jnp.max(jnp.abs(r)))
                      for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
  times = {name: [] for name in names}
  for _ in range(a.rounds):
    for name in names:
      t0 = time.perf_counter()
      for _ in range(a.calls):
        jax.block_until_ready(steps[name](x, w))
      times[name].append((time.perf_counter() - t0) / a.calls)
  flops = 3 * 2 * n * s * s * 9 * c * c  # forward, dx, dw
  print(f"3x3 conv {c}->{c}, {n}x{s}x{s}, fwd+bwd, {jax.devices()[0].platform}, "
        f"jax {jax.__version__}, median of {a.rounds} rounds x {a.calls} calls")
  print(f"{'variant':8s} {'ms':>8s} {'GFLOP/s':>8s} {'vs nhwc':>8s} {'max rel err':>12s}")
  result = {}
  base = float(np.median(times["nhwc"])) if "nhwc" in times else None
  for name in names:
    t = float(np.median(times[name]))
    result[name] = {"ms": 1e3 * t, "gflops": flops / t / 1e9,
                    "first_call_s": compile_s[name], "max_rel_err": err.get(name)}
    speed = f"{base / t:8.2f}" if base else "       -"
    print(f"{name:8s} {1e3 * t:8.1f} {flops / t / 1e9:8.1f} {speed} "
          f"{err.get(name, float('nan')):12.1e}")
  if a.output:
    with open(a.output, "w") as fh:
      json.dump({"batch": n, "size": s, "channels": c, "rounds": a.rounds,
                 "jax": jax.__version__, "variants": result}, fh, indent=1)


if __name__ == "__main__":
  main()
