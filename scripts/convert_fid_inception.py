r"""Converts pytorch-fid's FID Inception weights into an .npz that flowdiff_jax reads.

Run on any machine with torch (no GPU needed; torchvision and pytorch-fid are
not needed either):

  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  pip install torch numpy
  python scripts/convert_fid_inception.py pt_inception-2015-12-05-6726825d.pth fid_inception.npz

then copy fid_inception.npz (about 91 MB) to the evaluation machine and pass
`--inception_weights=fid_inception.npz` to `python -m flowdiff_jax.evaluate`.

The .npz holds the torch state dict as it is (torch key names, OIHW conv
kernels, BatchNorm weight/bias/running_mean/running_var) minus the entries the
pool3 features do not use (the 1008-way `fc` layer, `num_batches_tracked`);
`flowdiff_jax.models.inception.load_variables` maps it onto the Flax network
and checks every name and shape. When flowdiff_jax is importable here too,
this script runs that check right away.
"""

import argparse
import hashlib
import os
import sys

import numpy as np

# The sha256 prefix pytorch-fid's release puts in the file name.
EXPECTED_SHA256_PREFIX = "6726825d"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("pth", help="pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("npz", help="output .npz")
  args = parser.parse_args()

  import torch  # noqa: PLC0415  (only this script needs torch)

  with open(args.pth, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if not digest.startswith(EXPECTED_SHA256_PREFIX):
    print(f"warning: sha256 {digest[:8]}... is not pytorch-fid's {EXPECTED_SHA256_PREFIX}...; "
          "is this the FID Inception file?", file=sys.stderr)
  state_dict = torch.load(args.pth, map_location="cpu")
  arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state_dict.items()
            if not k.startswith(("fc.", "AuxLogits.")) and not k.endswith("num_batches_tracked")}
  np.savez(args.npz, **arrays)
  print(f"wrote {len(arrays)} arrays ({sum(a.size for a in arrays.values()):,} numbers) to "
        f"{args.npz} ({os.path.getsize(args.npz) / 2**20:.1f} MiB)")

  try:
    from flowdiff_jax.models import inception  # noqa: PLC0415
  except ImportError:
    print("flowdiff_jax is not importable here; the evaluation machine checks the file on load.")
    return
  inception.load_variables(args.npz)  # raises on any missing entry or shape mismatch
  print("checked: every entry of the Flax FID Inception-v3 is there with the right shape")


if __name__ == "__main__":
  main()
