"""The report: which parameter gets what (decay, lr multiplier, frozen, bytes)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from adamw_flax.masks.paths import as_target, path_str
from adamw_flax.masks.resolve import examples_str, resolve
from adamw_flax.masks.rules import DECAY, REQUIRED, parse_rules


@dataclasses.dataclass(frozen=True)
class ReportRow:
  """One parameter in the report.

  Attributes:
    path: ``"/"``-joined path.
    module: class name of the owning module, or ``None`` when unknown.
    shape: the parameter's shape.
    dtype: its dtype name.
    size: number of elements.
    bytes: size in bytes (whole array).
    decay: whether weight decay applies.
    lr_multiplier: its learning-rate multiplier.
    frozen: whether it is frozen.
    per_device_bytes: bytes of one shard, when shardings were given.
    spec: its ``PartitionSpec``, when named shardings were given.
    device_shape: the shape of one shard, when shardings were given.
  """

  path: str
  module: str | None
  shape: tuple[int, ...]
  dtype: str
  size: int
  bytes: int
  decay: bool | float
  lr_multiplier: float
  frozen: bool
  per_device_bytes: int | None = None
  spec: Any = None
  device_shape: tuple[int, ...] | None = None


def _sharding_table(shardings: Any, paths: Sequence[str]) -> dict[str, Any]:
  # A flat {path: Sharding} dict, or a tree of Shardings shaped like the params.
  if isinstance(shardings, Mapping) and all(
    isinstance(k, str) and isinstance(v, jax.sharding.Sharding) for k, v in shardings.items()
  ):
    table = dict(shardings)
  else:
    keyed, _ = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    table = {path_str(kp): s for kp, s in keyed}
  missing = [p for p in paths if p not in table]
  if missing:
    raise ValueError(
      f"shardings: no sharding for {examples_str(missing, 3)}; give a tree like the "
      f"params or a dict path -> Sharding (have: {examples_str(sorted(table), 3)})"
    )
  bad = [p for p in paths if not isinstance(table[p], jax.sharding.Sharding)]
  if bad:
    raise ValueError(f"shardings: {bad[0]!r} has {table[bad[0]]!r}, not a jax.sharding.Sharding")
  return table


def report_rows(
  target: Any,
  *,
  decay_rules: Any = "default",
  lr_multipliers: Any = (),
  frozen: Any = (),
  shardings: Any = None,
  params_dtype: Any = None,
) -> list[ReportRow]:
  """The report as data: one :class:`ReportRow` per parameter, in leaf order.

  Args:
    target: as for :func:`path_values` (the model, for type rules and the
      ``module`` column).
    decay_rules: weight-decay rules or preset.
    lr_multipliers: learning-rate multiplier rules (unmatched: 1.0).
    frozen: frozen rules (unmatched: not frozen).
    shardings: optional tree of ``jax.sharding.Sharding`` like the params (or
      a dict path -> Sharding), for the per-device bytes.
    params_dtype: the dtype the trained (not frozen) floating params are
      stored in when it is not the model's own (``optimizer.params_dtype``).

  Returns:
    The rows.
  """
  params = as_target(target)
  decay_rules = parse_rules(decay_rules, value_type=DECAY, what="weight decay")
  decay = resolve(params, decay_rules, REQUIRED, "weight decay")
  lr = resolve(
    params,
    parse_rules(lr_multipliers, value_type=float, what="learning-rate multiplier"),
    1.0,
    "learning-rate multiplier",
  )
  frz = resolve(params, parse_rules(frozen, what="freeze"), False, "freeze")
  paths = [path for path, _ in params.entries]
  table = _sharding_table(shardings, paths) if shardings is not None else None
  rows = []
  for path, leaf in params.entries:
    shape = tuple(int(d) for d in getattr(leaf, "shape", np.shape(leaf)))
    dtype = np.dtype(getattr(leaf, "dtype", np.result_type(leaf)))
    if params_dtype is not None and not frz[path] and np.issubdtype(dtype, np.floating):
      dtype = np.dtype(params_dtype)
    size = math.prod(shape)
    owner = params.owners.get(path) if params.owners else None
    per_device = spec = device_shape = None
    if table is not None:
      device_shape = tuple(int(d) for d in table[path].shard_shape(shape))
      per_device = math.prod(device_shape) * dtype.itemsize
      spec = getattr(table[path], "spec", None)
    rows.append(
      ReportRow(
        path=path,
        module=owner.__name__ if owner is not None else None,
        shape=shape,
        dtype=dtype.name,
        size=size,
        bytes=size * dtype.itemsize,
        decay=decay[path],
        lr_multiplier=lr[path],
        frozen=frz[path],
        per_device_bytes=per_device,
        spec=spec,
        device_shape=device_shape,
      )
    )
  return rows


def _spec_str(spec: Any) -> str:
  if spec is None:
    return "-"
  entries = list(spec)
  return "replicated" if not any(e is not None for e in entries) else repr(spec)


def _human_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError  # unreachable


def _group_line(label: str, rows: Sequence[ReportRow], total: int, per_device: bool) -> str:
  size = sum(r.size for r in rows)
  share = f"{100 * size / total:.1f}%" if total else "-"
  line = (
    f"{label:<12} {len(rows):>6} tensors {size:>14,} params ({share:>6}) "
    f"{_human_bytes(sum(r.bytes for r in rows)):>10}"
  )
  if per_device:
    line += f"  per device {_human_bytes(sum(r.per_device_bytes or 0 for r in rows))}"
  return line


def report(
  target: Any,
  *,
  decay_rules: Any = "default",
  lr_multipliers: Any = (),
  frozen: Any = (),
  shardings: Any = None,
  params_dtype: Any = None,
) -> str:
  """A table of every parameter and what the rules give it, with totals.

  Columns: path, owning module class (when known), shape, dtype, weight decay,
  learning-rate multiplier, frozen, and per-device bytes when ``shardings``
  is given (:func:`placement` shows the specs and shard shapes). Totals count tensors, elements and bytes for all parameters and
  for the trainable decayed, trainable not-decayed and frozen groups (these
  three add up to the total).

  Args:
    target: as for :func:`report_rows`.
    decay_rules: as for :func:`report_rows`.
    lr_multipliers: as for :func:`report_rows`.
    frozen: as for :func:`report_rows`.
    shardings: as for :func:`report_rows`.
    params_dtype: as for :func:`report_rows`.

  Returns:
    The table, ready to print.

  Examples:
    >>> import numpy as np
    >>> params = {"dense": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    >>> print(report(params, decay_rules="bias=false, *=true"))
    path          shape   dtype    decay  lr  frozen
    dense/bias    (3,)    float32  no     1   no
    dense/kernel  (2, 3)  float32  yes    1   no
    total             2 tensors              9 params (100.0%)       36 B
    decayed           1 tensors              6 params ( 66.7%)       24 B
    not decayed       1 tensors              3 params ( 33.3%)       12 B
    frozen            0 tensors              0 params (  0.0%)        0 B
  """
  rows = report_rows(
    target,
    decay_rules=decay_rules,
    lr_multipliers=lr_multipliers,
    frozen=frozen,
    shardings=shardings,
    params_dtype=params_dtype,
  )
  with_module = any(r.module is not None for r in rows)
  with_device = shardings is not None
  header = (
    ["path"] + (["module"] if with_module else []) + ["shape", "dtype", "decay", "lr", "frozen"]
  )
  if with_device:
    header.append("per device")
  table = [header]
  for r in rows:
    cells = [r.path] + ([r.module or "-"] if with_module else [])
    cells += [
      str(r.shape),
      r.dtype,
      ("yes" if r.decay else "no") if isinstance(r.decay, bool) else f"x{r.decay:g}",
      f"{r.lr_multiplier:g}",
      "yes" if r.frozen else "no",
    ]
    if with_device:
      cells.append(_human_bytes(r.per_device_bytes or 0))
    table.append(cells)
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = [
    "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
  ]
  total = sum(r.size for r in rows)
  trainable = [r for r in rows if not r.frozen]
  lines += [
    _group_line("total", rows, total, with_device),
    _group_line("decayed", [r for r in trainable if r.decay], total, with_device),
    _group_line("not decayed", [r for r in trainable if not r.decay], total, with_device),
    _group_line("frozen", [r for r in rows if r.frozen], total, with_device),
  ]
  return "\n".join(lines)


def placement(target: Any, shardings: Any) -> str:
  """A table of where every parameter lives: its ``PartitionSpec``, per-device shape and bytes.

  Args:
    target: as for :func:`report_rows` (the parameters' paths and shapes).
    shardings: a tree of ``jax.sharding.Sharding`` like the params, or a dict
      path -> Sharding (named shardings show their ``PartitionSpec``).

  Returns:
    The table and the per-device total, ready to print.

  Examples:
    >>> import jax, numpy as np
    >>> from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
    >>> mesh = AbstractMesh((2,), ("model",))
    >>> params = {"w": np.ones((4, 8), np.float32), "b": np.zeros(8, np.float32)}
    >>> print(placement(params, {"w": NamedSharding(mesh, P(None, "model")), "b": NamedSharding(mesh, P())}))
    path  shape   sharding          device shape  per device
    b     (8,)    replicated        (8,)          32 B
    w     (4, 8)  P(None, 'model')  (4, 4)        64 B
    per device: 96 B of 160 B
  """
  rows = report_rows(target, decay_rules="all", shardings=shardings)
  header = ["path", "shape", "sharding", "device shape", "per device"]
  table = [header] + [
    [
      r.path,
      str(r.shape),
      _spec_str(r.spec),
      str(r.device_shape),
      _human_bytes(r.per_device_bytes or 0),
    ]
    for r in rows
  ]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = [
    "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
  ]
  per_device = sum(r.per_device_bytes or 0 for r in rows)
  lines.append(
    f"per device: {_human_bytes(per_device)} of {_human_bytes(sum(r.bytes for r in rows))}"
  )
  return "\n".join(lines)
