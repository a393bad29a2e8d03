"""The XLA CPU fusion bug worked around in flowdiff_jax.xla_workarounds stays worked around."""

import jax
import jax.numpy as jnp
import numpy as np

from flowdiff_jax import diffusion


def test_fused_expm1_reductions_match_eager():
  # The minimal pattern: two expm1 of different inputs around one reduction
  # (44 % off under jit without the workaround, jaxlib 0.10.2 and 0.12.0.1).
  t = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.0, (64, 64)), jnp.float32)
  x = 0.3 * jnp.cos(jnp.arange(64 * 4.0)).reshape(64, 4)

  def f(t):
    return jnp.expm1(-t) * jnp.sum(jnp.expm1(t)[:, :, None] * x[None] + 1.0, axis=-1)

  np.testing.assert_allclose(jax.jit(f)(t), f(t), rtol=1e-5)


def test_uniform_time_nll_bound_is_the_same_under_jit():
  # The case that exposed the bug: the uniform-t NLL bound of the linear schedule.
  schedule = diffusion.VPSchedule(kind="linear")
  x = 0.3 * jnp.sin(jnp.arange(8 * 4 * 4, dtype=jnp.float32)).reshape(8, 4, 4, 1)
  eps_fn = lambda x_t, t: 0.5 * x_t

  def bound(x):
    return diffusion.nll_bound(eps_fn, schedule, x, jax.random.key(0, impl="rbg"),
                               num_time_samples=16, time_sampling="uniform")

  np.testing.assert_allclose(jax.jit(bound)(x), bound(x), rtol=1e-4)
