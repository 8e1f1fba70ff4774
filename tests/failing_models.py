"""The models of tests/user_models.py broken the ways users' code breaks, as "tests.failing_models:...".

For each kind of model (``cnn``: NNX with Rngs, BatchNorm, Dropout;
``gemma``: NNX with activation sharding constraints; ``resnet``: Linen with
batch_stats; ``vae``: Linen with an RNG passed to ``__call__``; ``wrapped``:
a Linen encoder the builder wraps in ``nnx.bridge.ToNNX``), one variant per
way to fail, registered as ``<kind>_<failure>``:

* ``raises``: the user's own exception at the first step, raised in the loss
  (cnn), in an NNX ``__call__`` (gemma), in a Linen ``__call__`` under the
  bridge (resnet), only in the eval step (vae), or in a Linen module the user
  bridged, under gradient accumulation's ``jax.lax.scan`` (wrapped);
* ``missing_key``: the loss reads a key the batches do not have;
* ``shape``: a layer built for the wrong input width, a reshape that does not
  fit, example inputs with the wrong channels, a decoder of the wrong width;
* ``init``: the model's constructor raises (a KeyError for a missing
  ``data_info`` entry, a ValueError, a TypeError of the builder, a Linen
  ``setup`` during abstract init, a bridged module called without ``train``);
* ``no_kernel``: a model with no parameter the ``default`` weight-decay mask
  selects (a config problem: status 2).

Beside that grid, the step's contract broken: ``resnet_training_arg`` (a
Linen ``__call__(self, x, training: bool)`` whose ``example_inputs`` give
``x`` alone), ``cnn_vector_loss`` (a loss without ``.mean()``) and
``cnn_vector_metric`` (a metric per row).

Also ``flipped_images``: the images dataset with an augmentation in
``train_batch`` that raises (numpy's AxisError) before the first step.

:func:`config` is the launch config of a case; :data:`FIXES` the config
overrides that make each failure's case train.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from adamw_flax.registry import register_dataset, register_model
from tests import user_models as um
from tests.configs import model_kinds

KINDS = ("cnn", "gemma", "resnet", "vae", "wrapped")
FAILURES = ("raises", "missing_key", "shape", "init", "no_kernel")

# ------------------------------------------------------------------ cnn


def cnn_smoothed_loss(model, batch, *, train):
  logits = model(batch["image"])
  if train:
    raise NotImplementedError("label smoothing is not written yet")
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}


def cnn_labels_loss(model, batch, *, train):
  del train
  logits = model(batch["image"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), {}


class RGBCNN(um.CNN):
  """The CNN with its first convolution built for RGB images (the data are grayscale)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    super().__init__(cfg, rngs=rngs, data_info=data_info)
    self.conv1 = nnx.Conv(3, cfg.width, kernel_size=(3, 3), rngs=rngs)


class ChannelsCNN(um.CNN):
  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    channels = data_info["channels"]  # the dataset's info has no "channels"
    super().__init__(cfg, rngs=rngs, data_info=data_info)
    self.conv1 = nnx.Conv(channels, cfg.width, kernel_size=(3, 3), rngs=rngs)


