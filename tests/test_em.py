"""The EM method (flowdiff_jax/methods/em.py): laps, resume inside a lap and inside an
E-step, and one lap on the Gaussian oracle.

MMPS's exactness on Gaussian priors is checked with the other solvers in
tests/test_inverse.py.
"""

import os
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdiff_jax import export, inverse, operators, oracle, runs, step as step_lib, train
from flowdiff_jax.configs import default, tiny
from flowdiff_jax.methods import em
from flowdiff_jax.models import gaussian


def _tiny_em(steps=7, **em_fields):
  config = tiny.get_config()
  config.method = "em"
  config.data.fmnist_idx_dir = ""  # the (mocked) tfds source
  config.data.max_train_examples = 32
  config.gaussian_em.update(rank=0, num_iters=2, init_var=0.1)
  config.em.update(steps_per_lap=3, num_observations=12, batch_size=8, num_steps=2,
                   cg_iters=1, **em_fields)
  config.training.update(num_train_steps=steps, checkpoint_every_steps=100,
                         eval_every_steps=0, sample_every_steps=0)
  return config


def _arrays(state):
  return jax.device_get((state.step, state.params, state.ema_params, state.opt_state))


def _assert_same(got, want):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          strict=True):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))


def _lap_files(workdir):
  root = os.path.join(workdir, "em")
  return {lap: sorted(os.listdir(os.path.join(root, lap))) for lap in sorted(os.listdir(root))}


@pytest.mark.slow
def test_em_resumes_bit_identically_inside_an_e_step_and_inside_a_lap(
    tmp_path, mock_fashion_mnist, monkeypatch):
  """Uninterrupted: laps 0 (Gaussian-EM warm start), 1 and 2 (MMPS) of 3 M-steps. Interrupted:
  a real SIGTERM after the first chunk of lap 1's E-step, a resume that stops at step 4
  (inside lap 1's M-step), a resume to the end: the same arrays and the same samples."""
  ref = train.train_and_evaluate(_tiny_em(), str(tmp_path / "ref"))
  assert int(ref.step) == 7
  assert set(ref.params) == {"score", "gaussian_em"}
  # 12 observations in chunks of 8: two files per lap.
  want_files = ["chunk_00000.npy", "chunk_00001.npy"]
  assert _lap_files(str(tmp_path / "ref")) == {f"lap_0000{k}": want_files for k in range(3)}
  lap1 = np.load(tmp_path / "ref" / "em" / "lap_00001" / "chunk_00000.npy")
  assert lap1.shape == (8, 28, 28, 1) and np.all(np.isfinite(lap1))

  # SIGTERM during lap 1's first chunk: the loop stops after that chunk.
  chunk_samples = em.Laps._chunk_samples

  def interrupting(self, state, lap, chunk):
    if lap == 1 and chunk == 0:
      os.kill(os.getpid(), signal.SIGTERM)
    return chunk_samples(self, state, lap, chunk)

  run = str(tmp_path / "run")
  monkeypatch.setattr(em.Laps, "_chunk_samples", interrupting)
  with pytest.raises(train.Preempted, match="during the E-step at step 3"):
    train.train_and_evaluate(_tiny_em(), run)
  monkeypatch.setattr(em.Laps, "_chunk_samples", chunk_samples)
  assert _lap_files(run) == {"lap_00000": want_files, "lap_00001": want_files[:1]}
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0", "3"]

  # Resume: the missing chunk of lap 1, then one M-step (stop at step 4, inside the lap).
  train.train_and_evaluate(_tiny_em(steps=4), run)
  np.testing.assert_array_equal(np.load(os.path.join(run, "em", "lap_00001", "chunk_00000.npy")),
                                lap1)
  # Resume inside lap 1: its samples are read back, not drawn again.
  drawn = []
  monkeypatch.setattr(em.Laps, "_chunk_samples",
                      lambda self, *a: drawn.append(a[1:]) or chunk_samples(self, *a))
  state = train.train_and_evaluate(_tiny_em(), run)
  assert drawn == [(2, 0), (2, 1)]  # only lap 2's chunks
  _assert_same(_arrays(state), _arrays(ref))
  for lap in range(3):
    for name in want_files:
      np.testing.assert_array_equal(np.load(os.path.join(run, "em", f"lap_0000{lap}", name)),
                                    np.load(tmp_path / "ref" / "em" / f"lap_0000{lap}" / name))
  # The tools load the run (its fitted Gaussian included) and its prior.
  _, loaded = runs.load_run(run)
  _assert_same(_arrays(loaded), _arrays(ref))
  runs.load_prior(run)


