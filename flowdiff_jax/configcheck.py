"""Checks of single config fields, shared by `validate` and the methods' own checks.

Every failure raises `ConfigError` with a message of the form
`config.<field>=<value>: <what is wrong>; allowed: <values>`.
"""

from __future__ import annotations

from collections.abc import Iterable
import math

import ml_collections


class ConfigError(ValueError):
  """A config field has a value the program cannot run with."""


def fail(field: str, value, problem: str) -> None:
  raise ConfigError(f"config.{field}={value!r}: {problem}")


def get(config: ml_collections.ConfigDict, field: str):
  """The value at the dotted `field`; a ConfigError naming it when it is missing."""
  node = config
  for part in field.split("."):
    if part not in node:
      raise ConfigError(f"config.{field} is missing (is the config based on configs/default.py?)")
    node = node[part]
  return node


def choice(config: ml_collections.ConfigDict, field: str, allowed: Iterable) -> None:
  value = get(config, field)
  allowed = tuple(allowed)
  if value not in allowed:
    fail(field, value, f"unknown value; allowed: {', '.join(map(str, allowed))}")


def positive(config: ml_collections.ConfigDict, field: str, *, strict: bool = True,
             integer: bool = False) -> None:
  """The field is a finite number (an int if `integer`), > 0 (or >= 0 if not `strict`)."""
  value = get(config, field)
  ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
  if isinstance(value, bool) or not ok_type or not math.isfinite(value) or (
      value <= 0 if strict else value < 0):
    kind = "an integer" if integer else "a number"
    fail(field, value, f"must be {kind} {'> 0' if strict else '>= 0'}")


def optimizer(config: ml_collections.ConfigDict, section: str) -> None:
  """The fields of an optimiser section (`optim`, `flow_optim`)."""
  positive(config, f"{section}.learning_rate")
  positive(config, f"{section}.warmup_steps", strict=False, integer=True)
  decay = get(config, f"{section}.decay_steps")
  positive(config, f"{section}.decay_steps", strict=False, integer=True)
  if decay and decay <= get(config, f"{section}.warmup_steps"):
    fail(f"{section}.decay_steps", decay,
         f"must be 0 (no decay) or > {section}.warmup_steps "
         f"({get(config, f'{section}.warmup_steps')}): the cosine starts after the warm-up")
  positive(config, f"{section}.weight_decay", strict=False)
  positive(config, f"{section}.grad_clip_norm", strict=False)
