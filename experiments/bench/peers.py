r"""The peers' training steps against ours, timed alternately in one run (needs torch).

  python experiments/bench/peers.py --dpi=PATH/TO/DPI [--batch_size=8] [--rounds=3]
      [--steps=2] [--output=FILE.json]

Two pairs, each timed A B A B ... (`--rounds` times, `--steps` steps each, after
one untimed step), so that a machine's drifting load falls on both sides:

* **U-Net step**: EMDiffusion's M-step network, diffusers' `UNet2DModel` with the
  settings of EMDiffusion's `denoiser_diffusion.py` (block channels 128, 256, 256,
  256; 2 ResNet layers per block; attention in the second down and third up block;
  dropout 0.1; AdamW, lr 2e-4; MSE on the noise at a random DDPM step), against
  this project's CIFAR U-Net `clean` step (`configs/cifar_noise.py`, method
  `clean`): both a denoising-score-matching step of a CIFAR-size U-Net.
* **Conditional flow step**: DPI's conditional Glow (HeSunPU/DPI,
  `DPItorch/generative_model/cond_glow_model.py`, imported from the `--dpi`
  folder: 16 flows × 4 blocks, coupling width 512, conditioned on the flattened
  observation) with its reverse-KL loss (data fidelity + a standard Gaussian
  prior − log det, Adam), against this project's `amortized` method with a
  Gaussian prior and the flow configured to the same size (`flow.num_levels=4`,
  `flow.num_steps=16`, `flow.hidden_channels=512`), on CIFAR-size denoising.

Prints, per pair, both median step times, images/s, parameter counts and the
ratio peer time / our time (> 1: ours is faster); --output writes them as JSON
with the machine and the date. The peers' code is read from their folders,
never copied here; get it with `git clone https://github.com/HeSunPU/DPI`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dpi", required=True, help="a checkout of HeSunPU/DPI")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=2, help="timed steps per side and round")
  p.add_argument("--pairs", default="unet,flow", help="which pairs to time")
  p.add_argument("--output", default="")
  return p.parse_args(argv)


# --- The peers (torch) ---------------------------------------------------------------


def emdiffusion_unet_step(batch_size: int):
  """EMDiffusion's M-step: a step of DSM on its U-Net. (step function, parameter count)."""
  from diffusers import UNet2DModel
  import torch

  torch.manual_seed(0)
  model = UNet2DModel(
      sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, norm_eps=1e-6,
      downsample_padding=0, flip_sin_to_cos=False, dropout=0.1, freq_shift=1,
      block_out_channels=(128, 256, 256, 256),
      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
  alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)  # DDPM's linear betas
  x = torch.rand(batch_size, 3, 32, 32) * 2 - 1

  def step():
    t = torch.randint(0, 1000, (batch_size,))
    noise = torch.randn_like(x)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    loss = torch.nn.functional.mse_loss(model(a.sqrt() * x + (1 - a).sqrt() * noise, t).sample,
                                        noise)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  return step, sum(p.numel() for p in model.parameters())


def dpi_flow_step(batch_size: int, dpi_folder: str, sigma_y: float = 0.2):
  """DPI's conditional Glow, one reverse-KL step on denoising. (step, parameter count)."""
  import torch

  sys.path.insert(0, os.path.join(dpi_folder, "DPItorch"))
  from generative_model import cond_glow_model  # the peer's own module

  torch.manual_seed(0)
  n_flow, n_block = 16, 4
  glow = cond_glow_model.Glow(3, n_flow, n_block, affine=True)
  x = torch.rand(batch_size, 3, 32, 32) * 2 - 1
  y = x + sigma_y * torch.randn_like(x)
  cond = y.reshape(batch_size, -1)
  shapes = cond_glow_model.calc_z_shapes(3, 32, n_flow, n_block)
  with torch.no_grad():  # the data-dependent init (ActNorm, the condition nets)
    glow(x, cond)
  optimizer = torch.optim.Adam(glow.parameters(), lr=1e-4)

  def step():
    z = [torch.randn(batch_size, *s) for s in shapes]
    sample, logdet = glow.reverse(z, cond)
    data = ((sample - y) ** 2).flatten(1).sum(1) / (2 * sigma_y ** 2)
    prior = (sample ** 2).flatten(1).sum(1) / 2
    loss = (data + prior - logdet).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  return step, sum(p.numel() for p in glow.parameters())


# --- Ours (JAX) ----------------------------------------------------------------------


