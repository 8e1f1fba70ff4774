"""pod_lm's state formats on TPU pods, compiled with ``python -m train.compile``: how a user picks one.

Usage::

  python benchmarks/pod_formats.py                      # v5p-32 and v5e-256, ~40 min on 2 cores
  python benchmarks/pod_formats.py --topologies v5p-32  # one topology
  python benchmarks/pod_formats.py --jobs 2             # two compiles side by side
  python benchmarks/pod_formats.py --formats int8       # recompile the formats named so; the
                                                        # others' rows come from pod_formats.json
  python benchmarks/pod_formats.py --no-write           # print only

For each topology and each state format (float32; int8 moments; bfloat16
params + int8 moments), with the optimizer state in HBM and offloaded to host
memory between steps (``optimizer.offload=opt_state``), it runs the pod-compile
command on ``configs/pod_lm.py`` (its default fsdp variant) and reads the lines
its report promises: ``per-chip HBM: ... peak P GiB of H GiB`` (and the host
bytes with offload) and ``step estimate: S ms`` (v5e's cost model gives no
estimate in this libtpu: the line says so, and so does the table). Needs libtpu
(``pip install -e '.[tpu]'``), no TPU.

The results replace the "## pod_lm state formats on v5p-32 and v5e-256" section
of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import cpu_model, publish  # noqa: E402

TITLE = "pod_lm state formats on v5p-32 and v5e-256"
CACHE = HERE / "pod_formats.json"
SHARED_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
INT8 = ["optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8"]
FORMATS = [
  ("float32", []),
  ("int8 moments", INT8),
  ("bf16 params + int8 moments", ["optimizer.params_dtype=bfloat16", *INT8]),
]
_PEAK = re.compile(
  r"^per-chip HBM: .*temps ([\d.e+-]+) GiB, peak ([\d.e+-]+) GiB(?: of ([\d.]+) GiB)?"
)
_HOST = re.compile(r"in host memory ([\d.e+-]+) GiB")
_STATE = re.compile(r"optimizer state ([\d.e+-]+) GiB")
_STEP = re.compile(r"^step estimate: ([\d.]+) ms(?:, .* MFU ([\d.]+)%)?")


def compile_one(topology: str, overrides: list[str], timeout: int) -> dict:
  """Runs ``python -m train.compile`` on pod_lm; the report's figures (or its error)."""
  cmd = [
    sys.executable,
    "-m",
    "train.compile",
    "--config=configs/pod_lm.py",
    f"--topology={topology}",
  ]
  cmd += [f"--config.{o}" for o in overrides]
  if SHARED_TEXT.is_file():  # no download on machines that hold the text
    cmd.append(f"--config.data.path={SHARED_TEXT}")
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1"
  )
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  out = {"seconds": round(time.perf_counter() - t0, 1), "status": proc.returncode}
  out["cpu"] = f"{os.cpu_count()}-core {cpu_model()}"  # the compile's seconds are this machine's
  out["lines"] = proc.stdout.splitlines()  # the report as printed (the docs quote it)
  for line in proc.stdout.splitlines():
    m = _PEAK.match(line)
    if m:
      out["temps"], out["peak"] = float(m[1]), float(m[2])
      out["hbm"] = float(m[3]) if m[3] else None
      out["state"] = float(_STATE.search(line)[1])
      host = _HOST.search(line)
      out["host"] = float(host[1]) if host else 0.0
      out["fits"] = "DOES NOT FIT" not in line
    m = _STEP.match(line)
    if m:
      out["ms"] = float(m[1])
      out["mfu"] = float(m[2]) if m[2] else None
    if line.startswith("step estimate: unavailable"):
      out["ms"] = None
  if "peak" not in out:  # the exception's own line, not JAX's note on filtered frames
    lines = (proc.stdout + proc.stderr).strip().splitlines() or ["(no output)"]
    errors = [ln for ln in lines if re.match(r"^(error: |[\w.]*(Error|Exception)\b)", ln)]
    out["error"] = (errors or lines)[-1][:300]
  return out


