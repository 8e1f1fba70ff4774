"""configs/pod_lm.py compiled for TPU slices on this CPU: memory, step estimate, variants.

Usage::

  python benchmarks/pod_compile.py                 # everything (~1-2 h on 2 cores: ~40 compiles)
  python benchmarks/pod_compile.py --parts report  # the v5p-32 and v5e-256 reports only (~10 min)
  python benchmarks/pod_compile.py --quick         # a one-block pod_lm: checks the script (~5 min)
  python benchmarks/pod_compile.py --no-write      # print only

1. **Reports** (``python -m train.compile``'s lines) of pod_lm's two
   variants (fsdp, the default, and zero1) on v5p-32 and v5e-256: the
   figures of configs/pod_lm.py's docstring and train/README.md.
2. **A job that does not fit**: the zero1 variant on v5e-32 (params
   replicated, 32 sequences per chip), with the command's compiled advice.
3. **--compare tables** of pod_lm on v5e-256, v5p-128 and v6e-64: each state
   format (float32; bf16 mu; int8 moments; bf16 params + int8 moments) under
   the config's sharding, ZeRO-1 and FSDP over all chips, compiled one after
   the other in this process (one libtpu). On v6e-64 pod_lm's 16-way FSDP
   axis does not map onto the 8x8 torus; the table uses the mesh the command
   proposes, ``mesh.shape=(-1, 8)``.

Everything is XLA:TPU's own compile through libtpu (``pip install -e '.[tpu]'``)
on compile-only devices: no TPU is used. The results replace the
"## Pod LM compiled for TPU slices" section of benchmarks/RESULTS.md and
benchmarks/pod_compile.json.
"""

from __future__ import annotations

import os

for _key, _value in (
  ("JAX_PLATFORMS", "cpu"),
  ("TPU_SKIP_MDS_QUERY", "1"),
  ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
):
  os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from adamw_flax import aot  # noqa: E402
from adamw_flax import config as config_lib  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import SHARED_TEXT, cpu_model, write_section  # noqa: E402

TITLE = "Pod LM compiled for TPU slices"
# topology:variant; fsdp (the default) and zero1 on the slices configs/pod_lm.py quotes.
REPORTS = ("v5p-32", "v5e-256", "v5p-32:zero1", "v5e-256:zero1")
# A job that does not fit: the zero1 variant (params replicated) with 32 sequences per chip.
MISFIT = ("v5e-32", "zero1")
COMPARES = (("v5e-256", []), ("v5p-128", []), ("v6e-64", ["mesh.shape=(-1, 8)"]))
QUICK = [
  "model.num_layers=1",
  "model.embed_dim=128",
  "model.num_heads=2",
  "model.max_len=64",
  "data.seq_len=64",
  "data.batch_size=256",
]
MEMORY_FIELDS = (
  "params",
  "opt_state",
  "batch",
  "other",
  "temps",
  "peak",
  "argument",
  "output",
  "alias",
)


def pod_config(extra: list[str], quick: bool, variant: str | None = None) -> object:
  overrides = list(extra) + (QUICK if quick else [])
  if SHARED_TEXT.is_file():  # no download on machines that hold the text
    overrides.append(f"data.path={SHARED_TEXT}")
  cfg = config_lib.load_config(ROOT / "configs" / "pod_lm.py", overrides, arg=variant)
  config_lib.check_registered(cfg)
  return cfg


def _command(key: str) -> str:
  name, _, variant = key.partition(":")
  config = "configs/pod_lm.py" + (f":{variant}" if variant else "")
  return f"$ python -m train.compile --config={config} --topology={name}"