@pytest.mark.slow
def test_em_lap_without_its_samples_is_refused(tmp_path, mock_fashion_mnist):
  run = str(tmp_path / "run")
  train.train_and_evaluate(_tiny_em(steps=4, warm_start="pinv"), run)
  for name in os.listdir(os.path.join(run, "em", "lap_00001")):
    os.remove(os.path.join(run, "em", "lap_00001", name))
  with pytest.raises(FileNotFoundError, match="inside lap 1 .* not all in"):
    train.train_and_evaluate(_tiny_em(warm_start="pinv"), run)


def _oracle_config(operator="denoise"):
  config = default.get_config()
  config.method = "em"
  config.model.name = "gaussian"
  config.operator.update(name=operator, sigma_y=0.2, drop_prob=0.5)
  config.optim.update(learning_rate=3e-3, warmup_steps=100, grad_clip_norm=0.0, ema_decay=0.9)
  config.training.batch_size = 64
  config.em.update(e_step="mmps", num_steps=64, cg_iters=16, clip=False, sample_with="params",
                   warm_start="pinv")
  return config


def test_one_mmps_lap_moves_the_gaussian_prior_towards_sigma():
  """The exact Gaussian ε-network trained by DSM on A⁺y of denoising data learns
  Σ + σ_y² I (`naive`'s bias); one EM lap (an MMPS E-step under that prior, 1500
  DSM steps on its samples) moves the learned covariance towards the true Σ.

  Measured ‖Σ̂ − Σ‖_F/‖Σ‖_F: 0.278 before the lap, 0.176 after it. An E-step that
  ignored y (samples of the prior itself) would leave Σ̂ where it was.
  """
  config = _oracle_config()
  mu, sigma = oracle.gaussian_problem(4)
  _, data = oracle.corrupted_data(config, mu, sigma, 2048)
  obj = step_lib.make_objective(config, 1)
  step_fn = jax.jit(step_lib.train_step)
  rng = np.random.default_rng(0)

  def m_step(state, images, steps):
    for _ in range(steps):
      batch = {em.SAMPLES_KEY: images[rng.integers(0, len(images), 64)]}
      state, _ = step_fn(state, batch, jax.random.key(1))
    return state

  def error(state):
    _, cov = gaussian.mean_and_covariance(state.params["score"])
    return oracle.relative_error(np.asarray(cov, np.float64), sigma)

  state = step_lib.create_train_state(config, jax.random.key(0), {"y": data["y"][:8],
                                                                 "omega": {}})
  state = m_step(state, data["y"], 1500)  # lap 0: the `naive` warm start (A⁺y = y)
  before = error(state)
  keys = em.lap_keys(0, 1, jnp.arange(2048))
  samples = jax.jit(lambda p, y, k: em.e_step(em.make_solver(config), obj, p, y, {}, k))(
      state.params["score"], data["y"], keys)
  after = error(m_step(state, samples, 1500))
  print(f"covariance error before {before:.3f}, after {after:.3f}")
  assert before > 0.2, before  # the bias σ_y² I is there to remove
  assert after < 0.75 * before, (before, after)


