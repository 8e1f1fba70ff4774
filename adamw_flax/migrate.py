"""Converting optimizer states between formats and trees.

An optimizer state's tree and dtypes follow the optimizer's options: another
``mu_dtype`` (float32, bfloat16, 8-bit), a mask preset that adds or removes
``optax.MaskedState`` nodes, a learning rate or weight decay that becomes a
schedule (a counter appears), ``skip_nonfinite`` (an ``ApplyIfFiniteState``
wrapper), bfloat16 params (a :class:`~adamw_flax.transform.ParamsRoundingState`).
A checkpoint written with one set of options then does not restore into
another. :func:`convert_opt_state` carries what the two states share over to
the new tree: each Adam moment by its parameter's path (dequantized or cast,
then stored in the new format), every update counter from the Adam count, and
any other leaf found under the same path; the rest keeps its fresh value.

optax has no such conversion (its states are plain pytrees; restoring one into
another tree is left to the user), so it is written here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamw_flax import quantize
from adamw_flax.masks import key_str
from adamw_flax.transform import ParamsRoundingState

__all__ = ["convert_opt_state", "from_optax_state", "to_optax_state"]

Path = tuple[str, ...]
_ADAM_FIELDS = ("count", "mu", "nu")


def _is_adam(node: Any) -> bool:
  if isinstance(node, optax.ScaleByAdamState):
    return True
  return isinstance(node, dict) and set(_ADAM_FIELDS) <= set(node)


def _is_moment_leaf(node: Any) -> bool:
  # A QuantizedMoment, or one in a mapping's form (as Orbax restores it
  # without a target, or as nnx.Optimizer keeps it: quantize.moment_of).
  return quantize.is_quantized(quantize.moment_of(node))


def _field(node: Any, name: str) -> Any:
  return node[name] if isinstance(node, dict) else getattr(node, name)


def _flat(tree: Any, stop: Any = None) -> list[tuple[Path, Any]]:
  """(path, leaf) pairs; a quantized moment is one leaf; ``stop`` nodes are leaves too."""

  def is_leaf(x: Any) -> bool:
    return _is_moment_leaf(x) or (stop is not None and stop(x))

  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return [(tuple(key_str(k) for k in kp), quantize.moment_of(x)) for kp, x in flat]


def _adam_nodes(tree: Any) -> list[tuple[Path, Any]]:
  return [(p, x) for p, x in _flat(tree, stop=_is_adam) if _is_adam(x)]


def _describe(x: Any) -> str:
  if quantize.is_quantized(x):
    return "int8"
  return str(np.dtype(x.dtype))


def _moment_values(x: Any) -> jax.Array:
  if quantize.is_quantized(x):
    return quantize.dequantize(jax.tree.map(jnp.asarray, x))
  return jnp.asarray(x, jnp.float32) if not jnp.iscomplexobj(x) else jnp.asarray(x)


def _convert_moment(saved: Any, like: Any, kind: str) -> Any:
  values = _moment_values(saved)
  if quantize.is_quantized(like):
    if values.shape != like.shape:
      raise ValueError(f"shape {values.shape} != {like.shape}")
    return quantize.quantize(values, kind, like.block)
  if values.shape != tuple(np.shape(like)):
    raise ValueError(f"shape {values.shape} != {np.shape(like)}")
  return values.astype(like.dtype)


def _count_of(node: Any) -> Any:
  return jnp.asarray(_field(node, "count"))


def convert_opt_state(saved: Any, fresh: Any) -> tuple[Any, list[str]]:
  """Carries an optimizer state over to another state's tree and formats.

  Args:
    saved: the state to convert: an optimizer state, or the nested
      dicts/lists Orbax restores without a target (NamedTuples as dicts,
      tuples as lists, a quantized moment as ``{"codes", "scale"}``).
    fresh: a state of the wanted tree, e.g. ``tx.init(params)``; its leaves
      are the values of what ``saved`` lacks.

  Returns:
    ``(state, notes)``: a state with ``fresh``'s tree and dtypes, and one line
    per kind of conversion done (for the run's log).

  Raises:
    ValueError: ``saved`` has no Adam state (``count``, ``mu``, ``nu``), the
      two have a different number of Adam states, or a moment's parameter is
      missing or has another shape.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import adamw_flax
    >>> params = {"w": jnp.ones((4, 256))}
    >>> old = optax.adamw(1e-3).init(params)
    >>> new_tx = adamw_flax.adamw(optax.cosine_decay_schedule(1e-3, 100), mu_dtype="int8",
    ...                           quantize_min_size=0)
    >>> state, notes = convert_opt_state(old, new_tx.init(params))
    >>> type(state[0].mu["w"]).__name__, notes[0]
    ('QuantizedMoment', 'mu: float32 -> int8 (1 leaves)')
  """
  saved_adams, fresh_adams = _adam_nodes(saved), _adam_nodes(fresh)
  if not saved_adams:
    raise ValueError("the saved optimizer state has no Adam moments (count, mu, nu) to carry over")
  if len(saved_adams) != len(fresh_adams):
    raise ValueError(
      f"the saved optimizer state has {len(saved_adams)} Adam state(s), the new one "
      f"{len(fresh_adams)}; they cannot be paired"
    )
  count = _count_of(saved_adams[0][1])
  saved_flat = dict(_flat(saved))
  conversions: dict[str, int] = {}
  new_nodes: dict[Path, Any] = {}

  for (_, s_node), (f_path, f_node) in zip(saved_adams, fresh_adams, strict=True):
    moments = {}
    for kind in ("mu", "nu"):
      s_moments = dict(_flat(_field(s_node, kind)))
      f_moments = _flat(_field(f_node, kind))
      out = []
      for p, like in f_moments:
        if p not in s_moments:
          raise ValueError(
            f"{kind} of {'/'.join(p)}: not in the saved state (the model changed?); its "
            f"parameters: {', '.join('/'.join(q) for q in list(s_moments)[:4])}"
          )
        try:
          out.append(_convert_moment(s_moments[p], like, kind))
        except ValueError as e:
          raise ValueError(f"{kind} of {'/'.join(p)}: {e}") from None
        before, after = _describe(s_moments[p]), _describe(like)
        if before != after:
          change = f"{kind}: {before} -> {after}"
          conversions[change] = conversions.get(change, 0) + 1
      treedef = jax.tree.structure(_field(f_node, kind), is_leaf=quantize.is_quantized)
      moments[kind] = jax.tree.unflatten(treedef, out)
    new_nodes[f_path] = optax.ScaleByAdamState(
      count=jnp.array(count, f_node.count.dtype), mu=moments["mu"], nu=moments["nu"]
    )

  fresh_kept = []

  def other_leaf(path: Path, like: Any) -> Any:
    shape, dtype = tuple(np.shape(like)), like.dtype
    if path and path[-1] == "count" and shape == ():
      return jnp.array(count, dtype)  # every counter of our chains counts updates (a copy each)
    hit = saved_flat.get(path)
    if hit is not None and not quantize.is_quantized(hit) and tuple(np.shape(hit)) == shape:
      return jnp.array(hit, dtype)
    fresh_kept.append("/".join(path))
    return like

  def visit(kp: Any, node: Any) -> Any:
    path = tuple(key_str(k) for k in kp)
    return new_nodes[path] if _is_adam(node) else other_leaf(path, node)

  state = jax.tree_util.tree_map_with_path(visit, fresh, is_leaf=_is_adam)
  notes = [f"{change} ({n} leaves)" for change, n in conversions.items()]
  notes.append(f"update counters set to {int(count)} (the Adam count)")
  if fresh_kept:
    shown = fresh_kept[:4] + ([f"... {len(fresh_kept) - 4} more"] if len(fresh_kept) > 4 else [])
    notes.append("freshly initialized (not in the saved state): " + ", ".join(shown))
  return state, notes


def _strip_rounding(state: Any) -> Any:
  # adamw(params_rounding=...) appends a ParamsRoundingState to optax's three.
  if isinstance(state, tuple) and not hasattr(state, "_fields") and state:
    if isinstance(state[-1], ParamsRoundingState):
      return state[:-1]
  return state


def to_optax_state(state: Any, dtype: Any = jnp.float32) -> Any:
  """An adamw_flax optimizer state as plain ``optax.adamw``/``nadamw`` state.

  8-bit moments are dequantized to ``dtype``; the rounding state of bfloat16
  params (``adamw(params_rounding=...)``) is dropped. The result restores into
  and updates with ``optax.adamw(...)`` of the same options.

  Args:
    state: the state of :func:`adamw_flax.adamw` (or a chain holding it).
    dtype: the dtype of moments that were quantized (others keep theirs).

  Returns:
    The optax state.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import adamw_flax
    >>> params = {"w": jnp.ones((4, 256))}
    >>> state = adamw_flax.adamw(1e-3, mu_dtype="int8", nu_dtype="int8",
    ...                          quantize_min_size=0).init(params)
    >>> plain = to_optax_state(state)
    >>> jax.tree.structure(plain) == jax.tree.structure(optax.adamw(1e-3).init(params))
    True
  """
  state = _strip_rounding(state)
  return jax.tree.map(
    lambda x: quantize.dequantize(quantize.moment_of(x), dtype) if _is_moment_leaf(x) else x,
    state,
    is_leaf=_is_moment_leaf,
  )


def from_optax_state(optax_state: Any, tx: optax.GradientTransformation, params: Any) -> Any:
  """An ``optax.adamw`` state converted into the state of ``tx`` (e.g. 8-bit moments).

  Args:
    optax_state: the state of ``optax.adamw`` / ``optax.nadamw`` (or any state
      :func:`convert_opt_state` can read).
    tx: the adamw_flax optimizer whose state to build.
    params: the params ``tx`` is initialised from (shapes, and the fresh
      values of anything optax's state lacks).

  Returns:
    ``tx``'s state holding the optax state's moments and count.
  """
  return convert_opt_state(optax_state, tx.init(params))[0]