class ProbeCNN(nnx.Module):
  """A linear probe on batch-normed pixels: an ``nnx.Param`` named ``w``, no kernel."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    self.bn = nnx.BatchNorm(1, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (64, data_info["classes"])))
    self.rngs = rngs

  def __call__(self, x):
    x = self.dropout(self.bn(x)).reshape(x.shape[0], -1)
    return x @ self.w


CNN_FIELDS = ("width", "dropout")
register_model("cnn_raises", loss=cnn_smoothed_loss, config_fields=CNN_FIELDS)(um.CNN)
register_model("cnn_missing_key", loss=cnn_labels_loss, config_fields=CNN_FIELDS)(um.CNN)
register_model("cnn_shape", loss=um.classification_loss, config_fields=CNN_FIELDS)(RGBCNN)
register_model("cnn_init", loss=um.classification_loss, config_fields=CNN_FIELDS)(ChannelsCNN)
register_model("cnn_no_kernel", loss=um.classification_loss, config_fields=CNN_FIELDS)(ProbeCNN)

# ---------------------------------------------------------------- gemma


class WindowedAttention(um.Attention):
  def __call__(self, x_BTD):
    if x_BTD.shape[1] > 4:
      raise ValueError(f"sequence of {x_BTD.shape[1]} tokens is longer than the window of 4")
    return super().__call__(x_BTD)


class WindowedGemma(um.GemmaLike):
  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    super().__init__(cfg, rngs=rngs, data_info=data_info)
    for layer in self.layers:
      layer["attn"] = WindowedAttention(cfg.dim, cfg.heads, self.shd, rngs=rngs)


def gemma_ids_loss(model, batch, *, train):
  del train
  logits = model(batch["input_ids"][:, :-1])
  labels = batch["input_ids"][:, 1:]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), {}


class ChunkedGemma(um.GemmaLike):
  """Attends over chunks of 3 tokens, which 8 tokens do not make."""

  def __call__(self, tokens_BT):
    b, t = tokens_BT.shape
    chunks = tokens_BT.reshape(b * (t // 3), 3)
    return super().__call__(chunks).reshape(b, t, -1)


class CheckedGemma(um.GemmaLike):
  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    if cfg.dim % cfg.heads:
      raise ValueError(f"width must be a multiple of heads, got dim={cfg.dim}, heads={cfg.heads}")
    super().__init__(cfg, rngs=rngs, data_info=data_info)


class FusedMLP(nnx.Module):
  """A gated MLP whose weights are plain ``nnx.Param``s (``w_in``, ``w_out``), sharded."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("fsdp", "tensor"))
    vocab, dim = data_info["vocab"], cfg.dim
    self.w_in = nnx.Param(init(rngs.params(), (vocab, dim)))
    self.w_out = nnx.Param(init(rngs.params(), (dim, vocab)))
    self.shd = um.ShardingConfig()

  def __call__(self, tokens_BT):
    x = jax.lax.with_sharding_constraint(self.w_in[tokens_BT], P("fsdp", None, "tensor"))
    return nnx.gelu(x) @ self.w_out


GEMMA_FIELDS = ("dim", "heads", "layers")
register_model("gemma_raises", loss=um.next_token_loss, config_fields=GEMMA_FIELDS)(WindowedGemma)
register_model("gemma_missing_key", loss=gemma_ids_loss, config_fields=GEMMA_FIELDS)(um.GemmaLike)
register_model("gemma_shape", loss=um.next_token_loss, config_fields=GEMMA_FIELDS)(ChunkedGemma)
register_model("gemma_init", loss=um.next_token_loss, config_fields=GEMMA_FIELDS)(CheckedGemma)
register_model("gemma_no_kernel", loss=um.next_token_loss, config_fields=GEMMA_FIELDS)(FusedMLP)

# --------------------------------------------------------------- resnet


