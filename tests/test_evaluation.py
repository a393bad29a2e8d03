"""Evaluation metrics against known values: PSNR, SSIM, Fréchet distance, KID, pixel moments.

Each test is built to fail for a plausible wrong implementation: SSIM with a
box window or sample variances (scikit-image's reference values), a Fréchet
distance whose matrix square root assumes commuting covariances (a
non-commuting closed form), a KID that keeps the kernel diagonal (the exact
MMD² of discrete distributions, which the biased V-statistic misses).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from flowdiff_jax import evaluation


def _smooth_images(rng, shape):
  """Images [B, H, W, C] in [-1, 1] with structure at several scales (not white noise)."""
  b, h, w, c = shape
  coarse = rng.uniform(-1, 1, (b, h // 4 + 1, w // 4 + 1, c))
  up = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :h, :w]
  return np.clip(up + 0.3 * rng.normal(size=shape), -1, 1).astype(np.float32)


# --------------------------------------------------------------------------
# PSNR and SSIM.
# --------------------------------------------------------------------------


def test_psnr_known_values():
  ref = np.zeros((3, 8, 8, 1), np.float32)
  offsets = np.array([0.02, 0.2, 2.0], np.float32)
  x = ref + offsets[:, None, None, None]
  # MSE = c², peak-to-peak 2 on [-1, 1]: 10 log10(4 / c²) = 40, 20, 0 dB.
  np.testing.assert_allclose(evaluation.psnr(x, ref), [40.0, 20.0, 0.0], atol=1e-4)


def test_psnr_matches_scikit_image():
  rng = np.random.default_rng(0)
  ref = _smooth_images(rng, (4, 16, 16, 3))
  x = np.clip(ref + 0.1 * rng.normal(size=ref.shape), -1, 1).astype(np.float32)
  want = [peak_signal_noise_ratio(r, a, data_range=2.0) for r, a in zip(ref, x)]
  np.testing.assert_allclose(evaluation.psnr(x, ref), want, rtol=1e-5)


def test_ssim_matches_scikit_image_gaussian_window():
  rng = np.random.default_rng(1)
  ref = _smooth_images(rng, (3, 28, 28, 3))
  noise = np.array([0.1, 0.5, 0.0])[:, None, None, None] * rng.normal(size=ref.shape)
  x = np.clip(ref + noise, -1, 1).astype(np.float32)
  x[2] = _smooth_images(rng, (1, 28, 28, 3))[0]  # an unrelated image too (SSIM near 0)
  want = [structural_similarity(r, a, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=2.0, channel_axis=-1)
          for r, a in zip(ref, x)]
  got = np.asarray(evaluation.ssim(jnp.asarray(x), jnp.asarray(ref)))
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert abs(got[2]) < 0.2 < got[1] < got[0] < 1


def test_ssim_known_values():
  ones = np.ones((1, 16, 16, 1), np.float32)
  np.testing.assert_allclose(evaluation.ssim(0.3 * ones, 0.3 * ones), [1.0], atol=1e-6)
  # Constant images a and b: variances and covariance vanish, so SSIM is the
  # luminance term (2ab + C1) / (a² + b² + C1), C1 = (0.01 * 2)².
  a, b, c1 = 0.5, -0.2, (0.01 * 2.0) ** 2
  np.testing.assert_allclose(evaluation.ssim(a * ones, b * ones),
                             [(2 * a * b + c1) / (a * a + b * b + c1)], rtol=1e-4)
  with pytest.raises(ValueError, match="at least 11x11"):
    evaluation.ssim(ones[:, :8, :8], ones[:, :8, :8])


# --------------------------------------------------------------------------
# Fréchet distance.
# --------------------------------------------------------------------------


def _random_spd(rng, d, scale=1.0):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_frechet_distance_one_dimension():
  # W2² between N(m1, s1²) and N(m2, s2²) is (m1 − m2)² + (s1 − s2)².
  got = evaluation.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-0.5]),
                                    np.array([[0.25]]))
  assert got == pytest.approx(1.5 ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_frechet_distance_commuting_covariances():
  # Σ1 = R diag(a) Rᵀ, Σ2 = R diag(b) Rᵀ commute: d² = ‖Δμ‖² + Σ (√a − √b)².
  rng = np.random.default_rng(0)
  d = 50
  rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  got = evaluation.frechet_distance(mu1, rot @ np.diag(a) @ rot.T, mu2, rot @ np.diag(b) @ rot.T)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_non_commuting_covariances():
  # For 2x2 PSD M, tr √M = sqrt(tr M + 2 sqrt(det M)); with M = Σ1 Σ2 (same
  # eigenvalues as the symmetric Σ1^½ Σ2 Σ1^½) this is the closed form.
  s1 = np.array([[4.0, 1.9], [1.9, 1.0]])
  s2 = np.array([[1.0, -0.8], [-0.8, 1.0]])
  mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
  m = s1 @ s2
  tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  got = evaluation.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(want, rel=1e-12)
  # A shortcut valid only for commuting matrices, tr(Σ1^½ Σ2^½), differs here:
  # this test would catch it.
  root = lambda a: evaluation._sqrt_psd(a)
  shortcut = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(root(s1) @ root(s2)))
  assert abs(shortcut - want) > 0.1


def test_frechet_distance_properties():
  rng = np.random.default_rng(1)
  d = 64
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d, 2.0)
  assert evaluation.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
  assert (evaluation.frechet_distance(mu1, s1, mu2, s2)
          == pytest.approx(evaluation.frechet_distance(mu2, s2, mu1, s1), rel=1e-9))
  # Singular covariances (fewer features than dimensions, as with few samples)
  # stay finite and non-negative.
  f1, f2 = rng.normal(size=(20, d)), rng.normal(size=(20, d)) + 0.5
  value = evaluation.frechet_distance_of_features(f1, f2)
  assert np.isfinite(value) and value > 0
  with pytest.raises(ValueError, match="Shapes do not match"):
    evaluation.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_frechet_distance_of_samples_converges_to_the_closed_form():
  """FD between features drawn from two known Gaussians approaches their exact distance."""
  rng = np.random.default_rng(2)
  d, n = 8, 200_000
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d, 0.5)
  exact = evaluation.frechet_distance(mu1, s1, mu2, s2)
  f1 = rng.multivariate_normal(mu1, s1, size=n)
  f2 = rng.multivariate_normal(mu2, s2, size=n)
  assert evaluation.frechet_distance_of_features(f1, f2) == pytest.approx(exact, rel=0.01)
  mean, cov = evaluation.feature_statistics(f1)
  np.testing.assert_allclose(cov, np.cov(f1, rowvar=False))
  np.testing.assert_allclose(mean, f1.mean(0))


# --------------------------------------------------------------------------
# KID.
# --------------------------------------------------------------------------


def test_polynomial_kernel_definition():
  x, y = np.array([[1.0, 2.0], [0.0, -1.0]]), np.array([[3.0, 1.0]])
  np.testing.assert_allclose(evaluation.polynomial_kernel(x, y),
                             [[(5.0 / 2 + 1) ** 3], [(-1.0 / 2 + 1) ** 3]])


def _exact_mmd2(a, b):
  """MMD² of the uniform distributions on the rows of a and of b (independent draws)."""
  k = evaluation.polynomial_kernel
  return k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()


def _biased_mmd2(x, y):
  k = evaluation.polynomial_kernel
  return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def test_mmd2_estimator_is_unbiased_for_a_known_mmd():
  """The estimator's mean over many draws matches the exact MMD² of two discrete distributions."""
  rng = np.random.default_rng(3)
  d = 4
  support_p = rng.normal(size=(6, d))
  support_q = rng.normal(size=(6, d)) * 1.3 + 0.4
  exact = _exact_mmd2(support_p, support_q)
  m, draws = 8, 4000
  unbiased, biased = [], []
  for _ in range(draws):
    x = support_p[rng.integers(0, 6, m)]
    y = support_q[rng.integers(0, 6, m)]
    unbiased.append(evaluation.mmd2_unbiased(x, y))
    biased.append(_biased_mmd2(x, y))
  sem = np.std(unbiased) / np.sqrt(draws)
  assert abs(np.mean(unbiased) - exact) < 4 * sem
  # The V-statistic (kernel diagonal kept) is off by many standard errors:
  # the test can tell the two apart.
  assert abs(np.mean(biased) - exact) > 10 * sem


