"""Shape, size and dependency properties of the DDPM U-Net."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowdiff_jax.models import unet as unet_lib
import params_testing

# 28x28 -> 14 -> 7, attention at 14; small enough to compile in seconds.
TINY = dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
            attn_resolutions=(14,), dropout=0.1, num_groups=8)


def _num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _randomize(params, seed, scale=0.05):
  return params_testing.perturb(params, seed, scale)


def _key(seed):
  # "rbg" keys: with jax_threefry_partitionable (conftest) the many threefry
  # draws of init/dropout/noise compile about twice as slowly on CPU.
  return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def tiny():
  model = unet_lib.UNet(**TINY)
  x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
  t = jnp.array([0.1, 0.5, 0.9])
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(_key(1), x, t)
  apply = jax.jit(model.apply, static_argnames="train")
  return model, variables, apply, x, t


def test_tiny_shape_and_zero_output_at_init(tiny):
  _, variables, apply, x, t = tiny
  out = apply(variables, x, t, train=False)
  assert out.shape == x.shape and out.dtype == jnp.float32
  # The zero-initialised head makes a fresh network predict eps_hat = 0.
  np.testing.assert_array_equal(out, 0.0)


def test_out_channels_and_config():
  cfg = ml_collections.ConfigDict(TINY)
  model = unet_lib.unet_from_config(cfg, channels=2)
  assert model.out_channels == 2 and model.channel_mult == (1, 2, 2)
  shapes = jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)),
                           train=False), jax.random.key(0))
  out = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)),
                            train=False), shapes)
  assert out.shape == (1, 28, 28, 2)


def test_tiny_param_count_matches_hand_count(tiny):
  """Block-by-block count for TINY: catches missing/duplicated layers."""
  _, variables, *_ = tiny
  params = variables["params"]
  c, temb = 16, 64
  gn = lambda ch: 2 * ch
  conv = lambda cin, cout, k=3: k * k * cin * cout + cout
  dense = lambda cin, cout: cin * cout + cout

  def res(cin, cout):
    skip = dense(cin, cout) if cin != cout else 0
    return (gn(cin) + conv(cin, cout) + dense(temb, cout) + gn(cout) +
            conv(cout, cout) + skip)

  attn = lambda ch: gn(ch) + 4 * dense(ch, ch)
  # Levels (28: 16ch) (14: 32ch, attn) (7: 32ch); one ResBlock each going down.
  down = (res(16, 16) + conv(16, 16) + res(16, 32) + attn(32) + conv(32, 32) +
          res(32, 32))
  middle = 2 * res(32, 32) + attn(32)
  # Up: 2 blocks per level on concat(h, skip); the skips, popped last
  # first, have 32, 32 | 32, 16 | 16, 16 channels.
  up = (res(64, 32) + res(64, 32) + conv(32, 32) +           # 7x7
        res(64, 32) + attn(32) + res(48, 32) + attn(32) +    # 14x14
        conv(32, 32) +
        res(48, 16) + res(32, 16))                           # 28x28
  head = gn(16) + conv(16, 1)
  stem_and_time = conv(1, 16) + dense(c, temb) + dense(temb, temb)
  expected = stem_and_time + down + middle + up + head
  assert _num_params(params) == expected
  n_res = sum(k.startswith("ResBlock") for k in params)
  n_attn = sum(k.startswith("AttnBlock") for k in params)
  assert (n_res, n_attn) == (3 + 2 + 6, 1 + 1 + 2)


def test_ddpm_cifar_size_and_shape():
  """Ho et al.'s CIFAR-10 model has 35.7M parameters; eval_shape only, no init."""
  model = unet_lib.UNet(base_channels=128, channel_mult=(1, 2, 2, 2),
                        num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), x, t)
  n = _num_params(shapes["params"])
  assert abs(n - 35.7e6) / 35.7e6 < 0.03, n
  assert n == 35_746_307  # exact count of this implementation
  out = jax.eval_shape(functools.partial(model.apply, train=False), shapes, x, t)
  assert out.shape == x.shape and out.dtype == jnp.float32


@pytest.mark.slow
def test_output_depends_on_t(tiny):
  _, variables, apply, x, t = tiny
  params = _randomize(variables, 2)
  out_a = apply(params, x, t, train=False)
  out_b = apply(params, x, t + 0.05, train=False)
  assert float(jnp.abs(out_a - out_b).max()) > 1e-3


def test_batch_examples_are_independent(tiny):
  _, variables, apply, x, t = tiny
  params = _randomize(variables, 3)
  out = apply(params, x, t, train=False)
  x2 = x.at[0].add(jax.random.normal(jax.random.key(4), x.shape[1:]))
  t2 = t.at[0].set(0.7)
  out2 = apply(params, x2, t2, train=False)
  assert float(jnp.abs(out2[0] - out[0]).max()) > 1e-3
  np.testing.assert_allclose(out2[1:], out[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dropout_only_in_training(tiny):
  _, variables, apply, x, t = tiny
  params = _randomize(variables, 5)
  # Eval needs no rng and is deterministic.
  e1 = apply(params, x, t, train=False)
  e2 = apply(params, x, t, train=False)
  np.testing.assert_array_equal(e1, e2)
  d1 = apply(params, x, t, train=True, rngs={"dropout": _key(6)})
  d2 = apply(params, x, t, train=True, rngs={"dropout": _key(7)})
  assert float(jnp.abs(d1 - d2).max()) > 1e-4
  assert float(jnp.abs(d1 - e1).max()) > 1e-4
  # The same dropout key reproduces the training pass bit for bit.
  np.testing.assert_array_equal(
      d1, apply(params, x, t, train=True, rngs={"dropout": _key(6)}))


def test_invalid_sizes_raise():
  model = unet_lib.UNet(**TINY)
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 30, 30, 1)),
                                        jnp.zeros((1,)), train=False),
                   jax.random.key(0))
  bad_groups = unet_lib.UNet(**{**TINY, "num_groups": 6})
  with pytest.raises(ValueError, match="num_groups"):
    jax.eval_shape(lambda k: bad_groups.init(k, jnp.zeros((1, 28, 28, 1)),
                                             jnp.zeros((1,)), train=False),
                   jax.random.key(0))
