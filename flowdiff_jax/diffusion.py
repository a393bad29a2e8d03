"""Variance-preserving diffusion in continuous time, written in log-SNR form.

Time t runs over [0, 1] (0 = data, 1 = noise). A schedule is a strictly
decreasing log signal-to-noise ratio lambda(t) = log(alpha_t^2 / sigma_t^2),
and the VP constraint alpha_t^2 + sigma_t^2 = 1 gives

    alpha_t^2 = sigmoid(lambda(t)),   sigma_t^2 = sigmoid(-lambda(t)).

Everything here is a pure function of arrays; networks enter only through an
``eps_fn(x_t, t) -> eps_hat`` closure (x_t [B, H, W, C], t [B] in [0, 1]).
Images are on the [-1, 1] scale.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from flowdiff_jax import rng as rng_lib, sampling

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

SCHEDULE_KINDS = ("linear", "cosine")
SAMPLERS = ("ancestral", "ddim", "heun")
TIME_SAMPLINGS = ("log_snr", "uniform")  # nll_bound's proposal for t
PRIOR_GRADIENTS = ("exact", "sds")  # nll_bound's x-gradient of the diffusion term


@dataclasses.dataclass(frozen=True)
class VPSchedule:
  """VP schedule: alpha_t^2 = sigmoid(lambda(t)), sigma_t^2 = sigmoid(-lambda(t)), t in [0, 1].

  Frozen and hashable, so it can be a static argument of `jax.jit`.

  * ``linear``: the continuous limit of DDPM's linear betas
    (beta_min ... beta_max over ``num_timesteps`` steps), i.e. score_sde's
    VPSDE with beta(t) = T*beta_min + t*T*(beta_max - beta_min):
    alpha_t^2 = exp(-B(t)), B(t) = int_0^t beta, so lambda(t) = -log(expm1(B(t))).
  * ``cosine``: Nichol & Dhariwal's alpha_bar(t) = f(t)/f(0),
    f(t) = cos^2((t + s)/(1 + s) * pi/2). Their discrete schedule ends at
    alpha_bar = 0 (lambda = -inf, which they avoid by clipping betas); here t
    is mapped onto [0, 1 - 1/T] of that curve so lambda(1) stays finite
    (about -12.9 for T = 1000, the discrete schedule's last unclipped step).
  """

  kind: str = "linear"  # "linear" | "cosine"
  beta_min: float = 1e-4  # DDPM per-step beta at step 1 (linear kind)
  beta_max: float = 0.02  # DDPM per-step beta at step T (linear kind)
  num_timesteps: int = 1000  # T of the matching discrete DDPM; also time-embedding scale
  cosine_s: float = 0.008  # Nichol & Dhariwal offset (cosine kind)
  t_min: float = 1e-3  # smallest t used in training and sampling (lambda(0) = +inf)

  def __post_init__(self):
    if self.kind not in SCHEDULE_KINDS:
      raise ValueError(
          f"VPSchedule.kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
    if not 0.0 < self.t_min < 1.0:
      raise ValueError(f"VPSchedule.t_min must lie in (0, 1), got {self.t_min}")
    if self.num_timesteps < 2:
      raise ValueError(
          f"VPSchedule.num_timesteps must be >= 2, got {self.num_timesteps}")
    if self.kind == "linear" and not 0.0 < self.beta_min < self.beta_max < 1.0:
      raise ValueError("VPSchedule needs 0 < beta_min < beta_max < 1, got "
                       f"beta_min={self.beta_min}, beta_max={self.beta_max}")
    if self.kind == "cosine" and self.cosine_s <= 0.0:
      raise ValueError(f"VPSchedule.cosine_s must be > 0, got {self.cosine_s}")

  # -- linear kind: beta(t) and its integral B(t), in units of 1/t. --
  def _beta0_beta1(self):
    t_steps = float(self.num_timesteps)
    return t_steps * self.beta_min, t_steps * self.beta_max

  # -- cosine kind: lambda is a function of an angle theta(t) decreasing from
  # theta0 = pi/2 / (1+s) at t = 0; writing cos((t+s)/(1+s) pi/2) as
  # sin(theta) keeps full precision where alpha_t -> 0. --
  def _cosine_angles(self, t):
    s = self.cosine_s
    stretch = 1.0 - 1.0 / self.num_timesteps  # keeps lambda(1) finite
    theta0 = 0.5 * math.pi / (1.0 + s)
    theta = theta0 * (1.0 - t * stretch)
    dtheta_dt = -theta0 * stretch
    return theta0, theta, dtheta_dt

  def log_snr(self, t) -> jax.Array:
    """lambda(t) = log(alpha_t^2 / sigma_t^2) (nats), strictly decreasing; t any shape."""
    t = jnp.asarray(t, jnp.float32)
    if self.kind == "linear":
      b0, b1 = self._beta0_beta1()
      big_b = b0 * t + 0.5 * (b1 - b0) * t**2
      # sigma^2/alpha^2 = e^B - 1; expm1 keeps accuracy for small t.
      return -jnp.log(jnp.expm1(big_b))
    theta0, theta, _ = self._cosine_angles(t)
    # alpha_bar = sin^2(theta)/sin^2(theta0); 1 - alpha_bar uses
    # sin^2 a - sin^2 b = sin(a-b) sin(a+b), exact near t = 0.
    return (2.0 * jnp.log(jnp.sin(theta)) - jnp.log(jnp.sin(theta0 - theta)) -
            jnp.log(jnp.sin(theta0 + theta)))

  def alpha_sigma(self, t) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t), each the shape of t; via sigmoid(+-lambda) so neither end overflows."""
    lam = self.log_snr(t)
    return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

  def t_from_log_snr(self, lam) -> jax.Array:
    """Inverse of log_snr: the t in [0, 1] with log_snr(t) = lam; any shape."""
    lam = jnp.asarray(lam, jnp.float32)
    if self.kind == "linear":
      b0, b1 = self._beta0_beta1()
      big_b = jax.nn.softplus(-lam)  # B(t) = log(1 + sigma^2/alpha^2)
      # Root of b0 t + (b1 - b0) t^2 / 2 = B, written to avoid cancellation.
      return 2.0 * big_b / (b0 + jnp.sqrt(b0**2 + 2.0 * (b1 - b0) * big_b))
    theta0, _, dtheta_dt = self._cosine_angles(0.0)
    # e^lam = sin^2 theta / (sin^2 theta0 - sin^2 theta).
    theta = jnp.arcsin(jnp.sin(theta0) * jnp.sqrt(jax.nn.sigmoid(lam)))
    return (theta - theta0) / dtheta_dt

  def dlog_snr_dt(self, t) -> jax.Array:
    """lambda'(t) (< 0), analytic, same shape as t."""
    t = jnp.asarray(t, jnp.float32)
    if self.kind == "linear":
      b0, b1 = self._beta0_beta1()
      beta = b0 + (b1 - b0) * t
      big_b = b0 * t + 0.5 * (b1 - b0) * t**2
      # d/dt[-log(e^B - 1)] = -beta e^B / (e^B - 1) = -beta (1 + 1/expm1(B)).
      # Written with log_snr's expm1(B), not expm1(-B): XLA's CPU "YNN" reduce
      # fusions (jaxlib 0.10.2) mix up two expm1 of different arguments in one
      # fusion, which made nll_bound's uniform-t weights wrong under jit.
      return -beta * (1.0 + 1.0 / jnp.expm1(big_b))
    theta0, theta, dtheta_dt = self._cosine_angles(t)
    cot = lambda a: jnp.cos(a) / jnp.sin(a)
    dlam_dtheta = 2.0 * cot(theta) + cot(theta0 - theta) - cot(theta0 + theta)
    return dlam_dtheta * dtheta_dt


def make_schedule(cfg: Any) -> VPSchedule:
  """Builds a VPSchedule from a ConfigDict (or dict) with the field names of VPSchedule."""
  d = VPSchedule()
  get = cfg.get
  return VPSchedule(
      kind=str(get("kind", d.kind)),
      beta_min=float(get("beta_min", d.beta_min)),
      beta_max=float(get("beta_max", d.beta_max)),
      num_timesteps=int(get("num_timesteps", d.num_timesteps)),
      cosine_s=float(get("cosine_s", d.cosine_s)),
      t_min=float(get("t_min", d.t_min)),
  )


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  """Per-example values [B] -> [B, 1, ..., 1] to broadcast against x."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(schedule: VPSchedule, x: jax.Array, t: jax.Array,
             eps: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x) = N(alpha_t x, sigma_t^2 I).

  Args:
    schedule: the VP schedule.
    x: clean images [B, H, W, C] in [-1, 1].
    t: times [B] in [0, 1].
    eps: standard normal noise, same shape as x.
  Returns:
    x_t = alpha_t x + sigma_t eps, shape of x.
  """
  alpha, sigma = schedule.alpha_sigma(t)
  return _bcast(alpha, x) * x + _bcast(sigma, x) * eps


def dsm_loss(eps_fn: EpsFn, schedule: VPSchedule, x: jax.Array, rng: jax.Array, *,
             axis_name: str | None = None) -> jax.Array:
  """Denoising score matching (epsilon form), one Monte-Carlo draw per example.

  Args:
    eps_fn: (x_t [B,H,W,C], t [B]) -> eps_hat [B,H,W,C].
    schedule: the VP schedule.
    x: clean images [B, H, W, C] (callers stop gradients if they must).
    rng: PRNG key; t ~ U(t_min, 1) and eps ~ N(0, I) are drawn per example.
      Under shard_map/pmap it must be the same on every device.
    axis_name: None under jit (x is the global batch); inside shard_map/pmap
      the mapped batch axis, so that each device gets its rows of the
      global draws (`flowdiff_jax.rng`) and the result does not depend on
      the device count.
  Returns:
    [B] loss per example: mean over pixels of (eps_hat - eps)^2 (per dimension).
  """
  t_rng, eps_rng = jax.random.split(rng)
  batch = x.shape[0]
  t = rng_lib.uniform(t_rng, (batch,), schedule.t_min, 1.0, jnp.float32, axis_name=axis_name)
  eps = rng_lib.normal(eps_rng, x.shape, x.dtype, axis_name=axis_name)
  x_t = q_sample(schedule, x, t, eps)
  err = (eps_fn(x_t, t) - eps).astype(jnp.float32)
  return jnp.mean(jnp.square(err), axis=tuple(range(1, x.ndim)))


def _bound_constant_terms(schedule: VPSchedule, x: jax.Array):
  """nll_bound's prior term [B] (differentiable in x) and decoder constant (a float)."""
  dims = math.prod(x.shape[1:])
  alpha_1, sigma_1 = schedule.alpha_sigma(1.0)
  prior = 0.5 * (alpha_1**2 * jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) +
                 dims * (sigma_1**2 - 1.0 - jnp.log(sigma_1**2)))
  decoder = 0.5 * dims * (1.0 + math.log(2 * math.pi) - schedule.log_snr(schedule.t_min))
  return prior, decoder


