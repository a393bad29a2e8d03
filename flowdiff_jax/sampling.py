r"""The reverse-diffusion step, and the summary of posterior samples.

One reverse step serves every sampler: prior sampling (`diffusion.sample`) and
the inverse-problem solvers (`flowdiff_jax.solvers`, which add only their
likelihood guidance to the estimate x̂₀ they pass in). Time t runs over [0, 1]
(0 = data) on a VP schedule (`diffusion.VPSchedule`); images are [B, H, W, C]
on the [-1, 1] scale.

Notation: x̂₀(x_t) = (x_t − σ_t ε̂(x_t, t)) / α_t is Tweedie's estimate of
E[x₀ | x_t] (`denoise`), and the DDIM(η) step from t to s < t (`reverse_step`) is

    x_s = α_s x̂₀ + sqrt(σ_s² − c_η²) ε̂ + c_η z,   c_η = η σ_s sqrt(1 − SNR_t/SNR_s),

z ~ N(0, I). η = 1 is DDPM's ancestral step (a draw from q(x_s | x_t, x̂₀)),
η = 0 is DDIM. `heun_step` is the second-order step of the probability-flow
ODE. Every sampler runs on `time_grid`: num_steps steps uniform in t from 1 to
t_min, then a last step t_min -> 0 that returns x̂₀ (α_0 = 1, σ_0 = 0).

This module only needs jax and numpy: schedules and ε-networks come in as
arguments (`schedule.log_snr`, `schedule.alpha_sigma`, an `eps_fn` closure).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # diffusion.py imports this module
  from flowdiff_jax.diffusion import VPSchedule

# (x_t [B, H, W, C], t [B]) -> ε̂ [B, H, W, C].
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def time_grid(schedule: VPSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(t, s) of the num_steps + 1 transitions t -> s: uniform in t from 1 to t_min, then t_min -> 0.

  Returns two float32 arrays [num_steps + 1] (host arrays, so they are
  constants under jit and can be padded on the host); s = 0 marks the final
  step (λ(0) = +inf: α = 1, σ = 0, so `reverse_step` returns x̂₀ there).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  grid = np.concatenate([np.linspace(1.0, schedule.t_min, num_steps + 1), [0.0]])
  return grid[:-1].astype(np.float32), grid[1:].astype(np.float32)


def denoise(eps_fn: EpsFn, schedule: VPSchedule, x: jax.Array,
            t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x̂₀, ε̂), each [B, H, W, C] float32, at x_t = x [B, H, W, C] and a scalar time t."""
  alpha, sigma = schedule.alpha_sigma(t)
  eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.float32)).astype(jnp.float32)
  return (x - sigma * eps) / alpha, eps


def reverse_step(schedule: VPSchedule, x: jax.Array, x0: jax.Array, t: jax.Array,
                 s: jax.Array, *, eta: float, clip: bool, noise: jax.Array | None = None,
                 eps: jax.Array | None = None) -> jax.Array:
  """The DDIM(η) step x_t -> x_s (module docstring) given an estimate x0 of x₀.

  Args:
    schedule: the VP schedule.
    x: x_t [B, H, W, C].
    x0: the (possibly guided) estimate of x₀, shape of x.
    t, s: scalar times, s < t (s = 0: the final step, which returns x0).
    eta: 1 ancestral (DDPM), 0 deterministic (DDIM), in between a mix; static.
    clip: clip x0 to [-1, 1] first; ε is then recomputed to match.
    noise: z ~ N(0, I), shape of x; may be None when eta == 0.
    eps: the ε̂ that gave x0, when x0 is unguided; None: the ε consistent with
      x0, (x_t − α_t x0) / σ_t (ε̂ itself when x0 is Tweedie's and unclipped).
  Returns:
    x_s, shape of x.
  """
  alpha_t, sigma_t = schedule.alpha_sigma(t)
  alpha_s, sigma_s = schedule.alpha_sigma(s)
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
  if clip or eps is None:
    eps = (x - alpha_t * x0) / sigma_t
  if eta == 0:
    return alpha_s * x0 + sigma_s * eps
  # 1 − SNR_t/SNR_s via expm1 (exact for small steps); 1 at the final step (λ_s = inf).
  c = -jnp.expm1(schedule.log_snr(t) - schedule.log_snr(s))
  std = eta * sigma_s * jnp.sqrt(c)
  return alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - std**2, 0.0)) * eps + std * noise