def test_mmd2_of_identical_distributions_is_zero_on_average():
  rng = np.random.default_rng(4)
  estimates = [evaluation.mmd2_unbiased(rng.normal(size=(16, 8)), rng.normal(size=(16, 8)))
               for _ in range(2000)]
  sem = np.std(estimates) / np.sqrt(len(estimates))
  assert abs(np.mean(estimates)) < 4 * sem
  assert min(estimates) < 0  # unbiased: negative values happen


def test_kid_averages_subsets():
  rng = np.random.default_rng(5)
  f1 = rng.normal(size=(300, 16))
  f2 = rng.normal(size=(400, 16)) + 0.3
  mean, std = evaluation.kid(f1, f2, num_subsets=20, subset_size=100, seed=0)
  # The same subsets, drawn as kid draws them.
  subset_rng = np.random.default_rng(0)
  want = [evaluation.mmd2_unbiased(f1[subset_rng.choice(300, 100, replace=False)],
                                   f2[subset_rng.choice(400, 100, replace=False)])
          for _ in range(20)]
  assert mean == pytest.approx(np.mean(want)) and std == pytest.approx(np.std(want))
  # A shifted distribution is far; a subset size above N falls back to N.
  assert mean > 10 * std / np.sqrt(20)
  same, _ = evaluation.kid(f1[:150], f1[150:], num_subsets=5, subset_size=1000)
  assert abs(same) < mean / 10


