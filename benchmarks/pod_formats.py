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
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import compile_pod_lm, cpu_model, publish, tpu_compile_machine  # noqa: E402

TITLE = "pod_lm state formats on v5p-32 and v5e-256"
CACHE = HERE / "pod_formats.json"
INT8 = ["optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8"]
FORMATS = [
  ("float32", []),
  ("int8 moments", INT8),
  ("bf16 params + int8 moments", ["optimizer.params_dtype=bfloat16", *INT8]),
]


def compile_one(topology: str, overrides: list[str], timeout: int) -> dict:
  """:func:`common.compile_pod_lm`, with the machine that compiled it (its seconds are that one's)."""
  return {
    **compile_pod_lm(topology, overrides, timeout),
    "cpu": f"{os.cpu_count()}-core {cpu_model()}",
  }


def gib(value: float | None) -> str:
  return "-" if value is None else f"{value:.2f}"


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
      # A job that does not fit has only XLA:TPU's total (no breakdown, no estimate).
      peak = f"{r['peak']:.2f}" + ("" if r["fits"] else " (does not fit)")
      ms = "no estimate (v5e cost model)" if r.get("ms") is None else f"{r['ms']:.1f} ms"
      mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1f}%"
      rows.append(
        f"| {topology} | {label} | {off} | {peak} | {gib(r.get('state'))} | "
        f"{gib(r.get('host'))} | {gib(r.get('temps'))} | {ms} | {mfu} | {r['seconds']:.0f} |"
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
  cache["machine"] = tpu_compile_machine(
    load_before,
    f"{args.jobs} compile(s) at a time",
    f"this run's {len(todo)} compile(s) {(time.perf_counter() - t_all) / 60:.0f} min",
  )
  publish(TITLE, section(cache), CACHE, cache, write=not args.no_write)


if __name__ == "__main__":
  main()
