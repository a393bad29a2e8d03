r"""Inverse-problem solvers with a learned diffusion prior (docs/design.md §2.7).

Given a trained ε-network ε̂(x_t, t) of a VP diffusion (`diffusion.py`) and a
measurement y = A_ω x + σ_y ε of an operator of `operators.py` (σ_y on the
[-1, 1] image scale, docs/design.md §2, as in DPS), the solvers here draw an
approximate posterior sample x ~ p(x | y) by running the reverse process from
t = 1 to 0 with a likelihood-guidance term. They take the steps of
`flowdiff_jax.sampling` on its `time_grid` (num_steps steps uniform in t from 1
to t_min, the grid of `diffusion.sample`), followed by one last step
t_min -> 0 that returns the (guided) estimate of x₀, so a solve costs
num_steps + 1 forward *and* backward passes of the network.

Notation (`flowdiff_jax.sampling`): x̂₀(x_t) = (x_t − σ_t ε̂(x_t, t)) / α_t is
Tweedie's estimate of E[x₀ | x_t], and DDIM_η(x_t; x̂₀) is the reverse step
`sampling.reverse_step` (η = 1 the DDPM ancestral step of `diffusion.sample`,
η = 0 DDIM). With `clip`, x̂₀ is clipped to [-1, 1] inside the step (ε
recomputed to match) and the result is clipped. Each solver adds only its
guidance to that step:

**DPS** (Chung, Kim, Mccann, Klasky, Ye, ICLR 2023; any operator):

    x'_s = DDIM_η(x_t; x̂₀)
    x_s  = x'_s − ζ / ‖y − A x̂₀‖ · ∇_{x_t} ½‖y − A x̂₀‖²   (= x'_s − ζ ∇_{x_t} ‖y − A x̂₀‖)

per example, the gradient taken through the network. ζ is the step size of
the official DPS code's `scale` (the paper's ζ' with ∇‖·‖² is ζ/2). The rule
normalises the step by the residual, so σ_y enters only through y; ζ needs
tuning per task and image size (`inverse.TASKS` holds the CLI's defaults).

**ΠGDM** (Song, Vahdat, Mardani, Kautz, ICLR 2023; linear operators, using
their structure): it approximates p(x₀ | x_t) by N(x̂₀, r_t² I), with

    r_t² = v σ_t² / (α_t² v + σ_t²),

the variance of x₀ | x_t when x₀ ~ N(μ, v I) (v = `data_var`; the paper's
v = 1 gives r_t² = σ_t² on the VP scale). Then p(y | x_t) ≈ N(A x̂₀, r_t² A Aᵀ
+ σ_y² I) and the likelihood score is the vector-Jacobian product

    g = (∂x̂₀/∂x_t)ᵀ Aᵀ (r_t² A Aᵀ + σ_y² I)⁻¹ (y − A x̂₀).

The inverse is exact and cheap because A Aᵀ is diagonal for our operators:
I (denoising), diag(mask) (inpainting), and |H(f)|² in the 2-D DFT basis for
the circular blur. We use g as a conditional score, ε̂_y = ε̂ − σ_t g, i.e. the
guided estimate x̂₀_y = x̂₀ + (σ_t² / α_t) g, in the DDIM(η) step (the paper's
Algorithm 1 adds a heuristically weighted g to the unguided update instead).
This form is the exact posterior score when the prior is N(μ, v I), so then
the solver samples the exact posterior up to time discretisation
(tests/test_inverse.py checks the closed-form mean and covariance); for other
priors it is ΠGDM's approximation.

**MMPS** (moment-matching posterior sampling; Rozet, Andry, Lanusse, Louppe,
NeurIPS 2024; linear operators, matrix-free): ΠGDM's isotropic r_t² I is
replaced by the covariance of x₀ | x_t that the network itself implies,
Tweedie's second moment

    V_t = Cov[x₀ | x_t] = (σ_t² / α_t) ∂x̂₀/∂x_t,

so p(y | x_t) ≈ N(A x̂₀, σ_y² I + A V_t Aᵀ). The system (σ_y² I + A V_t Aᵀ) u =
y − A x̂₀ is solved per example by `cg_iters` conjugate-gradient iterations,
each one vector-Jacobian product of the denoiser (∂x̂₀/∂x_t is symmetric for
an exact score, so the VJP stands for the JVP, as in the paper), and the
guided estimate is x̂₀_y = x̂₀ + V_t Aᵀ u: one more VJP. For a Gaussian prior
V_t is exact and so is p(y | x_t); with enough CG iterations (the measurement
dimension, at most) the solver then samples the exact posterior up to time
discretisation, for every linear operator (tests/test_inverse.py). A step
costs 2 + cg_iters network passes (one forward, 1 + cg_iters backward).

Randomness is per example: example i's x_1 and every step's z derive from its
own key (`example_keys(seed, index)`), so its solution does not depend on the
batch it is solved in. `solve` is pure and jittable (one `lax.scan`);
`solve_chunked` runs the same steps as jitted chunks from a host loop, which
syncs once per chunk to report progress. The evaluation harness and command
line that use these solvers on trained runs are in `flowdiff_jax.inverse`.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flowdiff_jax import diffusion, operators, sampling

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
# (params, x_t [B, H, W, C], t [B]) -> ε̂; must be hashable (a jit-static argument).
EpsApply = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DPS:
  """Diffusion posterior sampling (see the module docstring). Hashable: jit-static."""

  # Step size ζ of x_s = x'_s − ζ ∇_{x_t} ‖y − A x̂₀‖. 1 is the DPS code's value
  # for 256×256 images; smaller images want other values (inverse.TASKS, for 28×28).
  zeta: float = 1.0
  num_steps: int = 1000  # steps on the grid (+1 final step), the paper's 1000
  eta: float = 1.0  # 1: DDPM ancestral steps (the paper), 0: DDIM
  clip: bool = True  # clip x̂₀ in the steps and the result to [-1, 1]
  name: ClassVar[str] = "dps"


@dataclasses.dataclass(frozen=True)
class PiGDM:
  """Pseudo-inverse guided diffusion for linear operators (see the module docstring)."""

  num_steps: int = 100  # steps on the grid (+1 final step), the paper's 100
  eta: float = 1.0  # 1: DDPM ancestral steps, 0: DDIM
  data_var: float = 1.0  # v in r_t² = v σ_t² / (α_t² v + σ_t²); the paper's 1
  clip: bool = True  # clip the guided x̂₀ in the steps and the result to [-1, 1]
  name: ClassVar[str] = "pigdm"


@dataclasses.dataclass(frozen=True)
class MMPS:
  """Moment-matching posterior sampling for linear operators (see the module docstring)."""

  num_steps: int = 64  # steps on the grid (+1 final step)
  eta: float = 1.0  # 1: DDPM ancestral steps, 0: DDIM
  cg_iters: int = 3  # conjugate-gradient iterations per step (each one VJP of the network)
  clip: bool = True  # clip the guided x̂₀ in the steps and the result to [-1, 1]
  name: ClassVar[str] = "mmps"


Solver = DPS | PiGDM | MMPS
SOLVERS = {cls.name: cls for cls in (DPS, PiGDM, MMPS)}


@dataclasses.dataclass(frozen=True)
class NetworkEps:
  """eps_apply of a trained run: (params, x_t, t) -> ε̂ of `objective.score_net`, eval mode.

  A frozen dataclass of the (hashable) methods.Objective, so equal for the
  same run: a jit-static argument that compiles once.
  """

  objective: Any

  def __call__(self, params: Any, x_t: jax.Array, t: jax.Array) -> jax.Array:
    return self.objective.score_net.apply({"params": params}, x_t, t, train=False)


def example_keys(seed: int, index: Any) -> jax.Array:
  """Per-example solver keys [B]: fold_in(key(seed), index[i])."""
  root = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(index, jnp.int32))


# --------------------------------------------------------------------------
# Guidance.
# --------------------------------------------------------------------------


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  """Per-example values [B] -> [B, 1, ..., 1] to broadcast against x."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def inverse_measurement_cov(op: operators.Operator, r2: jax.Array, v: jax.Array,
                            omega: operators.Omega) -> jax.Array:
  """(r2 A Aᵀ + σ_y² I)⁻¹ v for v [B, H, W, C] in measurement space, r2 a scalar.

  Uses the structure of A Aᵀ: I (denoising), diag(mask) (inpainting; the
  result is 0 on dropped pixels, where v is 0 anyway), and |H(f)|² in the
  2-D DFT basis for the circular blur. Raises NotImplementedError otherwise.
  """
  sy2 = op.sigma_y**2
  if isinstance(op, operators.Denoise):
    return v / (r2 + sy2)
  if isinstance(op, (operators.RandomInpaint, operators.BoxInpaint)):
    mask = omega["mask"].astype(v.dtype)
    # On dropped pixels the denominator is σ_y², 0 when noiseless: keep it finite.
    return jnp.where(mask > 0, v / jnp.where(mask > 0, r2 * mask + sy2, 1.0), 0.0)
  if isinstance(op, operators.GaussianBlur):
    height, width = v.shape[1], v.shape[2]
    # |H|² computed in float64 on the host: static, so free under jit.
    power = jnp.asarray(np.abs(op.transfer(height, width))**2, jnp.float32)
    vf = jnp.fft.rfft2(v, axes=(1, 2))
    u = jnp.fft.irfft2(vf / (r2 * power + sy2)[None, :, :, None], s=(height, width), axes=(1, 2))
    return u.astype(v.dtype)
  raise NotImplementedError(
      f"ΠGDM needs the structure of A Aᵀ; not implemented for operator {op.name!r}.")


