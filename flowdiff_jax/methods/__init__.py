"""The methods, one module each, and the registry that maps `config.method` to them.

Nothing outside this registry compares method names: code that depends on the
method asks the `Method` object (`get(config.method)`) instead. To add a
method, write a module with a `base.Method` subclass and add its instance to
`_ALL` below (docs/design.md §4).
"""

from __future__ import annotations

from flowdiff_jax.methods import amortized, dsm, em, flowdiff
from flowdiff_jax.methods.base import Method, Objective

_ALL: tuple[Method, ...] = (dsm.CLEAN, dsm.NAIVE, amortized.AMORTIZED, flowdiff.FLOWDIFF,
                            em.EM_METHOD)
REGISTRY: dict[str, Method] = {m.name: m for m in _ALL}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> Method:
  """The method registered as `name` (a `config.method` value)."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise ValueError(f"config.method={name!r}: unknown method; allowed: "
                     f"{', '.join(NAMES)}") from None


def with_posterior() -> tuple[str, ...]:
  """Names of the methods that train a conditional flow (posterior samples)."""
  return tuple(m.name for m in _ALL if m.has_posterior)


def with_prior() -> tuple[str, ...]:
  """Names of the methods that train a diffusion prior (prior samples)."""
  return tuple(m.name for m in _ALL if m.has_prior)


__all__ = ["NAMES", "REGISTRY", "Method", "Objective", "get", "with_posterior", "with_prior"]
