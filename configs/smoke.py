"""A tiny Tiny Shakespeare run for tests: a few seconds on a CPU.

Run:
  python -m train --config=configs/smoke.py --workdir=/tmp/smoke
"""

from __future__ import annotations

import ml_collections

from configs import tiny_shakespeare


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = tiny_shakespeare.get_config(arg)
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.embed_dim = 32
  c.model.max_len = 32
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.optimizer.warmup_steps = 5
  c.trainer.num_steps = 40
  c.trainer.log_every = 10
  c.trainer.eval_every = 20
  c.trainer.eval_batches = 2
  c.trainer.progress = False
  c.checkpoint.every_steps = 20
  return c