def dps_guidance(eps_fn: EpsFn, schedule: diffusion.VPSchedule, op: operators.Operator,
                 y: jax.Array, omega: operators.Omega, x: jax.Array,
                 t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x̂₀, ∇_{x_t} ½‖y − A x̂₀‖², ‖y − A x̂₀‖ [B]) at x_t = x [B, H, W, C], scalar t."""
  def half_sq_residual(x):
    x0, _ = sampling.denoise(eps_fn, schedule, x, t)
    r = y - op.apply(x0, omega)
    # Summed over the batch: examples are independent, so the gradient is per example.
    return 0.5 * jnp.sum(jnp.square(r)), (x0, r)

  grad, (x0, r) = jax.grad(half_sq_residual, has_aux=True)(x)
  norm = jnp.sqrt(jnp.sum(jnp.square(r), axis=tuple(range(1, r.ndim))))
  return x0, grad, norm


def _dps_step(solver: DPS, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
              op: operators.Operator, y: jax.Array, omega: operators.Omega, x: jax.Array,
              t: jax.Array, s: jax.Array, noise: jax.Array) -> jax.Array:
  x0, grad, norm = dps_guidance(eps_fn, schedule, op, y, omega, x, t)
  x_prime = sampling.reverse_step(schedule, x, x0, t, s, eta=solver.eta, clip=solver.clip,
                                  noise=noise)
  # ζ/‖r‖ ∇½‖r‖² = ζ ∇‖r‖, but finite when r = 0 (noiseless, perfectly fit data).
  return x_prime - _bcast(solver.zeta / jnp.maximum(norm, 1e-12), x) * grad


def pigdm_guidance(solver: PiGDM, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
                   op: operators.Operator, y: jax.Array, omega: operators.Omega, x: jax.Array,
                   t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x̂₀, guided x̂₀_y = x̂₀ + σ_t²/α_t g) at x_t = x [B, H, W, C], scalar t (no clipping)."""
  alpha, sigma = schedule.alpha_sigma(t)
  x0, vjp_fn = jax.vjp(lambda x: sampling.denoise(eps_fn, schedule, x, t)[0], x)
  v = solver.data_var
  r2 = v * sigma**2 / (alpha**2 * v + sigma**2)
  u = inverse_measurement_cov(op, r2, y - op.apply(x0, omega), omega)
  (g,) = vjp_fn(op.adjoint(u, omega))
  return x0, x0 + (sigma**2 / alpha) * g


