"""Input throughput of the grain pipelines against the train step they feed.

The pipeline must not be the bottleneck: for each pipeline, batches per
second drawn by ``train_batch(position)`` (one process, the host loop's own
call) next to the steps per second of the model it feeds, measured in the
same run on this machine:

* Tiny Shakespeare, numpy path and its grain variant
  (``configs/tiny_shakespeare.py`` and ``:grain``), against the CPU recipe's
  compiled train step;
* the ArrayRecord example (``examples/grain_arrayrecord``: one raw float32
  record per example, decoded in the loop), batch 256, against the annotated
  MLP of the tests (with ``np.savez`` records instead, 19 batches/s against
  94 steps/s on a 2-core AMD EPYC: the input was the bottleneck).

Run: ``python benchmarks/input_pipeline.py`` (writes the "Input pipeline"
section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import jax
import ml_collections

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import SHARED_TEXT, machine, write_section  # noqa: E402

from adamw_flax import grain_data, registry, sharding  # noqa: E402
from adamw_flax import train_state as T  # noqa: E402
from adamw_flax.config import load_config  # noqa: E402

SHARED = SHARED_TEXT


def batches_per_sec(dataset, n: int = 200) -> float:
  dataset.train_batch(0)
  t0 = time.perf_counter()
  for p in range(1, n + 1):
    dataset.train_batch(p)
  return n / (time.perf_counter() - t0)


def steps_per_sec(cfg, dataset, n: int = 30) -> float:
  entry = registry.MODELS.get(cfg.model.name)
  state = T.state_from_config(cfg, dataset.info)
  mesh = sharding.mesh_from_config(cfg.mesh)
  step = T.make_train_step(entry.loss)
  batches = [sharding.global_batch(dataset.train_batch(p), mesh, cfg.mesh) for p in range(n + 1)]
  state, m = step(state, batches[0])
  jax.block_until_ready(m["loss"])
  t0 = time.perf_counter()
  for b in batches[1:]:
    state, m = step(state, b)
  jax.block_until_ready(m["loss"])
  return n / (time.perf_counter() - t0)


def main() -> None:
  rows = []
  text = [f"data.path={SHARED}"] if SHARED.exists() else []
  ts = load_config(ROOT / "configs" / "tiny_shakespeare.py", text)
  ts_grain = load_config(ROOT / "configs" / "tiny_shakespeare.py", text, arg="grain")
  numpy_ds = registry.DATASETS.get(ts.data.name)(
    ts.data, seed=ts.trainer.seed, process_index=0, process_count=1
  )
  grain_ds = grain_data.GrainDataset(
    ts_grain.data, seed=ts.trainer.seed, process_index=0, process_count=1
  )
  ts_steps = steps_per_sec(ts, numpy_ds)
  for name, ds in (
    ("Tiny Shakespeare, numpy path", numpy_ds),
    ("Tiny Shakespeare, grain", grain_ds),
  ):
    rows.append((name, ts.data.batch_size, batches_per_sec(ds), ts_steps))
  with tempfile.TemporaryDirectory() as tmp:
    ar = load_config(ROOT / "tests" / "configs" / "grain_records.py", [f"data.path={tmp}"])
    ar.data.source = "examples.grain_arrayrecord.data:make"
    ar.data.batch_size = 256
    ar.data.num_train = 4096
    ar = ml_collections.ConfigDict(ar)
    ds = grain_data.GrainDataset(ar.data, seed=0, process_index=0, process_count=1)
    rows.append(("ArrayRecord via grain (raw float32 records)", 256, batches_per_sec(ds, 50),
                 steps_per_sec(ar, ds)))  # fmt: skip
  table = [
    "| pipeline | batch | batches/s (input) | steps/s (train step) | input / step |",
    "|---|---|---|---|---|",
  ]
  for name, batch, bps, sps in rows:
    table.append(f"| {name} | {batch} | {bps:.0f} | {sps:.1f} | {bps / sps:.1f}x |")
  body = "\n".join(
    [
      f"Machine: {machine()}.",
      "",
      "One process; `train_batch(position)` in the host loop against the compiled train step "
      "of the model each feeds (Tiny Shakespeare: the CPU recipe; ArrayRecord: the tests' "
      "annotated MLP). A ratio above 1 means the input keeps up. "
      "`python benchmarks/input_pipeline.py`.",
      "",
      *table,
    ]
  )
  print(body)
  write_section("Input pipeline", body)


if __name__ == "__main__":
  main()
