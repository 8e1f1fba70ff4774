"""A tiny model and dataset registered for the trainer tests ("tests.trainer_models:...")."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from adamw_flax.registry import register_dataset, register_model


def mse_loss(model, batch, *, train):
  del train
  pred = model(batch["x"])
  return jnp.mean((pred - batch["y"]) ** 2), {}


@register_model("regressor", loss=mse_loss)
class Regressor(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    width = cfg.get("width", 16)
    self.hidden = nnx.Linear(data_info["features"], width, rngs=rngs)
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.out = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.gelu(self.norm(self.hidden(x))))[:, 0]


class RegressionData:
  """y = x @ w_true + noise; batch ``step`` is a pure function of (seed, step)."""

  def __init__(self, cfg, *, seed, process_index, process_count):
    self.features = cfg.get("features", 4)
    self.global_batch_size = cfg.batch_size
    self.tokens_per_example = 1
    self.nan_from_step = cfg.get("nan_from_step", -1)
    self.nan_at = set(cfg.get("nan_at", ()))  # batch positions whose inputs are NaN
    self.spike_at = set(cfg.get("spike_at", ()))  # batch positions with 1000x targets
    self.rise_from = cfg.get("rise_from", -1)  # from this position on, targets 30x (for good)
    self.info = {"features": self.features}
    self.seed = seed
    self.rows = slice(
      process_index * cfg.batch_size // process_count,
      (process_index + 1) * cfg.batch_size // process_count,
    )
    self.w = np.random.default_rng(12345).normal(size=self.features).astype(np.float32)

  def _batch(self, key):
    rng = np.random.default_rng(key)
    x = rng.normal(size=(self.global_batch_size, self.features)).astype(np.float32)
    y = (x @ self.w + 0.01 * rng.normal(size=self.global_batch_size)).astype(np.float32)
    return {"x": x[self.rows], "y": y[self.rows]}

  def train_batch(self, step):
    batch = self._batch((self.seed, step))
    if 0 <= self.nan_from_step <= step or step in self.nan_at:
      batch["x"] = np.full_like(batch["x"], np.nan)
    if step in self.spike_at:
      batch["y"] = batch["y"] * 1000
    if 0 <= self.rise_from <= step:  # a lasting change of the data, like a new mixture
      batch["y"] = batch["y"] * 30
    return batch

  def eval_batches(self, num):
    return [self._batch((self.seed, 1 << 30, i)) for i in range(num)]


register_dataset("trainer_regression")(RegressionData)