def _pigdm_step(solver: PiGDM, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
                op: operators.Operator, y: jax.Array, omega: operators.Omega, x: jax.Array,
                t: jax.Array, s: jax.Array, noise: jax.Array) -> jax.Array:
  _, x0_y = pigdm_guidance(solver, eps_fn, schedule, op, y, omega, x, t)
  # ε follows from the guided x̂₀_y (reverse_step's default), not the unguided ε̂.
  return sampling.reverse_step(schedule, x, x0_y, t, s, eta=solver.eta, clip=solver.clip,
                               noise=noise)


def conjugate_gradient(matvec: Callable[[jax.Array], jax.Array], b: jax.Array,
                       num_iters: int) -> jax.Array:
  """u ≈ M⁻¹ b by `num_iters` CG iterations from u = 0, per example (leading axis of b).

  matvec: v [B, ...] -> M v, M symmetric positive definite and block-diagonal
  over the examples; each example gets its own step sizes, so one example's
  solve does not depend on the others in its batch. Exact (in exact
  arithmetic) after as many iterations as an example has dimensions; a
  converged example (zero residual) stays where it is.
  """
  axes = tuple(range(1, b.ndim))
  dot = lambda u, v: jnp.sum(u * v, axis=axes, keepdims=True)
  safe = lambda num, den: jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)

  def body(_, carry):
    u, r, p, rr = carry
    mp = matvec(p)
    step = safe(rr, dot(p, mp))
    u, r = u + step * p, r - step * mp
    rr_new = dot(r, r)
    return u, r, r + safe(rr_new, rr) * p, rr_new

  init = (jnp.zeros_like(b), b, b, dot(b, b))
  return jax.lax.fori_loop(0, num_iters, body, init)[0]


