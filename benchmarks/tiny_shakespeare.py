"""Tiny Shakespeare time to quality: our default recipe, the nanoGPT-exact variant and a PyTorch twin.

Usage::

  pip install -e '.[torch]'                     # the PyTorch twin's one dependency
  python benchmarks/tiny_shakespeare.py           # 3 interleaved rounds, ~20 min on 2 cores
  python benchmarks/tiny_shakespeare.py --rounds=1 --no-write

Each round runs, one after the other in this process tree on this machine:

* ``ours``: ``python -m train --config=configs/tiny_shakespeare.py`` (the
  default CPU recipe);
* ``ours bfloat16``: the same with ``--config.model.dtype=bfloat16`` (bfloat16
  matmul inputs; for CPUs with AMX or AVX512-BF16);
* ``ours nanogpt``: ``--config=configs/tiny_shakespeare.py:nanogpt``, the
  reference's exact recipe (decay on every tensor with ndim >= 2, cosine
  schedule, 2000 steps);
* ``pytorch twin``: ``benchmarks/torch_shakespeare.py``, the reference recipe
  in PyTorch (same architecture, init, AdamW, sampling and evaluation).

Every run reads the canonical text and ends with a validation loss over 200
batches. Wall time is the whole process, from launch to exit (imports,
start-up, compile, evaluations, saves, plots included); time to target is the
``wall_time`` of the first evaluation row at or below 1.88 in its
``metrics.jsonl`` (the in-process clock, which starts after the imports).
Peak RSS is the process's ``VmHWM``. Medians over the rounds go to the "Tiny
Shakespeare: time to quality" section of benchmarks/RESULTS.md, with the
machine's matmul peak and the fraction of it the train step reaches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
  SHARED_TEXT,
  compiled_gflop,
  machine,
  matmul_peak_gflops,
  shakespeare_step,
  write_section,  # noqa: E402
)

TITLE = "Tiny Shakespeare: time to quality"
# The canonical text (set by --text; default: the project's shared copy beside the repository).
TEXT = [SHARED_TEXT]
TARGET = 1.88


def _ours(variant: str, *overrides: str) -> Any:
  def cmd(workdir: pathlib.Path) -> list[str]:
    config = "configs/tiny_shakespeare.py" + (f":{variant}" if variant else "")
    return [
      sys.executable,
      "-m",
      "train",
      f"--config={config}",
      f"--workdir={workdir}",
      f"--config.data.path={TEXT[0]}",
      "--config.trainer.progress=False",
      *overrides,
    ]

  return cmd


def _twin(workdir: pathlib.Path) -> list[str]:
  twin = str(HERE / "torch_shakespeare.py")
  return [sys.executable, twin, f"--data={TEXT[0]}", f"--out={workdir}"]


RUNS = {
  "ours": _ours(""),
  # bfloat16 matmuls (float32 params and softmax): faster where the CPU has AMX or
  # AVX512-BF16 (Sapphire Rapids and later), slower on AVX2-only CPUs.
  "ours bfloat16": _ours("", "--config.model.dtype=bfloat16"),
  "ours nanogpt": _ours("nanogpt"),
  "pytorch twin": _twin,
}


def _peak_rss_mib(pid: int) -> float | None:
  try:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def run_once(name: str, workdir: pathlib.Path) -> dict[str, Any]:
  t0 = time.perf_counter()
  proc = subprocess.Popen(
    RUNS[name](workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  rss = 0.0
  while proc.poll() is None:
    rss = max(rss, _peak_rss_mib(proc.pid) or 0.0)
    time.sleep(0.25)
  wall = time.perf_counter() - t0
  out, err = proc.communicate()
  if proc.returncode:
    raise RuntimeError(f"{name} failed ({proc.returncode}):\n{err[-3000:]}")
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if r["split"] in ("eval", "final")]
  final = evals[-1]["loss"]
  hit = next((r for r in evals if r["loss"] <= TARGET), None)
  train = [r for r in rows if r["split"] == "train" and "tokens_per_sec" in r]
  result = {
    "wall": wall,
    "final_val": final,
    "to_target": hit["wall_time"] if hit else None,
    "to_target_step": hit["step"] if hit else None,
    "rss_mib": rss,
    "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in train) if train else None,
  }
  if name == "pytorch twin":
    summary = json.loads(out.strip().splitlines()[-1])
    steps = max(r["step"] for r in evals)
    result["tokens_per_sec"] = steps * 12 * 64 / summary["wall_time"]
  return result


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--no-write", action="store_true")
  ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
  ap.add_argument("--text", default=str(TEXT[0]), help="the canonical Tiny Shakespeare text")
  args = ap.parse_args()
  TEXT[0] = pathlib.Path(args.text)
  names = [n for n in RUNS if not args.only or n in args.only.split(",")]
  results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      for name in names:
        res = run_once(name, pathlib.Path(tmp) / f"{name.replace(' ', '_')}_{r}")
        results[name].append(res)
        print(f"round {r} {name}: {json.dumps(res)}", flush=True)

  med = lambda xs: statistics.median(xs) if xs else None
  table = {}
  for name, rs in results.items():
    hits = [x["to_target"] for x in rs if x["to_target"] is not None]
    table[name] = {
      "wall": med([x["wall"] for x in rs]),
      "final_val": med([x["final_val"] for x in rs]),
      "to_target": med(hits) if len(hits) == len(rs) else None,
      "rss": med([x["rss_mib"] for x in rs]),
      "tok": med([x["tokens_per_sec"] for x in rs if x["tokens_per_sec"]]),
      "walls": [round(x["wall"], 1) for x in rs],
    }
  twin = table.get("pytorch twin")
  peak = matmul_peak_gflops()
  _, _, state, batch, step = shakespeare_step()
  gflop = compiled_gflop(step, state, batch)
  lines = [
    f"Measured {datetime.date.today()} on {machine()}; torch {_torch_version()}; "
    f"{args.rounds} interleaved round(s), medians.",
    "",
    "| run | wall s (each round) | final val (200 batches) | s to val <= 1.88 | tokens/s | "
    "peak RSS MiB | wall / twin |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, t in table.items():
    ratio = f"{t['wall'] / twin['wall']:.2f}" if twin else "-"
    target = f"{t['to_target']:.0f}" if t["to_target"] is not None else "not reached"
    lines.append(
      f"| {name} | {t['wall']:.1f} ({', '.join(map(str, t['walls']))}) | {t['final_val']:.4f} "
      f"| {target} | {t['tok']:.0f} | {t['rss']:.0f} | {ratio} |"
    )
  ours = table.get("ours")
  if ours and ours["tok"]:
    ms = 1e3 * 768 / ours["tok"]  # tokens per step: batch 12 x 64 (default recipe)
    lines += [
      "",
      f"Machine matmul peak (jitted 2048^3 float32 dot): {peak:.0f} GFLOP/s. The default "
      f"recipe's train step is {gflop:.2f} GFLOP (XLA cost analysis) in {ms:.1f} ms at its "
      f"median logged rate: {gflop / ms * 1e3:.0f} GFLOP/s, {gflop / ms * 1e3 / peak:.0%} of "
      "the matmul peak.",
    ]
  text = "\n".join(lines)
  print(text)
  if not args.no_write:
    write_section(TITLE, text)
    (HERE / "tiny_shakespeare.json").write_text(json.dumps(results, indent=1) + "\n")


def _torch_version() -> str:
  try:
    import torch

    return torch.__version__
  except ImportError:
    return "not installed"


if __name__ == "__main__":
  main()
