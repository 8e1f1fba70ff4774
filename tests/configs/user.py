"""Launch configs of the models in tests/user_models.py: ``--config=tests/configs/user.py:NAME``.

NAME is ``cnn`` (NNX, BatchNorm + Dropout + Rngs in the module, data parallel),
``mlp`` (NNX with sharding annotations, on a 2x2 (data, model) mesh, ZeRO-1)
or ``linen`` (a Linen transformer with logical partitioning and dropout).
"""

from adamw_flax.config import default_config


def get_config(name: str = "cnn"):
  c = default_config()
  c.data.batch_size = 8
  c.trainer.num_steps = 8
  c.trainer.log_every = 1
  c.trainer.eval_every = 4
  c.trainer.eval_batches = 1
  c.trainer.progress = False
  c.checkpoint.every_steps = 4
  c.checkpoint.async_save = False
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.1
  c.mesh.axes = ("data",)
  c.mesh.shape = (-1,)
  if name == "cnn":
    c.model.name = "tests.user_models:cnn"
    c.model.width = 8
    c.model.dropout = 0.2
    c.data.name = "tests.user_models:images"
  elif name == "mlp":
    c.model.name = "tests.user_models:annotated_mlp"
    c.model.hidden = 16
    c.data.name = "tests.user_models:user_regression"
    c.optimizer.weight_decay_mask = "ndim>=2=true, *=false"
    c.mesh.axes = ("data", "model")
    c.mesh.shape = (-1, 2)
    c.mesh.logical_axis_rules = (("mlp", "model"),)
    c.mesh.shard_opt_state = "data"
  elif name == "linen":
    c.model.name = "tests.user_models:linen_lm"
    c.model.dim = 16
    c.model.heads = 2
    c.model.layers = 1
    c.model.dropout = 0.1
    c.data.name = "tests.user_models:tokens"
    c.data.length = 9
    c.mesh.axes = ("data", "model")
    c.mesh.shape = (-1, 1)
    c.mesh.logical_axis_rules = (("mlp", "model"), ("heads", "model"), ("vocab", None))
  else:
    raise ValueError(f"unknown test config {name!r}: cnn, mlp or linen")
  return c
