"""Prints what the optimizer rules of a config give every parameter of its model.

Usage::

  python -m train.inspect --config=configs/X.py [--config.section.key=value ...]

The model named by ``config.model.name`` is built abstractly
(``nnx.eval_shape``: shapes only, no parameter memory), and the rules in
``config.optimizer.weight_decay_mask``, ``config.optimizer.lr_multipliers``
and ``config.optimizer.freeze`` are applied to it. The table shows, per
parameter, its path, owning module, shape, dtype, weight decay, learning-rate
multiplier and frozen flag, then the totals. Try rules before a run::

  python -m train.inspect --config=configs/X.py \\
    --config.optimizer.weight_decay_mask='bias=false, type:LayerNorm=false, *=true'

How to write rules: see :mod:`adamw_flax.masks`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from adamw_flax import config as config_lib
from adamw_flax import plan, registry, train_state
from train import cli


def data_info(run: plan.RunPlan) -> dict[str, Any]:
  """The dataset's ``info`` (e.g. ``vocab_size``) the model builder may need."""
  if not run.data.name:
    return {}
  build = registry.DATASETS.get(run.data.name)
  dataset = build(run.data, seed=run.trainer.seed, process_index=0, process_count=1)
  return dict(dataset.info)


def config_report(config: Any) -> str:
  """The report of :func:`adamw_flax.masks.report` for the model and rules of ``config``.

  Args:
    config: a full launch config (validated here) or its run plan.

  Returns:
    A header naming the model and the rules, then the table and totals.
  """
  run = plan.make_plan(config)
  config_lib.check_registered(run.config)
  with config_lib.user_errors(f"model ({run.model.name})"):
    factory = train_state.registered_state_factory(run, data_info(run))
  o = run.optimizer.section
  lines = [
    f"model: {run.model.name} ({type(factory.target).__name__})",
    f"optimizer: {o.name}, weight_decay={o.weight_decay}",
    f"weight_decay_mask: {o.weight_decay_mask!r}",
    f"lr_multipliers: {o.lr_multipliers!r}",
    f"freeze: {o.freeze!r}",
    "",
    factory.report(run.optimizer),
  ]
  return "\n".join(lines)


_CONFIG = flags.DEFINE_string("config", None, "Config file (get_config()); path or path:arg.")


def main(args: Sequence[str], overrides: Sequence[str]) -> int:
  if len(args) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
  return cli.run_reporting_errors(
    lambda: print(config_report(cli.load_config(_CONFIG.value, overrides))),
    verbose=flags.FLAGS["verbosity"].present,
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  argv, overrides = cli.split_config_overrides(sys.argv)
  app.run(lambda a: sys.exit(main(a, overrides)), argv=argv)
