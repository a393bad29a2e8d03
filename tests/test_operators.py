"""Property tests of the forward operators and the fixed corruption draw."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowdiff_jax import operators as ops

SHAPE = (16, 16, 3)  # (H, W, C) of one example


def all_ops(sigma_y=0.1):
  return [
      ops.Denoise(sigma_y),
      ops.GaussianBlur(sigma_y, kernel_size=5, kernel_std=1.5),
      ops.RandomInpaint(sigma_y, drop_prob=0.6),
      ops.BoxInpaint(sigma_y, box_size=5),
  ]


OP_IDS = [op.name for op in all_ops()]


def batched_omega(op, key, batch, shape=SHAPE):
  return jax.vmap(lambda k: op.sample_omega(k, shape))(jax.random.split(key, batch))


def uniform_images(key, batch, shape=SHAPE):
  return jax.random.uniform(key, (batch, *shape), minval=-1.0, maxval=1.0)


def smooth_image(shape=SHAPE):
  """A periodic image made of a few low-frequency modes, [1, H, W, C] in [-1, 1]."""
  h, w, c = shape
  i = np.arange(h)[:, None, None]
  j = np.arange(w)[None, :, None]
  ch = np.arange(c)[None, None, :]
  img = (0.4 * np.cos(2 * np.pi * (i / h + ch / 7)) + 0.3 * np.sin(2 * np.pi * 2 * j / w)
         + 0.2 * np.cos(2 * np.pi * (i + j) / h))
  return jnp.asarray(img[None], jnp.float32)


# --- Adjoints ----------------------------------------------------------------


@pytest.mark.parametrize("op", all_ops(), ids=OP_IDS)
def test_adjoint_identity_and_linear_transpose(op):
  kx, ky, kw = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, *SHAPE))
  y = jax.random.normal(ky, (3, *SHAPE))
  omega = batched_omega(op, kw, 3)
  ax, aty = op.apply(x, omega), op.adjoint(y, omega)
  assert ax.shape == aty.shape == x.shape
  lhs = np.vdot(np.float64(ax), np.float64(y))
  rhs = np.vdot(np.float64(x), np.float64(aty))
  # float32 rounding of each output element, accumulated over ~800 entries.
  scale = np.linalg.norm(ax) * np.linalg.norm(y)
  assert abs(lhs - rhs) <= 1e-5 * scale, (lhs, rhs)

  (transposed,) = jax.linear_transpose(lambda v: op.apply(v, omega), x)(y)
  np.testing.assert_allclose(aty, transposed, atol=1e-5)


def test_blur_adjoint_and_fourier_form_when_kernel_wider_than_image():
  # Tiny test images (4x4) with the default 9x9 kernel: the circular wrap must
  # fold the kernel over itself consistently in conv and FFT.
  op = ops.GaussianBlur(0.1, kernel_size=9, kernel_std=2.0)
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
  y = jax.random.normal(jax.random.key(2), (2, 4, 4, 2))
  np.testing.assert_allclose(jnp.vdot(op.apply(x, {}), y), jnp.vdot(x, op.adjoint(y, {})),
                             rtol=1e-5)
  hf = op.transfer(4, 4)
  ax = np.fft.irfft2(np.conj(hf)[None, :, :, None] * np.fft.rfft2(np.float64(x), axes=(1, 2)),
                     s=(4, 4), axes=(1, 2))
  np.testing.assert_allclose(op.apply(x, {}), ax, atol=1e-6)


# --- Pseudo-inverses ---------------------------------------------------------


@pytest.mark.parametrize("op", [o for o in all_ops() if o.name != "blur"],
                         ids=[i for i in OP_IDS if i != "blur"])
def test_pinv_is_generalised_inverse(op):
  kx, kw = jax.random.split(jax.random.key(3))
  x = uniform_images(kx, 4)
  omega = batched_omega(op, kw, 4)
  ax = op.apply(x, omega)
  # A A⁺ A = A (exact for 0/1 masks), and A⁺ is 0 off the observed pixels.
  np.testing.assert_array_equal(op.apply(op.pinv(ax, omega), omega), ax)
  np.testing.assert_array_equal(op.pinv(ax, omega), op.pinv(op.pinv(ax, omega), omega))


def test_blur_pinv_inverts_on_smooth_image_with_tiny_reg():
  op = ops.GaussianBlur(0.1, kernel_size=9, kernel_std=2.0, pinv_reg=1e-7)
  x = smooth_image()
  ax = op.apply(x, {})
  assert float(jnp.abs(ax - x).max()) > 0.05  # the blur really changes x
  np.testing.assert_allclose(op.pinv(ax, {}), x, atol=1e-4)


def test_blur_pinv_minimises_tikhonov_objective():
  op = ops.GaussianBlur(0.1, kernel_size=5, kernel_std=1.5, pinv_reg=1e-2)
  y = jax.random.normal(jax.random.key(4), (2, *SHAPE))

  def objective(x):
    return jnp.sum((op.apply(x, {}) - y) ** 2) + op.pinv_reg * jnp.sum(x ** 2)

  grad_at_pinv = jax.grad(objective)(op.pinv(y, {}))
  grad_at_zero = jax.grad(objective)(jnp.zeros_like(y))  # = -2 Aᵀy
  ratio = jnp.linalg.norm(grad_at_pinv) / jnp.linalg.norm(grad_at_zero)
  assert ratio < 1e-4, ratio


# --- Masks -------------------------------------------------------------------


def test_random_mask_statistics():
  p = 0.6
  op = ops.RandomInpaint(0.1, drop_prob=p)
  masks = batched_omega(op, jax.random.key(5), 64, (32, 32, 3))["mask"]
  assert masks.shape == (64, 32, 32, 1) and masks.dtype == jnp.float32
  assert set(np.unique(masks)) <= {0.0, 1.0}
  n = masks.size
  # Observed fraction ~ Binomial(n, 1-p)/n, std sqrt(p(1-p)/n) ≈ 0.0019; allow 5 std.
  tol = 5 * np.sqrt(p * (1 - p) / n)
  assert abs(float(masks.mean()) - (1 - p)) < tol
  flat = np.asarray(masks).reshape(64, -1)
  assert len({row.tobytes() for row in flat}) == 64  # every example its own mask


def test_masks_are_shared_across_channels():
  for op in (ops.RandomInpaint(0.3), ops.BoxInpaint(0.3, box_size=5)):
    kx, kw, kn = jax.random.split(jax.random.key(6), 3)
    x = uniform_images(kx, 4)
    omega = batched_omega(op, kw, 4)
    assert omega["mask"].shape == (4, *SHAPE[:2], 1)
    y = op.measure(kn, x, omega)
    dropped = np.broadcast_to(np.asarray(omega["mask"]) == 0, y.shape)
    assert dropped.any()
    assert np.all(np.asarray(y)[dropped] == 0)  # every channel of a dropped pixel
    assert np.all(np.asarray(y)[~dropped] != 0)


def test_box_mask_is_one_square_inside_the_image():
  h, w, b = 8, 10, 3
  op = ops.BoxInpaint(0.1, box_size=b)
  masks = np.asarray(batched_omega(op, jax.random.key(7), 2000, (h, w, 1))["mask"])[..., 0]
  tops, lefts = [], []
  for m in masks:
    missing = np.argwhere(m == 0)
    assert len(missing) == b * b
    top, left = missing.min(axis=0)
    assert np.array_equal(missing.max(axis=0), [top + b - 1, left + b - 1])  # a solid square
    assert 0 <= top <= h - b and 0 <= left <= w - b
    tops.append(top)
    lefts.append(left)
  # Uniform over all positions: with 2000 draws every row/col offset shows up.
  assert set(tops) == set(range(h - b + 1))
  assert set(lefts) == set(range(w - b + 1))


def test_box_larger_than_image_rejected():
  with pytest.raises(ValueError, match="operator.box_size"):
    ops.BoxInpaint(0.1, box_size=9).sample_omega(jax.random.key(0), (8, 8, 1))


# --- Blur kernel -------------------------------------------------------------


def test_blur_kernel_and_mean_preservation():
  op = ops.GaussianBlur(0.1, kernel_size=9, kernel_std=2.0)
  k = np.asarray(op.kernel())
  assert k.shape == (9, 9)
  np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(k, k.T)
  np.testing.assert_array_equal(k, k[::-1, ::-1])
  assert np.unravel_index(k.argmax(), k.shape) == (4, 4)

  x = uniform_images(jax.random.key(8), 2)
  np.testing.assert_allclose(op.apply(x, {}).mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-6)
  const = jnp.full((1, *SHAPE), 0.37)
  np.testing.assert_allclose(op.apply(const, {}), const, atol=1e-6)


def test_blur_rejects_even_kernel():
  with pytest.raises(ValueError, match="operator.kernel_size"):
    ops.GaussianBlur(0.1, kernel_size=4)


# --- Measurement noise -------------------------------------------------------


@pytest.mark.parametrize("op", all_ops(sigma_y=0.2), ids=OP_IDS)
def test_measure_noise_level(op):
  kx, kw, kn = jax.random.split(jax.random.key(9), 3)
  x = uniform_images(kx, 16, (32, 32, 3))
  omega = batched_omega(op, kw, 16, (32, 32, 3))
  y = op.measure(kn, x, omega)
  resid = np.asarray(y - op.apply(x, omega), np.float64)
  mask = np.broadcast_to(np.asarray(omega.get("mask", 1.0)), y.shape) > 0
  np.testing.assert_array_equal(resid[~mask], 0.0)  # no noise where dropped
  noise = resid[mask]
  n = noise.size
  # Sample std of n Gaussians: relative std ≈ 1/sqrt(2n); mean: std σ/sqrt(n). 5 std each.
  assert abs(noise.std() / op.sigma_y - 1) < 5 / np.sqrt(2 * n)
  assert abs(noise.mean()) < 5 * op.sigma_y / np.sqrt(n)


# --- Fixed per-example corruption --------------------------------------------


corrupt_jit = jax.jit(ops.corrupt, static_argnums=0)


@pytest.mark.parametrize("op", all_ops(), ids=OP_IDS)
def test_corrupt_depends_only_on_seed_and_index(op):
  x_all = uniform_images(jax.random.key(10), 10)

  def run(index, seed=0):
    index = jnp.asarray(index, jnp.int32)
    return corrupt_jit(op, x_all[index], index, seed)

  a, b = run([3, 7]), run([7, 1, 3])
  assert a["y"].shape == (2, *SHAPE)
  assert set(a) == {"y"} | set(op.sample_omega(jax.random.key(0), SHAPE))
  for key in a:
    np.testing.assert_array_equal(a[key][0], b[key][2])  # index 3
    np.testing.assert_array_equal(a[key][1], b[key][0])  # index 7
  # The draw is the documented one: omega from the first half of fold_in(key(seed), i).
  k_omega, _ = jax.random.split(jax.random.fold_in(jax.random.key(0), 3))
  for key, leaf in op.sample_omega(k_omega, SHAPE).items():
    np.testing.assert_array_equal(a[key][0], leaf)
  # Same image under another index or seed gets another corruption.
  same_x = jnp.stack([x_all[3], x_all[3]])
  c = corrupt_jit(op, same_x, jnp.array([3, 4], jnp.int32), 0)
  d = corrupt_jit(op, same_x, jnp.array([3, 3], jnp.int32), 1)
  np.testing.assert_array_equal(c["y"][0], a["y"][0])
  assert not np.array_equal(c["y"][0], c["y"][1])
  assert not np.array_equal(d["y"][0], a["y"][0])
  np.testing.assert_array_equal(d["y"][0], d["y"][1])


def test_corrupt_independent_of_device_count():
  op = ops.RandomInpaint(0.1)
  x = uniform_images(jax.random.key(11), 8)
  index = jnp.arange(100, 108, dtype=jnp.int32)
  single = corrupt_jit(op, x, index, 5)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = corrupt_jit(op, jax.device_put(x, shard), jax.device_put(index, shard), 5)
  assert len(sharded["y"].sharding.device_set) == 4
  for key in single:
    np.testing.assert_array_equal(single[key], sharded[key])


# --- Factory -----------------------------------------------------------------


def operator_config(name):
  return ml_collections.ConfigDict(dict(
      name=name, sigma_y=0.2, kernel_size=7, kernel_std=1.0, pinv_reg=1e-2,
      drop_prob=0.3, box_size=4))


def test_make_operator_builds_every_operator():
  built = {name: ops.make_operator(operator_config(name)) for name in ops.OPERATORS}
  assert built["denoise"] == ops.Denoise(0.2)
  assert built["blur"] == ops.GaussianBlur(0.2, kernel_size=7, kernel_std=1.0, pinv_reg=1e-2)
  assert built["inpaint_random"] == ops.RandomInpaint(0.2, drop_prob=0.3)
  assert built["inpaint_box"] == ops.BoxInpaint(0.2, box_size=4)
  for name, op in built.items():
    assert op.name == name
    hash(op)  # usable as a static jit argument
  assert dataclasses.replace(built["blur"], pinv_reg=1e-3).pinv_reg == 1e-3


def test_make_operator_rejects_unknown_name():
  with pytest.raises(ValueError, match="operator.name") as err:
    ops.make_operator(operator_config("deblur"))
  for name in ops.OPERATORS:
    assert name in str(err.value)