def say(line: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def commit() -> str:
  try:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "adamw_flax"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head + (" (+ uncommitted changes in adamw_flax/)" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="report,misfit,compare", help="report,misfit,compare")
  parser.add_argument("--reports", default=",".join(REPORTS), help="topology[:variant],...")
  parser.add_argument("--compare_on", default=",".join(n for n, _ in COMPARES),
                      help="the topologies of the --compare tables")  # fmt: skip
  parser.add_argument("--quick", action="store_true", help="a one-block pod_lm")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()
  parts = set(args.parts.split(","))
  results: dict[str, object] = {}
  t_all = time.perf_counter()
  load_before = os.getloadavg()[0]

  reports: dict[str, list[str]] = {}
  compiled: dict[str, aot.RunCompile] = {}
  if "report" in parts:
    for key in args.reports.split(","):
      name, _, variant = key.partition(":")
      cfg = pod_config([], args.quick, variant or None)
      t = time.perf_counter()
      lines: list[str] = []  # what python -m train.compile prints
      result = aot.run_command(cfg, name, out=lines.append, progress=say)
      reports[key] = lines
      m = result.train.memory
      results[f"report {key}"] = {
        "lines": lines,
        "seconds": time.perf_counter() - t,
        "train_compile_s": result.train.seconds,
        "memory": {k: getattr(m, k) for k in MEMORY_FIELDS},
        "step_s": result.train.cost.seconds,
        "raw_optimal_seconds": result.train.cost.raw_seconds,
        "flops_per_chip": result.train.cost.flops,
        "mfu": aot.mfu(result),
        "collectives": result.train.collectives,
      }
      print("\n".join([_command(key), *lines, ""]), flush=True)
      if "compare" in parts and key in dict(COMPARES):
        compiled[name] = result  # the base of that topology's --compare table
      del result

  misfit: list[str] = []
  if "misfit" in parts:
    name, variant = MISFIT
    cfg = pod_config([], args.quick, variant)
    t = time.perf_counter()
    try:
      aot.run_command(cfg, name, out=misfit.append, progress=say)
    except aot.DoesNotFit as e:  # the command's last line, exit status 2
      misfit.append(f"error: {e}")
    results[f"misfit {name} {variant}"] = {"lines": misfit, "seconds": time.perf_counter() - t}
    print("\n".join([f"$ python -m train.compile --config=configs/pod_lm.py:{variant} "
                     f"--topology={name}", *misfit, ""]), flush=True)  # fmt: skip

  tables: dict[str, list[str]] = {}
  if "compare" in parts:
    for name, extra in COMPARES:
      if name not in args.compare_on.split(","):
        continue
      topology = aot.parse_topology(name)
      devices = aot.topology_devices(topology)
      cfg = pod_config(extra, args.quick)
      t = time.perf_counter()
      base = compiled.pop(name, None) if not extra else None
      if base is None:
        base = aot.compile_run(cfg, devices, topology, evals=False, details=False, progress=say)
      rows = aot.compare(cfg, base, devices, progress=say)
      table = aot.compare_table(rows, topology.usable_hbm_bytes)
      tables[name] = table
      results[f"compare {name}"] = {
        "overrides": extra,
        "seconds": time.perf_counter() - t,
        "rows": [dict(sharding=s, format=f, **dataclasses.asdict(r)) for s, f, r in rows],
        "table": table,
      }
      print("\n".join([f"--compare on {name}" + (f" ({' '.join(extra)})" if extra else ""),
                       *table, ""]), flush=True)  # fmt: skip
      del base

  date = datetime.date.today().isoformat()
  machine = (
    f"{os.cpu_count()}-core {cpu_model()}; jax {jax.__version__}, libtpu {aot.libtpu_version()}; "
    f"commit {commit()}; load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after; "
    f"{(time.perf_counter() - t_all) / 60:.0f} min in all"
  )
  for entry in results.values():
    entry["machine"], entry["date"] = machine, date
  if args.no_write or args.quick:
    return
  # Parts and topologies run separately (side by side, one libtpu each) add up: this
  # run's entries replace theirs in pod_compile.json, the others are kept.
  path = HERE / "pod_compile.json"
  kept = json.loads(path.read_text()) if path.exists() else {}
  kept = {k: v for k, v in kept.items() if isinstance(v, dict) and ("lines" in v or "table" in v)}
  kept.update(json.loads(json.dumps(results, default=str)))
  path.write_text(json.dumps(kept, indent=1) + "\n")
  write_section(TITLE, section(kept))


def section(entries: dict[str, dict]) -> str:
  """The RESULTS.md section from pod_compile.json's entries (each with its date and machine)."""
  d = pod_config([], quick=False).data
  machines = sorted({f"{e['date']} on {e['machine']}" for e in entries.values()})
  body = [
    "`python benchmarks/pod_compile.py`: `configs/pod_lm.py` (303M params, global batch "
    f"{d.batch_size} x {d.seq_len} tokens, bfloat16 matmuls, splash attention) compiled by "
    "XLA:TPU through libtpu for TPU slices on a CPU machine, no TPU used. Runs: "
    + "; ".join(machines)
    + ".",
    "",
    "Memory is `memory_analysis()`'s per-chip total (arguments + outputs - aliased + temps); "
    '"fits" compares it with the HBM XLA:TPU compiles against. Step estimates are XLA\'s '
    "`optimal_seconds`; libtpu 0.0.42.1's cost model gives negative times on v5e and v6e "
    "(no estimate, so no MFU there). MFU = 6·N·tokens / (estimate x chips x peak bf16).",
    "",
  ]
  for key in REPORTS:
    if f"report {key}" in entries:
      lines = entries[f"report {key}"]["lines"]
      body += [f"`{_command(key)[2:]}`:", "", "```", *lines, "```", ""]
  name, variant = MISFIT
  if f"misfit {name} {variant}" in entries:
    body += [f"`python -m train.compile --config=configs/pod_lm.py:{variant} --topology={name}` "
             "(exit status 2):", "", "```", *entries[f"misfit {name} {variant}"]["lines"], "```",
             ""]  # fmt: skip
  for name, extra in COMPARES:
    if f"compare {name}" in entries:
      note = f" with `--config.{extra[0]}` (the proposed mesh)" if extra else ""
      body += [f"`--compare` on {name}{note}:", "", *entries[f"compare {name}"]["table"], ""]
  return "\n".join(body)


if __name__ == "__main__":
  main()
