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
  in PyTorch (same architecture, init, AdamW, sampling and evaluation);
* ``nanogpt train.py`` with ``--nanogpt=DIR`` (a checkout of karpathy/nanoGPT):
  nanoGPT's own ``train.py`` with its README's CPU command, on data its
  ``prepare.py`` makes from the canonical text.

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
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
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
# A run that has not ended by then is killed (each takes 0.5-2 min on 2 cores).
RUN_TIMEOUT_S = 3600


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


# nanoGPT's own train.py with its README's CPU command (a checkout given by --nanogpt).
NANOGPT: list[pathlib.Path | None] = [None]
NANOGPT_CPU = [
  "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
  "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
  "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
]  # fmt: skip
_NANOGPT_EVAL = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")
_NANOGPT_ITER = re.compile(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms")


def _nanogpt(workdir: pathlib.Path) -> list[str]:
  """A copy of the checkout in ``workdir``, its data prepared from the canonical text (untimed)."""
  shutil.copytree(NANOGPT[0], workdir, ignore=shutil.ignore_patterns(".git", "out-*"))
  data = workdir / "data" / "shakespeare_char"
  shutil.copyfile(TEXT[0], data / "input.txt")  # prepare.py downloads it only when missing
  subprocess.run(
    [sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True, timeout=600
  )
  return [sys.executable, "-u", "train.py", *NANOGPT_CPU]


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


def run_nanogpt(workdir: pathlib.Path) -> dict[str, Any]:
  """nanoGPT's train.py: its printed evaluations (20 batches), each timed from the launch."""
  cmd = _nanogpt(workdir)
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)  # fmt: skip
  deadline = threading.Timer(RUN_TIMEOUT_S, proc.kill)  # the line loop below ends with the process
  deadline.start()
  evals, iters, rss, out = [], [], 0.0, []
  try:
    for line in proc.stdout:
      out.append(line)
      rss = max(rss, _peak_rss_mib(proc.pid) or 0.0)
      if m := _NANOGPT_EVAL.search(line):
        evals.append((int(m[1]), float(m[2]), time.perf_counter() - t0))
      elif m := _NANOGPT_ITER.search(line):
        iters.append(float(m[2]))
  finally:
    deadline.cancel()
  wall = time.perf_counter() - t0
  if proc.wait() or not evals:
    raise RuntimeError(f"nanoGPT train.py failed ({proc.returncode}):\n{''.join(out)[-3000:]}")
  hit = next((e for e in evals if e[1] <= TARGET), None)
  return {
    "wall": wall,
    "final_val": evals[-1][1],
    "to_target": hit[2] if hit else None,
    "to_target_step": hit[0] if hit else None,
    "rss_mib": rss,
    "tokens_per_sec": 12 * 64 / (statistics.median(iters[1:]) / 1e3),
  }


def run_once(name: str, workdir: pathlib.Path) -> dict[str, Any]:
  if name == "nanogpt train.py":
    return run_nanogpt(workdir)
  t0 = time.perf_counter()
  proc = subprocess.Popen(
    RUNS[name](workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  rss = 0.0
  while True:  # communicate() drains both pipes, so a chatty run cannot block on a full one
    try:
      out, err = proc.communicate(timeout=0.25)
      break
    except subprocess.TimeoutExpired:
      rss = max(rss, _peak_rss_mib(proc.pid) or 0.0)
      if time.perf_counter() - t0 > RUN_TIMEOUT_S:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{name} did not end within {RUN_TIMEOUT_S} s; killed") from None
  wall = time.perf_counter() - t0
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
  ap.add_argument(
    "--nanogpt",
    default="",
    help="a checkout of karpathy/nanoGPT: its train.py runs too, with its README's CPU command",
  )
  args = ap.parse_args()
  TEXT[0] = pathlib.Path(args.text)
  if args.nanogpt:
    NANOGPT[0] = pathlib.Path(args.nanogpt)
    RUNS["nanogpt train.py"] = _nanogpt
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
    "peak RSS MiB | wall / twin | wall / nanoGPT's train.py |",
    "|---|---|---|---|---|---|---|---|",
  ]
  reference = table.get("nanogpt train.py")
  for name, t in table.items():
    ratio = f"{t['wall'] / twin['wall']:.2f}" if twin else "-"
    ratio += f" | {t['wall'] / reference['wall']:.2f}" if reference else " | -"
    target = f"{t['to_target']:.0f}" if t["to_target"] is not None else "not reached"
    lines.append(
      f"| {name} | {t['wall']:.1f} ({', '.join(map(str, t['walls']))}) | {t['final_val']:.4f} "
      f"| {target} | {t['tok']:.0f} | {t['rss']:.0f} | {ratio} |"
    )
  if reference:
    lines += [
      "",
      "`nanogpt train.py`: nanoGPT's own `train.py` (a checkout given by `--nanogpt`) with its "
      "README's CPU command (`" + " ".join(NANOGPT_CPU) + "`), data prepared from the canonical "
      "text by its `prepare.py` (untimed); its final val is its own 20-batch estimate, and its "
      "time to target is counted from the launch (ours from after the imports).",
    ]
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
