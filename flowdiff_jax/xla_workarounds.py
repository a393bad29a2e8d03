"""XLA flags that work around known compiler bugs; applied when the package is imported.

XLA's CPU backend in jaxlib 0.10–0.12 miscompiles some fused reductions: with
"YNN" reduce fusions, two `expm1` (or `log`, `log1p`) ops with different
inputs inside one fusion can be merged into one, e.g. under `jax.jit`
`expm1(-t) * sum(expm1(t) * x + 1)` came out 44 % off (eager is right). Our
diffusion schedules are made of exactly such ops, so the NLL bound and the
samplers were at risk on CPU. Disabling that fusion kind fixes it (checked on
jaxlib 0.10.2 and 0.12.0.1) and costs nothing measurable here. GPU and TPU
backends do not read the flag.

Flags only take effect if set before JAX starts its CPU backend: importing
`flowdiff_jax` first (as `python -m flowdiff_jax.main` does) is enough.
"""

from __future__ import annotations

import importlib.metadata
import os

# Disables the buggy fusion kind; XLA rejects unknown flags, so it is only
# added for jaxlib releases known to have (and accept) it.
_YNN_REDUCE_OFF = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
_AFFECTED_JAXLIB = ((0, 10), (0, 11), (0, 12))


def _jaxlib_minor() -> tuple[int, int] | None:
  try:
    major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
    return int(major), int(minor)
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return None


def apply() -> bool:
  """Adds the flag to XLA_FLAGS unless already chosen there; True if it is in effect."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in flags:
    return _YNN_REDUCE_OFF in flags
  if _jaxlib_minor() not in _AFFECTED_JAXLIB:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {_YNN_REDUCE_OFF}".strip()
  return True


apply()
