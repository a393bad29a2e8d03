"""Helpers shared by the network and training-step tests."""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnums=2)
def perturb(params, seed, scale=0.05):
  """params + fixed pseudo-random offsets of size ~scale on every leaf.

  Moves zero-initialised layers (identity couplings, zero heads) to a generic
  point so that tests of invertibility or input dependence are not trivially
  true. Built from sin of an index, which compiles much faster on CPU than one
  random draw per leaf.
  """
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, p in enumerate(leaves):
    phase = jnp.arange(p.size, dtype=jnp.float32) * 0.618034 + 2.71 * i + seed
    out.append(p + scale * jnp.sin(131.0 * phase).reshape(p.shape))
  return jax.tree.unflatten(treedef, out)


def observation_batch(seed=1, n=8, size=8):
  """A training batch of n uniform [-1, 1] single-channel size×size observations, no ω."""
  y = jax.random.uniform(jax.random.key(seed), (n, size, size, 1), minval=-1, maxval=1)
  return {"y": y, "omega": {}}
