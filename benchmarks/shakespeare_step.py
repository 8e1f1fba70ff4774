"""Where the Tiny Shakespeare train step's time goes on this CPU.

Usage::

  python benchmarks/shakespeare_step.py            # ~1 min; writes its RESULTS.md section
  python benchmarks/shakespeare_step.py --no-write

Times, in one process (the three parts in interleaved rounds, medians), for the default
recipe's model and batch:

* the forward loss alone, the forward + backward (``jax.value_and_grad``), and
  the trainer's whole compiled step (gradients, clipping, AdamW, metrics);
* every matmul of the step on its own (each shape of the forward, and the two
  gradient matmuls of each, with the same layouts as the step), jitted one
  by one: their sum is what XLA:CPU's matmul kernels need at these shapes,
  which bounds the step from below;
* the machine's float32 matmul peak (a 2048^3 dot).

The gap between the step and the sum of its matmuls is everything else
(attention's softmax and masking, layer norms, GELU, the embedding gather and
its scatter-add gradient, the optimizer), and the gap between the matmuls'
rate and the peak is what small shapes cost XLA:CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from common import (  # noqa: E402
  compiled_gflop,
  interleaved_medians,
  machine,
  matmul_peak_gflops,
  shakespeare_step,
  write_section,  # noqa: E402
)

TITLE = "Tiny Shakespeare train step: where the time goes"


def _timed(f, *args, rounds: int = 7, iters: int = 10) -> float:
  out = f(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(iters):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / iters)
  return statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args()

  cfg, entry, state, batch, step = shakespeare_step()
  b, t = cfg.data.batch_size, cfg.data.seq_len

  def loss_of(params):
    model = state.merge(params, state.rest)
    return entry.loss(model, batch, train=True)[0]

  forward = jax.jit(loss_of)
  grad = jax.jit(jax.value_and_grad(loss_of))

  def repeat(f, *args):
    def run(iters: int) -> None:
      for _ in range(iters):
        out = f(*args)
      jax.block_until_ready(out)

    run(1)  # compile
    return run

  # The three parts in interleaved rounds, so that the machine's noise falls on all alike.
  results = interleaved_medians(
    {
      "forward loss": repeat(forward, state.params),
      "forward + backward": repeat(grad, state.params),
      "whole train step": repeat(step, state, batch),
    },
    iters=10,
    repeats=9,
  )
  flops = compiled_gflop(step, state, batch) * 1e9

  # The step's matmuls: rows N = B*T; width D; per layer qkv (D->3D), proj (D->D),
  # fc (D->4D), out (4D->D); the tied head (D->V); attention's two batched
  # einsums per head. Forward x @ W, and the gradients dx = g @ W.T, dW = x.T @ g.
  n, d, v = b * t, cfg.model.embed_dim, 65
  heads, layers = cfg.model.num_heads, cfg.model.num_layers
  dense = [(n, d, 3 * d), (n, d, d), (n, d, 4 * d), (n, 4 * d, d)]
  rows: list[tuple[str, float, float]] = []

  def matmul_time(m: int, k: int, nn: int) -> tuple[float, float]:
    x = jnp.ones((m, k), jnp.float32)
    w = jnp.ones((k, nn), jnp.float32)
    g = jnp.ones((m, nn), jnp.float32)
    fwd = _timed(jax.jit(lambda x, w: x @ w), x, w)
    dx = _timed(jax.jit(lambda g, w: g @ w.T), g, w)
    dw = _timed(jax.jit(lambda x, g: x.T @ g), x, g)
    return fwd + dx + dw, 3 * 2 * m * k * nn

  total_mm, total_mm_flops = 0.0, 0.0
  for m, k, nn in dense:
    sec, fl = matmul_time(m, k, nn)
    rows.append((f"{m}x{k} @ {k}x{nn} (+ its 2 gradients), x{layers}", sec * layers, fl * layers))
    total_mm += sec * layers
    total_mm_flops += fl * layers
  sec, fl = matmul_time(n, d, v)
  rows.append((f"{n}x{d} @ {d}x{v} head (+ 2 gradients)", sec, fl))
  total_mm += sec
  total_mm_flops += fl
  # attention: per (batch, head) q @ k.T [T, hd] x [hd, T] and p @ v [T, T] x [T, hd]
  hd = d // heads
  q = jnp.ones((b, heads, t, hd), jnp.float32)
  p = jnp.ones((b, heads, t, t), jnp.float32)
  att = _timed(jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k)), q, q)
  pv = _timed(jax.jit(lambda p, v: jnp.einsum("bhqk,bhkd->bhqd", p, v)), p, q)
  att_sec = 3 * (att + pv) * layers  # forward and roughly 2x for the backward
  att_flops = 3 * 2 * 2 * b * heads * t * t * hd * layers
  rows.append((f"attention einsums ({b}x{heads} heads of {t}x{hd}, ~3x forward), x{layers}",
               att_sec, att_flops))  # fmt: skip
  total_mm += att_sec
  total_mm_flops += att_flops

  peak = matmul_peak_gflops()

  whole = results["whole train step"]
  lines = [
    f"Measured on {machine()}; the default recipe's model (4 layers, width 128) and batch "
    f"({b} x {t}); the three parts timed in 9 interleaved rounds of 10 calls (medians), "
    "each matmul on its own.",
    "",
    "| part | ms | share of the step |",
    "|---|---|---|",
    *[f"| {k} | {v * 1e3:.1f} | {v / whole:.0%} |" for k, v in results.items()],
    "",
    "| the step's matmuls, each jitted alone | ms | GFLOP/s |",
    "|---|---|---|",
    *[f"| {name} | {s * 1e3:.2f} | {fl / s / 1e9:.0f} |" for name, s, fl in rows],
    f"| **all matmuls** | **{total_mm * 1e3:.1f}** | {total_mm_flops / total_mm / 1e9:.0f} |",
    "",
    f"The step is {flops / 1e9:.2f} GFLOP (XLA's cost analysis): {flops / whole / 1e9:.0f} "
    f"GFLOP/s, {flops / whole / 1e9 / peak:.0%} of the {peak:.0f} GFLOP/s a 2048^3 float32 "
    f"dot reaches here. Its matmuls alone, at these shapes, take {total_mm * 1e3:.1f} ms "
    f"({total_mm / whole:.0%} of the step) at {total_mm_flops / total_mm / 1e9:.0f} GFLOP/s; "
    f"the other {max(whole - total_mm, 0) * 1e3:.1f} ms are the elementwise work, "
    "reductions, the embedding gradient and the optimizer. "
    f"The optimizer and metrics add {(whole - results['forward + backward']) * 1e3:.1f} ms "
    "to the forward + backward.",
  ]
  text = "\n".join(lines)
  print(text)
  if not args.no_write:
    write_section(TITLE, text)


if __name__ == "__main__":
  main()