def _time_draw(schedule: VPSchedule, key: jax.Array, x: jax.Array, time_sampling: str,
               axis_name: str | None):
  """One (t [B], ε like x, w) draw of nll_bound's diffusion term; w = −λ'(t) / density(t)."""
  time_key, eps_key = jax.random.split(key)
  lam_max, lam_1 = schedule.log_snr(schedule.t_min), schedule.log_snr(1.0)
  if time_sampling == "log_snr":
    lam = rng_lib.uniform(time_key, x.shape[:1], lam_1, lam_max, jnp.float32,
                          axis_name=axis_name)
    t = schedule.t_from_log_snr(lam)
    weight = lam_max - lam_1
  else:
    t = rng_lib.uniform(time_key, x.shape[:1], schedule.t_min, 1.0, jnp.float32,
                        axis_name=axis_name)
    weight = (1.0 - schedule.t_min) * -schedule.dlog_snr_dt(t)
  eps = rng_lib.normal(eps_key, x.shape, x.dtype, axis_name=axis_name)
  return t, eps, jnp.broadcast_to(weight, t.shape)


def uniform_time_weight(schedule: VPSchedule, t: jax.Array, time_sampling: str) -> jax.Array:
  """[B] importance weights that turn draws of nll_bound's t into `dsm_loss`'s U(t_min, 1).

  The density of U(t_min, 1) over that of the proposal: 1 for "uniform"; for
  "log_snr" (density −λ'(t) / (λ(t_min) − λ(1))) it is
  (λ(t_min) − λ(1)) / ((1 − t_min) (−λ'(t))), whose mean under the proposal is 1.
  """
  if time_sampling == "uniform":
    return jnp.ones_like(t)
  lam_range = schedule.log_snr(schedule.t_min) - schedule.log_snr(1.0)
  return lam_range / ((1.0 - schedule.t_min) * -schedule.dlog_snr_dt(t))


