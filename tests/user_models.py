"""Models and data written the way users write them, registered as "tests.user_models:...".

* ``cnn``: an NNX CNN with Conv, BatchNorm, Dropout and an ``nnx.Rngs`` kept
  in the module (dropout draws from the module's own stream, whose count is
  state that checkpoints and resumes).
* ``annotated_mlp``: an NNX MLP whose params carry sharding annotations
  (``nnx.with_partitioning`` on a Linear, and an ``nnx.Param`` made with
  ``out_sharding``), in logical and mesh axis names.
* ``linen_lm``: a Linen transformer with logical partitioning
  (``nn.with_logical_partitioning``) and dropout, registered as Linen and
  trained through ``nnx.bridge``; its loss takes the step's ``rngs``.

Data: ``images`` (8x8 single-channel images, 4 classes given by a fixed
linear rule) and ``tokens`` (sequences of a noisy counting pattern); batch
``position`` is a pure function of (seed, position). The environment variable
``USER_MODELS_SLEEP_AT`` makes ``train_batch`` wait at that position, so a
test can kill a run there (the config stays that of an uninterrupted run).
"""

from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adamw_flax.registry import register_dataset, register_model

# ---------------------------------------------------------------- NNX CNN


class CNN(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    width = cfg.width
    self.conv1 = nnx.Conv(1, width, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(width, width, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
    self.bn2 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.head = nnx.Linear(width, data_info["classes"], rngs=rngs)
    self.rngs = rngs  # kept: the module's own streams

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = self.dropout(x.mean(axis=(1, 2)))
    return self.head(x)


def classification_loss(model, batch, *, train):
  del train  # model.train() / model.eval() set Dropout and BatchNorm
  logits = model(batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return loss, {"accuracy": accuracy}


register_model("cnn", loss=classification_loss, config_fields=("width", "dropout"))(CNN)


# ---------------------------------------------------------- annotated MLP


class AnnotatedMLP(nnx.Module):
  """``Linear(in, hidden) -> relu -> x @ w_out + b``, params annotated for a (data, model) mesh."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    hidden = cfg.hidden
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(
      data_info["features"],
      hidden,
      kernel_init=nnx.with_partitioning(init, (None, "mlp")),  # a logical name
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)),
      rngs=rngs,
    )
    key = rngs.params()
    self.w_out = nnx.Param(init(key, (hidden, 1)), out_sharding=("model", None))  # a mesh axis
    self.b_out = nnx.Param(jnp.zeros((1,)))

  def __call__(self, x):
    return (nnx.relu(self.up(x)) @ self.w_out + self.b_out)[:, 0]


def mse_loss(model, batch, *, train):
  del train
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


register_model("annotated_mlp", loss=mse_loss, config_fields=("hidden",))(AnnotatedMLP)


# ------------------------------------------------------- Linen transformer


class Block(nn.Module):
  dim: int
  heads: int
  dropout: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    dense = lambda features, axes, name: nn.DenseGeneral(
      features,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      name=name,
    )
    h = nn.LayerNorm()(x)
    q = dense((self.heads, self.dim // self.heads), ("embed", "heads", "kv"), "query")(h)
    k = dense((self.heads, self.dim // self.heads), ("embed", "heads", "kv"), "key")(h)
    v = dense((self.heads, self.dim // self.heads), ("embed", "heads", "kv"), "value")(h)
    length = x.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))
    weights = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.dim // self.heads)
    weights = jax.nn.softmax(jnp.where(mask, weights, -1e9), axis=-1)
    weights = nn.Dropout(self.dropout, deterministic=not train)(weights)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
    x = x + nn.Dense(
      self.dim,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
    )(y)
    h = nn.LayerNorm()(x)
    h = nn.Dense(
      4 * self.dim,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
    )(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(h))
    return x + nn.Dense(
      self.dim,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
    )(h)


class LinenLM(nn.Module):
  vocab: int
  dim: int
  heads: int
  layers: int
  dropout: float

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    embed = nn.Embed(
      self.vocab,
      self.dim,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    x = embed(tokens)
    for _ in range(self.layers):
      x = Block(self.dim, self.heads, self.dropout)(x, train=train)
    return embed.attend(nn.LayerNorm()(x))


def build_linen_lm(cfg, *, rngs, data_info):
  del rngs  # the bridge initialises a Linen module from the run's seed
  return LinenLM(data_info["vocab"], cfg.dim, cfg.heads, cfg.layers, cfg.dropout)


def lm_inputs(cfg, data_info):
  del cfg
  return (jax.ShapeDtypeStruct((2, data_info["length"]), jnp.int32),)


def lm_loss(model, batch, *, train, rngs):
  # The bridged Linen module takes the step's rngs for its 'dropout' stream.
  logits = model(batch["tokens"][:, :-1], train=train, rngs=rngs)
  labels = batch["tokens"][:, 1:]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), {}


register_model(
  "linen_lm",
  loss=lm_loss,
  example_inputs=lm_inputs,
  config_fields=("dim", "heads", "layers", "dropout"),
)(build_linen_lm)


# ------------------------------------------------------------------- data


class _Data:
  """Batch ``position`` from (seed, position); this process's rows of it."""

  tokens_per_example = 1

  def __init__(self, cfg, *, seed, process_index, process_count):
    self.global_batch_size = cfg.batch_size
    self.seed = seed
    self.sleep_at = int(os.environ.get("USER_MODELS_SLEEP_AT", "-1"))
    per = cfg.batch_size // process_count
    self.rows = slice(process_index * per, (process_index + 1) * per)

  def _make(self, rng):
    raise NotImplementedError

  def train_batch(self, position):
    if position == self.sleep_at:
      time.sleep(600)  # a test kills the run here
    batch = self._make(np.random.default_rng((self.seed, position)))
    return {k: v[self.rows] for k, v in batch.items()}

  def eval_batches(self, num):
    out = []
    for i in range(num):
      batch = self._make(np.random.default_rng((self.seed, 1 << 30, i)))
      out.append({k: v[self.rows] for k, v in batch.items()})
    return out


class Images(_Data):
  def __init__(self, cfg, **kw):
    super().__init__(cfg, **kw)
    self.info = {"classes": 4}
    self.w = np.random.default_rng(7).normal(size=(64, 4)).astype(np.float32)

  def _make(self, rng):
    x = rng.normal(size=(self.global_batch_size, 8, 8, 1)).astype(np.float32)
    label = np.argmax(x.reshape(self.global_batch_size, 64) @ self.w, -1).astype(np.int32)
    return {"image": x, "label": label}


class Regression(_Data):
  def __init__(self, cfg, **kw):
    super().__init__(cfg, **kw)
    self.info = {"features": 8}
    self.w = np.random.default_rng(3).normal(size=8).astype(np.float32)

  def _make(self, rng):
    x = rng.normal(size=(self.global_batch_size, 8)).astype(np.float32)
    return {"x": x, "y": np.tanh(x @ self.w).astype(np.float32)}


class Tokens(_Data):
  def __init__(self, cfg, **kw):
    super().__init__(cfg, **kw)
    self.length = cfg.length
    self.info = {"vocab": 16, "length": cfg.length - 1}

  def _make(self, rng):
    start = rng.integers(0, 16, size=(self.global_batch_size, 1))
    seq = (start + np.arange(self.length)) % 16
    noise = rng.random(seq.shape) < 0.1
    return {"tokens": np.where(noise, rng.integers(0, 16, seq.shape), seq).astype(np.int32)}


register_dataset("images", config_fields=("batch_size",))(Images)
register_dataset("user_regression", config_fields=("batch_size",))(Regression)
register_dataset("tokens", config_fields=("batch_size", "length"))(Tokens)


def slow_arrayrecord(cfg):
  """The ArrayRecord example's splits, each train example 5 ms late (so a test can kill a run)."""
  from examples.grain_arrayrecord import data

  made = data.make(cfg)
  return {**made, "train": made["train"].map(lambda e: (time.sleep(0.005), e)[1])}