def mmps_guidance(solver: MMPS, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
                  op: operators.Operator, y: jax.Array, omega: operators.Omega, x: jax.Array,
                  t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x̂₀, guided x̂₀_y = x̂₀ + V_t Aᵀ u) at x_t = x [B, H, W, C], scalar t (no clipping)."""
  alpha, sigma = schedule.alpha_sigma(t)
  x0, vjp_fn = jax.vjp(lambda x: sampling.denoise(eps_fn, schedule, x, t)[0], x)
  cov = lambda v: (sigma**2 / alpha) * vjp_fn(v)[0]  # V_t v, V_t = Cov[x₀ | x_t]
  sy2 = op.sigma_y**2
  u = conjugate_gradient(lambda v: sy2 * v + op.apply(cov(op.adjoint(v, omega)), omega),
                         y - op.apply(x0, omega), solver.cg_iters)
  return x0, x0 + cov(op.adjoint(u, omega))


def _mmps_step(solver: MMPS, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
               op: operators.Operator, y: jax.Array, omega: operators.Omega, x: jax.Array,
               t: jax.Array, s: jax.Array, noise: jax.Array) -> jax.Array:
  _, x0_y = mmps_guidance(solver, eps_fn, schedule, op, y, omega, x, t)
  return sampling.reverse_step(schedule, x, x0_y, t, s, eta=solver.eta, clip=solver.clip,
                               noise=noise)


# Solver steps unrolled per loop iteration (see `_run_steps`).
_UNROLL = 8

_STEPS = {"dps": _dps_step, "pigdm": _pigdm_step, "mmps": _mmps_step}


# --------------------------------------------------------------------------
# Solving.
# --------------------------------------------------------------------------


def _init(keys: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(x_1 ~ N(0, I) of `shape` [B, ...], per-example step keys [B]) from keys [B]."""
  split = jax.vmap(jax.random.split)(keys)  # [B, 2]
  init_keys, step_keys = split[:, 0], split[:, 1]
  x = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(init_keys)
  return x, step_keys


def _run_steps(solver: Solver, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
               op: operators.Operator, y: jax.Array, omega: operators.Omega, x: jax.Array,
               step_keys: jax.Array, index: jax.Array, t: jax.Array, s: jax.Array,
               valid: jax.Array) -> jax.Array:
  """Scans the transitions (index, t, s, valid) [n] from x [B, H, W, C]; invalid ones are no-ops."""
  step = functools.partial(_STEPS[solver.name], solver, eps_fn, schedule, op, y, omega)

  def body(x, inputs):
    n, t, s, ok = inputs
    if solver.eta == 0:  # deterministic steps: skip the (costly) noise draws
      noise = jnp.zeros_like(x)
    else:
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, n), x.shape[1:],
                                                   jnp.float32))(step_keys)
    # Padding steps (the last chunk of solve_chunked) skip the network entirely.
    return jax.lax.cond(ok, lambda x: step(x, t, s, noise), lambda x: x, x), None

  # Partly unrolled: XLA:CPU runs a rolled loop's body 1.7x slower than the
  # same steps unrolled (MMPS, 8 steps of 64 Fashion-MNIST images: 13.7 s
  # rolled, 7.9 s unrolled by 8; compile 19 s and 25 s).
  x, _ = jax.lax.scan(body, x, (index, t, s, valid), unroll=min(_UNROLL, max(1, t.shape[0])))
  return x


