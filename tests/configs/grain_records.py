"""A grain pipeline over ArrayRecord files, through python -m train (tests/test_grain.py)."""

from adamw_flax.config import default_config


def get_config():
  c = default_config()
  c.model.name = "tests.user_models:annotated_mlp"
  c.model.hidden = 16
  c.data.name = "adamw_flax.grain_data:grain"
  c.data.source = "tests.user_models:slow_arrayrecord"
  c.data.path = ""  # the ArrayRecord directory (the test sets it)
  c.data.shuffle = True
  c.data.batch_size = 8
  c.optimizer.weight_decay_mask = "ndim>=2=true, *=false"
  c.mesh.axes = ("data", "model")
  c.mesh.shape = (-1, 1)
  c.mesh.logical_axis_rules = (("mlp", "model"),)
  c.trainer.num_steps = 120
  c.trainer.log_every = 10
  c.trainer.eval_every = 0
  c.trainer.eval_batches = 2
  c.trainer.progress = False
  c.checkpoint.every_steps = 30
  c.checkpoint.async_save = False
  return c
