"""Launch configs of one model of each kind: ``--config=tests/configs/model_kinds.py:NAME``.

NAME is ``gemma`` (NNX with its own fsdp + tensor shardings and activation
constraints, on a 2x2 (fsdp, tensor) mesh), ``resnet`` (Linen with
batch_stats), ``vae`` (Linen with an RNG passed to ``__call__``), ``lstm``
(Linen ``nn.RNN``), ``wrapped`` (a Linen encoder the builder wraps in
``nnx.bridge.ToNNX`` itself, with BatchNorm) or ``cnn`` (NNX with Rngs,
BatchNorm and Dropout). Models and data: ``tests/user_models.py``.
"""

from adamw_flax.config import default_config

MODELS = {
  "cnn": ("cnn", "images"),
  "gemma": ("gemma_like", "tokens"),
  "resnet": ("resnet", "images"),
  "vae": ("vae", "user_regression"),
  "lstm": ("lstm", "tokens"),
  "wrapped": ("wrapped_regressor", "user_regression"),
}


def get_config(name: str = "gemma"):
  if name not in MODELS:
    raise ValueError(f"unknown model kind {name!r}: {', '.join(MODELS)}")
  model, data = MODELS[name]
  c = default_config()
  c.model.name = f"tests.user_models:{model}"
  c.data.name = f"tests.user_models:{data}"
  c.data.batch_size = 8
  c.trainer.num_steps = 4
  c.trainer.log_every = 1
  c.trainer.eval_every = 2
  c.trainer.eval_batches = 1
  c.trainer.progress = False
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.1
  c.mesh.axes = ("data",)
  c.mesh.shape = (-1,)
  if name == "cnn":
    c.model.width = 8
    c.model.dropout = 0.2
  elif name == "gemma":
    c.model.dim = 16
    c.model.heads = 4
    c.model.layers = 1
    c.data.length = 9
    c.mesh.axes = ("fsdp", "tensor")
    c.mesh.shape = (2, 2)
    c.mesh.data_axes = ("fsdp",)
  elif name == "resnet":
    c.model.stages = (1, 1)
    c.model.filters = 4
  elif name == "vae":
    c.model.latents = 4
  elif name == "lstm":
    c.model.hidden = 16
    c.data.length = 9
  elif name == "wrapped":
    c.model.hidden = 16
  return c