def section(cache: dict) -> str:
  rows = [
    "| topology | state | offloaded | peak HBM GiB per chip | of which optimizer state | "
    "host GiB per chip | temps GiB | step estimate | MFU | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for topology, per in cache["rows"].items():
    for name, r in per.items():
      label, _, off = name.partition(" | ")
      if "error" in r:
        rows.append(
          f"| {topology} | {label} | {off} | error: {r['error']} | | | | | | {r['seconds']:.0f} |"
        )
        continue
      ms = "no estimate (v5e cost model)" if r.get("ms") is None else f"{r['ms']:.1f} ms"
      mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1f}%"
      rows.append(
        f"| {topology} | {label} | {off} | {r['peak']:.2f} | {r['state']:.2f} | "
        f"{r['host']:.2f} | {r['temps']:.2f} | {ms} | {mfu} | {r['seconds']:.0f} |"
      )
  machines = sorted({r.get("cpu", "?") for per in cache["rows"].values() for r in per.values()})
  where = (
    f"on {machines[0]}"
    if len(machines) == 1
    else "rows compiled on " + " and ".join(machines) + " (the compile s column is each row's)"
  )
  return "\n".join(
    [
      "Written by `python benchmarks/pod_formats.py`: `python -m train.compile "
      "--config=configs/pod_lm.py --topology=T` (fsdp, XLA:TPU's compile of the train step) "
      f"for each state format, in HBM and with `optimizer.offload=opt_state`; pod_lm's "
      f"model as configured ({cache.get('model', '?')}). Compiled {cache['when']}, {where}; "
      f"last run: {cache.get('machine', '?')}; no TPU used. XLA:TPU's output does not "
      "depend on the host CPU.",
      "",
      *rows,
      "",
      "The peak is the compiled step's whole HBM per chip (arguments + outputs - aliased + "
      "temporaries): params, optimizer state, batch and the backward pass's activations. "
      "Offloaded, the optimizer state lives in host memory between steps (the host column) "
      "and comes into HBM only for the update, after the backward pass; 8-bit codes stay in "
      "HBM on TPU (XLA:TPU in this libtpu does not compile host transfers of 8-bit arrays), "
      "so with int8 moments only their float32 scales and float moments move. Sharded "
      "8-bit leaves take the XLA path of the update on TPU (a Pallas kernel's "
      "`custom_partitioning` does not compile for compile-only devices).",
      "",
      "Reading the rows: under 16-way FSDP each chip holds a sixteenth of the params and "
      "moments (0.21 GiB of float32 state and params for 303M params), and the activations "
      "of its share of the batch are the rest of the peak, so here the state format moves the "
      "peak by under 0.2 GiB and the step estimate by under 1%. The lean formats pay where "
      "the state is a real share of HBM: replicated or ZeRO-1 params, bigger models per chip, "
      "or a smaller batch per chip (`python -m train.compile --compare` shows each).",
    ]
  )


def model_levers() -> str:
  """configs/pod_lm.py's model levers as they are now (the table's model)."""
  sys.path.insert(0, str(ROOT))
  from configs import pod_lm  # noqa: PLC0415 (a config file, read once the compiles are done)

  m, d = pod_lm.get_config().model, pod_lm.get_config().data
  return (
    f"model.attention={m.attention}, model.attention_dtype={m.attention_dtype}, "
    f"model.remat={m.remat}, model.dtype={m.dtype}, data.batch_size={d.batch_size}"
  )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topologies", default="v5p-32,v5e-256")
  ap.add_argument("--jobs", type=int, default=1, help="compiles side by side")
  ap.add_argument(
    "--formats", default="", help="compile only the state formats whose names contain this"
  )
  ap.add_argument("--timeout", type=int, default=1800)
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args()
  cache = json.loads(CACHE.read_text()) if CACHE.exists() else {"rows": {}}
  t_all, load_before = time.perf_counter(), os.getloadavg()[0]
  todo = []
  for topology in args.topologies.split(","):
    kept = cache["rows"].get(topology, {})
    cache["rows"][topology] = {}  # in FORMATS order, whatever order the compiles end in
    for label, overrides in FORMATS:
      for off in (False, True):
        name = f"{label} | {'yes' if off else 'no'}"
        cache["rows"][topology][name] = kept.get(name, {})
        if args.formats in label or name not in kept:
          todo.append(
            (topology, name, overrides + (["optimizer.offload=opt_state"] if off else []))
          )
  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    futures = {pool.submit(compile_one, t, o, args.timeout): (t, n) for t, n, o in todo}
    for f in concurrent.futures.as_completed(futures):
      topology, name = futures[f]
      cache["rows"][topology][name] = f.result()
      shown = {k: v for k, v in f.result().items() if k != "lines"}
      print(f"  {topology} {name}: {json.dumps(shown)}", flush=True)
      if not args.no_write:  # each compile kept as it ends
        CACHE.write_text(json.dumps(cache, indent=1) + "\n")
  cache["when"] = f"{datetime.date.today()}"
  cache["model"] = model_levers()
  cache["machine"] = (
    f"{os.cpu_count()}-core {cpu_model()}; jax {importlib.metadata.version('jax')}, "
    f"libtpu {importlib.metadata.version('libtpu')}; {args.jobs} compile(s) at a time; load "
    f"average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after; this run's "
    f"{len(todo)} compile(s) {(time.perf_counter() - t_all) / 60:.0f} min"
  )
  publish(TITLE, section(cache), CACHE, cache, write=not args.no_write)


if __name__ == "__main__":
  main()
