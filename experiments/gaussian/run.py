r"""The Gaussian oracle: covariance error over training, method by method.

  python experiments/gaussian/run.py [--size 6] [--steps 4000] [--every 250] \
      [--operators denoise,inpaint_random,blur] [--methods naive,flowdiff] \
      [--measure samples|params] [--name results] [--out experiments/gaussian]

For each operator, trains each method with the exact Gaussian ε-network
(model.name="gaussian") on the same corrupted samples of N(μ, Σ)
(size×size×1 images, σ_y = 0.2; inpainting drops half the pixels; blur is a
--blur_size² kernel of std --blur_std), and every `--every` steps measures
‖Ĉ − Σ‖_F/‖Σ‖_F of the EMA prior: of 4000 of its samples (Heun, 100 steps;
`--measure samples`), or of the covariance its parameters hold
(`--measure params`: exact, no sampling error; the network is a Gaussian);
for the flow methods also that of one flow sample per observation for 4096
observations ("flow_curves"; the aggregate posterior ∫q(x|y)p(y)dy, which has
covariance Σ when q is the exact posterior), what the score network is
trained on. Methods:

  naive, flowdiff      the config methods, flow base A⁺y, β_prior warm-up.
  flowdiff_handover    flowdiff with the Gaussian-EM warm start: flow base the
                       posterior mean of N(μ̂, Σ̂) fitted by EM to the
                       observations, the flow's prior term that Gaussian for
                       --hold steps, handed over to the diffusion prior over
                       --handover steps (no β_prior warm-up). The fit's time
                       counts in its wall time.
  gaussian_em          the EM fit alone (--em_iters iterations; dense Σ for
                       denoise/blur, rank --em_rank for masks): its Σ̂'s error.
  clean                references: the config method "clean", the same network
  empirical            and optimiser trained on the clean x (what DSM training
                       reaches at this budget with no corruption at all), and the
                       sample covariance of the clean x (no training: the floor of
                       any estimate from these examples), and of the first 4096
                       (the floor of the flow samples' curve, which uses 4096).

Ablations: --set KEY=VALUE (repeatable) overrides any config field of the
trained methods after the above, e.g. --set flowdiff.flow_updates_per_score_update=4
--set optim.learning_rate=3e-4; the value is a Python literal.

Writes NAME.json and NAME.png (covariance_error.png for the default name) to --out.
"""

import argparse
import ast
import datetime
import json
import os
import sys
import time

import jax
import numpy as np

from flowdiff_jax import gaussian_em, operators, oracle, reporting, step as step_lib
from flowdiff_jax.configs import default
from flowdiff_jax.methods import base
from flowdiff_jax.models import gaussian

METHODS = ("naive", "flowdiff", "flowdiff_handover", "gaussian_em", "clean", "empirical")