@pytest.mark.slow
def test_a_learned_prior_restores_new_measurements_of_another_operator(tmp_path):
  """A prior trained on noisy measurement files (no clean images anywhere) restores new
  measurements of another operator and σ_y (blurred, σ_y 0.05) with MMPS, written as
  export writes them; PSNR only with a reference. The flow-only paths refuse clearly."""

  rng = np.random.default_rng(0)
  clean = rng.uniform(0.2, 0.8, (16, 28, 28, 1)).astype(np.float32)  # the file units (0, 1)
  np.savez(tmp_path / "noisy.npz", y=clean + 0.1 * rng.standard_normal(clean.shape))
  config = tiny.get_config()
  config.method = "naive"
  config.data.update(dataset="npz", path=str(tmp_path / "noisy.npz"), num_eval_examples=8)
  config.training.update(num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=0,
                         sample_every_steps=0)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)

  blur = {"name": "blur", "sigma_y": 0.05, "kernel_size": 5, "kernel_std": 1.0}
  op = operators.make_operator(blur)
  x = jnp.asarray(2 * clean[:6] - 1)
  y = op.apply(x, {}) + 0.05 * jax.random.normal(jax.random.key(3), x.shape)
  np.savez(tmp_path / "blurred.npz", y=np.asarray((y + 1) / 2))
  np.savez(tmp_path / "reference.npz", x=clean[:6])
  out = str(tmp_path / "restored")
  summary = export.export(workdir, out, num_samples=2, save_samples=1, batch_size=4,
                          data_path=str(tmp_path / "blurred.npz"), sampler="mmps",
                          solver_steps=3, operator=blur, reference_path=str(tmp_path /
                                                                            "reference.npz"))
  assert summary["operator"] == "blur" and summary["sigma_y"] == 0.05
  assert summary["solver"]["name"] == "mmps" and summary["num_measurements"] == 6
  assert np.isfinite(summary["residual_ratio"]) and "psnr_posterior_mean" in summary
  arrays = np.load(os.path.join(out, "blurred_restored.npz"))
  assert arrays["mean"].shape == (6, 28, 28, 1) and arrays["samples"].shape == (6, 1, 28, 28, 1)
  # The samples do not depend on the batching (per-measurement keys).
  again = export.export(workdir, str(tmp_path / "again"), num_samples=2, save_samples=1,
                        batch_size=2, data_path=str(tmp_path / "blurred.npz"), sampler="mmps",
                        solver_steps=3, operator=blur)
  np.testing.assert_allclose(np.load(str(tmp_path / "again" / "blurred_restored.npz"))["mean"],
                             arrays["mean"], atol=1e-5)
  assert "psnr_posterior_mean" not in again
  with pytest.raises(ValueError, match="learns a prior only.*--sampler="):
    export.export(workdir, out, data_path=str(tmp_path / "blurred.npz"))
  with pytest.raises(ValueError, match="unknown fields"):
    export.export(workdir, out, data_path=str(tmp_path / "blurred.npz"), sampler="mmps",
                  operator={"nam": "blur"})
  with pytest.raises(ValueError, match="pass them as --data_path"):
    inverse.run(workdir, "denoise")
  # The command line's form: `inverse --data_path ... --solvers=mmps --operator=...`.
  flags = types.SimpleNamespace(
      workdir=workdir, output_dir=str(tmp_path / "cli"), solvers=["mmps"], num_samples=2,
      save_samples=0, batch_size=4, data_path=str(tmp_path / "blurred.npz"), mask_dir=None,
      reference_path=None, seed=0, dps_steps=3, pigdm_steps=3, mmps_steps=3, mmps_cg_iters=1,
      dps_zeta=None, eta=1.0, operator=[f"{k}={v}" for k, v in blur.items()])
  inverse.restore_measurements(flags)
  cli = np.load(str(tmp_path / "cli" / "mmps" / "blurred_restored.npz"))
  np.testing.assert_allclose(cli["mean"], arrays["mean"], atol=1e-5)
