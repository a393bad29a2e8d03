"""Workdirs on a bucket (issue 20): a gs:// run trains, is killed, resumes, is evaluated and
exported, offline, on an in-memory stand-in for Cloud Storage.

The stand-in is gcp-storage-emulator's in-memory server, started in this test
process; the programs reach it as they would reach Cloud Storage, through its
JSON API: epath through gcsfs (STORAGE_EMULATOR_HOST; EPATH_USE_TF=false, as
TensorFlow's GCS client has no endpoint setting) and orbax's arrays through
tensorstore's own GCS driver (TENSORSTORE_GCS_HTTP_URL). TensorBoard files go
through TensorFlow, so these runs log to the console only
(training.tensorboard=False). Every program runs in an empty local folder that
must stay empty: a path handled as a local one (os.makedirs("gs://b/run")
makes ./gs:/b/run) shows up there. Only the persistent compilation cache (in
the repository's .pytest_cache) is written locally.
"""

import json
import os
import signal
import socket
import sys

from etils import epath
import numpy as np
import pytest

from runs_testing import REPO, Run, arrays, assert_same_arrays, run_env, steps

pytestmark = pytest.mark.slow  # three trainings, an evaluation and an export

BUCKET = "flowdiff-test"
STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _with_generation_headers(server_module, objects):
  """Media downloads also carry x-goog-generation, as Cloud Storage's do.

  tensorstore reads an object's generation from that header (to condition its
  next write on it); the emulator sends it only in the JSON metadata. Returns
  a function that puts the emulator's own handlers back.
  """
  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    except Exception:  # noqa: BLE001 (a missing object: download answers 404 itself)
      pass
    return objects.download(request, response, storage, *args, **kwargs)

  def get(request, response, storage, *args, **kwargs):
    if request.query.get("alt") == ["media"]:
      return download(request, response, storage, *args, **kwargs)
    return objects.get(request, response, storage, *args, **kwargs)

  replaced = []
  for _, handlers in server_module.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler in (objects.download, objects.get):
        replaced.append((handlers, method, handler))
        handlers[method] = download if handler is objects.download else get

  def restore():
    for handlers, method, handler in replaced:
      handlers[method] = handler
  return restore


@pytest.fixture(scope="module")
def gcs_env():
  """The stand-in's environment variables; set in this process too while the module runs."""
  from gcp_storage_emulator import server as server_module
  from gcp_storage_emulator.handlers import objects
  from gcp_storage_emulator.server import create_server

  restore_handlers = _with_generation_headers(server_module, objects)
  port = _free_port()
  server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://localhost:{port}"
  # gcsfs caches listings; objects that tensorstore or another process wrote
  # would then stay invisible to it.
  no_cache = json.dumps({"use_listings_cache": False})
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "offline", "EPATH_USE_TF": "false",
         "FSSPEC_GS": no_cache, "FSSPEC_GCS": no_cache}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec.config  # read its environment at import: maybe before this fixture

  fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False
  # epath decides once per process whether TensorFlow serves gs:// (cached at
  # its first use of any path, maybe by an earlier test): decide again.
  from etils.epath import gpath

  gpath._is_tf_installed.cache_clear()
  yield env
  fsspec.config.conf["gs"].pop("use_listings_cache")
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  gpath._is_tf_installed.cache_clear()
  server.stop()
  restore_handlers()


def _train_flags(workdir: str, idx_dir: str) -> list[str]:
  fields = {
      "method": "flowdiff", "training.num_train_steps": STEPS, "training.batch_size": 8,
      "data.max_train_examples": 64, "data.fmnist_idx_dir": idx_dir, "data.read_threads": 1,
      "training.log_every_steps": 1, "training.checkpoint_every_steps": 1000,
      "training.eval_every_steps": 0, "training.sample_every_steps": STEPS,
      "training.tensorboard": False, "eval.nll_time_samples": 1,
      "model.channel_mult": "(1,)", "model.attn_resolutions": "()", "flow.num_levels": 1}
  return ([f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in fields.items()])


def test_a_gs_workdir_trains_resumes_bit_identical_evaluates_and_exports(
    gcs_env, fmnist_idx_dir, tmp_path):
  cwd, logs = tmp_path / "cwd", tmp_path / "logs"
  cwd.mkdir()
  logs.mkdir()
  env = run_env(**gcs_env)
  ref, work = f"gs://{BUCKET}/reference", f"gs://{BUCKET}/runs/flowdiff"

  def start(args, workdir, cmd=None):
    return Run(args, workdir, cmd=cmd, env=env, cwd=str(cwd), log_dir=logs)

  reference = start(_train_flags(ref, fmnist_idx_dir), ref)
  stop = start(_train_flags(work, fmnist_idx_dir), work).kill_after(2, signal.SIGTERM)
  assert steps(work) == [stop]
  log = start(_train_flags(work, fmnist_idx_dir), work).wait()
  assert f"Resumed from step {stop} " in log
  reference.wait()
  assert steps(ref) == [STEPS]
  assert_same_arrays(arrays(work), arrays(ref))
  # The sample grid, written by the training program through epath.
  assert (epath.Path(work) / "samples" / f"step_{STEPS:07d}.png").exists()

  evaluate = start(None, work, cmd=[
      sys.executable, "-m", "flowdiff_jax.evaluate", f"--workdir={work}", "--num_samples=8",
      "--batch_size=8", "--num_reference=8", "--num_posterior_images=8",
      "--posterior_samples=2", "--posterior_batch_size=8", "--kid_subsets=1",
      "--kid_subset_size=4", "--sample_steps=2", "--nocurves"])
  evaluate.wait()
  metrics = json.loads((epath.Path(work) / "eval" / "metrics.json").read_text())
  assert metrics["run"]["step"] == STEPS and "posterior" in metrics

  # Measurements on the bucket too: 4 noisy 28x28 images in [0, 1].
  rng = np.random.default_rng(0)
  y = np.clip(rng.uniform(0.2, 0.8, (4, 28, 28)) + 0.1 * rng.normal(size=(4, 28, 28)), 0, 1)
  data_path = epath.Path(f"gs://{BUCKET}/measurements/noisy.npz")
  with data_path.open("wb") as f:
    np.savez(f, y=y.astype(np.float32))
  export = start(None, work, cmd=[
      sys.executable, "-m", "flowdiff_jax.export", f"--workdir={work}",
      f"--data_path={data_path}", "--num_samples=2", "--batch_size=4"])
  export.wait()
  restored = epath.Path(work) / "restored"
  summary = json.loads((restored / "export.json").read_text())
  assert summary["num_measurements"] == 4 and np.isfinite(summary["residual_ratio"])
  with (restored / "noisy_restored.npz").open("rb") as f:
    assert np.load(f)["mean"].shape == (4, 28, 28, 1)

  # Nothing reached the local disk: not the working folder, not the repository.
  assert os.listdir(cwd) == []
  assert not os.path.exists(os.path.join(REPO, "gs:"))
