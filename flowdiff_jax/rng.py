"""Per-example random draws that do not depend on how the batch is split.

Under `jax.jit` the step sees the global batch and draws noise of the global
shape; with `jax_threefry_partitionable` those numbers are the same whatever
the sharding. Under `jax.shard_map` or `jax.pmap` each device sees only its
rows. To draw *the same* numbers there, a device draws the global array and
keeps its own rows: the draw is a little redundant work (noise is cheap next
to a U-Net pass), and in exchange the jit, shard_map and pmap forms of a step
compute the same update, and a run's result does not depend on the device
count.

Every function takes `axis_name`: None under jit (the array is global), else
the mapped axis whose devices each hold `shape[batch_axis]` consecutive rows,
in device order.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _own_rows(draw: Callable[[tuple[int, ...]], jax.Array], shape: tuple[int, ...],
              batch_axis: int, axis_name: str | None) -> jax.Array:
  if axis_name is None:
    return draw(tuple(shape))
  num_shards = jax.lax.axis_size(axis_name)
  rows = shape[batch_axis]
  full = list(shape)
  full[batch_axis] = rows * num_shards
  return jax.lax.dynamic_slice_in_dim(draw(tuple(full)), jax.lax.axis_index(axis_name) * rows,
                                      rows, axis=batch_axis)


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32, *, batch_axis: int = 0,
           axis_name: str | None = None) -> jax.Array:
  """N(0, 1) of the local `shape`: this device's rows of the global draw."""
  return _own_rows(lambda s: jax.random.normal(key, s, dtype), shape, batch_axis, axis_name)


def uniform(key: jax.Array, shape: tuple[int, ...], minval: float = 0.0, maxval: float = 1.0,
            dtype=jnp.float32, *, batch_axis: int = 0,
            axis_name: str | None = None) -> jax.Array:
  """U(minval, maxval) of the local `shape`: this device's rows of the global draw."""
  return _own_rows(lambda s: jax.random.uniform(key, s, dtype, minval, maxval), shape,
                   batch_axis, axis_name)