def make_config(method: str, operator: str, steps: int):
  config = default.get_config()
  config.method = method
  config.model.name = "gaussian"
  config.operator.update(name=operator, sigma_y=0.2, drop_prob=0.5)
  config.flow.update(num_levels=1, num_steps=4, hidden_channels=32, cond_channels=16)
  config.flow_optim.update(learning_rate=2e-3, warmup_steps=100, grad_clip_norm=0.0)
  config.optim.update(learning_rate=3e-3, warmup_steps=100, grad_clip_norm=0.0, ema_decay=0.99)
  config.amortized.update(num_time_samples=4, beta_prior_warmup_steps=steps // 4)
  config.training.update(batch_size=64, num_train_steps=steps)
  return config


def method_config(method: str, operator: str, args):
  """make_config, with the blur kernel, and for flowdiff_handover its warm start."""
  config = make_config("flowdiff" if method == "flowdiff_handover" else method, operator,
                       args.steps)
  config.operator.update(kernel_size=args.blur_size, kernel_std=args.blur_std)
  per_example = operator not in ("denoise", "blur")
  config.gaussian_em.update(rank=args.em_rank if per_example else 0, num_iters=args.em_iters,
                            init_var=0.1)
  if method == "flowdiff_handover":
    config.flow.base = "gaussian_em"
    config.flowdiff.update(gaussian_prior_steps=args.hold, handover_steps=args.handover)
    config.amortized.beta_prior_warmup_steps = 0
  for key, value in overrides(args.set):
    parent, _, leaf = key.rpartition(".")
    node = config
    for part in filter(None, parent.split(".")):
      node = node[part]
    if leaf not in node:  # an unlocked ConfigDict would silently add a typo
      raise SystemExit(f"--set {key}: no such config field")
    node[leaf] = value  # ConfigDict refuses a value of another type
  return config


def overrides(items):
  """["a.b=1e-3", ...] → [("a.b", 0.001), ...]; values are Python literals."""
  pairs = []
  for item in items:
    key, sep, text = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare string, e.g. --set amortized.time_sampling=uniform
    pairs.append((key, value))
  return pairs


def ema_covariance(state, shape, measure: str) -> np.ndarray:
  if measure == "params":
    _, cov = gaussian.mean_and_covariance(state.ema_params["score"])
    return np.asarray(cov, np.float64)
  return oracle.prior_covariance(state, shape)


def run(method, operator, args, mu, sigma):
  config = method_config("naive" if method == "empirical" else method, operator, args)
  x, data = oracle.corrupted_data(config, mu, sigma, args.examples)
  if method == "empirical":
    flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    errs = [oracle.relative_error(np.cov(part.T), sigma) for part in (flat, flat[:4096])]
    print(f"{operator:15s} {method:17s} sample covariance of {len(flat)} / 4096 clean x: "
          f"error {errs[0]:.3f} / {errs[1]:.3f}", flush=True)
    return [(0, errs[0]), (4096, errs[1])], []
  if method == "clean":  # trains on the clean images: a reference, not a method for y
    data = {"x": x}
  if method == "gaussian_em":
    op = operators.make_operator(config.operator)
    fit = gaussian_em.fit(op, data["y"], data["omega"], num_iters=args.em_iters,
                          rank=config.gaussian_em.rank or None, init_var=0.1,
                          final_loglik=False)
    err = oracle.relative_error(np.asarray(fit.covariance(), np.float64), sigma)
    print(f"{operator:15s} {method:17s} {args.em_iters} iterations: error {err:.3f}", flush=True)
    return [(0, err)], []
  n = jax.tree.leaves(data)[0].shape[0]
  order = np.random.default_rng(0)
  take = lambda idx: jax.tree.map(lambda a: a[idx], data)
  fitted = base.fit_flow_base(config, lambda _: (data["y"], data["omega"]))
  state = step_lib.create_train_state(config, jax.random.key(0), take(np.arange(256)),
                                      fitted_params=fitted)
  step_fn = jax.jit(step_lib.train_step, donate_argnums=0)
  # One flow sample per observation: their covariance is that of the flow's
  # aggregate posterior, which equals the prior's when q(x|y) is its exact
  # posterior (what the score network is then trained on).
  obj = state.objective
  flow_draw = jax.jit(lambda params, batch, key: base.flow_samples(obj, params, batch, key, 1)[0])
  probe = take(np.arange(min(n, 4096)))
  rng = jax.random.key(1)
  shape = (args.size, args.size, 1)
  curve, flow_curve = [], []
  for i in range(1, args.steps + 1):
    state, _ = step_fn(state, take(order.integers(0, n, config.training.batch_size)), rng)
    if i % args.every == 0:
      err = oracle.relative_error(ema_covariance(state, shape, args.measure), sigma)
      curve.append((i, err))
      note = ""
      if "flow" in state.params:
        x = np.asarray(flow_draw(state.params, probe, jax.random.key(i)), np.float64)
        flow_curve.append((i, oracle.relative_error(np.cov(x.reshape(x.shape[0], -1).T),
                                                    sigma)))
        note = f" (flow samples {flow_curve[-1][1]:.3f})"
      print(f"{operator:15s} {method:17s} step {i:6d}: covariance error {err:.3f}{note}",
            flush=True)
  return curve, flow_curve


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=6)
  parser.add_argument("--steps", type=int, default=4000)
  parser.add_argument("--every", type=int, default=250)
  parser.add_argument("--examples", type=int, default=8192)
  parser.add_argument("--operators", default="denoise,inpaint_random")
  parser.add_argument("--methods", default="naive,flowdiff")
  parser.add_argument("--measure", choices=("samples", "params"), default="samples")
  parser.add_argument("--blur_size", type=int, default=5)
  parser.add_argument("--blur_std", type=float, default=1.0)
  parser.add_argument("--em_iters", type=int, default=64)
  parser.add_argument("--em_rank", type=int, default=64)
  parser.add_argument("--hold", type=int, default=1000)
  parser.add_argument("--handover", type=int, default=1000)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field of the trained methods (repeatable)")
  parser.add_argument("--name", default="results")
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()
  methods = args.methods.split(",")
  if set(methods) - set(METHODS):
    parser.error(f"--methods: unknown {sorted(set(methods) - set(METHODS))}; allowed {METHODS}")
  jax.config.update("jax_threefry_partitionable", True)
  mu, sigma = oracle.gaussian_problem(args.size)
  # Paths relative to the working directory, not this machine's absolute ones.
  results = {"date": datetime.date.today().isoformat(), "hardware": reporting.hardware(),
             "command": " ".join(["python", *sys.argv]),
             "args": {**vars(args), "out": os.path.relpath(args.out)}, "curves": {},
             "flow_curves": {}, "wall_s": {}}
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"{args.name}.json")
  operators_ = args.operators.split(",")
  for operator in operators_:
    for method in methods:
      start = time.time()
      key = f"{operator}/{method}"
      results["curves"][key], results["flow_curves"][key] = run(method, operator, args, mu,
                                                                sigma)
      results["wall_s"][f"{operator}/{method}"] = round(time.time() - start, 1)
      with open(path, "w") as f:  # after every run: a long sweep shows its progress
        json.dump(results, f, indent=1)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(operators_), figsize=(5 * len(operators_), 3.6),
                           squeeze=False)
  for ax, operator in zip(axes[0], operators_):
    for method in methods:
      steps, errs = zip(*results["curves"][f"{operator}/{method}"])
      if method == "gaussian_em":
        ax.axhline(errs[0], color="k", ls="--", lw=1, label="gaussian_em (fit)")
      elif method == "empirical":
        ax.axhline(errs[0], color="gray", ls=":", lw=1, label="sample cov. of the clean x")
      else:
        ax.plot(steps, errs, marker="o", ms=3, label=method)
    ax.set(title=f"{operator}, {args.size}x{args.size}, σ_y = 0.2", xlabel="step",
           ylabel="‖Ĉ − Σ‖_F / ‖Σ‖_F", ylim=(0, None))
    ax.legend()
  fig.tight_layout()
  png = "covariance_error.png" if args.name == "results" else f"{args.name}.png"
  fig.savefig(os.path.join(args.out, png), dpi=120)


if __name__ == "__main__":
  main()
