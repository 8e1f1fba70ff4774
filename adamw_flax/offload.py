"""Optimizer state kept in host memory between steps (``optimizer.offload``).

``optimizer.offload = "opt_state"`` keeps the whole optimizer state in the
accelerator host's pinned memory; ``"mu, nu"`` (names of optimizer-state
fields) keeps just those leaves there. Each step brings them into device
memory for the update and writes the new values back, so the accelerator
holds them only while the update runs: per-chip HBM drops by their bytes
between steps, at the cost of two host transfers per step.

It uses JAX memory kinds (``NamedSharding(..., memory_kind="pinned_host")``
for the state between steps, ``jax.device_put`` to the ``"device"`` kind
inside the step), as in the JAX memories guide; no library offers this rule
for an optax state (MaxText offloads by its own config names).

On CPU, host and device memory are one: the option is accepted and has no
effect (the trainer says so once at start-up). Checkpoints hold the same
arrays either way: a checkpoint saved with offload restores without it and
the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.experimental.layout import Format

__all__ = ["HOST", "effective", "parse", "place", "to_device", "to_host"]

# The memory kind the offloaded state lives in between steps.
HOST = "pinned_host"
_ALL = "opt_state"


def parse(rules: str) -> tuple[str, ...]:
  """The names in ``optimizer.offload``: ``"mu, nu"`` -> ``("mu", "nu")``; ``""`` -> ``()``.

  Args:
    rules: the config value.

  Returns:
    The names (``("opt_state",)`` for the whole state).

  Raises:
    ValueError: a name that is not an identifier.

  Examples:
    >>> parse("mu, nu"), parse("opt_state"), parse("")
    (('mu', 'nu'), ('opt_state',), ())
  """
  names = tuple(n.strip() for n in str(rules).split(",") if n.strip())
  for n in names:
    if not n.isidentifier():
      raise ValueError(
        f"{n!r} is not a name; give 'opt_state' (the whole optimizer state) or names of its "
        "fields such as 'mu, nu'"
      )
  return names


def effective(devices: Sequence[Any]) -> bool:
  """Whether offloading moves anything on these devices (not on CPU, whose host memory is its memory).

  Args:
    devices: the mesh's devices (real or compile-only).

  Returns:
    True on TPU and GPU.
  """
  return bool(devices) and all(getattr(d, "platform", "cpu") != "cpu" for d in devices)


def _field_names(path: Sequence[Any]) -> set[str]:
  out = set()
  for k in path:
    for attr in ("name", "key"):  # GetAttrKey (NamedTuple fields), DictKey
      v = getattr(k, attr, None)
      if isinstance(v, str):
        out.add(v)
  return out


def _host_sharding(leaf: Any, s: Any, platform: str | None) -> Any:
  if platform == "tpu" and jax.numpy.dtype(getattr(leaf, "dtype", jax.numpy.float32)).itemsize == 1:
    # XLA:TPU (libtpu 0.0.42.1) does not compile host transfers of 8-bit arrays
    # ("Source and destination buffers in CopyDone arguments need to be the
    # same shape": int8 tiled (8,128)(4,1) in host memory, (32,128)(4,1) in
    # HBM; naming the host layout compiles one leaf alone, not a train step):
    # 8-bit codes stay in HBM, their float32 scales and float leaves move.
    return s
  return s.with_memory_kind(HOST)


def place(opt_state: Any, shardings: Any, names: Sequence[str], platform: str | None = None) -> Any:
  """``shardings`` of ``opt_state`` with the leaves that ``names`` select in host memory.

  A name selects the leaves under a field of that name anywhere in the
  optimizer state (``mu`` selects every first moment, its 8-bit codes and
  scales included); ``opt_state`` selects every leaf.

  Args:
    opt_state: the (abstract) optimizer state.
    shardings: its ``NamedSharding`` tree (same structure).
    names: from :func:`parse`.
    platform: the devices' platform; on ``"tpu"`` 8-bit leaves (int8
      moments' codes) stay in device memory (see ``_host_sharding``).

  Returns:
    The shardings, selected leaves with ``memory_kind="pinned_host"``.

  Raises:
    ValueError: a name that selects no leaf (the message lists the fields there are).
  """
  if not names:
    return shardings
  flat, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
  flat_shardings = treedef.flatten_up_to(shardings)
  seen: set[str] = set()
  used: set[str] = set()
  out = []
  for (path, leaf), s in zip(flat, flat_shardings, strict=True):
    fields = _field_names(path)
    seen |= fields
    hit = _ALL in names or bool(fields & set(names))
    used |= fields & set(names)
    out.append(_host_sharding(leaf, s, platform) if hit else s)
  missing = [n for n in names if n != _ALL and n not in used]
  if missing:
    raise ValueError(
      f"{', '.join(map(repr, missing))} names no field of the optimizer state; give "
      f"'opt_state' or some of: {', '.join(sorted(seen)) or '(no fields)'}"
    )
  return treedef.unflatten(out)


def _sharding(s: Any) -> Any:
  return s.sharding if isinstance(s, Format) else s


def _is_host(s: Any) -> bool:
  return getattr(_sharding(s), "memory_kind", None) == HOST


def to_device(tree: Any, shardings: Any) -> Any:
  """Inside a jitted step: the leaves whose sharding is in host memory, moved to device memory.

  Args:
    tree: the (traced) optimizer state.
    shardings: its shardings (from :func:`place`); None: nothing is offloaded.

  Returns:
    The tree, every leaf in device memory.
  """
  if shardings is None:
    return tree
  move = lambda x, s: (
    jax.device_put(x, _sharding(s).with_memory_kind("device")) if _is_host(s) else x
  )
  return jax.tree.map(move, tree, shardings)


def to_host(tree: Any, shardings: Any) -> Any:
  """Inside a jitted step: the offloaded leaves of the new state, written back to host memory.

  Args:
    tree: the new (traced) optimizer state, in device memory.
    shardings: its shardings (from :func:`place`); None: nothing is offloaded.

  Returns:
    The tree, offloaded leaves in host memory.
  """
  if shardings is None:
    return tree
  back = lambda x, s: jax.device_put(x, _sharding(s)) if _is_host(s) else x
  return jax.tree.map(back, tree, shardings)
