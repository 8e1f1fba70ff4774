"""A PyTorch twin of the reference Tiny Shakespeare CPU recipe (nanoGPT's shakespeare_char on CPU).

Written for this project (not copied): the same architecture, initialisation,
AdamW settings, data sampling and evaluation protocol as the published
setting described in ``shared/spec/tiny_shakespeare_reference.md``, so that
``benchmarks/tiny_shakespeare.py`` can measure our time to quality against
it on the machine at hand. Needs ``pip install adamw_flax[torch]``.

* Model: token + learned position embeddings, ``n_layer`` pre-LayerNorm
  blocks (causal self-attention, GELU MLP 4x), a final LayerNorm, the output
  layer tied to the token embedding; no biases in Linear or LayerNorm.
  Weights ~ N(0, 0.02), the residual projections ~ N(0, 0.02 / sqrt(2 n_layer)).
* AdamW(b1 0.9, b2 0.99), weight decay 0.1 on tensors with ndim >= 2
  (matmuls and embeddings), none on norm gains; global-norm clipping at 1.0;
  lr warmup ``(it + 1) / (warmup + 1)`` for 100 iterations, then cosine to
  lr / 10 at ``lr_decay_iters``.
* Data: the first 90% of the characters for training, the last 10% for
  validation; a batch is ``batch_size`` random windows (``torch.randint``
  after ``torch.manual_seed(1337)``).
* Evaluation: at iterations 0, 250, ..., ``max_iters``, the mean loss over
  ``eval_iters`` random batches of each split, train then validation (before that iteration's
  update); the loop runs iterations 0..``max_iters`` (2001 updates), as the
  reference does.

Beyond the reference it evaluates once more at the end over
``--final_eval_batches`` validation batches (our metric) and writes
``metrics.jsonl`` rows like our trainer's (``step``, ``split``, ``loss``,
``wall_time``), so time to target is read the same way for both.

Usage::

  python benchmarks/torch_shakespeare.py --data=PATH --out=DIR [--max_iters=2000]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class SelfAttention(nn.Module):
  def __init__(self, n_embd: int, n_head: int, n_layer: int):
    super().__init__()
    self.n_head = n_head
    self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
    self.proj = nn.Linear(n_embd, n_embd, bias=False)
    self.proj.residual = True

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, c = x.shape
    q, k, v = self.qkv(x).split(c, dim=2)
    shape = (b, t, self.n_head, c // self.n_head)
    q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
  def __init__(self, n_embd: int, n_head: int, n_layer: int):
    super().__init__()
    self.ln1 = nn.LayerNorm(n_embd, bias=False)
    self.attn = SelfAttention(n_embd, n_head, n_layer)
    self.ln2 = nn.LayerNorm(n_embd, bias=False)
    self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
    self.out = nn.Linear(4 * n_embd, n_embd, bias=False)
    self.out.residual = True

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.ln1(x))
    return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
  def __init__(self, vocab: int, n_layer: int, n_head: int, n_embd: int, block_size: int):
    super().__init__()
    self.tok = nn.Embedding(vocab, n_embd)
    self.pos = nn.Embedding(block_size, n_embd)
    self.blocks = nn.ModuleList(Block(n_embd, n_head, n_layer) for _ in range(n_layer))
    self.ln_f = nn.LayerNorm(n_embd, bias=False)
    self.head = nn.Linear(n_embd, vocab, bias=False)
    self.head.weight = self.tok.weight  # tied
    for module in self.modules():
      if isinstance(module, (nn.Linear, nn.Embedding)):
        std = 0.02 / math.sqrt(2 * n_layer) if getattr(module, "residual", False) else 0.02
        nn.init.normal_(module.weight, mean=0.0, std=std)

  def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    t = idx.shape[1]
    x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
    for block in self.blocks:
      x = block(x)
    logits = self.head(self.ln_f(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def lr_at(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
  if it < warmup:
    return lr * (it + 1) / (warmup + 1)
  if it > decay_iters or decay_iters <= warmup:
    return min_lr
  ratio = (it - warmup) / (decay_iters - warmup)
  return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--max_iters", type=int, default=2000)
  ap.add_argument("--eval_interval", type=int, default=250)
  ap.add_argument("--eval_iters", type=int, default=20)
  ap.add_argument("--final_eval_batches", type=int, default=200)
  ap.add_argument("--batch_size", type=int, default=12)
  ap.add_argument("--block_size", type=int, default=64)
  ap.add_argument("--n_layer", type=int, default=4)
  ap.add_argument("--n_head", type=int, default=4)
  ap.add_argument("--n_embd", type=int, default=128)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--seed", type=int, default=1337)
  args = ap.parse_args()
  t_start = time.perf_counter()

  text = pathlib.Path(args.data).read_text()
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  ids = np.array([index[c] for c in text], dtype=np.uint16)
  n = int(0.9 * len(ids))
  splits = {
    "train": torch.from_numpy(ids[:n].astype(np.int64)),
    "val": torch.from_numpy(ids[n:].astype(np.int64)),
  }

  torch.manual_seed(args.seed)
  bs, block = args.batch_size, args.block_size

  def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = splits[split]
    starts = torch.randint(len(data) - block, (bs,))
    x = torch.stack([data[i : i + block] for i in starts])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in starts])
    return x, y

  model = CharGPT(len(chars), args.n_layer, args.n_head, args.n_embd, block)
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [
    {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
  ]
  opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99))

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = (out / "metrics.jsonl").open("w")

  @torch.no_grad()
  def estimate(split: str, batches: int) -> float:
    model.eval()
    losses = [model(*get_batch(split)).item() for _ in range(batches)]
    model.train()
    return float(np.mean(losses))

  first_step_at = None
  for it in range(args.max_iters + 1):
    lr = lr_at(it, args.lr, args.lr / 10, 100, args.max_iters)
    for group in opt.param_groups:
      group["lr"] = lr
    if it % args.eval_interval == 0:
      estimate("train", args.eval_iters)  # as the reference: both splits, train first
      val = estimate("val", args.eval_iters)
      row = {"step": it, "split": "eval", "loss": val, "wall_time": time.perf_counter() - t_start}
      rows.write(json.dumps(row) + "\n")
      rows.flush()
    loss = model(*get_batch("train"))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if first_step_at is None:
      first_step_at = time.perf_counter() - t_start
  final = estimate("val", args.final_eval_batches)
  wall = time.perf_counter() - t_start
  rows.write(
    json.dumps({"step": args.max_iters + 1, "split": "final", "loss": final, "wall_time": wall})
    + "\n"
  )
  rows.close()
  print(json.dumps({"final_val": final, "wall_time": wall, "first_step_at": first_step_at}))


if __name__ == "__main__":
  main()