class StochasticDepthResNet(um.ResNet):
  """The ResNet with stochastic depth in training, which its author has not written yet."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    if train:
      raise NotImplementedError("stochastic depth in training")
    return super().__call__(x, train)


def build_stochastic_depth_resnet(cfg, *, rngs, data_info):
  del rngs
  classes = data_info["classes"]
  return StochasticDepthResNet(stages=tuple(cfg.stages), filters=cfg.filters, classes=classes)


def resnet_images_loss(model, batch, *, train):
  logits = model(batch["images"], train=train)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}


def rgb_inputs(cfg, data_info):
  del cfg, data_info
  return (jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32),)  # the data are grayscale


def build_resnet_v2(cfg, *, rngs, data_info):
  del rngs
  return um.ResNet(stage_sizes=tuple(cfg.stages), filters=cfg.filters, classes=data_info["classes"])


class ScaledResNet(nn.Module):
  """Pixels times a learned ``scale`` per class, batch-normed: no kernel."""

  classes: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x).reshape(x.shape[0], -1)
    scale = self.param("scale", nn.initializers.normal(0.02), (x.shape[-1], self.classes))
    return x @ scale


def build_scaled(cfg, *, rngs, data_info):
  del cfg, rngs
  return ScaledResNet(data_info["classes"])


RESNET = {"config_fields": ("stages", "filters")}
register_model("resnet_raises", loss=um.resnet_loss, example_inputs=um.image_inputs, **RESNET)(
  build_stochastic_depth_resnet
)
register_model(
  "resnet_missing_key", loss=resnet_images_loss, example_inputs=um.image_inputs, **RESNET
)(um.build_resnet)
register_model("resnet_shape", loss=um.resnet_loss, example_inputs=rgb_inputs, **RESNET)(
  um.build_resnet
)
register_model("resnet_init", loss=um.resnet_loss, example_inputs=um.image_inputs, **RESNET)(
  build_resnet_v2
)
register_model("resnet_no_kernel", loss=um.resnet_loss, example_inputs=um.image_inputs, **RESNET)(
  build_scaled
)

# ------------------------------------------------------------------ vae


def vae_iwae_loss(model, batch, *, train, rngs):
  if not train:
    raise NotImplementedError("the importance-weighted bound for evaluation is not written yet")
  return um.vae_loss(model, batch, train=train, rngs=rngs)


def vae_inputs_loss(model, batch, *, train, rngs):
  del train
  recon, mean, logvar = model(batch["inputs"], rngs.noise())
  return jnp.mean((recon - batch["inputs"]) ** 2) + jnp.mean(mean**2 + logvar**2), {}


def build_wide_vae(cfg, *, rngs, data_info):
  del rngs
  return um.VAE(latents=cfg.latents, features=data_info["features"] + 1)


DECODERS = {"mlp": um.Decoder}


class ConfiguredVAE(um.VAE):
  kind: str = "deconv"

  def setup(self):
    self.encoder = um.Encoder(self.latents)
    self.decoder = DECODERS[self.kind](self.features)


def build_configured_vae(cfg, *, rngs, data_info):
  del rngs
  return ConfiguredVAE(latents=cfg.latents, features=data_info["features"])


class ScaleVAE(nn.Module):
  """A VAE of diagonal maps: ``self.param`` scales and shifts, no Dense."""

  latents: int
  features: int

  @nn.compact
  def __call__(self, x, z_rng):
    enc = self.param("enc_scale", nn.initializers.ones, (self.features,))
    shift = self.param("shift", nn.initializers.zeros, (self.features,))
    mean, logvar = x * enc + shift, jnp.zeros_like(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(z_rng, logvar.shape)
    return z, mean, logvar


def build_scale_vae(cfg, *, rngs, data_info):
  del rngs
  return ScaleVAE(latents=cfg.latents, features=data_info["features"])


VAE = {"example_inputs": um.vae_inputs, "config_fields": ("latents",)}
register_model("vae_raises", loss=vae_iwae_loss, **VAE)(um.build_vae)
register_model("vae_missing_key", loss=vae_inputs_loss, **VAE)(um.build_vae)
register_model("vae_shape", loss=um.vae_loss, **VAE)(build_wide_vae)
register_model("vae_init", loss=um.vae_loss, **VAE)(build_configured_vae)
register_model("vae_no_kernel", loss=um.vae_loss, **VAE)(build_scale_vae)

# -------------------------------------------------------------- wrapped


class ClippedEncoder(um.LinenEncoder):
  @nn.compact
  def __call__(self, x, *, train: bool):
    if train and jnp.ndim(x) == 2 and x.shape[0] < 8:
      raise ValueError(f"micro-batches of {x.shape[0]} rows are too small for BatchNorm")
    return super().__call__(x, train=train)


class ClippedRegressor(um.WrappedRegressor):
  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    super().__init__(cfg, rngs=rngs, data_info=data_info)
    x = jnp.ones((1, data_info["features"]))
    self.encoder = nnx.bridge.ToNNX(ClippedEncoder(cfg.hidden), rngs=rngs).lazy_init(x, train=False)


def wrapped_target_loss(model, batch, *, train):
  return jnp.mean((model(batch["x"], train=train) - batch["target"]) ** 2), {}


class NarrowHeadRegressor(um.WrappedRegressor):
  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    super().__init__(cfg, rngs=rngs, data_info=data_info)
    self.head = nnx.Linear(cfg.hidden // 2, 1, rngs=rngs)


class LazyRegressor(um.WrappedRegressor):
  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    x = jnp.ones((1, data_info["features"]))
    self.encoder = nnx.bridge.ToNNX(um.LinenEncoder(cfg.hidden), rngs=rngs).lazy_init(x)
    self.head = nnx.Linear(cfg.hidden, 1, rngs=rngs)


class LinenScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * self.param("scale", nn.initializers.ones, (x.shape[-1],))


class ScaleRegressor(nnx.Module):
  """A bridged Linen ``scale`` and an NNX ``nnx.Param`` readout: no kernel anywhere."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, data_info: dict):
    del cfg
    x = jnp.ones((1, data_info["features"]))
    self.scale = nnx.bridge.ToNNX(LinenScale(), rngs=rngs).lazy_init(x)
    self.readout = nnx.Param(jnp.full((data_info["features"],), 0.1))

  def __call__(self, x, *, train: bool):
    del train
    return self.scale(x) @ self.readout


WRAPPED = ("hidden",)
register_model("wrapped_raises", loss=um.wrapped_loss, config_fields=WRAPPED)(ClippedRegressor)
register_model("wrapped_missing_key", loss=wrapped_target_loss, config_fields=WRAPPED)(
  um.WrappedRegressor
)
register_model("wrapped_shape", loss=um.wrapped_loss, config_fields=WRAPPED)(NarrowHeadRegressor)
register_model("wrapped_init", loss=um.wrapped_loss, config_fields=WRAPPED)(LazyRegressor)
register_model("wrapped_no_kernel", loss=um.wrapped_loss, config_fields=WRAPPED)(ScaleRegressor)