def jax_step(config):
  """Our jitted train step for `config` on a synthetic batch. (step, params, compile_s)."""
  import jax

  sys.path.insert(0, HERE)
  import bench  # this folder's benchmark: the same batch and state as its table

  from flowdiff_jax import parallel, step as step_lib

  mesh = parallel.make_mesh()
  batch = bench._synthetic_batch(config, mesh, config.training.batch_size)  # noqa: SLF001
  state = bench._initial_state(config, mesh, batch)  # noqa: SLF001
  rng = jax.random.key(1)
  t = time.perf_counter()
  compiled = step_lib.make_train_step(config, mesh).lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t
  params = sum(x.size for x in jax.tree.leaves(state.params))
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch, rng)
    jax.block_until_ready(metrics)

  return step, params, compile_s


def our_configs(batch_size: int) -> dict:
  from flowdiff_jax.configs import cifar_noise

  unet = cifar_noise.get_config()
  unet.method = "clean"
  flow = cifar_noise.get_config()
  flow.method = "amortized"
  flow.amortized.prior = "gaussian"
  flow.flow.num_levels, flow.flow.num_steps, flow.flow.hidden_channels = 4, 16, 512
  for config in (unet, flow):
    config.training.batch_size = batch_size
  return {"unet": unet, "flow": flow}


# --- Timing --------------------------------------------------------------------------


def _time(step, steps: int) -> float:
  t = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - t) / steps


def compare(peer, ours, rounds: int, steps: int) -> tuple[list[float], list[float]]:
  """Seconds per step of each side, round by round, alternating; one untimed step first."""
  peer()
  ours()
  peer_s, our_s = [], []
  for _ in range(rounds):
    peer_s.append(_time(peer, steps))
    our_s.append(_time(ours, steps))
  return peer_s, our_s


def main(argv=None) -> None:
  args = _parse_args(argv)
  sys.path.insert(0, REPO)
  import jax
  import torch

  import flowdiff_jax  # noqa: F401 (XLA workarounds before the first computation)

  jax.config.update("jax_threefry_partitionable", True)
  configs = our_configs(args.batch_size)
  peers = {"unet": ("EMDiffusion U-Net (diffusers UNet2DModel)",
                    lambda: emdiffusion_unet_step(args.batch_size)),
           "flow": ("DPI conditional Glow, 16 flows x 4 blocks, width 512",
                    lambda: dpi_flow_step(args.batch_size, args.dpi))}
  ours_names = {"unet": "cifar_noise clean step", "flow": "amortized, flow 4 x 16 x 512"}
  rows = []
  for pair in args.pairs.split(","):
    print(f"# {pair}: building both steps ...", file=sys.stderr, flush=True)
    peer, peer_params = peers[pair][1]()
    ours, our_params, compile_s = jax_step(configs[pair])
    peer_s, our_s = compare(peer, ours, args.rounds, args.steps)
    peer_med, our_med = statistics.median(peer_s), statistics.median(our_s)
    rows.append(dict(pair=pair, peer=peers[pair][0], ours=ours_names[pair],
                     batch_size=args.batch_size, peer_params_m=peer_params / 1e6,
                     our_params_m=our_params / 1e6, our_compile_s=compile_s,
                     peer_step_s=peer_s, our_step_s=our_s, peer_median_s=peer_med,
                     our_median_s=our_med, peer_over_ours=peer_med / our_med))
  info = {"date": datetime.date.today().isoformat(), "host": platform.node(),
          "cpu_count": os.cpu_count(), "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
          "platform": jax.default_backend(),
          "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "rows": rows}
  print(f"{info['date']}, {info['cpu_count']} CPUs ({info['platform']}), torch "
        f"{info['torch']} ({info['torch_threads']} threads), jax {info['jax']}; batch "
        f"{args.batch_size}, {args.rounds} rounds x {args.steps} steps, alternating\n")
  print("| pair | peer | params (M) | s/step | ours | params (M) | s/step | compile (s) "
        "| peer / ours |")
  print("|---|---|---:|---:|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['pair']} | {r['peer']} | {r['peer_params_m']:.1f} | {r['peer_median_s']:.2f} "
          f"| {r['ours']} | {r['our_params_m']:.1f} | {r['our_median_s']:.2f} "
          f"| {r['our_compile_s']:.0f} | {r['peer_over_ours']:.2f} |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(info, f, indent=1)
      f.write("\n")


if __name__ == "__main__":
  main()
