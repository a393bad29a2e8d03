r"""Trains the Fashion-MNIST classifier behind FD-FMNIST / KID-FMNIST and commits its weights.

Trains `flowdiff_jax.models.classifier.FMNISTClassifier` on the 60k *clean*
Fashion-MNIST training images (the Debian package's idx files, offline), then
reports its accuracy on the 10k test images and writes

  * the params to flowdiff_jax/models/weights/fmnist_classifier.msgpack
    (`classifier.DEFAULT_WEIGHTS`, what `flowdiff_jax.evaluate` loads), and
  * results.json beside this script (accuracy, loss, settings, wall time).

Run from the repository root (a few minutes on a 2-core CPU):

  python experiments/fmnist_classifier/train.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flowdiff_jax  # noqa: F401  (XLA workarounds before jax starts)
from flowdiff_jax.data import read_idx_images
from flowdiff_jax.models import classifier

HERE = os.path.dirname(os.path.abspath(__file__))


def load_split(idx_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, 28, 28, 1] in [-1, 1], labels int32 [N])."""
  prefix = "train" if split == "train" else "t10k"
  images = read_idx_images(os.path.join(idx_dir, f"{prefix}-images-idx3-ubyte.gz"))
  labels = classifier.read_idx_labels(os.path.join(idx_dir, f"{prefix}-labels-idx1-ubyte.gz"))
  return images.astype(np.float32) / 127.5 - 1.0, labels.astype(np.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--idx_dir", default="/usr/share/datasets/fashion-mnist")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--learning_rate", type=float, default=2e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=classifier.DEFAULT_WEIGHTS)
  parser.add_argument("--results", default=os.path.join(HERE, "results.json"))
  args = parser.parse_args()

  x_train, y_train = load_split(args.idx_dir, "train")
  x_test, y_test = load_split(args.idx_dir, "test")
  steps_per_epoch = len(x_train) // args.batch_size
  total_steps = args.epochs * steps_per_epoch
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, args.learning_rate, min(200, total_steps // 10), total_steps), weight_decay=1e-4)
  rng = jax.random.key(args.seed)
  params = classifier.init_params(rng)
  opt_state = tx.init(params)
  net = classifier.FMNISTClassifier()

  @jax.jit
  def train_step(params, opt_state, x, y, key):
    # Random horizontal flips: Fashion-MNIST classes are mirror-symmetric.
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)

    def loss_fn(p):
      logits, _ = net.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, x):
    return jnp.argmax(net.apply({"params": params}, x)[0], axis=-1)

  def accuracy(params, x, y, batch=1000):
    correct = sum(int(jnp.sum(predict(params, x[i:i + batch]) == y[i:i + batch]))
                  for i in range(0, len(x), batch))
    return correct / len(x)

  order_rng = np.random.default_rng(args.seed)
  start = time.time()
  for epoch in range(args.epochs):
    perm = order_rng.permutation(len(x_train))
    losses = []
    for i in range(steps_per_epoch):
      idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
      params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx],
                                           jax.random.fold_in(rng, epoch * steps_per_epoch + i))
      losses.append(loss)
    train_loss = float(jnp.mean(jnp.stack(losses)))
    print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, "
          f"test accuracy {accuracy(params, x_test, y_test):.4f}, "
          f"{time.time() - start:.0f} s", flush=True)
  wall = time.time() - start
  test_acc = accuracy(params, x_test, y_test)
  train_acc = accuracy(params, x_train, y_train)
  classifier.save_params(args.out, params)
  results = {
      "test_accuracy": test_acc, "train_accuracy": train_acc, "final_train_loss": train_loss,
      "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
      "seed": args.seed, "num_params": int(sum(a.size for a in jax.tree.leaves(params))),
      "weights_bytes": os.path.getsize(args.out), "train_wall_s": round(wall, 1),
      "jax": jax.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
      "date": datetime.date.today().isoformat()}
  with open(args.results, "w") as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
