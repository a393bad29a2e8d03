"""What the command-line tools share when they report: numbers, files, progress, logs.

The tools (`evaluate`, `inverse`, `export`, and the training program `main`)
write their results the same way: a metrics.json with every number, the
settings and the hardware (`hardware`), a metrics.md with the same as tables,
and PNG figures (`write_report`); means over images come with their standard
error (`mean_sem`). Long loops show a `ProgressBar` (tqdm), and `quiet_library_logs`
keeps orbax's, jax's and grain's INFO lines out of the log.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import platform
import sys
from typing import IO, Any

from absl import logging
import jax
import numpy as np
import tqdm

from flowdiff_jax import paths


def hardware() -> str:
  """The machine, e.g. "4 × NVIDIA H100 80GB HBM3 (gpu), 64 CPU cores (x86_64), jax 0.10.2".

  The devices are this process's (the tools run in one process).
  """
  devices = jax.local_devices()
  return (f"{len(devices)} × {devices[0].device_kind} ({devices[0].platform}), "
          f"{os.cpu_count()} CPU cores ({platform.machine()}), jax {jax.__version__}")


def mean_sem(values: Any) -> dict[str, float]:
  """{"mean", "sem"} of values [n]: the mean and its standard error std(ddof=1) / sqrt(n).

  With n = 1 the sem is NaN, not 0: one value says nothing about the spread,
  and 0 would claim an exact mean. (json writes it as NaN, Markdown as "nan".)
  """
  v = np.asarray(values, np.float64).reshape(-1)
  sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
  return {"mean": float(v.mean()), "sem": sem}


def write_report(output_dir: str, results: dict[str, Any], markdown: str,
                 figures: dict[str, np.ndarray] | None = None) -> list[str]:
  """Writes output_dir/metrics.json (`results`), metrics.md (`markdown`) and the figures.

  Args:
    output_dir: created if missing.
    results: JSON-serialisable numbers and settings.
    markdown: the same as Markdown.
    figures: {file name (e.g. "grid.png"): uint8 image [H, W, C]}.
  Returns:
    The paths written.
  """
  written = [os.path.join(output_dir, "metrics.json"), os.path.join(output_dir, "metrics.md")]
  paths.write_json(written[0], results)
  paths.write_text(written[1], markdown)
  for name, image in (figures or {}).items():
    written.append(os.path.join(output_dir, name))
    paths.write_image(written[-1], image)
  return written


class ProgressBar:
  """A tqdm bar on stderr, fed the number of units done so far (not increments).

  The solvers report progress as "chunks done"; this adapts that to tqdm's
  increments. The bar closes itself when `total` is reached.
  """

  def __init__(self, label: str, total: int, stream: IO[str] | None = None,
               unit: str = "steps"):
    self._bar = tqdm.tqdm(total=total, desc=label, unit=f" {unit}", file=stream or sys.stderr,
                          dynamic_ncols=True, mininterval=1.0)

  def __call__(self, done: int) -> None:
    self._bar.update(done - self._bar.n)
    if done >= self._bar.total:
      self._bar.close()


class _QuietLibraries(std_logging.Filter):
  """Drops INFO records of orbax, jax and grain; ours and their warnings stay.

  orbax logs ~30 INFO lines per checkpoint read or write through absl, which
  buries the metrics.
  """
  _CHATTY = ("/orbax/", "/jax/_src/", "/grain/")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno > std_logging.INFO or not any(
        part in record.pathname for part in self._CHATTY)


def quiet_library_logs() -> None:
  """Installs the filter on absl's log handler (call it in a program's main, once)."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
