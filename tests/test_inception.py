"""The FID Inception-v3 in Flax, on random weights (the real ones cannot be downloaded here).

One compiled forward at the smallest input the network takes (75x75, no
resize) serves the shape, determinism, batch-independence, grayscale and
round-trip checks; the 299 resize is checked against bilinear interpolation
written out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdiff_jax.models import inception

SIZE = inception.MIN_INPUT_SIZE


@pytest.fixture(scope="module")
def variables():
  return inception.random_variables(seed=0)


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(0), (2, SIZE, SIZE, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def features(variables, images):
  return np.asarray(inception.make_feature_fn(variables, resize_to=None)(images))


def test_architecture_matches_torchvision_parameter_count():
  # torchvision's inception_v3 has 27,161,264 parameters (its documented
  # num_params); without AuxLogits (98,560 + 2,459,136 + 769,000) and fc
  # (2,049,000) that leaves 21,785,568 conv and BatchNorm parameters, which
  # the FID variant shares (it changes pooling only).
  abstract = inception.abstract_variables()
  assert sum(a.size for a in jax.tree.leaves(abstract["params"])) == 21_785_568
  # 94 BasicConv2d layers, each conv.weight + 4 BatchNorm entries in torch.
  assert len(jax.tree.leaves(abstract)) == 94 * 5
  state_dict = inception.to_torch_state_dict(
      jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract))
  assert state_dict["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  assert state_dict["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
  assert state_dict["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
  assert state_dict["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)


def test_features_shape_determinism_and_batch_independence(variables, images, features):
  assert features.shape == (2, inception.FEATURE_DIM)
  assert np.all(np.isfinite(features)) and np.std(features) > 1e-3
  fn = inception.make_feature_fn(variables, resize_to=None)
  np.testing.assert_array_equal(np.asarray(fn(images)), features)
  # Inference-mode BatchNorm: an image's features do not depend on its batch mates.
  swapped = np.asarray(fn(images[::-1]))
  np.testing.assert_allclose(swapped, features[::-1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(features[0], features[1])


def test_grayscale_is_repeated_to_rgb(variables, images):
  fn = inception.make_feature_fn(variables, resize_to=None)
  gray = images[..., :1]
  np.testing.assert_array_equal(np.asarray(fn(gray)),
                                np.asarray(fn(jnp.repeat(gray, 3, axis=-1))))


@pytest.mark.parametrize("suffix", [".npz", ".msgpack"])
def test_weights_file_round_trip(variables, images, features, tmp_path, suffix):
  path = str(tmp_path / f"inception{suffix}")
  inception.save_variables(path, variables)
  loaded = inception.load_variables(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
      np.asarray(inception.make_feature_fn(loaded, resize_to=None)(images)), features)


def test_torch_layout_is_oihw_and_ignores_unused_entries(variables):
  state_dict = inception.to_torch_state_dict(variables)
  kernel = np.asarray(variables["params"]["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"])  # HWIO
  np.testing.assert_array_equal(state_dict["Mixed_5b.branch5x5_2.conv.weight"],
                                kernel.transpose(3, 2, 0, 1))
  # What pytorch-fid's file also holds (the 1008-way classifier, BatchNorm
  # counters) is not needed for pool3 and is skipped.
  extra = dict(state_dict, **{"fc.weight": np.zeros((1008, 2048)), "fc.bias": np.zeros(1008),
                              "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0)})
  back = inception.from_torch_state_dict(extra)
  np.testing.assert_array_equal(back["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"])


def test_bad_weights_files_fail_with_clear_messages(variables, tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_fid_inception.py"):
    inception.load_variables(str(tmp_path / "missing.npz"))
  state_dict = inception.to_torch_state_dict(variables)
  missing = dict(state_dict)
  del missing["Mixed_6e.branch7x7dbl_3.bn.running_mean"]
  np.savez(tmp_path / "missing_entry.npz", **missing)
  with pytest.raises(ValueError, match=r"1 entries missing.*Mixed_6e\.branch7x7dbl_3"):
    inception.load_variables(str(tmp_path / "missing_entry.npz"))
  wrong = dict(state_dict, **{"Conv2d_2a_3x3.conv.weight": np.zeros((32, 32, 5, 5))})
  np.savez(tmp_path / "wrong_shape.npz", **wrong)
  with pytest.raises(ValueError, match=r"Conv2d_2a_3x3\.conv\.weight has shape \(32, 32, 5, 5\)"):
    inception.load_variables(str(tmp_path / "wrong_shape.npz"))
  with pytest.raises(ValueError, match="must end in .npz or .msgpack"):
    inception.save_variables(str(tmp_path / "weights.pth"), variables)


def test_small_inputs_without_resize_are_refused():
  net = inception.FIDInceptionV3(resize_to=None)
  with pytest.raises(ValueError, match="at least 75x75"):
    jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def _bilinear_half_pixel(image, out):
  """Bilinear upsampling with half-pixel centres, written out (torch align_corners=False)."""
  n = image.shape[0]
  coords = (np.arange(out) + 0.5) * n / out - 0.5
  coords = np.clip(coords, 0, n - 1)
  lo = np.floor(coords).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  w = coords - lo
  rows = image[lo] * (1 - w)[:, None] + image[hi] * w[:, None]
  return rows[:, lo] * (1 - w)[None, :] + rows[:, hi] * w[None, :]


def test_resize_is_bilinear_with_half_pixel_centres():
  """The 28 -> 299 resize the network applies is torch's bilinear(align_corners=False)."""
  image = np.random.default_rng(0).uniform(-1, 1, (28, 28)).astype(np.float32)
  got = inception.resize(jnp.asarray(image)[None, :, :, None], 299)[0, :, :, 0]
  np.testing.assert_allclose(got, _bilinear_half_pixel(image, 299), atol=1e-5)
