"""``python -m train`` jobs of one or several real processes, for tests that watch them end.

Unlike :func:`tests.sharding_workers.run_processes` (which kills the others
as soon as one fails), a :class:`Job` lets every process end by itself, so a
test can check how each one ends: its status, its output, and when. Every
process gets its own session and is SIGKILLed (with its children) at the
deadline or when the test is done, so none outlives the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import ROOT
from tests.sharding_workers import child_env, free_port


def write_config(path: Path, **overrides) -> Path:
  """A config file whose ``get_config`` is :func:`tests.reliability_models.config` with overrides.

  Keys are ``section__name`` (``trainer__num_steps=40``).
  """
  path.write_text(
    "from tests.reliability_models import config\n\n\n"
    f"def get_config():\n  return config(**{overrides!r})\n"
  )
  return path


class Job:
  """Processes of one ``python -m train`` job, started at once.

  Args:
    config: the config file.
    workdir: the run's directory.
    log_dir: where ``process_<i>.log`` (stdout + stderr) goes.
    num_processes: processes (``jax.distributed`` on localhost when > 1).
    devices: CPU devices per process.
    args: more command-line arguments (``--config.x=y``).
    env: more environment variables.
    process_args: more arguments for each process (one list per process).
  """

  def __init__(
    self,
    config: Path,
    workdir: Path,
    log_dir: Path,
    *,
    num_processes: int = 1,
    devices: int = 1,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    process_args: Sequence[Sequence[str]] | None = None,
  ):
    log_dir.mkdir(parents=True, exist_ok=True)
    self.logs = [log_dir / f"process_{i}.log" for i in range(num_processes)]
    self.workdir = workdir
    address = f"127.0.0.1:{free_port()}"
    self.procs: list[subprocess.Popen] = []
    self.started = time.monotonic()
    for i, log in enumerate(self.logs):
      cmd = [sys.executable, "-m", "train", f"--config={config}", f"--workdir={workdir}", *args]
      cmd += list(process_args[i]) if process_args else []
      if num_processes > 1:
        cmd += [
          f"--coordinator_address={address}",
          f"--num_processes={num_processes}",
          f"--process_id={i}",
        ]
      with open(log, "wb") as f:
        self.procs.append(
          subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**child_env(devices), **(env or {})},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
          )
        )

  def output(self, i: int = 0) -> str:
    """Process ``i``'s output so far."""
    return self.logs[i].read_text(errors="replace") if self.logs[i].exists() else ""

  def signal(self, signum: int, i: int = 0) -> None:
    """Sends ``signum`` to process ``i`` (not its group: a user's Ctrl-C or kill)."""
    self.procs[i].send_signal(signum)

  def wait_for_step(self, step: int, timeout: float) -> None:
    """Waits until ``metrics.jsonl`` has a train row at ``step`` or later."""
    deadline = time.monotonic() + timeout
    path = self.workdir / "metrics.jsonl"
    while time.monotonic() < deadline:
      if any(p.poll() is not None for p in self.procs):
        raise AssertionError(f"a process ended before step {step}:\n{self.output()[-3000:]}")
      if path.exists():
        for line in path.read_text().splitlines():
          try:
            row = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line being written
          if row.get("split") == "train" and row["step"] >= step:
            return
      time.sleep(0.1)
    self.kill()
    raise AssertionError(f"no step {step} within {timeout:.0f}s:\n{self.output()[-3000:]}")

  def wait(self, timeout: float) -> tuple[list[int | None], list[float]]:
    """Waits for every process to end; returns their statuses and end times (s since start).

    A process still running at the timeout is killed and reported as None.
    """
    deadline = self.started + timeout
    ends: list[float | None] = [None] * len(self.procs)
    while time.monotonic() < deadline and any(e is None for e in ends):
      for i, p in enumerate(self.procs):
        if ends[i] is None and p.poll() is not None:
          ends[i] = time.monotonic() - self.started
      time.sleep(0.05)
    codes = [p.poll() for p in self.procs]
    self.kill()
    return codes, [e if e is not None else float("inf") for e in ends]

  def kill(self) -> None:
    """SIGKILLs whatever is still running (with its children)."""
    for p in self.procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      p.wait()

  def __enter__(self) -> Job:
    return self

  def __exit__(self, *exc) -> None:
    self.kill()
