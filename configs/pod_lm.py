"""A ~300M-parameter character transformer on a TPU pod slice, FSDP over 16 chips.

Run on every worker of a slice (see train/README.md):
  train/launch_tpu_pod.sh my-tpu us-central2-b gs://my-bucket/runs/pod_lm

or by hand on each worker:
  python -m train --config=configs/pod_lm.py --workdir=gs://my-bucket/runs/pod_lm

Variants (``--config=configs/pod_lm.py:VARIANT``):
  fsdp (default)  mesh ("data", "fsdp") = (-1, 16): params and optimizer state
                  sharded 16 ways (first dimension of every kernel), replicated
                  across the "data" axis; the batch over all chips. Needs a
                  chip count divisible by 16 (v4-32, v5p-32, v5e-16 and up).
  zero1           mesh ("data",) = (-1,): params replicated (plain data
                  parallelism), AdamW moments sharded over all chips (ZeRO-1).

Model: 24 blocks, width 1024, 16 heads, context 1024: 303.2M params (302.0M
in the blocks), bfloat16 compute, float32 params and moments. Per chip on 32
chips (computed from the shardings by tests/test_sharding.py on an abstract
mesh): fsdp: params 72.5 MiB, optimizer state 144.9 MiB; zero1: params
1156.4 MiB, optimizer state 72.3 MiB. Activations and gradients come on top.
Data: Tiny Shakespeare (vocabulary 65), so the run works as is; name your
own registered dataset in ``data.name`` for real training. Not run here (no
TPU): no measured step time or loss yet.
"""

from __future__ import annotations

import ml_collections

from configs import tiny_shakespeare


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "fsdp"
  if variant not in ("fsdp", "zero1"):
    raise ValueError(f"configs/pod_lm.py: unknown variant {variant!r}; use 'fsdp' or 'zero1'")
  c = tiny_shakespeare.get_config()  # its data section; everything else set below

  m = c.model
  m.num_layers = 24  # transformer blocks
  m.num_heads = 16  # attention heads per block (head size 64)
  m.embed_dim = 1024  # model width
  m.max_len = 1024  # context length (= data.seq_len)
  m.dropout = 0.0  # no dropout at this data scale per step
  m.dtype = "bfloat16"  # compute dtype; params stay float32

  d = c.data
  d.batch_size = 256  # global batch (sequences); a multiple of the chip count
  d.seq_len = 1024  # characters per example

  o = c.optimizer
  o.name = "adamw"
  o.learning_rate = 3e-4  # GPT-2-medium scale
  o.schedule = "warmup_cosine"
  o.warmup_steps = 1000
  o.end_learning_rate = 3e-5  # decay to lr / 10
  o.b1 = 0.9
  o.b2 = 0.95  # common for LMs of this size
  o.weight_decay = 0.1
  o.weight_decay_mask = "default"  # decay Linear kernels; not embeddings, norms
  o.grad_clip_norm = 1.0
  o.mu_dtype = "float32"  # moments stay float32 whatever the compute dtype
  o.nu_dtype = "float32"

  t = c.trainer
  t.num_steps = 20000
  t.log_every = 50
  t.eval_every = 1000
  t.eval_batches = 10
  t.seed = 0

  k = c.checkpoint
  k.every_steps = 1000
  k.keep = 3
  k.keep_best_by = "loss"
  k.async_save = True  # write to the bucket while training goes on

  s = c.mesh
  if variant == "fsdp":
    s.axes = ("data", "fsdp")
    s.shape = (-1, 16)  # 16-way FSDP, data parallel across groups of 16 chips
    s.partition_rules = (
      # Every Linear kernel (qkv, attention and MLP projections): its input dimension.
      (r".*/kernel", ("fsdp", None)),
      # Token embedding [65, 1024]: the vocabulary does not divide by 16; the width does.
      (r"tok_emb/embedding", (None, "fsdp")),
      (r"pos_emb/embedding", ("fsdp", None)),
      # LayerNorm scales (1024 floats each) stay replicated.
    )
    s.data_axes = ("data", "fsdp")  # the batch over all chips
    s.shard_opt_state = "params"  # moments sharded like their params
  else:
    s.axes = ("data",)
    s.shape = (-1,)
    s.partition_rules = ()
    s.data_axes = ("data",)
    s.shard_opt_state = "data"  # ZeRO-1
  return c
