"""experiments/bench/conv.py: its convolution formulations compute lax's convolution.

The benchmark times them against each other, so each must be the same
function, gradients included: a formulation that were faster because it
computed something else would be a wrong result, not a speed-up.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runs_testing import REPO

sys.path.insert(0, os.path.join(REPO, "experiments", "bench"))
import conv  # from its folder, as the benchmark runs it


@pytest.mark.parametrize("name", sorted(conv.VARIANTS))
def test_every_formulation_has_lax_value_and_gradients(name):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 6, 5, 3))  # non-square, odd: catches swapped shifts
  w = jax.random.normal(kw, (3, 3, 3, 4))
  g = jax.random.normal(kg, (2, 6, 5, 4))
  def loss(f):
    return lambda x, w: jnp.sum(f(x, w) * g)
  ref = jax.value_and_grad(loss(conv.conv_nhwc), argnums=(0, 1))(x, w)
  out = jax.value_and_grad(loss(conv.VARIANTS[name]), argnums=(0, 1))(x, w)
  for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)
  # lax itself, not only conv_nhwc, is the reference: check the forward once.
  direct = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv.VARIANTS[name](x, w), direct, rtol=1e-5, atol=1e-5)


def test_flax_conv_through_the_dw9_hook_keeps_params_and_gradients():
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  plain = nn.Conv(5, (3, 3), padding="SAME")
  hooked = nn.Conv(5, (3, 3), padding="SAME", conv_general_dilated=conv.conv_general_dilated)
  params = plain.init(jax.random.key(2), x)
  assert jax.tree.structure(hooked.init(jax.random.key(2), x)) == jax.tree.structure(params)
  grads = [jax.grad(lambda p, m=m: jnp.sum(jnp.sin(m.apply(p, x))))(params)
           for m in (plain, hooked)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Strided convolutions are handed to lax unchanged.
  strided = nn.Conv(5, (3, 3), strides=(2, 2), padding="SAME",
                    conv_general_dilated=conv.conv_general_dilated)
  assert strided.apply(params, x).shape == (2, 2, 2, 5)
