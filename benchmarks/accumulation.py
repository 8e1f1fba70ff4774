"""Gradient accumulation inside the step: peak memory and step time for k = 1, 2, 4.

``optimizer.accumulate_steps=k`` splits each step's batch into ``k``
micro-batches scanned inside one compiled step, so the run is that of ``k=1``
(same updates up to float summation order) and only the activations' peak
memory shrinks. Measured on the Tiny Shakespeare char transformer at a batch
where activations dominate (64 sequences of 256 characters, 6 layers of
width 384: the GPU config's shape), one process on this machine's CPU:

* peak memory: XLA's own accounting of the compiled step
  (``compiled.memory_analysis()``: temporaries + arguments + outputs, the
  donated state aliased), which is what a device must hold;
* step time: median of interleaved rounds;
* the loss after a few identical steps, for each k (the same batches).

Run: ``python benchmarks/accumulation.py [--steps N]`` (writes the
"Gradient accumulation" section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import interleaved_medians, machine, write_section  # noqa: E402

from adamw_flax import config as C  # noqa: E402
from adamw_flax import registry  # noqa: E402
from adamw_flax import train_state as T  # noqa: E402


def _config(k: int, batch: int, seq: int):
  cfg = C.load_config(ROOT / "configs" / "tiny_shakespeare_gpu.py")
  cfg.data.batch_size = batch
  cfg.data.seq_len = seq
  cfg.model.max_len = seq
  cfg.model.dropout = 0.0  # the same numbers for every k
  cfg.optimizer.accumulate_steps = k
  return C.validate_config(cfg)


def _peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  aliased = getattr(m, "alias_size_in_bytes", 0)
  return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - aliased


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  vocab = 65
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(args.steps):
    tokens = rng.integers(0, vocab, (args.batch, args.seq + 1)).astype(np.int32)
    batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  rows, runs, losses = [], {}, {}
  for k in (1, 2, 4):
    cfg = _config(k, args.batch, args.seq)
    entry = registry.MODELS.get(cfg.model.name)
    state = T.state_from_config(cfg, {"vocab_size": vocab, "chars": ""})
    step = T.make_train_step(entry.loss, accumulate_steps=k, donate=True)
    compiled = step.lower(state, batches[0]).compile()
    peak = _peak_bytes(compiled)
    for batch in batches:
      state, metrics = step(state, batch)
    losses[k] = float(metrics["loss"])
    holder = {"state": state}

    def run(n, step=step, holder=holder):
      s = holder["state"]
      for _ in range(n):
        s, m = step(s, batches[0])
      jax.block_until_ready(m["loss"])
      holder["state"] = s

    runs[k] = run
    rows.append((k, peak))
  times = interleaved_medians({str(k): runs[k] for k in runs}, iters=2, repeats=args.repeats)
  base_peak, base_time = rows[0][1], times["1"]
  table = [
    "| accumulate_steps | micro-batch | peak memory (MiB) | vs k=1 | step time (s) | vs k=1 "
    f"| loss after {args.steps} steps |",
    "|---|---|---|---|---|---|---|",
  ]
  for k, peak in rows:
    table.append(
      f"| {k} | {args.batch // k} x {args.seq} | {peak / 2**20:.0f} | {peak / base_peak:.2f} "
      f"| {times[str(k)]:.2f} | {times[str(k)] / base_time:.2f} | {losses[k]:.5f} |"
    )
  body = "\n".join(
    [
      f"Machine: {machine()}.",
      "",
      "Tiny Shakespeare char transformer in the GPU config's shape (6 layers, width 384, "
      f"bf16 compute), global batch {args.batch} x {args.seq}, dropout off; peak memory from "
      "XLA's memory analysis of the compiled step (temporaries + arguments + outputs, donated "
      "state aliased). The loss column shows the same run for every k (equal up to float "
      "summation order). `python benchmarks/accumulation.py`.",
      "",
      *table,
    ]
  )
  print(body)
  write_section("Gradient accumulation", body)


if __name__ == "__main__":
  main()