def heun_step(eps_fn: EpsFn, schedule: VPSchedule, x: jax.Array, t: jax.Array,
              s: jax.Array) -> jax.Array:
  """One Heun step x_t -> x_s (s > 0) of the probability-flow ODE; two evaluations of eps_fn.

  In y = x / α and ρ = σ / α = exp(−λ/2) the ODE is dy/dρ = ε̂(α y, t): no
  linear drift, so an explicit Euler step there is exactly DDIM and Heun
  corrects it. x [B, H, W, C]; t, s scalars.
  """
  alpha_t, sigma_t = schedule.alpha_sigma(t)
  alpha_s, sigma_s = schedule.alpha_sigma(s)
  rho_t, rho_s = sigma_t / alpha_t, sigma_s / alpha_s
  y = x / alpha_t
  d1 = denoise(eps_fn, schedule, x, t)[1]
  y_euler = y + (rho_s - rho_t) * d1
  d2 = denoise(eps_fn, schedule, alpha_s * y_euler, s)[1]
  return alpha_s * (y + (rho_s - rho_t) * 0.5 * (d1 + d2))


def tweedie_noise_range(schedule: VPSchedule) -> tuple[float, float]:
  """(lo, hi): the σ_y of `tweedie_posterior_mean`'s range, σ_t/α_t at t_min and at t = 1."""
  with jax.ensure_compile_time_eval():  # host numbers, also when called under jit
    lam_hi, lam_lo = (float(v) for v in schedule.log_snr(np.array([schedule.t_min, 1.0])))
  return float(np.exp(-lam_hi / 2)), float(np.exp(-lam_lo / 2))


def tweedie_posterior_mean(eps_fn: EpsFn, schedule: VPSchedule, y: jax.Array,
                           sigma_y: float) -> jax.Array:
  """E_p[x | y] [B, H, W, C] for y = x + σ_y ε (denoising, A = I) under the diffusion prior p.

  α_t y = α_t x + α_t σ_y ε is exactly a draw of x_t at the t where
  σ_t / α_t = σ_y (λ(t) = −2 log σ_y), so one network pass gives Tweedie's
  x̂₀(α_t y) = E_p[x | y]: the prior's own MMSE restoration, with no sampler
  and no amortisation. It is exact for the ε̂ of p; with a learned ε̂ its
  error is the network's error at that one noise level. Only for A = I: any
  other operator's posterior mixes noise levels per frequency or pixel.

  Raises ValueError when σ_y is outside the schedule's range
  [σ_t/α_t at t_min, at t = 1], where the network was never trained.
  """
  lo, hi = tweedie_noise_range(schedule)
  if not lo <= sigma_y <= hi:
    raise ValueError(f"sigma_y={sigma_y} is outside the schedule's noise levels "
                     f"[{lo:.4g}, {hi:.4g}] (sigma_t / alpha_t).")
  lam = -2.0 * float(np.log(sigma_y))
  t = schedule.t_from_log_snr(jnp.float32(lam))
  alpha, _ = schedule.alpha_sigma(t)
  return denoise(eps_fn, schedule, alpha * y.astype(jnp.float32), t)[0]


# --------------------------------------------------------------------------
# Posterior samples.
# --------------------------------------------------------------------------


def posterior_summary(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean, std) [B, H, W, C] over the samples [S, B, H, W, C] (std: the biased, 1/S one)."""
  return jnp.mean(samples, axis=0), jnp.std(samples, axis=0)


def posterior_panel(y: jax.Array, samples: jax.Array, mean: jax.Array, std: jax.Array,
                    x: jax.Array | None = None) -> jax.Array:
  """A row per example of [y | samples | mean | std | x], flattened for `evaluation.image_grid`.

  Args:
    y: observations [B, H, W, C].
    samples: the samples shown, [K, B, H, W, C].
    mean, std: `posterior_summary` of all samples, [B, H, W, C].
    x: the clean images [B, H, W, C], or None (measurements without a
      reference): the last column is then left out.
  Returns:
    [B * (K + 4), H, W, C] ([B * (K + 3), ...] without x), row-major, so the
    grid has K + 4 (K + 3) columns. The std column is rescaled to [-1, 1] by
    its largest value over the panel, so it is visible.
  """
  std = 2.0 * std / jnp.maximum(jnp.max(std), 1e-6) - 1.0
  columns = [y, *samples, mean, std] + ([x] if x is not None else [])
  return jnp.stack(columns, axis=1).reshape((-1,) + y.shape[1:])