ScoreApply = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def _split_gradient_squared_error(net: ScoreApply):
  """(params, z [N, ...], t [N], ε [N, ...], key) -> (e_z, e_params), each [N].

  Both outputs are the same value, Σ_pixels (net(params, z, t, key) − ε)²,
  with the gradient split: e_z's reaches z only (as if params were under
  stop_gradient), e_params's reaches params only (as if z were). Both come
  from one forward and one backward pass of the network: the two squared
  errors of row i share the error r_i, so their output cotangents 2 g_z,i r_i
  and 2 g_p,i r_i are parallel; the backward pass runs once with 2 g_p,i r_i
  (which is exactly params' gradient) and rescales row i of z's gradient by
  g_z,i / g_p,i. A row whose e_params has a zero cotangent gets no z-gradient
  either: the caller must weight e_params positively on every row (the DSM
  loss does). t, ε and key get no gradient.
  """
  def forward(params, z, t, eps, key):
    eps_hat, vjp = jax.vjp(lambda p, z_: net(p, z_, t, key), params, z)
    err = eps_hat - eps.astype(eps_hat.dtype)         # in the network's dtype
    err32 = err.astype(jnp.float32)
    sq = jnp.sum(jnp.square(err32), axis=tuple(range(1, err.ndim)))
    return (sq, sq), (err, vjp)

  @jax.custom_vjp
  def squared_error(params, z, t, eps, key):
    return forward(params, z, t, eps, key)[0]

  def backward(res, cotangents):
    err, vjp = res
    g_z, g_p = cotangents
    params_bar, z_bar = vjp((2.0 * _bcast(g_p, err) * err.astype(jnp.float32)).astype(err.dtype))
    safe = jnp.where(g_p != 0, g_p, 1.0)
    ratio = jnp.where(g_p != 0, g_z / safe, 0.0)
    return params_bar, (_bcast(ratio, z_bar) * z_bar).astype(z_bar.dtype), None, None, None

  squared_error.defvjp(forward, backward)
  return squared_error


