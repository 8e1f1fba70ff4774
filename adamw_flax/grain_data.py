"""grain input pipelines as a registered dataset: ``data.name = "adamw_flax.grain_data:grain"``.

``data.source = "my.module:make"`` names a function ``make(data_config)``
that returns ``{"train": ..., "eval": ..., "info": {...}}``: ``train`` and
``eval`` are ``grain.MapDataset`` objects or grain random-access data sources
(``grain.sources.ArrayRecordDataSource``, anything with ``__len__`` and
``__getitem__``) whose elements are dicts of arrays (one example each);
``info`` is passed to the model builder (and an optional
``tokens_per_example`` to the throughput log). The dataset:

* shuffles ``train`` with the run's seed (``data.shuffle``; grain reshuffles
  every epoch) and repeats it;
* makes global batch ``position`` of the examples ``position * B ...
  (position + 1) * B - 1`` of that sequence, and gives each process its rows
  of it (the mesh's data slices: ``process_index`` / ``process_count`` from
  :func:`adamw_flax.sharding.data_shard_info`), so the global batches are the
  same for any process count;
* is resumed exactly by the trainer's saved data position (random access: no
  iterator state to save);
* takes ``eval_batches(n)`` from the start of ``eval`` (``train`` if absent).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import grain
import numpy as np

from adamw_flax.registry import register_dataset


def _load(name: str) -> Any:
  module, _, attr = name.rpartition(":")
  if not module:
    raise ValueError(f"data.source: {name!r} must name a function as 'module.path:function'")
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"data.source: cannot load {name!r} ({e})") from None


def as_map_dataset(data: Any) -> grain.MapDataset:
  """A ``grain.MapDataset`` of a MapDataset or a random-access source.

  Args:
    data: a ``grain.MapDataset``, or an object with ``__len__`` and ``__getitem__``.

  Returns:
    The MapDataset.
  """
  return data if isinstance(data, grain.MapDataset) else grain.MapDataset.source(data)


def _stack(examples: Iterable[dict[str, Any]]) -> dict[str, np.ndarray]:
  examples = list(examples)
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


@register_dataset("grain")
class GrainDataset:
  """The dataset protocol of :func:`adamw_flax.register_dataset` over grain (see the module doc).

  Args:
    cfg: the ``data`` section: ``source``, ``batch_size``, ``shuffle``, and
      whatever the source function reads.
    seed: the run's seed.
    process_index: this process's slice of every batch.
    process_count: the number of slices.
  """

  def __init__(self, cfg: Any, *, seed: int, process_index: int, process_count: int):
    made = _load(str(cfg.source))(cfg)
    train = as_map_dataset(made["train"])
    if len(train) == 0:
      raise ValueError(f"data.source: {cfg.source!r} gave an empty train split")
    if cfg.get("shuffle", True):
      train = train.shuffle(seed=seed)
    self._train = train.repeat(None)
    self._eval = as_map_dataset(made.get("eval") or made["train"])
    self.info = dict(made.get("info", {}))
    self.tokens_per_example = int(made.get("tokens_per_example", 1))  # for the throughput log
    self.global_batch_size = int(cfg.batch_size)
    if self.global_batch_size % process_count:
      raise ValueError(
        f"data.batch_size ({self.global_batch_size}) must divide into {process_count} slices"
      )
    per = self.global_batch_size // process_count
    self._rows = range(process_index * per, (process_index + 1) * per)

  def train_batch(self, position: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch ``position``."""
    start = position * self.global_batch_size
    return _stack(self._train[start + row] for row in self._rows)

  def eval_batches(self, num: int) -> list[dict[str, np.ndarray]]:
    """This process's rows of the first ``num`` batches of the eval split (wrapping around)."""
    n = len(self._eval)
    out = []
    for b in range(num):
      start = b * self.global_batch_size
      out.append(_stack(self._eval[(start + row) % n] for row in self._rows))
    return out
