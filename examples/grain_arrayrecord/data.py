"""Examples kept in ArrayRecord files, read through grain: ``data.source = "examples.grain_arrayrecord.data:make"``.

ArrayRecord (the record format grain reads with random access) holds one
serialized example per record; here the raw float32 bytes of ``x`` then
``y`` (a regression task ``y = tanh(x @ w)``): decoding is a
``np.frombuffer``, so the input keeps up with a small model's step
(``np.savez`` records decoded 5x slower here, see benchmarks/RESULTS.md). ``make`` writes the files on first use
(``data.path``, a directory), then returns grain data sources over them.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

FEATURES = 8


def encode(example: dict[str, np.ndarray]) -> bytes:
  """One record: ``x`` (FEATURES float32) then ``y`` (one float32), raw bytes."""
  return np.concatenate([example["x"], [example["y"]]]).astype(np.float32).tobytes()


def decode(record: bytes) -> dict[str, np.ndarray]:
  """The example of one record."""
  values = np.frombuffer(record, np.float32)
  return {"x": values[:FEATURES], "y": values[FEATURES]}


def write_split(path: str, n: int, seed: int) -> None:
  """Writes ``n`` examples to the ArrayRecord file ``path``."""
  rng = np.random.default_rng(seed)
  w = np.random.default_rng(0).normal(size=FEATURES).astype(np.float32)
  writer = ArrayRecordWriter(path, "group_size:1")
  for _ in range(n):
    x = rng.normal(size=FEATURES).astype(np.float32)
    writer.write(encode({"x": x, "y": np.float32(np.tanh(x @ w))}))
  writer.close()


def make(cfg: Any) -> dict[str, Any]:
  """The train and eval splits of ``data.path`` (written if missing), as grain MapDatasets."""
  root = os.path.expanduser(str(cfg.path))
  os.makedirs(root, exist_ok=True)
  splits = {}
  for split, n, seed in (("train", int(cfg.get("num_train", 512)), 1), ("eval", 64, 2)):
    path = os.path.join(root, f"{split}.array_record")
    if not os.path.exists(path):
      write_split(path + ".tmp", n, seed)
      os.replace(path + ".tmp", path)
    source = grain.sources.ArrayRecordDataSource([path])
    splits[split] = grain.MapDataset.source(source).map(decode)
  return {**splits, "info": {"features": FEATURES}}