def solve(solver: Solver, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
          op: operators.Operator, y: jax.Array, omega: operators.Omega,
          keys: jax.Array) -> jax.Array:
  """Posterior samples x [B, H, W, C] for measurements y [B, H, W, C]; pure, jittable.

  Args:
    solver: a DPS, PiGDM or MMPS (static).
    eps_fn: (x_t [B, H, W, C], t [B]) -> ε̂. To jit, close over traced params,
      e.g. ``jax.jit(lambda p, y, w, k: solve(solver, lambda x, t: net.apply(p, x,
      t), schedule, op, y, w, k))``.
    schedule: the prior's VP schedule (static).
    op: the forward operator (static); its sigma_y is on the [-1, 1] scale.
    y: measurements [B, H, W, C].
    omega: the operator's per-example parameters, leaves [B, ...].
    keys: per-example keys [B] (`example_keys`).
  Returns:
    Samples [B, H, W, C] (float32; in [-1, 1] when solver.clip).
  """
  t, s = sampling.time_grid(schedule, solver.num_steps)
  x, step_keys = _init(keys, y.shape)
  x = _run_steps(solver, eps_fn, schedule, op, y, omega, x, step_keys,
                 jnp.arange(t.size, dtype=jnp.int32), jnp.asarray(t), jnp.asarray(s),
                 jnp.ones(t.shape, bool))
  return jnp.clip(x, -1.0, 1.0) if solver.clip else x


_init_jit = jax.jit(_init, static_argnums=1)


@functools.partial(jax.jit, static_argnames=("solver", "eps_apply", "schedule", "op"))
def _solve_chunk(params, y, omega, x, step_keys, index, t, s, valid, *, solver, eps_apply,
                 schedule, op):
  eps_fn = lambda x_t, tt: eps_apply(params, x_t, tt)
  return _run_steps(solver, eps_fn, schedule, op, y, omega, x, step_keys, index, t, s, valid)


def solve_chunked(solver: Solver, eps_apply: EpsApply, params: Any,
                  schedule: diffusion.VPSchedule, op: operators.Operator, y: jax.Array,
                  omega: operators.Omega, keys: jax.Array, *, num_chunks: int = 20,
                  progress: Callable[[int], None] | None = None) -> jax.Array:
  """`solve` run as `num_chunks` jitted chunks of steps from a host loop; same draws, same result.

  Args:
    eps_apply: (params, x_t, t) -> ε̂, hashable (e.g. `NetworkEps`); jit-static,
      so pass the same object for every batch to compile once.
    params: the network's params (traced, not baked into the program).
    num_chunks: how many times the host syncs to report progress. All chunks
      have the same length (the last is padded with no-op steps), so the
      chunk program compiles once.
    progress: called with the number of steps done after each chunk (e.g. a
      `reporting.ProgressBar`); None: no host syncs until the caller reads the result.
  Other arguments as in `solve`.
  """
  t, s = sampling.time_grid(schedule, solver.num_steps)
  total = t.size
  chunk = math.ceil(total / max(1, min(num_chunks, total)))
  padded = math.ceil(total / chunk) * chunk
  pad = lambda a, v: np.concatenate([a, np.full(padded - total, v, a.dtype)])
  index = pad(np.arange(total, dtype=np.int32), 0)
  t, s, valid = pad(t, 1.0), pad(s, 1.0), pad(np.ones(total, bool), False)
  x, step_keys = _init_jit(keys, y.shape)
  run = functools.partial(_solve_chunk, solver=solver, eps_apply=eps_apply, schedule=schedule,
                          op=op)
  for start in range(0, padded, chunk):
    sl = slice(start, start + chunk)
    x = run(params, y, omega, x, step_keys, index[sl], t[sl], s[sl], valid[sl])
    if progress is not None:
      jax.block_until_ready(x)  # the one host sync per chunk
      progress(min(start + chunk, total))
  return jnp.clip(x, -1.0, 1.0) if solver.clip else x
