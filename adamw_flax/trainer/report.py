"""What the trainer prints: the start-up report and the end-of-run summary.

Every decision a run makes is printed once at start-up (STYLE.md): the
model's size, the mesh, the optimizer's settings, the bytes per device and
per param, the extras on, and the table of what each parameter gets.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from adamw_flax import offload, plan, quantize, schema, sharding, train_state


def bytes_per_param(state) -> str:
  """The state's bytes per trained param: params, each moment (by format), the rest.

  Args:
    state: a :class:`~adamw_flax.train_state.TrainState` (arrays or shapes).

  Returns:
    The ``bytes per trained param: ...`` line.
  """
  n = max(train_state.param_count(state.params), 1)
  nbytes = lambda tree: sum(
    math.prod(np.shape(x)) * sharding.itemsize(x.dtype) for x in jax.tree.leaves(tree)
  )
  params_bytes, opt_bytes = nbytes(state.params), nbytes(state.opt_state)
  dtypes = "/".join(sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}))
  moments = quantize.moments_summary(state.opt_state)
  parts = [f"params {params_bytes / n:.2f} ({dtypes})"]
  for kind, m in moments.items():
    if not m["params"]:
      continue
    split = ""
    if m["int8_params"]:
      split = f" (int8 {m['int8_params']:,}, float {m['float_params']:,} params)"
    parts.append(f"{kind} {m['bytes'] / n:.2f}{split}")
  other = opt_bytes - sum(m["bytes"] for m in moments.values())
  parts.append(f"other optimizer state {other / n:.2f}")
  parts.append(f"total {(params_bytes + opt_bytes) / n:.2f}")
  return "bytes per trained param: " + ", ".join(parts)


def startup_report(run: plan.RunPlan, state, mesh, factory, unmapped: list[str]) -> str:
  """The lines printed before the first step.

  Args:
    run: the run plan.
    state: the built or restored state.
    mesh: the device mesh.
    factory: the state's :class:`~adamw_flax.train_state.StateFactory` (its parameter table).
    unmapped: logical axis names no rule maps (replicated).

  Returns:
    The report.
  """
  o = run.optimizer.section
  per_device = state.device_bytes()
  lines = [
    f"model {run.model.name}: {train_state.param_count(state.params):,} trainable params, "
    f"{train_state.param_count(state.frozen):,} frozen",
    f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)",
    f"optimizer {o.name}: {schema.summary(o)}",
    "per-device bytes: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in per_device.items()),
    bytes_per_param(state),
  ]
  # What the keys that turn something on say of it (their declarations' notes).
  extras = schema.notes({"optimizer": o, "trainer": run.trainer})
  if o.get("offload"):
    devices = list(mesh.devices.flat)
    extras.append(
      f"optimizer state {o.offload!r} in host memory between steps"
      if offload.effective(devices)
      else f"optimizer.offload={o.offload!r} has no effect on {devices[0].platform} (its host "
      "memory is its device memory)"
    )
  if extras:
    lines.append("also: " + "; ".join(extras))
  if unmapped:
    lines.append(
      "logical axes not mapped to a mesh axis (replicated; map them with "
      f"mesh.logical_axis_rules): {', '.join(unmapped)}"
    )
  lines.append(factory.report(run.optimizer))
  return "\n".join(lines)


_COSTS = {"startup": "start-up", "first_step": "first step", "evals": "evals",
          "saves": "saves (blocking)", "plots": "plots (background)"}  # fmt: skip


def summary_lines(summary: dict[str, Any], timing: dict[str, float]) -> str:
  """The end-of-run lines: the losses reached, and the run's fixed costs.

  Args:
    summary: from :func:`adamw_flax.trainer.train_and_evaluate`.
    timing: the run's fixed costs in seconds (``timing.json``).

  Returns:
    Two lines.
  """
  return (
    f"\nstep {summary['step']}: train loss {summary['train_loss']:.4f}, eval loss "
    f"{summary['eval_loss']:.4f}, {summary['wall_time']:.1f} s\n"
    + "fixed costs: "
    + ", ".join(f"{name} {timing[k]:.1f} s" for k, name in _COSTS.items() if k in timing)
  )
