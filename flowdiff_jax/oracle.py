"""The Gaussian problem with a known answer (docs/design.md §2.8).

Clean images x ~ N(μ, Σ) on a small grid; corrupted observations y = A_ω x +
σ_y ε with one fixed corruption per example. A prior learned from y only
should recover Σ (not, like the `naive` model, the covariance of A⁺y, e.g.
Σ + σ_y² I for denoising). Used by tests/test_flowdiff.py and
experiments/gaussian/.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowdiff_jax import operators, step as step_lib


def gaussian_problem(size: int = 4, std: float = 0.3,
                     length_scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
  """(μ [D], Σ [D, D]) on a size×size×1 grid, D = size²: a squared-exponential
  covariance (length in pixels) plus 10 % white noise, marginal std `std`, and
  a small sinusoidal mean."""
  d = size * size
  pos = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"),
                 -1).reshape(-1, 2)
  d2 = np.sum((pos[:, None, :] - pos[None, :, :])**2, axis=-1).astype(np.float64)
  sigma = std**2 * (np.exp(-d2 / (2 * length_scale**2)) + 0.1 * np.eye(d)) / 1.1
  mu = 0.1 * np.sin(np.arange(d, dtype=np.float64))
  return mu, sigma


def corrupted_data(config, mu: np.ndarray, sigma: np.ndarray, num_examples: int,
                   seed: int = 0) -> tuple[jax.Array, dict]:
  """Clean x [N, s, s, 1] ~ N(μ, Σ) and its fixed corruption {"y", "omega"} by config.operator."""
  size = int(round(np.sqrt(mu.size)))
  z = np.random.default_rng(seed).standard_normal((num_examples, mu.size))
  x = jnp.asarray((mu + z @ np.linalg.cholesky(sigma).T).reshape(num_examples, size, size, 1),
                  jnp.float32)
  op = operators.make_operator(config.operator)
  measured = operators.corrupt(op, x, jnp.arange(num_examples), config.data.corruption_seed)
  return x, {"y": measured.pop("y"), "omega": measured}


def prior_covariance(state: step_lib.TrainState, image_shape: tuple[int, int, int], *,
                     num_samples: int = 4000, seed: int = 0, sampler: str = "heun",
                     num_steps: int = 100) -> np.ndarray:
  """Covariance [D, D] of samples from the state's EMA diffusion prior."""
  x = step_lib.sample_prior(state, jax.random.key(seed), num_samples, image_shape,
                      sampler=sampler, num_steps=num_steps)
  return np.cov(np.asarray(x, np.float64).reshape(num_samples, -1).T)


def relative_error(cov: np.ndarray, sigma: np.ndarray) -> float:
  """‖cov − Σ‖_F / ‖Σ‖_F."""
  return float(np.linalg.norm(cov - sigma) / np.linalg.norm(sigma))
