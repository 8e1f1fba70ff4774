"""Start-up time of ``python -m train``: launch to the first train step dispatched.

Each measurement launches the command line exactly as a user does (its
re-exec for the malloc settings included) and times, from the launch:

* the first train step dispatched (its call returned: traced, compiled and
  on its way; nothing after it is timed), for small models of each kind, as
  the trainer runs it (the train step compiled on a second thread while the
  state is created) and, side by side in the same rounds, with the step
  compiled by its first call after the state (the start-up before); with
  where the time went: imports done (``adamw_flax.trainer`` loaded), state
  created, first step dispatched; and a later launch with JAX's persistent
  compilation cache warm (``JAX_COMPILATION_CACHE_DIR``);
* ``python -m train --help``, and a config error (an unknown key).

Rounds are interleaved, so other processes' load spreads over all variants;
medians of wall time and of the process's CPU time (user + system, from
``wait4``) are reported with the load average. The timestamps come from a
``sitecustomize`` module put on the child's ``PYTHONPATH`` that wraps two
library functions and ends the process at the first dispatch; the code under
test is not changed.

Run: ``python benchmarks/startup.py [--rounds=3] [--clean_venv=DIR]`` (writes
the "Start-up" section of benchmarks/RESULTS.md). With ``--clean_venv`` the
same rounds run first in a virtual environment holding only the project and
its dependencies (created there if missing), as a fresh machine has them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A launch that has not ended by then is killed (one takes 1-5 s).
LAUNCH_TIMEOUT_S = 600
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_TEXT, cpu_model, write_section  # noqa: E402

SHARED = SHARED_TEXT

# The child's instrumentation: timestamps into $STARTUP_OUT, exit at the first dispatch.
HOOK = textwrap.dedent(
  """
  import importlib.abc, importlib.util, json, os, sys, time

  OUT = os.environ["STARTUP_OUT"]
  marks = {}

  def mark(name):
    marks.setdefault(name, time.time())

  def patch_train_state(m):
    create = m.StateFactory.create
    def timed_create(self, *a, **k):
      out = create(self, *a, **k)
      mark("state")
      return out
    m.StateFactory.create = timed_create
    make = m.make_run_steps
    def timed_make(*a, **k):
      steps = make(*a, **k)
      train = steps.train
      class First:  # the jitted step (its .lower too: the trainer precompiles it), timed
        def __getattr__(self, name):
          if os.environ.get("STARTUP_SERIAL") == "1":
            raise AttributeError(name)  # no precompile: the first call compiles, as before
          return getattr(train, name)
        def __call__(self, *args, **kw):
          out = train(*args, **kw)
          mark("dispatched")
          marks["params"] = m.param_count(args[0].params)
          with open(OUT, "w") as f:
            json.dump(marks, f)
          os._exit(0)
      return type(steps)(train=First(), evals=steps.evals)
    m.make_run_steps = timed_make

  PATCHES = {"adamw_flax.train_state": patch_train_state,
             "adamw_flax.trainer": lambda m: mark("imported")}

  class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
      if name not in PATCHES:
        return None
      sys.meta_path.remove(self)
      try:
        spec = importlib.util.find_spec(name)
      finally:
        sys.meta_path.insert(0, self)
      run = spec.loader.exec_module
      def exec_module(module):
        run(module)
        PATCHES[name](module)
      spec.loader.exec_module = exec_module
      return spec

  sys.meta_path.insert(0, Hook())
  """
)

MODELS = {
  # label: (config, overrides)
  "Linen ResNet (BatchNorm, batch_stats)": (
    "tests/configs/model_kinds.py:resnet",
    ["model.filters=8", "model.stages=(2, 2)"],
  ),
  "NNX CNN (BatchNorm, Dropout, Rngs)": ("tests/configs/user.py:cnn", []),
  "NNX gemma-style (own shardings, 1 device)": (
    "tests/configs/model_kinds.py:gemma",
    ["mesh.shape=(1, 1)"],
  ),
  "Tiny Shakespeare char transformer": (
    "configs/tiny_shakespeare.py",
    [f"data.path={SHARED}"] if SHARED.exists() else [],
  ),
}


def _launch(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
  """(wall seconds, CPU seconds, exit status) of one launch."""
  t0 = time.time()
  proc = subprocess.Popen(
    args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = threading.Timer(LAUNCH_TIMEOUT_S, proc.kill)  # a hung launch ends (and fails)
  deadline.start()
  try:
    _, status, usage = os.wait4(proc.pid, 0)
  finally:
    deadline.cancel()
  proc.returncode = os.waitstatus_to_exitcode(status)
  return time.time() - t0, usage.ru_utime + usage.ru_stime, proc.returncode


def _env(hook_dir: str, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([hook_dir, str(ROOT)])
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env.update(extra)
  return env


def first_step(
  hook_dir: str,
  config: str,
  overrides: list[str],
  serial: bool = False,
  cache: str = "",
  python: str = sys.executable,
) -> dict[str, float]:
  with tempfile.TemporaryDirectory() as work:
    out = Path(work) / "marks.json"
    args = [python, "-m", "train", f"--config={config}", f"--workdir={work}/run"]
    args += [f"--config.{o}" for o in overrides]
    t0 = time.time()
    env = _env(hook_dir, STARTUP_OUT=str(out), STARTUP_SERIAL="1" if serial else "0")
    if cache:  # JAX's persistent compilation cache, as a user would set it
      env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    wall, cpu, code = _launch(args, env)
    if code != 0 or not out.exists():
      raise RuntimeError(f"{config}: exit status {code}, no first step")
    marks = json.loads(out.read_text())
  return {
    "first": marks["dispatched"] - t0,
    "imported": marks["imported"] - t0,
    "state": marks["state"] - t0,
    "cpu": cpu,
    "params": marks["params"],
    "wall": wall,
  }


def clean_venv(path: Path) -> str:
  """The python of a virtual environment with only the project (and its shakespeare extra).

  What a fresh machine has after the README's first command: this machine's
  own site-packages hold more (IPython, which Flax's NNX imports when it is
  there; boto3, which tensorboardX imports when it is there), each a cost
  of every launch here that a user's environment may not have.
  """
  python = path / "bin" / "python"
  if not python.exists():
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    pip = [str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[shakespeare]"]
    subprocess.run(pip, check=True, timeout=1800)
  return str(python)


def ml_dtypes_import(python: str) -> str:
  """How long ``import ml_dtypes`` takes in ``python`` (0.7.0: 0.4 s; pyproject excludes it)."""
  code = (
    "import time, numpy; t = time.perf_counter(); import ml_dtypes; "
    "print(f'ml_dtypes {ml_dtypes.__version__} imports in {time.perf_counter() - t:.3f} s')"
  )
  proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
  return proc.stdout.strip()


def measure(python: str, rounds: int, hook_dir: str, caches: str) -> tuple[list[str], list]:
  """Interleaved rounds with one interpreter: (table lines, load averages)."""
  runs: dict[tuple[str, str], list[dict[str, float]]] = {}
  small: dict[str, list[tuple[float, float]]] = {"help": [], "config error": []}
  loads = []
  variants = {"now": (False, False), "serial": (True, False), "cached": (False, True)}
  cache_of = {label: f"{caches}/{i}" for i, label in enumerate(MODELS)}
  for label, (config, overrides) in MODELS.items():  # fills each model's cache
    first_step(hook_dir, config, overrides, cache=cache_of[label], python=python)
  for r in range(rounds):
    loads.append(os.getloadavg()[0])
    for label, (config, overrides) in MODELS.items():
      for variant, (serial, cached) in variants.items():
        cache = cache_of[label] if cached else ""
        got = first_step(hook_dir, config, overrides, serial, cache, python)
        runs.setdefault((label, variant), []).append(got)
        print(f"round {r} {label} {variant}: {got}", flush=True)
    env = _env(hook_dir)
    wall, cpu, _ = _launch([python, "-m", "train", "--help"], env)
    small["help"].append((wall, cpu))
    bad = [python, "-m", "train", "--config=configs/smoke.py", "--workdir=/tmp/x",
           "--config.optimizer.lerning_rate=1"]  # fmt: skip
    wall, cpu, code = _launch(bad, env)
    assert code == 2, code
    small["config error"].append((wall, cpu))
    print(f"round {r}: help {small['help'][-1]}, config error {small['config error'][-1]}")

  med = lambda rows, key: statistics.median(row[key] for row in rows)
  lines = [
    "| model | params | launch to first step dispatched, s (CPU s) | imports done | state created "
    "| serial: step compiled after the state | warm compilation cache |",
    "|---|---|---|---|---|---|---|",
  ]
  for label in MODELS:
    now, serial, warm = (runs[(label, v)] for v in variants)
    lines.append(
      f"| {label} | {int(now[0]['params']):,} | {med(now, 'first'):.2f} ({med(now, 'cpu'):.2f}) "
      f"| {med(now, 'imported'):.2f} | {med(now, 'state'):.2f} "
      f"| {med(serial, 'first'):.2f} ({med(serial, 'cpu'):.2f}) "
      f"| {med(warm, 'first'):.2f} ({med(warm, 'cpu'):.2f}) |"
    )
  lines += ["", "| command | wall s | CPU s |", "|---|---|---|"]
  lines += [
    f"| `{name}` | {statistics.median(w for w, _ in v):.2f} | "
    f"{statistics.median(c for _, c in v):.2f} |"
    for name, v in small.items()
  ]
  return lines, loads


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--clean_venv",
    default="",
    help="also measure in this virtual environment of the project's own dependencies "
    "(created if missing; needs the package index)",
  )
  args = parser.parse_args()
  pythons = {"this machine's Python (its site-packages)": sys.executable}
  if args.clean_venv:
    pythons = {
      "a virtual environment with only the project's dependencies (`pip install -e "
      "'.[shakespeare]'`, as on a fresh machine)": clean_venv(Path(args.clean_venv)),
      **pythons,
    }
  parts, loads = [], []
  with tempfile.TemporaryDirectory() as hook_dir:
    (Path(hook_dir) / "sitecustomize.py").write_text(HOOK)
    for where, python in pythons.items():
      with tempfile.TemporaryDirectory() as caches:
        lines, got = measure(python, args.rounds, hook_dir, caches)
      loads += got
      parts += [f"### In {where}", "", f"{ml_dtypes_import(python)}.", "", *lines, ""]
  import jax  # noqa: PLC0415 (versions for the header only)

  body = "\n".join(
    [
      f"Measured {time.strftime('%Y-%m-%d')} on a {os.cpu_count()}-core {cpu_model()} "
      f"(`lscpu`), jax {jax.__version__}, CPU backend (`JAX_PLATFORMS=cpu`); load average "
      f"{', '.join(f'{x:.1f}' for x in loads)} at the rounds' starts; medians of "
      f"{args.rounds} interleaved rounds. Wall time from launch (`python -m train`, its "
      "re-exec included) to the first train step's call returning; CPU s is the process's "
      'user + system time. "imports done" and "state created": seconds from launch to '
      "`adamw_flax.trainer` loaded and to the state created. The train step compiles on a "
      "second thread from abstract values while the state is created (XLA compiles without "
      'the GIL); "serial": the same launch with the step compiled by its first call, after '
      'the state, as before; "warm compilation cache": a later launch with '
      "`JAX_COMPILATION_CACHE_DIR` set. `python benchmarks/startup.py --clean_venv=DIR`.",
      "",
      *parts,
    ]
  )
  print(body)
  write_section("Start-up", body)


if __name__ == "__main__":
  main()
