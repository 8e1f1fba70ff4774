"""What every benchmark shares: the machine's description and RESULTS.md sections."""

from __future__ import annotations

import os
import pathlib
import platform
import re
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


def interleaved_medians(
  runs: dict[str, Callable[[int], None]], *, iters: int, repeats: int
) -> dict[str, float]:
  """Seconds per iteration of each run, median over ``repeats`` interleaved rounds.

  Interleaving spreads the machine's noise (other processes) over all runs
  alike, so their ratios hold even when absolute times drift.
  """
  import statistics

  times: dict[str, list[float]] = {k: [] for k in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      t0 = time.perf_counter()
      run(iters)
      times[name].append((time.perf_counter() - t0) / iters)
  return {k: statistics.median(v) for k, v in times.items()}