# ------------------------------ the step's contract (beside the KINDS x FAILURES grid)


class DropoutCNN(nn.Module):
  """A CNN written as in Flax's dropout guide: ``__call__(self, x, training: bool)``, no default.

  Flax initialises it as ``model.init(key, x, training=False)``; registered
  with ``example_inputs`` that give ``x`` alone (``resnet_training_arg``),
  its init cannot call it; with ``training`` in them (``..._fixed``) it trains.
  """

  classes: int

  @nn.compact
  def __call__(self, x, training: bool):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.BatchNorm(use_running_average=not training, momentum=0.9)(x)
    x = nn.Dropout(rate=0.2, deterministic=not training)(x.reshape(x.shape[0], -1))
    return nn.Dense(self.classes)(x)


def build_dropout_cnn(cfg, *, rngs, data_info):
  del cfg, rngs
  return DropoutCNN(data_info["classes"])


def dropout_cnn_loss(model, batch, *, train, rngs):
  logits = model(batch["image"], training=train, rngs=rngs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}


def image_inputs_not_training(cfg, data_info):
  return (*um.image_inputs(cfg, data_info), False)  # Flax's init(key, x, training=False)


register_model(
  "resnet_training_arg", loss=dropout_cnn_loss, example_inputs=um.image_inputs, **RESNET
)(build_dropout_cnn)
register_model(
  "resnet_training_arg_fixed", loss=dropout_cnn_loss, example_inputs=image_inputs_not_training,
  **RESNET,
)(build_dropout_cnn)  # fmt: skip


def cnn_per_example_loss(model, batch, *, train):
  del train
  logits = model(batch["image"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), {}  # no .mean()


def cnn_correct_loss(model, batch, *, train):
  del train
  logits = model(batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, {"correct": jnp.argmax(logits, -1) == batch["label"]}  # per row: no .mean()


register_model("cnn_vector_loss", loss=cnn_per_example_loss, config_fields=CNN_FIELDS)(um.CNN)
register_model("cnn_vector_metric", loss=cnn_correct_loss, config_fields=CNN_FIELDS)(um.CNN)

# --------------------------------------------------------------- configs

#: The working model of each kind (tests/user_models.py), and its config's name.
WORKING = {
  "cnn": ("cnn", "cnn"),
  "gemma": ("gemma_like", "gemma"),
  "resnet": ("resnet", "resnet"),
  "vae": ("vae", "vae"),
  "wrapped": ("wrapped_regressor", "wrapped"),
}

#: What makes each failure's case train: config overrides as ``python -m train`` takes them.
FIXES = {
  "raises": lambda kind: [f"model.name=tests.user_models:{WORKING[kind][0]}"],
  "missing_key": lambda kind: [f"model.name=tests.user_models:{WORKING[kind][0]}"],
  "shape": lambda kind: [f"model.name=tests.user_models:{WORKING[kind][0]}"],
  "init": lambda kind: [f"model.name=tests.user_models:{WORKING[kind][0]}"],
  "no_kernel": lambda kind: ["optimizer.weight_decay_mask=all"],
}


def config(kind: str, failure: str):
  """The launch config of one case: the kind's config (tests/configs/model_kinds.py), 2 steps.

  Args:
    kind: one of :data:`KINDS`.
    failure: one of :data:`FAILURES`, or ``"data"`` (an image kind's model
      on :class:`FlippedImages`).

  Returns:
    The config, naming ``tests.failing_models:<kind>_<failure>``.
  """
  c = model_kinds.get_config(WORKING[kind][1])
  if failure == "data":  # the working model on a dataset whose train_batch raises
    c.data.name = "tests.failing_models:flipped_images"
  else:
    c.model.name = f"tests.failing_models:{kind}_{failure}"
  c.trainer.num_steps = 2
  c.trainer.eval_every = 2
  c.checkpoint.every_steps = 2
  if kind == "gemma" and failure == "init":
    c.model.heads = 3
  if kind == "wrapped" and failure == "raises":
    c.optimizer.accumulate_steps = 2  # the loss runs inside jax.lax.scan
  return c


# ----------------------------------------------------------------- data


class FlippedImages(um.Images):
  """The images, flipped left-right as augmentation, along an axis they do not have."""

  def train_batch(self, position):
    batch = super().train_batch(position)
    return {**batch, "image": np.flip(batch["image"], axis=4)}


register_dataset("flipped_images", config_fields=("batch_size",))(FlippedImages)
