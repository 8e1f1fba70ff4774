"""A small model and dataset for the sharding and multi-process tests.

Registered as ``"tests.sharding_models:sharded_mlp"`` (model) and
``"tests.sharding_models:regression"`` (dataset), so configs and
``python -m train`` (run from the repository root) find them by name.

The model is a two-layer MLP with an optional BatchNorm (state in the train
state's ``rest``) and optional NNX sharding annotations (Megatron style:
the first kernel's columns and the second kernel's rows over one axis). The
dataset is a noisy linear regression whose global batch ``step`` is a pure
function of ``(seed, step)``; each process gets its slice, so the global
batch is the same whatever the process count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from adamw_flax import registry

MODEL = "tests.sharding_models:sharded_mlp"
DATASET = "tests.sharding_models:regression"


class ShardedMLP(nnx.Module):
  """``Linear(in, hidden) -> [BatchNorm] -> relu -> Linear(hidden, out)``.

  The first Linear has a bias only without the BatchNorm.

  Args:
    in_dim, hidden, out_dim: layer widths.
    batch_norm: add a BatchNorm after the first layer.
    shard_axis: mesh axis name for the annotations, or "" for none.
    rngs: parameter RNGs.
  """

  def __init__(
    self,
    in_dim: int,
    hidden: int,
    out_dim: int,
    *,
    batch_norm: bool,
    shard_axis: str,
    rngs: nnx.Rngs,
  ):
    def init(base: Any, spec: tuple[Any, ...]) -> Any:
      return nnx.with_partitioning(base, spec) if shard_axis else base

    kernel = nnx.initializers.lecun_normal()
    # No bias before a BatchNorm: its gradient is zero up to rounding, which
    # Adam would scale up into noise-driven updates.
    self.l1 = nnx.Linear(
      in_dim,
      hidden,
      use_bias=not batch_norm,
      kernel_init=init(kernel, (None, shard_axis)),
      rngs=rngs,
    )
    self.bn = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs) if batch_norm else None
    self.l2 = nnx.Linear(hidden, out_dim, kernel_init=init(kernel, (shard_axis, None)), rngs=rngs)

  def __call__(self, x_BxI: jax.Array, *, train: bool) -> jax.Array:
    h_BxH = self.l1(x_BxI)
    if self.bn is not None:
      h_BxH = self.bn(h_BxH, use_running_average=not train)
    return self.l2(jax.nn.relu(h_BxH))


def mse_loss(
  model: ShardedMLP, batch: dict[str, jax.Array], *, train: bool
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean squared error of the model's prediction of ``batch["y"]`` from ``batch["x"]``."""
  pred = model(batch["x"], train=train)
  return jnp.mean(jnp.square(pred - batch["y"])), {}


def build_mlp(cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, data_info: dict[str, Any]):
  """Builds :class:`ShardedMLP` from ``config.model`` (``hidden``, ``batch_norm``, ``shard_axis``)."""
  # The annotations are applied by the train state's out_shardings; eager
  # sharding would need a mesh context while the model is being built.
  with nnx.use_eager_sharding(False):
    return ShardedMLP(
      int(data_info["in_dim"]),
      int(cfg.hidden),
      int(data_info["out_dim"]),
      batch_norm=bool(cfg.get("batch_norm", False)),
      shard_axis=str(cfg.get("shard_axis", "")),
      rngs=rngs,
    )


class RegressionData:
  """Noisy linear regression; ``train_batch(step)`` is this process's slice of global batch ``step``.

  Args:
    in_dim, out_dim: feature and target widths.
    batch_size: the global batch size.
    seed: fixes the true weights and every batch.
    process_index, process_count: which slice of each global batch to give.
  """

  def __init__(
    self,
    in_dim: int,
    out_dim: int,
    batch_size: int,
    *,
    seed: int,
    process_index: int,
    process_count: int,
  ):
    if batch_size % process_count:
      raise ValueError(
        f"data.batch_size={batch_size} must be divisible by the {process_count} data slices"
      )
    self.info = {"in_dim": in_dim, "out_dim": out_dim}
    self.global_batch_size = batch_size
    self.tokens_per_example = 1
    self._seed = seed
    self._rows = slice(
      process_index * batch_size // process_count,
      (process_index + 1) * batch_size // process_count,
    )
    self._w = np.random.default_rng([seed, 2**31 - 1]).normal(size=(in_dim, out_dim))

  def _batch(self, stream: int, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._seed, stream, index])
    x = rng.normal(size=(self.global_batch_size, self._w.shape[0]))
    y = x @ self._w + 0.1 * rng.normal(size=(self.global_batch_size, self._w.shape[1]))
    return {"x": x[self._rows].astype(np.float32), "y": y[self._rows].astype(np.float32)}

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self._batch(0, step)

  def eval_batches(self, num: int):
    return [self._batch(1, i) for i in range(num)]


def build_regression(
  cfg: ml_collections.ConfigDict, *, seed: int, process_index: int, process_count: int
) -> RegressionData:
  """Builds :class:`RegressionData` from ``config.data`` (``batch_size``, ``in_dim``, ``out_dim``)."""
  return RegressionData(
    int(cfg.get("in_dim", 16)),
    int(cfg.get("out_dim", 4)),
    int(cfg.batch_size),
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )


# Registered once even if this file is imported under two module names.
if "sharded_mlp" not in registry.MODELS.names():
  registry.register_model("sharded_mlp", loss=mse_loss)(build_mlp)
if "regression" not in registry.DATASETS.names():
  registry.register_dataset("regression")(build_regression)


def base_config(*, hidden: int = 32, batch_size: int = 16) -> ml_collections.ConfigDict:
  """A full config training :class:`ShardedMLP` on the regression data with AdamW."""
  from adamw_flax import config as config_lib

  c = config_lib.default_config()
  c.model.name = MODEL
  c.model.hidden = hidden
  c.model.batch_norm = False
  c.model.shard_axis = ""
  c.data.name = DATASET
  c.data.batch_size = batch_size
  c.data.in_dim = 16
  c.data.out_dim = 4
  c.optimizer.learning_rate = 1e-2
  c.optimizer.weight_decay = 1e-2
  c.trainer.num_steps = 4
  c.trainer.log_every = 1
  c.trainer.eval_every = 2
  c.trainer.eval_batches = 1
  c.trainer.progress = False
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  return config_lib.validate_config(c)