def nll_bound_and_dsm(net: ScoreApply, params: Any, schedule: VPSchedule, x: jax.Array,
                      rng: jax.Array, dropout_rng: jax.Array, *, num_time_samples: int = 1,
                      time_sampling: str = "log_snr", axis_name: str | None = None):
  """FlowDiff's two uses of the score network from one pass: (bound [B], dsm [B]).

  bound is `nll_bound(x)` (gradient "exact") with the gradient reaching x only;
  dsm is a denoising score-matching loss of the network on x (mean over
  pixels, as `dsm_loss`) with the gradient reaching params only, so
  β·bound + dsm trains the flow through x and the network through params as
  the two separate passes of `losses.flowdiff_loss` do, at about half the
  network cost: one forward and one backward pass instead of two of each
  (`_split_gradient_squared_error`).

  What differs from the two passes: both terms use the same (t, ε) draws and
  the network in training mode (dropout on, key `dropout_rng`) for the bound
  too; t is drawn from the bound's proposal (`time_sampling`) and the DSM
  term is importance-weighted to dsm_loss's U(t_min, 1) (`uniform_time_weight`),
  so each term has its two-pass expectation, and with num_time_samples K the
  DSM term averages its K draws. Deterministic networks (dropout 0) give
  exactly the two-pass values for the same draws.

  Args:
    net: (params, x_t [N, H, W, C], t [N], dropout key) -> ε̂, static.
    params: the network's params θ.
    schedule, x, rng, num_time_samples, time_sampling, axis_name: as `nll_bound`.
    dropout_rng: the network's dropout key.
  Returns:
    (bound [B] nats per image, dsm [B] per dimension).
  """
  if time_sampling not in TIME_SAMPLINGS:
    raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
  prior, decoder = _bound_constant_terms(schedule, x)
  k, b = num_time_samples, x.shape[0]
  t, eps, weight = jax.vmap(lambda key: _time_draw(schedule, key, x, time_sampling, axis_name))(
      jax.random.split(rng, k))                   # t, weight [K, B]; eps [K, B, ...]
  flat = lambda a: a.reshape((k * b,) + a.shape[2:])
  z = q_sample(schedule, flat(jnp.broadcast_to(x, (k,) + x.shape)), flat(t), flat(eps))
  e_z, e_params = _split_gradient_squared_error(net)(params, z, flat(t), flat(eps),
                                                     dropout_rng)
  bound = prior + decoder + jnp.mean(0.5 * weight * e_z.reshape(k, b), axis=0)
  dims = math.prod(x.shape[1:])
  dsm = jnp.mean(uniform_time_weight(schedule, t, time_sampling) * e_params.reshape(k, b),
                 axis=0) / dims
  return bound, dsm


