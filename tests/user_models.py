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

import dataclasses
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

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


# ------------------------------------- NNX with its own sharding (gemma style)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  """Where each weight and activation lives on an (fsdp, tensor) mesh, as gemma's config says."""

  emb_vd: tuple = ("tensor", "fsdp")
  q_weight_dnh: tuple = ("fsdp", "tensor", None)
  o_weight_nhd: tuple = ("tensor", None, "fsdp")
  ffw_weight_df: tuple = ("fsdp", "tensor")
  ffw_weight_fd: tuple = ("tensor", "fsdp")
  act_btd: P = P("fsdp", None, None)
  act_btnh: P = P("fsdp", None, "tensor", None)
  act_btf: P = P("fsdp", None, "tensor")


class Attention(nnx.Module):
  def __init__(self, dim, heads, shd: ShardingConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    head_dim = dim // heads
    qkv = lambda: nnx.Einsum(
      "BTD,DNH->BTNH",
      (dim, heads, head_dim),
      kernel_init=nnx.with_partitioning(init, shd.q_weight_dnh),
      rngs=rngs,
    )
    self.q, self.k, self.v = qkv(), qkv(), qkv()
    self.o = nnx.Einsum(
      "BTNH,NHD->BTD",
      (heads, head_dim, dim),
      kernel_init=nnx.with_partitioning(init, shd.o_weight_nhd),
      rngs=rngs,
    )
    self.shd = shd

  def __call__(self, x_BTD):
    shard = jax.lax.with_sharding_constraint
    q, k, v = (shard(p(x_BTD), self.shd.act_btnh) for p in (self.q, self.k, self.v))
    length = x_BTD.shape[1]
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -1e9)
    out = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, -1), v)
    return shard(self.o(shard(out, self.shd.act_btnh)), self.shd.act_btd)


