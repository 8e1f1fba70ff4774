"""Prints what the rules of a config give every parameter of its model, and where it lives.

Usage::

  python -m train.inspect --config=configs/X.py [--num_devices=N] [--config.section.key=value ...]

The model named by ``config.model.name`` is built abstractly (shapes only,
no parameter memory), under the config's mesh, as training builds it. The
rules in ``config.optimizer.weight_decay_mask``, ``lr_multipliers`` and
``freeze`` are applied to it, and ``config.mesh`` (partition rules, the
model's own annotations through ``mesh.logical_axis_rules``) places it: a
rule that matches nothing, or a spec the mesh cannot take, is the error
training would give (exit status 2). The table shows, per parameter, its
path, owning module, shape, dtype, weight decay, learning-rate multiplier,
frozen flag, then the totals; a second table gives each parameter's
``PartitionSpec`` and per-device shape and bytes.
The mesh is the one training would build on this machine's devices; with
``--num_devices=N``, the mesh on N devices (a pod's, from a laptop). Try
rules before a run::

  python -m train.inspect --config=configs/X.py \\
    --config.optimizer.weight_decay_mask='bias=false, type:LayerNorm=false, *=true'

How to write rules: see :mod:`adamw_flax.masks`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from train import cli

_CONFIG = flags.DEFINE_string("config", None, "Config file (get_config()); path or path:arg.")
_NUM_DEVICES = flags.DEFINE_integer(
  "num_devices", None, "Plan the mesh for this many devices (default: the visible devices)."
)


def data_info(run: Any) -> dict[str, Any]:
  """The dataset's ``info`` (e.g. ``vocab_size``) the model builder may need."""
  from adamw_flax import registry  # noqa: PLC0415 (jax loads once flags are parsed)

  if not run.data.name:
    return {}
  build = registry.DATASETS.get(run.data.name)
  dataset = build(run.data, seed=run.trainer.seed, process_index=0, process_count=1)
  return dict(dataset.info)


def _model_name(target: Any) -> str:
  kind = getattr(target, "kind", None)  # a masks.Target: "model VAE (Linen, ...)"
  return kind.split(" ", 1)[-1] if kind else type(target).__name__


def config_report(config: Any, *, num_devices: int | None = None) -> str:
  """The report of :func:`adamw_flax.masks.report` for the model, rules and mesh of ``config``.

  Args:
    config: a full launch config (validated here) or its run plan.
    num_devices: plan the mesh for this many devices; default: the visible ones.

  Returns:
    A header naming the model, the rules and the mesh, then the table and totals.
  """
  # The library (jax, flax) loads here, after absl parsed the flags: `--help`
  # and a bad flag answer without it.
  from adamw_flax import config as config_lib  # noqa: PLC0415
  from adamw_flax import plan, sharding, train_state  # noqa: PLC0415

  run = plan.make_plan(config)
  config_lib.check_registered(run.config)
  with config_lib.user_errors("mesh"):
    if num_devices is not None:
      mesh = sharding.abstract_mesh_from_config(run.mesh, num_devices)
    else:
      try:
        mesh = sharding.mesh_from_config(run.mesh)
      except ValueError as e:
        raise ValueError(f"{e}; or plan for the job's devices with --num_devices=N") from None
  with config_lib.user_errors(f"model ({run.model.name})"), sharding.use_mesh(mesh):
    factory = train_state.registered_state_factory(run, data_info(run))
    abstract = factory.abstract()
    shardings = abstract.shardings(mesh, run.mesh)  # the partition rules, checked as in training
    unmapped = sharding.unmapped_logical_axes(
      abstract.spec.templates,
      [abstract.params, abstract.frozen, abstract.rest],
      run.mesh,
      mesh=mesh,
    )
    table = factory.report(run.optimizer)
    placement = factory.placement(shardings)
  o, m = run.optimizer.section, run.mesh
  lines = [
    f"model: {run.model.name} ({_model_name(factory.target)})",
    f"optimizer: {o.name}, weight_decay={o.weight_decay}",
    f"weight_decay_mask: {o.weight_decay_mask!r}",
    f"lr_multipliers: {o.lr_multipliers!r}",
    f"freeze: {o.freeze!r}",
    f"mesh: {dict(mesh.shape)} ({mesh.size} devices), data axes {m.data_axes}, "
    f"optimizer state like {'the params and over the data axes' if m.shard_opt_state == 'data' else 'the params'}",
    f"partition_rules: {run.config.mesh.partition_rules!r}",
  ]
  if unmapped:
    lines.append(
      "logical axes not mapped to a mesh axis (replicated; map them with "
      f"mesh.logical_axis_rules): {', '.join(unmapped)}"
    )
  return "\n".join([*lines, "", table, "", placement])


def main(args: Sequence[str], overrides: Sequence[str]) -> int:
  if len(args) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
  verbose = flags.FLAGS["verbosity"].present
  if not verbose:
    # JAX logs its backend probing (a TPU runtime installed on a CPU host) at INFO.
    logging.set_verbosity(logging.WARNING)
  return cli.run_reporting_errors(
    lambda: print(
      config_report(cli.load_plan(_CONFIG.value, overrides), num_devices=_NUM_DEVICES.value)
    ),
    verbose=verbose,
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run_app(main, sys.argv)
