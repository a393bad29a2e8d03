"""CIFAR-10 32×32 denoising, σ_y = 0.2 on the [-1, 1] scale (EMDiffusion protocol).

Protocol: docs/design.md §3.1.

DDPM CIFAR-10 U-Net (35.7M params), VP linear β 1e-4…0.02, T = 1000, AdamW 2e-4,
EMA 0.999; FlowDiff with a 2-level conditional Glow. Meant for a GPU/TPU;
`--config.method=clean|naive` picks a baseline.
"""

from flowdiff_jax.configs import default


def get_config():
  config = default.get_config()
  config.method = "flowdiff"  # --config.method=clean|naive for the baselines
  config.data.dataset = "cifar10"
  config.operator.name = "denoise"
  config.operator.sigma_y = 0.2  # [-1, 1] scale: 0.1 on [0, 1]
  return config
