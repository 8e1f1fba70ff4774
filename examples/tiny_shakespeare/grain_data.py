"""Tiny Shakespeare through grain: ``data.name = "adamw_flax.grain_data:grain"``, ``data.source = "examples.tiny_shakespeare.grain_data:make"``.

The grain variant yields **the same batches** as the numpy path
(``examples.tiny_shakespeare.data``) when ``data.shuffle=False``: element ``i``
of its random-access source is row ``i % B`` of the numpy path's global batch
``i // B`` (random windows drawn from ``(seed, step)``, nanoGPT's sampler), so
grain's batching, process slicing and the trainer's position-based resumption
reproduce them exactly, for any process count. With ``data.shuffle=True``
grain would permute those windows (a different, equally random order);
``configs/tiny_shakespeare.py:grain`` keeps it off.
"""

from __future__ import annotations

from typing import Any

from examples.tiny_shakespeare.data import build

# Random access needs a length; the sampler has no end (a window per draw).
_LENGTH = 1 << 40


class _Rows:
  """Rows of the numpy path's global batches, one example per index (the last batch cached)."""

  def __init__(self, batch_of, batch_size: int):
    self._batch_of = batch_of
    self._size = batch_size
    self._cached: tuple[int, dict] | None = None

  def __len__(self) -> int:
    return _LENGTH

  def __getitem__(self, i: int) -> dict:
    b, row = divmod(int(i), self._size)
    if self._cached is None or self._cached[0] != b:
      self._cached = (b, self._batch_of(b))
    return {k: v[row] for k, v in self._cached[1].items()}


def make(cfg: Any) -> dict[str, Any]:
  """The train and eval splits as grain random-access sources, and the dataset's ``info``.

  Args:
    cfg: the ``data`` section of the Tiny Shakespeare config (``path``,
      ``batch_size``, ``seq_len``, ...) plus ``seed`` (default 0): the numpy
      path's seed, the trainer's ``trainer.seed`` in the example config.

  Returns:
    ``{"train", "eval", "info"}`` for :class:`adamw_flax.grain_data.GrainDataset`.
  """
  numpy_path = build(cfg, seed=int(cfg.get("seed", 0)), process_index=0, process_count=1)
  evals: list[dict] = []

  def eval_batch(b: int) -> dict:
    while len(evals) <= b:  # eval_batches is prefix-stable: grow the list as needed
      evals[:] = numpy_path.eval_batches(2 * len(evals) + 1)
    return evals[b]

  size = numpy_path.global_batch_size
  return {
    "train": _Rows(numpy_path.train_batch, size),
    "eval": _Rows(eval_batch, size),
    "info": dict(numpy_path.info),
    "tokens_per_example": numpy_path.tokens_per_example,
  }
