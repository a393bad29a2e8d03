"""The data-parallel mesh and the shardings the jitted steps use."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over all devices of all processes (axis "data").

  Auto axis types: with Explicit axes (jax.make_mesh's default) some gradients
  of the replicated parameters fail to compile.
  """
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data"."""
  return NamedSharding(mesh, P("data"))


def stacked_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """K stacked batches [K, B, ...] (`step.train_steps`): the batch axis split over "data"."""
  return NamedSharding(mesh, P(None, "data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())