# --------------------------------------------------------------------------
# Pixel moments, feature batching, quantization.
# --------------------------------------------------------------------------


def test_pixel_moments_stream_to_numpy_mean_and_covariance():
  rng = np.random.default_rng(6)
  images = rng.normal(size=(50, 4, 4, 2))
  moments = evaluation.PixelMoments()
  for chunk in np.split(images, [7, 30]):
    moments.add(chunk)
  flat = images.reshape(50, -1)
  np.testing.assert_allclose(moments.mean(), flat.mean(0))
  np.testing.assert_allclose(moments.covariance(), np.cov(flat, rowvar=False), atol=1e-12)
  pooled = evaluation.PixelMoments(pool=2)
  pooled.add(images)
  np.testing.assert_allclose(pooled.mean(),
                             images.reshape(50, 2, 2, 2, 2, 2).mean((2, 4)).reshape(50, -1).mean(0))
  assert evaluation.pixel_pool_for((64, 64, 3)) == 2  # 12288 -> 3072 dimensions
  assert evaluation.pixel_pool_for((32, 32, 3)) == 1


def test_pixel_moment_errors_known_values():
  rng = np.random.default_rng(7)
  ref_images = rng.normal(size=(400, 3, 3, 1))
  ref, shifted, scaled = (evaluation.PixelMoments() for _ in range(3))
  ref.add(ref_images)
  shifted.add(ref_images + 0.25)  # same covariance, mean off by 0.25 everywhere
  scaled.add(2.0 * ref_images)    # covariance 4x: relative error 3
  err = evaluation.pixel_moment_errors(shifted, ref)
  assert err["pixel_mean_rmse"] == pytest.approx(0.25)
  assert err["pixel_cov_rel_error"] == pytest.approx(0.0, abs=1e-12)
  assert evaluation.pixel_moment_errors(scaled, ref)["pixel_cov_rel_error"] == pytest.approx(3.0)


def test_extract_features_uses_fixed_batches():
  seen = []

  def feature_fn(x):
    seen.append(x.shape[0])
    return jnp.sum(x, axis=(1, 2, 3))[:, None] * jnp.array([[1.0, 2.0]])

  images = np.random.default_rng(8).normal(size=(10, 2, 2, 1)).astype(np.float32)
  got = evaluation.extract_features(feature_fn, images, batch_size=4)
  assert seen == [4, 4, 4]
  np.testing.assert_allclose(got[:, 1], 2 * images.sum((1, 2, 3)), rtol=1e-5)
  assert got.shape == (10, 2) and got.dtype == np.float64


def test_quantize_rounds_to_8_bit_levels():
  x = np.array([-1.5, -1.0, 0.0, 0.004, 1.0, 2.0], np.float32)
  q = evaluation.quantize(x)
  np.testing.assert_allclose((q + 1) * 127.5, np.round((q + 1) * 127.5), atol=1e-4)
  np.testing.assert_allclose(q[[0, 1, 4, 5]], [-1, -1, 1, 1])
  assert abs(q[2] - 0.0) <= 1 / 127.5 and np.all(np.abs(q[1:5] - x[1:5]) <= 0.5 / 127.5 + 1e-7)
  # What a uint8 image maps to survives exactly.
  u = np.arange(256, dtype=np.uint8)
  np.testing.assert_allclose(evaluation.quantize(u / 127.5 - 1.0), u / 127.5 - 1.0, atol=1e-7)


def test_jitted_metrics_run_under_jit():
  rng = np.random.default_rng(9)
  ref = jnp.asarray(_smooth_images(rng, (2, 16, 16, 1)))
  f = jax.jit(lambda a, b: (evaluation.psnr(a, b), evaluation.ssim(a, b)))
  p, s = f(ref + 0.1, ref)
  np.testing.assert_allclose(p, evaluation.psnr(ref + 0.1, ref), rtol=1e-5)
  assert s.shape == (2,)
