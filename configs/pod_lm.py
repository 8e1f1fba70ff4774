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
in the blocks), bfloat16 compute, the Pallas splash-attention kernel on
bfloat16 q, k, v, float32 params and moments; a global batch of 1024 x 1024
tokens (1M a step: benchmarks/pod_mfu.py measured each lever).

Per chip, everything included (params, optimizer state, batch, activations,
gradients), as XLA:TPU compiles the train step for the slice, on a CPU
machine (``python -m train.compile --config=configs/pod_lm.py --topology=v5p-32``;
benchmarks/pod_formats.py, benchmarks/RESULTS.md):
  v5p-32  16 chips, mesh data 1 x fsdp 16: peak 83.52 GiB of the 95.74 XLA
          can use (params 0.07, optimizer state 0.14, temps 83.31 GiB: the
          activations of 64 sequences a chip); XLA's step estimate 434 ms,
          MFU 59.9% by 6·N·tokens. int8 moments or bfloat16 params change
          the peak by under 0.2 GiB here: activations dominate.
  v5p-128 64 chips, mesh data 4 x fsdp 16: peak 20.84 GiB, 119.5 ms, MFU
          54.3% (benchmarks/pod_mfu.py).
  v5e-256 256 chips, mesh data 16 x fsdp 16: peak 5.91 GiB of 15.75 (temps
          5.69 GiB); no step estimate (libtpu 0.0.42.1's v5e cost model
          gives a negative time).
  zero1 on v5e-32 (params replicated, 32 sequences per chip) does not fit:
          about 29.10 GiB per chip (XLA:TPU refuses to compile it); the
          command's advice, compiled: accumulate_steps=4 cuts temps to 12.20
          GiB (peak 13.40 GiB, fits); int8 moments still need about 29.19.
Data: Tiny Shakespeare (vocabulary 65), so the run works as is; name your
own registered dataset in ``data.name`` for real training. Not run on a TPU
here: no measured step time or loss yet.
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
  # The Pallas TPU splash kernel on bfloat16 q, k, v (scores and softmax float32 inside it):
  # XLA:TPU's estimate on v5p-128 43.4 ms at batch 256 against einsum's 67.0 (pod_mfu.py).
  m.attention = "splash"  # attention kernel: "einsum", "dot_product", "splash" (Pallas TPU)
  m.attention_dtype = "bfloat16"  # attention matmuls' inputs (scores, softmax stay float32)
  # No remat: it costs 17-20% of the step (pod_mfu.py) and activations fit without it.
  m.remat = "none"  # per block: "none" (keep activations), "full", "dots" (keep matmuls)

  d = c.data
  # 1M tokens a step: FSDP's gathers and reduce-scatters cost the same at any batch, so a
  # bigger one raises MFU (v5p-128: 37.4% at 256, 44.0% at 512, 54.3% at 1024; pod_mfu.py).
  d.batch_size = 1024  # global batch (sequences); a multiple of the chip count
  d.seq_len = 1024  # characters per example

  o = c.optimizer
  o.name = "adamw"
  o.learning_rate = 3e-4  # GPT-2-medium scale
  o.schedule = "warmup_cosine"
  o.warmup_steps = 250  # 262M tokens
  o.end_learning_rate = 3e-5  # decay to lr / 10
  o.b1 = 0.9
  o.b2 = 0.95  # common for LMs of this size
  o.weight_decay = 0.1
  o.weight_decay_mask = "default"  # decay Linear kernels; not embeddings, norms
  o.grad_clip_norm = 1.0
  o.mu_dtype = "float32"  # moments stay float32 whatever the compute dtype
  o.nu_dtype = "float32"

  t = c.trainer
  t.num_steps = 5000  # 5.2B tokens (20000 steps of the former 256-sequence batch)
  t.log_every = 50
  t.eval_every = 250
  t.eval_batches = 10
  t.seed = 0

  k = c.checkpoint
  k.every_steps = 250
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
