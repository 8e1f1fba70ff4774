"""Applying rules to a target: per-path values, and the callables optax takes as masks."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import jax

from adamw_flax.masks.paths import Target, as_target, flatten_paths, leaf_ndim, mro_names
from adamw_flax.masks.rules import (
  CATCH_ALL,
  DECAY,
  PRESETS,
  REQUIRED,
  ParamInfo,
  Rule,
  is_boolean,
  parse_rules,
)

PyTree = Any


def check_types_available(rules: Sequence[Rule], kind: str, what: str, hint: str = "") -> None:
  for i, rule in enumerate(rules, 1):
    if rule.needs_types:
      hint = hint or (
        "pass the model as `target` (an nnx.Module, or "
        "adamw_flax.masks.linen_target(module, *example_inputs) for Linen), or use path "
        "rules ('*/bias', 're:.*norm.*/scale')"
      )
      raise ValueError(
        f"{what} rule #{i} {rule.selector!r} selects by module type, but the target "
        f"({kind}) carries no module types; {hint}"
      )


def examples_str(paths: Sequence[str], n: int = 5) -> str:
  shown = ", ".join(repr(p) for p in paths[:n])
  return shown + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def _diagnose_unmatched(rule: Rule, params: list[ParamInfo]) -> str:
  """Why a rule matched nothing: which part, and what is close."""
  notes = []
  for atom in rule.atoms:
    if any(atom.matches(p) for p in params):
      continue
    if atom.kind in ("glob", "re"):
      whole_path = atom.kind == "re" or "/" in atom.text
      candidates = sorted({p.path if whole_path else p.path.rsplit("/", 1)[-1] for p in params})
      probe = atom.text[3:] if atom.kind == "re" else atom.text
      close = difflib.get_close_matches(probe, candidates, n=1, cutoff=0.5)
      hint = f"; closest: {close[0]!r}" if close else ""
      notes.append(f"{atom.text!r} matches no path{hint}")
    elif atom.kind == "type":
      classes = sorted({p.owner[0] for p in params if p.owner})
      close = [c for n in atom.pattern for c in difflib.get_close_matches(n, classes, n=1)]
      hint = f"; did you mean {close[0]!r}?" if close else ""
      notes.append(f"{atom.text!r} matches no module (classes here: {', '.join(classes)}){hint}")
    else:
      ndims = sorted({p.ndim for p in params})
      notes.append(f"{atom.text!r} matches no parameter (ndims here: {ndims})")
  if not notes:  # every part matches something, but never the same parameter
    notes.append("its parts each match, but never the same parameter")
  return "; ".join(notes)


def resolve(target: Target, rules: Sequence[Rule], default: Any, what: str) -> dict[str, Any]:
  if target.owners is None:
    check_types_available(rules, target.kind, what, target.hint)
  params = [
    ParamInfo(path, leaf_ndim(leaf), mro_names(target.owners.get(path)) if target.owners else None)
    for path, leaf in target.entries
  ]
  if not params:
    return {}
  won: list[list[str]] = [[] for _ in rules]
  matched: list[list[str]] = [[] for _ in rules]
  winner_of: dict[str, int] = {}
  values: dict[str, Any] = {}
  unmatched: list[str] = []
  for p in params:
    for i, rule in enumerate(rules):
      if rule.matches(p):
        matched[i].append(p.path)
        if p.path not in winner_of:
          winner_of[p.path] = i
          won[i].append(p.path)
          values[p.path] = rule.value
    if p.path not in winner_of:
      unmatched.append(p.path)
  for i, rule in enumerate(rules):
    if won[i] or not rule.required or rule.selector == CATCH_ALL:
      continue
    label = f"{what} rule #{i + 1} {rule.selector!r}"
    if not matched[i]:
      preset = next((name for name, rs in PRESETS.items() if rs == tuple(rules)), None)
      hint = (
        f" The {preset!r} preset decays only the kernels of these layers; write rules instead, "
        "e.g. 'ndim>=2=true, *=false', or use 'all' or 'none'."
        if preset
        else ""
      )
      raise ValueError(
        f"{label} matches no parameter of the {target.kind} ({_diagnose_unmatched(rule, params)})."
        f" Parameters: {examples_str([p.path for p in params])}.{hint}"
      )
    earlier = sorted({winner_of[path] for path in matched[i]})
    raise ValueError(
      f"{label} matches {examples_str(matched[i], 3)}, but each is taken by an earlier rule ("
      + ", ".join(f"#{j + 1} {rules[j].selector!r}" for j in earlier)
      + "); the first matching rule wins, so put the more specific rule first"
    )
  if unmatched:
    if default is REQUIRED:
      raise ValueError(
        f"{what}: no rule matches {examples_str(unmatched, 3)}; end the rules with a catch-all "
        "such as '*=false'"
      )
    values.update(dict.fromkeys(unmatched, default))
  return {p.path: values[p.path] for p in params}


def path_values(
  target: Any,
  rules: Any,
  *,
  default: Any = REQUIRED,
  what: str = "weight decay",
  value_type: type = bool,
) -> dict[str, Any]:
  """Applies ordered rules to every parameter of ``target``.

  Args:
    target: an ``nnx.Module`` (its ``nnx.Param`` variables; module types
      known), a :class:`LinenTarget` (module types known), or any params tree:
      ``nnx.State`` (Variable leaves or arrays), the dict of
      ``state.to_pure_dict()``, a Linen params dict, a nested dict.
    rules: rules or a spec that :func:`parse_rules` reads.
    default: the value of parameters no rule matches; without it such a
      parameter is an error naming it.
    what: what the rules are for, used in error messages.
    value_type: ``bool`` or ``float``, to read and check the values.

  Returns:
    ``"/"``-joined path -> value, in leaf order.

  Raises:
    ValueError: a rule matches no parameter or only parameters an earlier
      rule took; a parameter is unmatched and there is no ``default``; a type
      rule and a target without module types.

  Examples:
    >>> import numpy as np
    >>> params = {"dense": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}}
    >>> path_values(params, [("*/bias", 0.0)], default=1.0, value_type=float)
    {'dense/bias': 0.0, 'dense/kernel': 1.0}
    >>> path_values(params, "*/bais=false, *=true")
    Traceback (most recent call last):
    ...
    ValueError: weight decay rule #1 '*/bais' matches no parameter of the dict ('*/bais' matches no path; closest: 'dense/bias'). Parameters: 'dense/bias', 'dense/kernel'.
  """
  return resolve(
    as_target(target), parse_rules(rules, value_type=value_type, what=what), default, what
  )


# --------------------------------------------------------------------------
# Callables for optax
# --------------------------------------------------------------------------


class RuleFn:
  """``tree -> tree of values``, for the ``mask`` of optax (and similar) transforms.

  Maps every leaf of the tree it is called with to the value of its parameter
  and returns a tree of the same structure (an ``nnx.State`` with Variable
  leaves comes back as one with the Variables holding the values). Built by
  :func:`weight_decay_mask`, :func:`lr_multiplier_fn` and :func:`frozen_fn`.

  With a ``target``, the values are computed once from the target (which gives
  module types); the called tree's paths must be the target's (a subset is
  fine; an unknown path is an error). Without one, the rules are applied to
  each tree the function is called with (at trace time under ``jit``).
  """

  def __init__(self, rules: Any, target: Any, *, default: Any, what: str, value_type: type):
    self.rules = parse_rules(rules, value_type=value_type, what=what)
    self.convert: Any = None  # applied to each value returned (e.g. bool, float)
    self.strengths = False  # values are weight-decay multipliers, not on/off
    self.what = what
    self.default = default
    self.value_type = value_type
    self.values: dict[str, Any] | None = None
    self._linen = False
    if target is None:
      check_types_available(self.rules, "params tree given to the optimizer", what)
    else:
      resolved = as_target(target)
      self.values = resolve(resolved, self.rules, default, what)
      self._linen = resolved.linen

  def _lookup(self, path: str) -> Any:
    assert self.values is not None
    if path in self.values:
      return self.values[path]
    # A Linen TrainState may hold {'params': {...}} where the target has the inner dict.
    if self._linen and path.startswith("params/") and path[len("params/") :] in self.values:
      return self.values[path[len("params/") :]]
    close = difflib.get_close_matches(path, list(self.values), n=1)
    hint = f"; closest: {close[0]!r}" if close else ""
    raise ValueError(
      f"{self.what}: the tree passed in has the path {path!r}, which the target does not have"
      f"{hint}. Target paths: {examples_str(list(self.values))}. Build the function from the same "
      "model whose parameters the optimizer receives."
    )

  def __call__(self, tree: PyTree) -> PyTree:
    entries, treedef = flatten_paths(tree)
    if self.values is None:
      table = resolve(Target(entries, None, "params tree"), self.rules, self.default, self.what)
      values = [table[path] for path, _ in entries]
    else:
      values = [self._lookup(path) for path, _ in entries]
    if self.convert is not None:
      values = [self.convert(v) for v in values]
    return jax.tree_util.tree_unflatten(treedef, values)

  def __repr__(self) -> str:
    rules = ", ".join(f"{r.selector}={r.value}" for r in self.rules)
    bound = "bound to a target" if self.values is not None else "unbound"
    return f"RuleFn({self.what}: {rules}; {bound})"


def weight_decay_mask(rules: Any = "default", target: Any = None) -> RuleFn:
  """A weight-decay mask for ``optax.adamw(..., mask=...)`` and ``adamw_flax.adamw``.

  Every parameter must be matched by a rule (presets match all); an unmatched
  one is an error naming it, so that a rule list without a catch-all cannot
  decide silently.

  Args:
    rules: a preset (``"default"``, ``"all"``, ``"none"``) or rules
      (see :func:`parse_rules`); ``True`` = decay.
    target: the model (``nnx.Module`` or :class:`LinenTarget`) or a params
      tree. Needed for type rules, including the ``"default"`` preset.

  Returns:
    A callable ``params tree -> bool tree`` of the same structure.

  Raises:
    ValueError: bad rules; with a target, a rule that matches nothing, an
      unmatched parameter, or a type rule without module types.

  Examples:
    >>> import numpy as np
    >>> mask = weight_decay_mask("bias=false, *=true")
    >>> mask({"dense": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}})
    {'dense': {'bias': False, 'kernel': True}}
  """
  fn = RuleFn(rules, target, default=REQUIRED, what="weight decay", value_type=DECAY)
  if not is_boolean(r.value for r in fn.rules):
    raise ValueError(
      "weight decay rules with multipliers other than 0 and 1 are strengths, not a mask: use "
      "adamw_flax.masks.weight_decay_strengths (adamw's weight_decay_multipliers)"
    )
  fn.convert = bool
  return fn


def weight_decay_strengths(rules: Any, target: Any = None) -> RuleFn:
  """Per-parameter multipliers of ``weight_decay``, for adamw's ``weight_decay_multipliers``.

  Rules as for :func:`weight_decay_mask`, whose values may be numbers >= 0
  (``"type:Embed=0.1, */bias=0, *=1"``; ``true``/``false`` count as 1/0).

  Args:
    rules: the rules (or a preset).
    target: as for :func:`weight_decay_mask`.

  Returns:
    A callable ``params tree -> float tree`` of the same structure.

  Examples:
    >>> import numpy as np
    >>> fn = weight_decay_strengths("embed/*=0.1, bias=false, *=1")
    >>> fn({"embed": {"table": np.ones(2)}, "dense": {"bias": np.ones(2), "kernel": np.ones(2)}})
    {'dense': {'bias': 0.0, 'kernel': 1.0}, 'embed': {'table': 0.1}}
  """
  fn = RuleFn(rules, target, default=REQUIRED, what="weight decay", value_type=DECAY)
  fn.convert = float
  fn.strengths = True  # what optimizer factories read to pass it as multipliers
  return fn


def lr_multiplier_fn(rules: Any, target: Any = None) -> RuleFn:
  """Per-parameter learning-rate multipliers; unmatched parameters get 1.0.

  Args:
    rules: rules with float values (see :func:`parse_rules`), e.g.
      ``"embed/*=0.1, type:LayerNorm=2"``.
    target: as for :func:`weight_decay_mask`.

  Returns:
    A callable ``params tree -> float tree`` of the same structure.

  Examples:
    >>> import numpy as np
    >>> fn = lr_multiplier_fn("embed/*=0.1")
    >>> fn({"embed": {"table": np.ones((4, 2))}, "head": {"kernel": np.ones((2, 2))}})
    {'embed': {'table': 0.1}, 'head': {'kernel': 1.0}}
  """
  return RuleFn(rules, target, default=1.0, what="learning-rate multiplier", value_type=float)


def frozen_fn(rules: Any, target: Any = None) -> RuleFn:
  """Which parameters are frozen (``True``: no update); unmatched ones are trainable.

  Args:
    rules: rules with bool values (see :func:`parse_rules`), e.g.
      ``"embed/*=true"``; ``"none"`` freezes nothing.
    target: as for :func:`weight_decay_mask`.

  Returns:
    A callable ``params tree -> bool tree`` of the same structure.

  Examples:
    >>> import numpy as np
    >>> frozen_fn("embed/*=true")({"embed": {"table": np.ones(2)}, "head": {"w": np.ones(2)}})
    {'embed': {'table': True}, 'head': {'w': False}}
  """
  return RuleFn(rules, target, default=False, what="freeze", value_type=bool)
