"""What every benchmark shares: the machine's description and RESULTS.md sections."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import re
import statistics
import time
from collections.abc import Callable

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def machine() -> str:
  """One line naming the machine and library versions."""
  import flax
  import jax
  import optax

  dev = jax.devices()[0]
  return (
    f"{jax.device_count()}x {dev.platform.upper()} ({getattr(dev, 'device_kind', '')}), "
    f"{os.cpu_count()}-core {cpu_model()}; jax {jax.__version__}, flax {flax.__version__}, "
    f"optax {optax.__version__}"
  )


def write_section(title: str, body: str) -> None:
  """Replaces (or appends) the ``## title`` section of benchmarks/RESULTS.md."""
  heading = f"## {title}"
  section = f"{heading}\n\n{body.strip()}\n"
  text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
  pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + "\n", text)
  else:
    text = text.rstrip("\n") + "\n\n" + section
  RESULTS.write_text(text.rstrip("\n") + "\n")


def publish(title: str, text: str, cache_path: pathlib.Path, cache: dict, write: bool) -> None:
  """Prints a benchmark's section; with ``write``, keeps its cache (JSON) and puts it in RESULTS.md."""
  print(text)
  if write:
    cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    write_section(title, text)


def interleaved_medians(
  runs: dict[str, Callable[[int], None]], *, iters: int, repeats: int
) -> dict[str, float]:
  """Seconds per iteration of each run, median over ``repeats`` interleaved rounds.

  Interleaving spreads the machine's noise (other processes) over all runs
  alike, so their ratios hold even when absolute times drift.
  """
  times: dict[str, list[float]] = {k: [] for k in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      t0 = time.perf_counter()
      run(iters)
      times[name].append((time.perf_counter() - t0) / iters)
  return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak_gflops(n: int = 2048) -> float:
  """float32 GFLOP/s of a jitted ``n^3`` dot on this machine (median of 5 calls)."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times) / 1e9


def compiled_gflop(fn: Callable, *args) -> float:
  """GFLOP of one call of the jitted ``fn(*args)``, from XLA's cost analysis."""
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"]) / 1e9


def shakespeare_step():
  """The Tiny Shakespeare default recipe's ``(config, model entry, state, batch, step)``.

  The state at init, a batch of random tokens and the trainer's compiled train
  step (not donating, so it can be called again on the same state).
  """
  import jax

  from adamw_flax import config, registry, train_state

  cfg = config.load_config(RESULTS.parent.parent / "configs" / "tiny_shakespeare.py")
  entry = registry.MODELS.get(cfg.model.name)
  state = train_state.registered_state_factory(cfg, {"vocab_size": 65, "chars": ""}).create()
  b, t = cfg.data.batch_size, cfg.data.seq_len
  tokens = jax.random.randint(jax.random.key(0), (b, t + 1), 0, 65)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  return cfg, entry, state, batch, train_state.make_train_step(entry.loss, donate=False)
