"""What every benchmark shares: the machine's description and RESULTS.md sections."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
ROOT = RESULTS.parent.parent
SHARED_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


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


# The lines of ``python -m train.compile``'s report that the pod benchmarks read.
_TOPOLOGY = re.compile(r"^topology \S+: (\d+) chips .*mesh (\{.*\})")
_PEAK = re.compile(
  r"^per-chip HBM: .*temps ([\d.e+-]+) GiB, peak ([\d.e+-]+) GiB of ([\d.]+) GiB \((fits|DOES NOT FIT)\)"
)
_STATE = re.compile(r"optimizer state ([\d.e+-]+) GiB")
_HOST = re.compile(r"in host memory ([\d.e+-]+) GiB")
_NEEDS = re.compile(r"^per-chip HBM: needs about ([\d.]+) GiB of ([\d.]+) GiB")
_STEP = re.compile(r"^step estimate: ([\d.]+) ms, ([\d.]+) TFLOP per chip, MFU ([\d.]+)%")
_BUFFER = re.compile(r"^\s+([\d.]+) GiB\s+temp \S+ (\S+): (.*)$")
_ERROR = re.compile(r"^(error: |[\w.]*(Error|Exception)\b)")


def compile_pod_lm(topology: str, config_overrides: list[str], timeout: int) -> dict:
  """Runs ``python -m train.compile`` on configs/pod_lm.py; the report's figures (or its error).

  Args:
    topology: the slice, as the command's ``--topology`` takes it.
    config_overrides: ``key=value`` strings, passed as ``--config.key=value``.
    timeout: seconds before the compile is abandoned (reported as an error).

  Returns:
    A dict: ``seconds``, ``status``, ``overrides``, ``lines`` (the report as
    printed); from the report ``chips``, ``mesh``, ``temps``, ``peak``, ``hbm``,
    ``fits``, ``state`` (optimizer state in HBM), ``host`` (offloaded to host
    memory), ``ms``, ``tflop``, ``mfu`` (``ms`` None where the cost model gives
    no estimate), ``largest`` (the largest temporary); ``error`` (the error or
    exception line, else the last) where the report has no memory line.
  """
  cmd = [sys.executable, "-m", "train.compile", "--config=configs/pod_lm.py"]
  cmd += [f"--topology={topology}", *(f"--config.{o}" for o in config_overrides)]
  if SHARED_TEXT.is_file():  # no download on machines that hold the text
    cmd.append(f"--config.data.path={SHARED_TEXT}")
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1"
  )
  t0 = time.perf_counter()
  out: dict = {"overrides": config_overrides}
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**out, "seconds": timeout, "status": None, "error": f"timed out after {timeout} s"}
  out.update(seconds=round(time.perf_counter() - t0, 1), status=proc.returncode)
  out["lines"] = proc.stdout.splitlines()
  for line in out["lines"]:
    if m := _TOPOLOGY.match(line):
      out["chips"], out["mesh"] = int(m[1]), m[2]
    elif m := _PEAK.match(line):
      out.update(temps=float(m[1]), peak=float(m[2]), hbm=float(m[3]))
      out["fits"] = m[4] == "fits"
      out["state"] = float(_STATE.search(line)[1])
      out["host"] = float(host[1]) if (host := _HOST.search(line)) else 0.0
    elif m := _NEEDS.match(line):
      out.update(peak=float(m[1]), hbm=float(m[2]), temps=None, fits=False)
    elif m := _STEP.match(line):
      out.update(ms=float(m[1]), tflop=float(m[2]), mfu=float(m[3]))
    elif line.startswith("step estimate: unavailable"):
      out.update(ms=None, mfu=None)
    elif (m := _BUFFER.match(line)) and "largest" not in out:
      out["largest"] = f"{m[1]} GiB {m[2]}"
  if "peak" not in out or proc.returncode not in (0, 2):
    lines = (proc.stdout + proc.stderr).strip().splitlines() or ["(no output)"]
    errors = [x for x in lines if _ERROR.match(x)]
    out["error"] = (errors or lines)[-1][:300]
  return out


def tpu_compile_machine(load_before: float, *details: str) -> str:
  """The pod benchmarks' machine line: CPU, jax and libtpu versions, load, then ``details``."""
  return "; ".join(
    [
      f"{os.cpu_count()}-core {cpu_model()}",
      f"jax {importlib.metadata.version('jax')}, libtpu {importlib.metadata.version('libtpu')}",
      *details,
      f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after",
    ]
  )
