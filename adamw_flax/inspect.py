"""Prints what the optimizer rules of a config give every parameter of its model.

Usage::

  python -m adamw_flax.inspect --config=configs/X.py [--config.section.key=value ...]

The model named by ``config.model.name`` is built abstractly
(``nnx.eval_shape``: shapes only, no parameter memory), and the rules in
``config.optimizer.weight_decay_mask``, ``config.optimizer.lr_multipliers``
and ``config.optimizer.freeze`` are applied to it. The table shows, per
parameter, its path, owning module, shape, dtype, weight decay, learning-rate
multiplier and frozen flag, then the totals. Try rules before a run::

  python -m adamw_flax.inspect --config=configs/X.py \\
    --config.optimizer.weight_decay_mask='bias=false, type:LayerNorm=false, *=true'

How to write rules: see :mod:`adamw_flax.masks`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from flax import nnx

from adamw_flax import masks, registry


def _data_info(config: Any, seed: int) -> dict[str, Any]:
  """The dataset's ``info`` (e.g. ``vocab_size``) the model builder may need."""
  data = config.get("data")
  if data is None or not data.get("name"):
    return {}
  build = registry.DATASETS.get(data.name)
  dataset = build(data, seed=seed, process_index=0, process_count=1)
  return dict(dataset.info)


def abstract_model(config: Any) -> nnx.Module:
  """Builds the config's model with shapes only (``jax.ShapeDtypeStruct`` values).

  Args:
    config: a ConfigDict with ``model.name`` (registered), optionally
      ``data.name`` (registered, for ``data_info``) and ``trainer.seed``.

  Returns:
    The NNX module, built under ``nnx.eval_shape``.
  """
  entry = registry.MODELS.get(config.model.name)
  trainer = config.get("trainer")
  seed = int(trainer.get("seed", 0)) if trainer is not None else 0
  data_info = _data_info(config, seed)
  return nnx.eval_shape(lambda: entry.build(config.model, rngs=nnx.Rngs(seed), data_info=data_info))


def config_report(config: Any) -> str:
  """The report of :func:`adamw_flax.masks.report` for the model and rules of ``config``.

  Args:
    config: a ConfigDict with ``model``, optionally ``data``, ``trainer.seed``
      and ``optimizer`` (``weight_decay_mask`` defaults to ``"default"``,
      ``lr_multipliers`` and ``freeze`` to none).

  Returns:
    A header naming the model and the rules, then the table and totals.
  """
  model = abstract_model(config)
  opt = config.get("optimizer") or {}
  decay = opt.get("weight_decay_mask", "default")
  lr = opt.get("lr_multipliers", ())
  freeze = opt.get("freeze", ())
  lines = [
    f"model: {config.model.name} ({type(model).__name__})",
    f"optimizer: {opt.get('name', '?')}, weight_decay={opt.get('weight_decay', '?')}",
    f"weight_decay_mask: {decay!r}",
    f"lr_multipliers: {lr!r}",
    f"freeze: {freeze!r}",
    "",
    masks.report(model, decay_rules=decay, lr_multipliers=lr, frozen=freeze),
  ]
  return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> None:
  """Parses ``--config`` and prints :func:`config_report`."""
  # Flags are defined here, not at import, so importing this module (doctests,
  # a trainer that defines its own --config) has no side effect on absl.FLAGS.
  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
  flags.mark_flag_as_required("config")

  def main(args: Sequence[str]) -> None:
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
    try:
      text = config_report(config.value)
    except (ValueError, KeyError) as e:  # bad rules or names: the message says what to fix
      sys.exit(f"error: {e}")
    print(text)

  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
