"""The fingerprint of a train state: what a checkpoint records to check a restore target against.

:func:`state_fingerprint` describes every node of a state (NamedTuple types of
the optimizer state, leaf dtypes and shapes) and the optimizer choices that
shape it; :func:`first_difference` and :func:`mismatch_message` turn two
fingerprints into the one-paragraph refusal a user reads before any array is
read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from adamw_flax import masks, schema
from adamw_flax.config import config_diff, config_json

PyTree = Any
ARRAY_FIELDS = ("step", "params", "frozen", "rest", "opt_state", "extra")


def state_arrays(state: Any) -> dict[str, Any]:
  """The array fields of a TrainState (or of a dict holding them) as a plain dict.

  Args:
    state: a TrainState, or a dict with some of its fields.

  Returns:
    ``field -> tree`` for the fields present.
  """
  if isinstance(state, dict):
    out = {k: state[k] for k in ARRAY_FIELDS if k in state}
  else:
    out = {k: getattr(state, k) for k in ARRAY_FIELDS if hasattr(state, k)}
  if "extra" in out:
    # Checkpoints hold the typed extra (train_state.Extra) as the dict of the
    # first builds: the same tree on disk, so their checkpoints still restore.
    extra = out["extra"]
    out["extra"] = extra if isinstance(extra, dict) else extra.as_dict()
    if not out["extra"]:
      # No EMA or spike statistics: the state (and its checkpoints) are the
      # first build's, whose checkpoints have no "extra" item.
      del out["extra"]
  return out


def _is_leaf(node: Any) -> bool:
  if node is None:
    return False
  treedef = jax.tree.structure(node)
  return treedef.num_nodes == 1 and treedef.num_leaves == 1


def is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_str(x: Any) -> str:
  shape = ",".join(str(d) for d in np.shape(x))
  return f"{x.dtype}[{shape}]"


def _entries(tree: PyTree, prefix: str = "") -> list[tuple[str, str]]:
  """Every node of ``tree`` in flatten order: (path, node type) or (path, "dtype[shape]").

  Interior nodes are listed too, so that nodes without leaves (optax's
  ``EmptyState``, ``MaskedNode``) and the NamedTuple types of the optimizer
  state take part in the comparison: a scalar weight decay has an
  ``EmptyState`` where a schedule has a ``WeightDecaySchedule``.
  """
  out: list[tuple[str, str]] = []

  def visit(node: Any, path: str) -> None:
    if _is_leaf(node):
      out.append((path, _leaf_str(node)))
      return
    out.append((path, "None" if node is None else type(node).__name__))
    # One level down: every child is taken as a leaf here and visited itself.
    children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
    for keypath, child in children:
      name = "/".join(masks.key_str(k) for k in keypath)
      visit(child, f"{path}/{name}" if path else name)

  visit(tree, prefix)
  return out


def _structure_summary(node: Any) -> str:
  """A one-line picture of an optimizer state: NamedTuple types, dict sizes, leaf dtypes."""
  if _is_leaf(node):
    return str(node.dtype)
  if node is None:
    return "None"
  if isinstance(node, dict):
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(node)})
    return f"{{{len(jax.tree.leaves(node))} x {'/'.join(dtypes) or '-'}}}"
  children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
  parts = []
  for keypath, child in children:
    text = _structure_summary(child)
    key = keypath[0] if keypath else None
    parts.append(f"{key.name}={text}" if hasattr(key, "name") else text)
  name = "" if type(node) in (tuple, list) else type(node).__name__
  return f"{name}({', '.join(parts)})"


def _rules_str(value: Any) -> str:
  if isinstance(value, str):
    return value
  return json.dumps(value, default=str)


def _optimizer_summary(config: ml_collections.ConfigDict | None, opt_state: Any) -> dict[str, Any]:
  """The user-visible optimizer choices that shape the optimizer state."""
  types = {kind for _, kind in _entries(opt_state)}
  summary: dict[str, Any] = {
    # Read from the state itself, the source of truth whoever built the
    # optimizer: optax keeps a counter only for schedules.
    "learning_rate": "schedule" if "ScaleByScheduleState" in types else "scalar",
    "weight_decay": "schedule" if "WeightDecaySchedule" in types else "scalar",
    "opt_state": _structure_summary(opt_state),
  }
  o = config.get("optimizer") if config is not None else None
  if o is not None:
    summary["optimizer"] = o.get("name")
    # The keys declared `fingerprint` (adamw_flax.schema); rules as text.
    summary.update({k: _rules_str(v) if isinstance(v, (tuple, list)) else v
                    for k, v in schema.fingerprinted(o).items()})  # fmt: skip
  return summary


def state_fingerprint(
  state: Any, config: ml_collections.ConfigDict | None = None
) -> dict[str, Any]:
  """What a checkpoint records about a state's structure, to check a restore target against.

  Args:
    state: a :class:`~adamw_flax.train_state.TrainState` of arrays or of
      ``jax.ShapeDtypeStruct`` leaves.
    config: its config (for the optimizer's name, schedule, mask rules and
      dtypes); optional.

  Returns:
    A JSON-able dict: ``optimizer`` (the choices that shape the optimizer
    state, with a one-line ``opt_state`` structure), ``dtypes`` (leaf count per
    dtype) and ``entries`` (every node as ``[path, type or "dtype[shape]"]``).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> fp = state_fingerprint({"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.ones(3)},
    ...                         "opt_state": optax.adamw(1e-3).init({"w": jnp.ones(3)})})
    >>> fp["optimizer"]["weight_decay"], fp["dtypes"]
    ('scalar', {'float32': 3, 'int32': 2})
    >>> fp["entries"][:3]
    [['step', 'int32[]'], ['params', 'dict'], ['params/w', 'float32[3]']]
  """
  arrays = state_arrays(state)
  # In the TrainState's field order (a dict would sort them), so that a
  # changed model is reported at its params before their optimizer state.
  entries = [
    [p, d] for field in ARRAY_FIELDS if field in arrays for p, d in _entries(arrays[field], field)
  ]
  dtypes: dict[str, int] = {}
  for leaf in jax.tree.leaves(arrays):
    dtypes[str(leaf.dtype)] = dtypes.get(str(leaf.dtype), 0) + 1
  return {
    "optimizer": _optimizer_summary(config, arrays.get("opt_state")),
    "dtypes": dict(sorted(dtypes.items())),
    "entries": entries,
  }


def first_difference(
  saved: Sequence[Sequence[str]], wanted: Sequence[Sequence[str]]
) -> tuple[str, str, str] | None:
  """(path, checkpoint's side, this run's side) of the first differing node, or None.

  Args:
    saved: the checkpoint's fingerprint ``entries``.
    wanted: the restore target's.

  Returns:
    ``(path, checkpoint's side, this run's side)``, or None when they agree.
  """
  saved_map = {p: d for p, d in saved}
  wanted_map = {p: d for p, d in wanted}
  for (ps, ds), (pw, dw) in zip(saved, wanted, strict=False):
    if ps == pw and ds == dw:
      continue
    if ps == pw:
      return ps, ds, dw
    if ps not in wanted_map:
      return ps, ds, "nothing (no such path)"
    return pw, saved_map.get(pw, "nothing (no such path)"), dw
  if len(saved) > len(wanted):
    p, d = saved[len(wanted)]
    return p, d, "nothing (no such path)"
  if len(wanted) > len(saved):
    p, d = wanted[len(saved)]
    return p, "nothing (no such path)", d
  return None


def differs_outside_opt_state(
  saved: Sequence[Sequence[str]], wanted: Sequence[Sequence[str]]
) -> bool:
  """Whether two fingerprint ``entries`` lists differ anywhere but under ``opt_state``."""
  keep = lambda entries: [tuple(e) for e in entries if not e[0].startswith("opt_state")]
  return keep(saved) != keep(wanted)


def changes_since(saved_meta: dict[str, Any], wanted_fp: dict[str, Any], config: Any) -> list[str]:
  """What changed between a checkpoint's config and optimizer summary and this run's (at most 6)."""
  changes: list[str] = []
  if config is not None and "config" in saved_meta:
    changes = config_diff(saved_meta["config"], config_json(config))
    changes = [c for c in changes if not c.startswith(("checkpoint.", "trainer."))]
  # The state's own summary says what the config does not (a schedule's counter):
  keys = {c.split(":")[0].rsplit(".", 1)[-1] for c in changes}
  summary = config_diff(saved_meta["fingerprint"]["optimizer"], wanted_fp["optimizer"])
  changes += [c for c in summary if c.split(":")[0] not in keys and not c.startswith("opt_state")]
  return changes[:6] + ([f"... {len(changes) - 6} more"] if len(changes) > 6 else [])


def opt_state_message(
  where: str, saved_meta: dict[str, Any], wanted_fp: dict[str, Any], config: Any, first: tuple
) -> str:
  """The one-line refusal of a checkpoint whose optimizer state alone differs."""
  path, theirs, ours = first
  changes = changes_since(saved_meta, wanted_fp, config)
  changed = f"; changed: {'; '.join(changes)}" if changes else ""
  return (
    f"checkpoint {where} does not fit the state this run builds: its optimizer state has "
    f"another format or tree (first difference at '{path}': the checkpoint has {theirs}, this "
    f"run expects {ours}{changed}); rerun with --config.checkpoint.migrate_opt_state=True to "
    "convert it"
  )


def mismatch_message(
  where: str, saved_meta: dict[str, Any], wanted_fp: dict[str, Any], config: Any, first: tuple
) -> tuple[str, str]:
  """The refusal of a checkpoint that does not fit: one line, and its details.

  Returns:
    ``(line, details)``: the line names what changed in the config
    (``model.embed_dim 32 → 64``) when the checkpoint's config says so, else
    the first difference of the state; the details have both.
  """
  path, theirs, ours = first
  difference = f"first difference at '{path}': the checkpoint has {theirs}, this run expects {ours}"
  changes = [c.replace(": ", " ", 1).replace(" -> ", " → ") for c in
             changes_since(saved_meta, wanted_fp, config)]  # fmt: skip
  todo = "resume with the config it was written with, or use another --workdir"
  if changes:
    line = f"checkpoint {where} does not fit this run, which changed {'; '.join(changes)}; {todo}"
  else:
    line = f"checkpoint {where} does not fit the state this run builds ({difference}); {todo}"
  details = (
    f"checkpoint {where} does not fit the state this run builds: {difference}. Changed since it "
    f"was written: {'; '.join(changes) or 'nothing in the config'}. restore_state(directory) "
    "reads the checkpoint with its own config."
  )
  return line, details
