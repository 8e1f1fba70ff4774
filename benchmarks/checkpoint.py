"""Checkpoint costs of a ~100M-parameter train state through adamw_flax's Checkpoints.

Usage::

  python benchmarks/checkpoint.py               # ~2 min on 2 cores, writes RESULTS.md
  python benchmarks/checkpoint.py --no-write    # print only
  python benchmarks/checkpoint.py --params 20e6 --repeats 1   # quick look

The state is a :class:`~adamw_flax.train_state.TrainState` of an NNX stack of
square ``Linear`` layers (float32 params, ``mu_dtype=bfloat16``, float32
``nu``: 10 bytes per parameter) saved through
:class:`adamw_flax.checkpoint.Checkpoints` into a fresh directory under
``--dir`` (default: a temporary directory in /tmp, removed afterwards). Per
repetition, interleaved:

* synchronous save: ``save()`` with ``checkpoint.async_save=False``, returning
  when the checkpoint is committed;
* asynchronous save: how long ``save()`` blocks the training loop (Orbax
  takes host copies of the arrays, then a background thread writes them), and
  how long until the write is committed (``wait()``);
* restore: ``restore()`` into the abstract target until every array is ready;
* bytes on disk (every file of the step directory) against the state's bytes
  in memory.

Targets: an async save blocks for < 10% of a synchronous save; disk bytes
<= 1.05x memory bytes. The results replace the "## Checkpoint" section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_section  # noqa: E402

from adamw_flax import checkpoint, train_state  # noqa: E402
from adamw_flax import config as config_lib  # noqa: E402


class Stack(nnx.Module):
  """``depth`` square Linear layers of width ``width``."""

  def __init__(self, width: int, depth: int, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


def build(num_params: float):
  depth = 6
  width = int(round((num_params / depth) ** 0.5 / 128)) * 128
  cfg = config_lib.default_config()
  cfg.optimizer.mu_dtype = "bfloat16"
  cfg.checkpoint.keep = 100
  factory = lambda rngs: Stack(width, depth, rngs)
  state = train_state.create_train_state(factory, cfg)
  # Non-zero moments, as in a real run (zeros would compress).
  state = jax.block_until_ready(_noisy_moments(state))
  target = train_state.create_train_state(factory, cfg, abstract=True)
  return cfg, state, target, width, depth


@jax.jit
def _noisy_moments(state):
  """Fills mu and nu with parameter-derived values (random bits: nothing compressible)."""
  adam = state.opt_state[0]
  mu = jax.tree.map(lambda m, p: (p * 0.1).astype(m.dtype), adam.mu, state.params)
  nu = jax.tree.map(lambda v, p: (p * p).astype(v.dtype), adam.nu, state.params)
  return state.replace(opt_state=(adam._replace(mu=mu, nu=nu), *state.opt_state[1:]))


def disk_bytes(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--params", type=float, default=100e6, help="about this many parameters")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
  parser.add_argument("--dir", default=None, help="parent directory (default: a /tmp tempdir)")
  parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
  args = parser.parse_args()

  cfg, state, target, width, depth = build(args.params)
  leaves = jax.tree.leaves(state)
  mem_bytes = sum(x.nbytes for x in leaves)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"{n_params / 1e6:.1f}M params ({depth} x Linear {width}), state {mem_bytes / 1e6:.0f} MB")

  root = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir or "/tmp"))
  times: dict[str, list[float]] = {"sync": [], "async_block": [], "async_total": [], "restore": []}
  ratios = []
  try:
    for r in range(args.repeats):
      cfg.checkpoint.async_save = False
      with checkpoint.Checkpoints(root / f"sync{r}", cfg, data_info={}) as ckpts:
        t0 = time.perf_counter()
        ckpts.save(state, data_state={"step": 0}, force=True)
        times["sync"].append(time.perf_counter() - t0)
      ratios.append(disk_bytes(root / f"sync{r}" / "0") / mem_bytes)

      cfg.checkpoint.async_save = True
      with checkpoint.Checkpoints(root / f"async{r}", cfg, data_info={}) as ckpts:
        t0 = time.perf_counter()
        ckpts.save(state, data_state={"step": 0}, force=True)
        times["async_block"].append(time.perf_counter() - t0)
        ckpts.wait()
        times["async_total"].append(time.perf_counter() - t0)

      with checkpoint.Checkpoints(root / f"sync{r}", cfg, data_info={}) as ckpts:
        t0 = time.perf_counter()
        restored, _ = ckpts.restore(target)
        jax.block_until_ready(restored)
        times["restore"].append(time.perf_counter() - t0)
      del restored
      shutil.rmtree(root / f"async{r}")
      print(
        f"round {r}: sync {times['sync'][-1]:.2f} s, async blocks {times['async_block'][-1]:.3f} s "
        f"(done after {times['async_total'][-1]:.2f} s), restore {times['restore'][-1]:.2f} s",
        flush=True,
      )
  finally:
    shutil.rmtree(root, ignore_errors=True)

  med = {k: statistics.median(v) for k, v in times.items()}
  block_pct = 100 * med["async_block"] / med["sync"]
  ratio = statistics.median(ratios)
  gb = mem_bytes / 1e9
  rows = [
    ("synchronous save", med["sync"], f"{gb / med['sync']:.2f} GB/s", ""),
    (
      "async save: blocks the loop",
      med["async_block"],
      f"{block_pct:.1f}% of sync",
      "< 10%: " + ("met" if block_pct < 10 else "**missed**"),
    ),
    ("async save: committed", med["async_total"], f"{gb / med['async_total']:.2f} GB/s", ""),
    ("restore (into target shardings)", med["restore"], f"{gb / med['restore']:.2f} GB/s", ""),
  ]
  try:
    load = f"load average {os.getloadavg()[0]:.1f}"
  except OSError:
    load = "load unknown"
  body = [
    f"`python benchmarks/checkpoint.py` ({datetime.date.today()}): a TrainState of "
    f"{n_params / 1e6:.1f}M float32 params ({depth} x `nnx.Linear({width}, {width})`) with "
    f"bfloat16 `mu` and float32 `nu`, {mem_bytes / 1e6:.0f} MB in memory, saved through "
    f"`adamw_flax.checkpoint.Checkpoints` (Orbax {_orbax_version()}, OCDBT) to local disk "
    f"under /tmp; median of {args.repeats} interleaved rounds. Machine: {machine()}; {load} "
    "when run (a shared machine: absolute times vary).",
    "",
    "| operation | median s | rate / share | target |",
    "|---|---:|---:|---|",
    *(f"| {name} | {t:.3f} | {rate} | {goal} |" for name, t, rate, goal in rows),
    f"| bytes on disk / in memory | {ratio:.3f} | {mem_bytes * ratio / 1e6:.0f} MB / "
    f"{mem_bytes / 1e6:.0f} MB | <= 1.05: {'met' if ratio <= 1.05 else '**missed**'} |",
    "",
    "- An async save blocks while Orbax takes host copies of the arrays and computes the "
    "checkpoint's metadata; writing, compressing and committing run in its background "
    "thread while training goes on. On this CPU-only machine the host copies are "
    "zero-copy views of the device buffers (JAX then does not donate those buffers to the "
    "next step, so the saved values stay intact; the crash tests check this bitwise); on "
    "a GPU or TPU the blocking part also holds the device-to-host copy of the state, not "
    "measured here.",
    "- Disk bytes include Orbax's metadata, the JSON items (config, fingerprint) and the "
    "OCDBT manifest; arrays are stored in their own dtypes, zstd-compressed (Orbax's "
    "default, level 1), which float bits resist: the ratio stays near 1.",
  ]
  text = "\n".join(body)
  print(text)
  if not args.no_write:
    write_section("Checkpoint", text)


def _orbax_version() -> str:
  import orbax.checkpoint as ocp

  return ocp.__version__


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