class FeedForward(nnx.Module):
  def __init__(self, dim, hidden, shd: ShardingConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    up = lambda: nnx.Linear(
      dim, hidden, use_bias=False, kernel_init=nnx.with_partitioning(init, shd.ffw_weight_df),
      rngs=rngs,
    )  # fmt: skip
    self.gate, self.up = up(), up()
    self.down = nnx.Linear(
      hidden, dim, use_bias=False, kernel_init=nnx.with_partitioning(init, shd.ffw_weight_fd),
      rngs=rngs,
    )  # fmt: skip
    self.shd = shd

  def __call__(self, x_BTD):
    h_BTF = jax.lax.with_sharding_constraint(
      nnx.gelu(self.gate(x_BTD)) * self.up(x_BTD), self.shd.act_btf
    )
    return self.down(h_BTF)


class GemmaLike(nnx.Module):
  """A decoder in the shape of Flax's gemma example: RMSNorm, attention, gated MLP, tied embed."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    shd = ShardingConfig()
    dim = cfg.dim
    self.embed = nnx.Embed(
      data_info["vocab"],
      dim,
      embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), shd.emb_vd),
      rngs=rngs,
    )
    self.layers = nnx.List(
      [
        nnx.Dict(
          attn_norm=nnx.RMSNorm(dim, rngs=rngs),
          attn=Attention(dim, cfg.heads, shd, rngs=rngs),
          mlp_norm=nnx.RMSNorm(dim, rngs=rngs),
          mlp=FeedForward(dim, 2 * dim, shd, rngs=rngs),
        )
        for _ in range(cfg.layers)
      ]
    )
    self.final_norm = nnx.RMSNorm(dim, rngs=rngs)
    self.shd = shd

  def __call__(self, tokens_BT):
    x = jax.lax.with_sharding_constraint(self.embed(tokens_BT), self.shd.act_btd)
    for layer in self.layers:
      x = x + layer["attn"](layer["attn_norm"](x))
      x = x + layer["mlp"](layer["mlp_norm"](x))
    return self.embed.attend(self.final_norm(x))


def next_token_loss(model, batch, *, train):
  del train
  logits = model(batch["tokens"][:, :-1])
  labels = batch["tokens"][:, 1:]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), {}


register_model("gemma_like", loss=next_token_loss, config_fields=("dim", "heads", "layers"))(
  GemmaLike
)


# ----------------------------------------- Linen ResNet with batch_stats


class ResNetBlock(nn.Module):
  filters: int
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape != y.shape:
      x = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="conv_proj")(x)
      x = norm(name="norm_proj")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  stages: tuple[int, ...]
  filters: int
  classes: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.filters, (3, 3), use_bias=False, name="conv_init")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_init")(x))
    for i, blocks in enumerate(self.stages):
      for j in range(blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(self.filters * 2**i, strides)(x, train=train)
    return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def build_resnet(cfg, *, rngs, data_info):
  del rngs
  return ResNet(stages=tuple(cfg.stages), filters=cfg.filters, classes=data_info["classes"])


def image_inputs(cfg, data_info):
  del cfg, data_info
  return (jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32),)


def resnet_loss(model, batch, *, train):
  # As in Flax's imagenet example, the module takes `train`; its batch_stats
  # update in training without anything else here.
  logits = model(batch["image"], train=train)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


register_model(
  "resnet", loss=resnet_loss, example_inputs=image_inputs, config_fields=("stages", "filters")
)(build_resnet)


# -------------------------------------- Linen VAE: an RNG passed to __call__


class Encoder(nn.Module):
  latents: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="fc1")(x))
    return nn.Dense(self.latents, name="mean")(x), nn.Dense(self.latents, name="logvar")(x)


class Decoder(nn.Module):
  features: int

  @nn.compact
  def __call__(self, z):
    return nn.Dense(self.features, name="fc2")(nn.relu(nn.Dense(32, name="fc1")(z)))


class VAE(nn.Module):
  latents: int
  features: int

  def setup(self):
    self.encoder = Encoder(self.latents)
    self.decoder = Decoder(self.features)

  def __call__(self, x, z_rng):
    mean, logvar = self.encoder(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(z_rng, logvar.shape)
    return self.decoder(z), mean, logvar


def build_vae(cfg, *, rngs, data_info):
  del rngs
  return VAE(latents=cfg.latents, features=data_info["features"])


def vae_inputs(cfg, data_info):
  del cfg
  features = data_info["features"]
  key = jax.random.key(0)
  return (
    jax.ShapeDtypeStruct((1, features), jnp.float32),
    jax.ShapeDtypeStruct(key.shape, key.dtype),
  )


def vae_loss(model, batch, *, train, rngs):
  del train
  recon, mean, logvar = model(batch["x"], rngs.noise())  # the step's key, as z_rng
  mse = jnp.mean(jnp.sum((recon - batch["x"]) ** 2, -1))
  kl = jnp.mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), -1))
  return mse + kl, {"kl": kl}


register_model("vae", loss=vae_loss, example_inputs=vae_inputs, config_fields=("latents",))(
  build_vae
)


# --------------------------------------------- Linen LSTM (seq2seq style)


EOS = 0


class LSTMLM(nn.Module):
  vocab: int
  hidden: int

  @nn.compact
  def __call__(self, tokens):
    # Lengths up to the first EOS, as seq2seq does for its padded batches.
    lengths = jnp.where(
      jnp.any(tokens == EOS, -1), jnp.argmax(tokens == EOS, -1) + 1, tokens.shape[1]
    )
    x = nn.Embed(self.vocab, self.hidden)(tokens)
    x = nn.RNN(nn.LSTMCell(self.hidden))(x, seq_lengths=lengths)
    return nn.Dense(self.vocab)(x)


def build_lstm(cfg, *, rngs, data_info):
  del rngs
  return LSTMLM(data_info["vocab"], cfg.hidden)


def lstm_loss(model, batch, *, train):
  del train
  logits = model(batch["tokens"][:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:]).mean(), {}


register_model("lstm", loss=lstm_loss, example_inputs=lm_inputs, config_fields=("hidden",))(
  build_lstm
)


# ---------------------------------- a Linen encoder the user wrapped in ToNNX


class LinenEncoder(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Dense(self.hidden)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.LayerNorm()(nn.relu(x))


class WrappedRegressor(nnx.Module):
  """An NNX head on a Linen encoder, bridged by hand as in Flax's bridge guide."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    x = jnp.ones((1, data_info["features"]))
    self.encoder = nnx.bridge.ToNNX(LinenEncoder(cfg.hidden), rngs=rngs).lazy_init(x, train=False)
    self.head = nnx.Linear(cfg.hidden, 1, rngs=rngs)

  def __call__(self, x, *, train: bool):
    # The one line Linen's BatchNorm needs in a hand-made bridge: its
    # batch_stats are mutable in training, as in Linen's apply.
    h = self.encoder(x, train=train, mutable=["batch_stats"] if train else False)
    return self.head(h)[:, 0]


def wrapped_loss(model, batch, *, train):
  return jnp.mean((model(batch["x"], train=train) - batch["y"]) ** 2), {}


register_model("wrapped_regressor", loss=wrapped_loss, config_fields=("hidden",))(WrappedRegressor)
