"""The final evaluation on several devices and processes, run again and again beside a load.

The reliability issue's command, the Tiny Shakespeare job cut to 40 steps
with its evaluation at the end, hung or aborted in that final evaluation:
1 process x 4 devices aborted at XLA:CPU's all-reduce rendezvous, 2 processes
x 2 devices (``jax.distributed``, gloo) hung. This script runs it ``--runs``
times in each form, one after the other, while another training process runs
beside it (the condition under which it failed), each run under a deadline,
and writes how each one ended to ``benchmarks/RESULTS.md``. Every run must
end by itself with status 0.

  python benchmarks/stress_final_eval.py --runs 10
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
# The command; warmup shortened to fit 40 steps (the config's 100 would be refused).
ARGS = [
  "--config=configs/tiny_shakespeare.py",
  "--config.trainer.num_steps=40",
  "--config.trainer.eval_every=40",
  "--config.optimizer.warmup_steps=10",
]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT)
  return env


def _data_args(text: Path | None) -> list[str]:
  return [f"--config.data.path={text}"] if text and text.exists() else []


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
  with open(log, "wb") as f:
    return subprocess.Popen(
      cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
    )


def _kill(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    p.wait()


def one_run(form: str, workdir: Path, logs: Path, deadline_s: float, text: Path | None):
  """One run of the command in ``form`` ("1x4" or "2x2"); returns (statuses, seconds)."""
  base = [sys.executable, "-m", "train", *ARGS, *_data_args(text), f"--workdir={workdir}"]
  if form == "1x4":
    cmds, env = [base], _env(4)
  else:
    address = f"127.0.0.1:{_port()}"
    flags = [f"--coordinator_address={address}", "--num_processes=2"]
    cmds, env = [base + flags + [f"--process_id={i}"] for i in range(2)], _env(2)
  start = time.monotonic()
  procs = [_start(c, env, logs / f"{workdir.name}_{i}.log") for i, c in enumerate(cmds)]
  try:
    while time.monotonic() - start < deadline_s and any(p.poll() is None for p in procs):
      time.sleep(0.2)
    return [p.poll() for p in procs], time.monotonic() - start
  finally:
    _kill(procs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=10, help="runs of each form")
  parser.add_argument("--deadline", type=float, default=600.0, help="seconds a run may take")
  parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
  parser.add_argument("--text", type=Path, default=TEXT, help="the Tiny Shakespeare text")
  parser.add_argument("--results", type=Path, default=RESULTS, help="the RESULTS.md to update")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="stress_") as tmp:
    root = Path(tmp)
    logs = root / "logs"
    logs.mkdir()
    # The load beside it: another training process, the same job at full length.
    load_cmd = [sys.executable, "-m", "train", "--config=configs/tiny_shakespeare.py",
                *_data_args(args.text), f"--workdir={root / 'load'}", "--config.trainer.num_steps=100000",
                "--config.trainer.progress=False"]  # fmt: skip
    load = _start(load_cmd, _env(1), logs / "load.log")
    rows = []
    try:
      for i in range(args.runs):
        for form in ("1x4", "2x2"):
          codes, took = one_run(form, root / f"{form}_{i}", logs, args.deadline, args.text)
          ok = all(c == 0 for c in codes)
          rows.append((form, i, codes, took, ok))
          print(f"{form} run {i}: statuses {codes}, {took:.1f} s, {'ok' if ok else 'FAILED'}")
          if not ok:
            for log in sorted(logs.glob(f"{form}_{i}_*.log")):
              print(f"--- {log.name}\n" + log.read_text(errors="replace")[-2000:])
          if load.poll() is not None:  # keep the load running
            load = _start(load_cmd, _env(1), logs / f"load_{i}.log")
    finally:
      _kill([load])
  failed = [r for r in rows if not r[4]]
  summary = f"{len(rows) - len(failed)} of {len(rows)} runs ended with status 0"
  print(summary)
  if not args.no_write:
    _write(rows, summary, args.results)
  sys.exit(1 if failed else 0)


def _cpu() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown CPU"


def _write(rows, summary: str, results: Path) -> None:
  import jax  # noqa: PLC0415 (only for the versions line)

  times = {form: [r[3] for r in rows if r[0] == form] for form in ("1x4", "2x2")}
  lines = [
    "## Final evaluation under load (reliability)",
    "",
    f"`python benchmarks/stress_final_eval.py --runs {len(rows) // 2}` "
    f"({datetime.date.today().isoformat()}): the Tiny Shakespeare job cut to 40 steps with its "
    "final evaluation (200 batches), as 1 process x 4 devices and as 2 processes x 2 devices "
    "(jax.distributed, gloo), alternately, while another training process runs beside it. "
    f"Machine: {os.cpu_count()}-core {_cpu()}; jax {jax.__version__}, Python "
    f"{platform.python_version()}.",
    "",
    f"- **{summary}** (deadline per run: none was reached if all ended).",
  ]
  for form, ts in times.items():
    if ts:
      lines.append(
        f"- {form}: {min(ts):.0f}-{max(ts):.0f} s per run (median {sorted(ts)[len(ts) // 2]:.0f} s)"
      )
  lines += [
    "- Before the fix, the 2x2 form hung in 3 of 3 tries and the 1x4 form aborted in 1 of 13 "
    '("Expected 4 threads to join the rendezvous, but only 2 of them arrived"); the evaluation '
    "dispatched all 200 eval steps at once and added their metrics on the devices. XLA:CPU "
    "launches a multi-device program device by device and admits a bounded number of programs "
    "in flight per device: with hundreds queued, one device's part of an all-reduce waited for a "
    "slot held by programs queued behind that same all-reduce on another device. Now at most two "
    "eval steps are in flight and the metrics are summed on the host.",
    "",
  ]
  text = results.read_text() if results.exists() else "# Benchmark results\n\n"
  head = "## Final evaluation under load (reliability)"
  if head in text:
    start = text.index(head)
    end = text.find("\n## ", start + len(head))
    text = text[:start] + "\n".join(lines) + (text[end + 1 :] if end != -1 else "")
  else:
    text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
  results.write_text(text)


if __name__ == "__main__":
  main()