def sample(eps_fn: EpsFn, schedule: VPSchedule, rng: jax.Array,
           shape: tuple[int, ...], *, sampler: str = "ddim",
           num_steps: int = 100, clip: bool = True) -> jax.Array:
  """Draws x0 ~ p_theta by integrating the reverse process from t = 1 to t_min.

  The steps are those of `flowdiff_jax.sampling` on its `time_grid`:
  num_steps steps uniform in t from 1 to schedule.t_min, then the final
  denoising step x0 = (x - sigma eps_hat)/alpha at t_min (what every sampler
  gives for the step t_min -> 0), so the cost is num_steps + 1 evaluations of
  eps_fn (2 num_steps + 1 for "heun").

  Args:
    eps_fn: (x_t [B,...], t [B]) -> eps_hat [B,...]. To jit, wrap the call in a
      function of the params so they are traced rather than baked in, e.g.
      ``jax.jit(lambda p, k: sample(lambda x, t: net.apply(p, x, t,
      train=False), schedule, k, shape))``; shape, sampler, num_steps and
      clip must be static.
    schedule: the VP schedule (static).
    rng: PRNG key for x_1 ~ N(0, I) and the ancestral noise.
    shape: output shape, e.g. (B, H, W, C) (static).
    sampler: "ancestral" (DDPM ancestral steps with q(x_s | x_t, x0_hat):
      `sampling.reverse_step` at eta = 1), "ddim" (eta = 0, deterministic),
      or "heun" (probability-flow ODE, second order; deterministic).
    num_steps: number of steps on the grid (static).
    clip: clip x0_hat to [-1, 1] inside "ancestral"/"ddim" steps and the
      final output to [-1, 1].
  Returns:
    Samples, ``shape``, float32, on the [-1, 1] image scale.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  init_rng, step_rng = jax.random.split(rng)
  # alpha_1 is tiny (~7e-3 for the linear kind), so N(0, I) is the prior.
  x = jax.random.normal(init_rng, shape, jnp.float32)
  ts, ss = sampling.time_grid(schedule, num_steps)

  def body(x, inputs):
    t, s, key = inputs
    if sampler == "heun":
      return sampling.heun_step(eps_fn, schedule, x, t, s), None
    x0, eps = sampling.denoise(eps_fn, schedule, x, t)
    eta = 1.0 if sampler == "ancestral" else 0.0
    noise = jax.random.normal(key, shape, jnp.float32) if eta else None
    return sampling.reverse_step(schedule, x, x0, t, s, eta=eta, clip=clip, noise=noise,
                                 eps=eps), None

  # One key per step on the grid 1 -> t_min; the final step draws no noise.
  keys = jax.random.split(step_rng, num_steps)
  x, _ = jax.lax.scan(body, x, (ts[:-1], ss[:-1], keys))
  # Final denoise at t_min: the t_min -> 0 step of each sampler.
  x0, eps = sampling.denoise(eps_fn, schedule, x, ts[-1])
  return sampling.reverse_step(schedule, x, x0, ts[-1], ss[-1], eta=0.0, clip=clip, eps=eps)


def nll_bound(eps_fn: EpsFn, schedule: VPSchedule, x: jax.Array, rng: jax.Array, *,
              num_time_samples: int = 1, time_sampling: str = "log_snr",
              gradient: str = "exact", axis_name: str | None = None) -> jax.Array:
  """Upper bound on -log p(x) in nats per image, the continuous-time diffusion ELBO.

  -log p(x) <= KL(q(z_1 | x) || N(0, I))                       (prior term)
              + E_z[-log p(x | z_{t_min})]                      (decoder term)
              + 1/2 int_{t_min}^1 -lambda'(t) E_eps ||eps_hat(z_t, t) - eps||^2 dt
                                                                (diffusion term)
  with a Gaussian decoder p(x | z) = N(z / alpha, sigma^2 / alpha^2) at
  t_min, whose expectation is the constant D/2 (1 + log 2 pi - lambda(t_min)).
  The bound is differentiable in x (through eps_fn) and in the network; it is
  what the flow minimises as -log p_theta(x) (docs/design.md §2.2), and for the exact
  score of a Gaussian it is within the decoder's tiny noise of the true NLL.

  The diffusion term is estimated with draws (t, eps), each weighted by
  w = -lambda'(t) / (density of t):
    * time_sampling "log_snr" (default): lambda uniform on
      [lambda(1), lambda(t_min)], so w = lambda(t_min) - lambda(1) is
      constant: importance sampling proportional to |lambda'(t)|.
    * "uniform": t ~ U(t_min, 1), w = (1 - t_min) (-lambda'(t)). Same
      expectation, but w ~ 1/t near t = 0 makes it heavy-tailed: several
      times the standard deviation per draw.

  Per draw the exact x-gradient of the diffusion term is
  w alpha_t J^T (eps_hat - eps), J = d eps_hat / d z_t, a backward pass
  through the network. With gradient "sds" J is replaced by sigma_t I, the
  Jacobian of the optimal eps_hat for N(0, I) data (which the VP process
  keeps at N(0, I)): the x-gradient becomes w alpha_t sigma_t (eps_hat - eps)
  with eps_hat held fixed, and the network gets no gradient from this term
  (eps_hat is under stop_gradient). The returned value is the same bound
  (the same arithmetic, up to XLA's fusion choices); only its gradient
  changes, and the prior term keeps its exact gradient. "sds" is cheaper (no
  backward pass through the network) but biased: for N(mu, Sigma) data the
  exact J = sigma_t C_t^-1, C_t = alpha_t^2 Sigma + sigma_t^2 I, so "sds"
  under-weights low-variance directions (and over-weights those with
  variance above 1).

  Args:
    eps_fn: (x_t [B, H, W, C], t [B]) -> eps_hat.
    schedule: the VP schedule.
    x: images [B, H, W, C].
    rng: key for t and eps; under shard_map/pmap the same on every device.
    num_time_samples: Monte-Carlo draws of (t, eps) per image, averaged.
    time_sampling: one of TIME_SAMPLINGS, see above.
    gradient: one of PRIOR_GRADIENTS: "exact" or "sds", see above.
    axis_name: None under jit (x is the global batch); inside shard_map/pmap
      the mapped batch axis, so that each device gets its rows of the
      global draws (`flowdiff_jax.rng`).

  Returns:
    [B] bound in nats per image (divide by H*W*C for nats per dimension).
  """
  if time_sampling not in TIME_SAMPLINGS:
    raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
  if gradient not in PRIOR_GRADIENTS:
    raise ValueError(f"gradient must be one of {PRIOR_GRADIENTS}, got {gradient!r}")
  prior, decoder = _bound_constant_terms(schedule, x)
  sum_pixels = lambda a: jnp.sum(a, axis=tuple(range(1, x.ndim)))

  def one_draw(key):
    t, eps, weight = _time_draw(schedule, key, x, time_sampling, axis_name)
    if gradient == "exact":
      err = eps_fn(q_sample(schedule, x, t, eps), t) - eps
      return 0.5 * weight * sum_pixels(jnp.square(err))
    x_fixed = jax.lax.stop_gradient(x)
    err = jax.lax.stop_gradient(eps_fn(q_sample(schedule, x_fixed, t, eps), t)) - eps
    alpha, sigma = schedule.alpha_sigma(t)
    grad_x = _bcast(weight * alpha * sigma, x) * err
    # x - x_fixed is exactly 0, so the value is the exact one; the x-gradient is grad_x.
    return 0.5 * weight * sum_pixels(jnp.square(err)) + sum_pixels((x - x_fixed) * grad_x)

  draws = jax.vmap(one_draw)(jax.random.split(rng, num_time_samples))
  return prior + decoder + jnp.mean(draws, axis=0)
