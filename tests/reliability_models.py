"""A user's model and data for the reliability tests ("tests.reliability_models:...").

Written the way users write them: an NNX MLP with ``nnx.Rngs`` and Dropout,
a loss reading its batch by key, a dataset that slices its global batch by
process. The data can misbehave on purpose, as real input pipelines do:
block for good at a batch on one process (a stuck file system, a dead
worker), or hand the loss a batch without the key it reads.
"""

from __future__ import annotations

import threading
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from adamw_flax import config as config_lib
from adamw_flax.registry import register_dataset, register_model


def classify_loss(model, batch, *, train, rngs=None):
  logits = model(batch["features"], rngs=rngs, train=train)
  labels = batch["label"]
  loss = -jnp.mean(jnp.take_along_axis(nnx.log_softmax(logits), labels[:, None], axis=-1))
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


@register_model("classifier", loss=classify_loss)
class Classifier(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    width = cfg.get("width", 32)
    self.hidden = nnx.Linear(data_info["features"], width, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.get("dropout", 0.1))
    self.out = nnx.Linear(width, data_info["classes"], rngs=rngs)

  def __call__(self, x, *, rngs=None, train=True):
    h = nnx.relu(self.hidden(x))
    return self.out(self.dropout(h, rngs=rngs, deterministic=not train))


class Blobs:
  """Gaussian blobs, one per class; batch ``position`` is a pure function of (seed, position)."""

  def __init__(self, cfg, *, seed, process_index, process_count):
    self.features, self.classes = 8, 4
    self.global_batch_size = cfg.batch_size
    self.info = {"features": self.features, "classes": self.classes}
    self.seed = seed
    self.process_index = process_index
    per = cfg.batch_size // process_count
    self.rows = slice(process_index * per, (process_index + 1) * per)
    self.block_at = cfg.get("block_at", -1)  # this batch never comes ...
    self.block_process = cfg.get("block_process", 0)  # ... on this process
    self.slow_s = cfg.get("slow_s", 0.0)  # seconds each batch takes to load
    self.label_key = cfg.get("label_key", "label")  # "lbl": the loss's batch["label"] fails
    self.eval_slow_s = cfg.get("eval_slow_s", 0.0)  # seconds each validation batch takes
    self.nan_from = cfg.get("nan_from", -1)  # train batches from this one hold a NaN
    self.centers = np.random.default_rng(7).normal(size=(self.classes, self.features)) * 3

  def _batch(self, key):
    rng = np.random.default_rng(key)
    label = rng.integers(0, self.classes, self.global_batch_size)
    x = self.centers[label] + rng.normal(size=(self.global_batch_size, self.features))
    return {"features": x[self.rows].astype(np.float32), self.label_key: label[self.rows]}

  def train_batch(self, position):
    if position == self.block_at and self.process_index == self.block_process:
      threading.Event().wait()  # blocks for good, as a hung read would
    if self.slow_s:
      time.sleep(self.slow_s)
    batch = self._batch((self.seed, position))
    if 0 <= self.nan_from <= position:
      batch["features"][0, 0] = np.nan
    return batch

  def eval_batches(self, num):
    for i in range(num):
      if self.eval_slow_s:
        time.sleep(self.eval_slow_s)
      yield self._batch((self.seed, 1 << 30, i))


register_dataset("blobs")(Blobs)


def config(**overrides):
  """The launch config of these tests: the classifier on blobs, checkpoints every 10 steps."""
  cfg = config_lib.default_config()
  cfg.model.name = "tests.reliability_models:classifier"
  cfg.model.width = 32
  cfg.model.dropout = 0.1
  cfg.data.name = "tests.reliability_models:blobs"
  cfg.data.batch_size = 16
  cfg.data.block_at = -1
  cfg.data.block_process = 0
  cfg.data.slow_s = 0.0
  cfg.data.eval_slow_s = 0.0
  cfg.data.nan_from = -1
  cfg.data.label_key = "label"
  cfg.optimizer.learning_rate = 3e-3
  cfg.trainer.num_steps = 40
  cfg.trainer.log_every = 5
  cfg.trainer.eval_every = 20
  cfg.trainer.eval_batches = 4
  cfg.trainer.progress = False
  cfg.checkpoint.every_steps = 10
  for key, value in overrides.items():
    section, name = key.split("__")
    cfg[section][name] = value
  return cfg
