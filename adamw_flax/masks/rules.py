"""The rule language: selectors, rules, presets, and reading rules from config values.

See :mod:`adamw_flax.masks` for the language itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import PartitionSpec

#: Layer classes whose ``kernel`` the ``"default"`` preset decays (NNX and Linen names).
#: Linen's ``OptimizedLSTMCell`` keeps its gate kernels in ``DenseParams``
#: (flax/linen/recurrent.py: "Dummy module for creating parameters matching
#: Dense", its ``kernel`` is a Dense kernel the cell multiplies itself), where
#: NNX's cell holds ``Linear`` layers: both cells' kernels decay alike.
DEFAULT_DECAY_TYPES: tuple[str, ...] = (
  "Linear",
  "LinearGeneral",
  "Einsum",
  "Conv",
  "ConvTranspose",
  "Dense",
  "DenseGeneral",
  "DenseParams",
)

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
CATCH_ALL = "*"
_NDIM_OPS: dict[str, Callable[[int, int], bool]] = {
  ">=": operator.ge,
  "<=": operator.le,
  "==": operator.eq,
  "!=": operator.ne,
  ">": operator.gt,
  "<": operator.lt,
}
_NDIM_RE = re.compile(r"ndim\s*(>=|<=|==|!=|>|<)\s*(\d+)")
_PREFIX_RE = re.compile(r"([A-Za-z_]+):")


class _Required:
  def __repr__(self) -> str:
    return "<required>"


REQUIRED: Any = _Required()


# --------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  """What a selector may look at: one parameter."""

  path: str
  ndim: int
  owner: tuple[str, ...] | None  # class names of the owning module and its bases


@dataclasses.dataclass(frozen=True)
class _Atom:
  kind: str  # "glob", "re", "type", "ndim"
  text: str
  pattern: Any

  def matches(self, p: ParamInfo) -> bool:
    if self.kind == "glob":
      subject = p.path if "/" in self.pattern else p.path.rsplit("/", 1)[-1]
      return fnmatch.fnmatchcase(subject, self.pattern)
    if self.kind == "re":
      return self.pattern.fullmatch(p.path) is not None
    if self.kind == "type":
      return p.owner is not None and any(name in p.owner for name in self.pattern)
    op, n = self.pattern
    return _NDIM_OPS[op](p.ndim, n)


def _parse_atom(text: str, rule: str) -> _Atom:
  text = text.strip()
  if not text:
    raise ValueError(
      f"rule {rule!r}: empty selector; write a glob ('*/bias'), 're:<regex>', "
      "'type:<Class>' or 'ndim>=2'"
    )
  ndim = _NDIM_RE.fullmatch(text)
  if ndim:
    return _Atom("ndim", text, (ndim.group(1), int(ndim.group(2))))
  if text.startswith("ndim") and any(op in text for op in "<>=!"):
    raise ValueError(
      f"rule {rule!r}: cannot read {text!r} as an ndim selector; write e.g. "
      "'ndim>=2' or 'ndim==1' (operators: >=, <=, ==, !=, >, <)"
    )
  prefix = _PREFIX_RE.match(text)
  if prefix and prefix.group(1) == "re":
    try:
      return _Atom("re", text, re.compile(text[3:]))
    except re.error as e:
      raise ValueError(f"rule {rule!r}: invalid regular expression {text[3:]!r}: {e}") from None
  if prefix and prefix.group(1) == "type":
    names = tuple(n.strip() for n in text[5:].split("|"))
    bad = [n for n in names if not n.isidentifier()]
    if bad:
      raise ValueError(
        f"rule {rule!r}: {bad[0]!r} is not a class name; write e.g. "
        "'type:LayerNorm' or 'type:LayerNorm|RMSNorm'"
      )
    return _Atom("type", text, names)
  if prefix:
    raise ValueError(
      f"rule {rule!r}: unknown selector kind {prefix.group(0)!r}; use a glob "
      "('*/bias'), 're:<regex>', 'type:<Class>' or 'ndim>=2'"
    )
  return _Atom("glob", text, text)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One rule: parameters matching ``selector`` get ``value``.

  Args:
    selector: a glob on the path (the default), ``"re:<regex>"``,
      ``"type:<Class>[|<Class>...]"``, ``"ndim>=2"`` and the like, or several
      of these joined by ``" & "``; see the module docstring.
    value: what matching parameters get (a bool or a float).
    required: whether matching no parameter is an error (presets set False for
      rules that a model may legitimately lack).

  Examples:
    >>> Rule("type:Linear & kernel", True).needs_types
    True
    >>> Rule("re:(", True)
    Traceback (most recent call last):
    ...
    ValueError: rule 're:(': invalid regular expression '(': missing ), unterminated subpattern at position 0
  """

  selector: str
  value: Any
  required: bool = True
  _atoms: tuple[_Atom, ...] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if not isinstance(self.selector, str):
      raise ValueError(f"rule selector must be a string, got {self.selector!r}")
    atoms = tuple(_parse_atom(part, self.selector) for part in re.split(r"\s+&\s+", self.selector))
    object.__setattr__(self, "_atoms", atoms)

  @property
  def atoms(self) -> tuple[_Atom, ...]:
    """The selector's parts (joined by ``&``)."""
    return self._atoms

  @property
  def needs_types(self) -> bool:
    """Whether the rule selects by module type (and so needs the model)."""
    return any(a.kind == "type" for a in self._atoms)

  def matches(self, param: ParamInfo) -> bool:
    return all(a.matches(param) for a in self._atoms)


# --------------------------------------------------------------------------
# Rule specs
# --------------------------------------------------------------------------

_DEFAULT_PRESET = (
  Rule(f"type:{'|'.join(DEFAULT_DECAY_TYPES)} & kernel", True),
  Rule(CATCH_ALL, False, required=False),
)
PRESETS: dict[str, tuple[Rule, ...]] = {
  "default": _DEFAULT_PRESET,
  "all": (Rule(CATCH_ALL, True, required=False),),
  "none": (Rule(CATCH_ALL, False, required=False),),
  # Token/position tables (nnx.Embed, linen.Embed): where 8-bit moments keep float32.
  "embeddings": (Rule("type:Embed", True, required=False), Rule(CATCH_ALL, False, required=False)),
}

# `sel=value` items separated by commas; the value is the last `=` token before a comma, so
# selectors may hold `=`, `,` or spaces ("ndim>=2=true", "re:a{1,2}=false").
_ITEM_RE = re.compile(r"\s*(?P<sel>\S.*?)\s*=\s*(?P<val>[^\s,=]+)\s*(?:,|$)")


def to_partition_spec(raw: Any, where: str) -> PartitionSpec:
  """A ``PartitionSpec`` from a config value: a spec, a tuple of axis names / tuples / None.

  Examples:
    >>> to_partition_spec(("data", None), "rule")
    P('data', None)
    >>> to_partition_spec(None, "rule")
    P()

  Args:
    raw: a ``PartitionSpec``, ``None`` (replicated), one axis name, or a
      sequence of axis names, tuples of names and ``None``.
    where: the rule, for error messages.

  Returns:
    The ``PartitionSpec``.
  """
  if isinstance(raw, PartitionSpec):
    return raw
  if raw is None:
    return PartitionSpec()
  if isinstance(raw, str):
    return PartitionSpec(raw)
  if not isinstance(raw, Sequence):
    raise ValueError(
      f"{where}: spec {raw!r} must be a PartitionSpec or a tuple of mesh axis names, "
      "tuples of names, or None (one per dimension)"
    )
  entries = []
  for e in raw:
    if e is None or isinstance(e, str):
      entries.append(e)
    elif isinstance(e, Sequence) and all(isinstance(a, str) for a in e):
      entries.append(tuple(e))
    else:
      raise ValueError(
        f"{where}: spec entry {e!r} must be a mesh axis name, a tuple of names, or None"
      )
  return PartitionSpec(*entries)


class _Decay:
  """The value type of weight-decay rules: a boolean (on/off) or a number >= 0 (a multiplier)."""

  def __repr__(self) -> str:
    return "DECAY"


#: ``value_type`` of weight-decay rules: ``true``/``false``, or a multiplier of
#: ``weight_decay`` (``"type:Embed=0.1, */bias=0, *=1"``; big_vision's wd_mults).
DECAY: Any = _Decay()


def is_boolean(values: Any) -> bool:
  """Whether weight-decay values are all on/off (``True``/``False``, or the numbers 0 and 1)."""
  return all(isinstance(v, bool) or v in (0, 1) for v in values)


def _convert(value: Any, value_type: type, selector: str, what: str) -> Any:
  if value_type is DECAY:
    if isinstance(value, bool | np.bool_) or (
      isinstance(value, str) and value.strip().lower() in _BOOL_WORDS
    ):
      return _convert(value, bool, selector, what)
    try:
      return _convert(value, float, selector, what)
    except ValueError:
      raise ValueError(
        f"{what} rule {selector!r}: value {value!r} is neither a boolean (true/false) nor a "
        "decay multiplier (a number >= 0)"
      ) from None
  if value_type is PartitionSpec:
    return to_partition_spec(value, f"{what} rule {selector!r}")
  if value_type is bool:
    if isinstance(value, bool | np.bool_):
      return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
      return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(
      f"{what} rule {selector!r}: value {value!r} is not a boolean; use true/false (yes/no, on/off)"
    )
  if value_type is float:
    try:
      if isinstance(value, bool | np.bool_):
        raise TypeError
      number = float(value)
    except (TypeError, ValueError):
      raise ValueError(f"{what} rule {selector!r}: value {value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
      raise ValueError(f"{what} rule {selector!r}: value {value!r} must be a finite number >= 0")
    return number
  raise ValueError(f"value_type must be bool, float or PartitionSpec, got {value_type!r}")


def _parse_compact(spec: str, what: str) -> list[tuple[str, str]]:
  pairs, pos = [], 0
  while pos < len(spec):
    if not spec[pos:].strip():
      break
    m = _ITEM_RE.match(spec, pos)
    if m is None:
      raise ValueError(
        f"{what} rules {spec!r}: cannot read {spec[pos:].strip()!r}; write "
        f"'selector=value' items separated by commas, e.g. '*/bias=false, *=true', "
        f"or a preset ({', '.join(PRESETS)})"
      )
    pairs.append((m.group("sel"), m.group("val")))
    pos = m.end()
  return pairs


def parse_rules(
  spec: Any, *, value_type: type = bool, what: str = "weight decay"
) -> tuple[Rule, ...]:
  """Reads rules from a preset name, pairs, a mapping or a compact string.

  Args:
    spec: one of
      * ``None`` or ``""``: no rules;
      * a preset name (only for ``value_type=bool``): ``"default"``, ``"all"``,
        ``"none"``;
      * a compact string ``"sel=value, sel=value"`` (the value follows the
        last ``=`` of an item, so ``"ndim>=2=true"`` reads as ``ndim>=2`` ->
        true);
      * a sequence of ``(selector, value)`` pairs or :class:`Rule` objects;
      * a mapping ``{selector: value}`` (in insertion order).
    value_type: ``bool`` (weight decay, frozen) or ``float`` (learning-rate
      multipliers); values are converted and checked.
    what: what the rules are for, used in error messages.

  Returns:
    The rules, in order.

  Raises:
    ValueError: naming the rule with a bad selector or value.

  Examples:
    >>> parse_rules("*/bias=false, ndim>=2=true, *=no")
    (Rule(selector='*/bias', value=False, required=True), Rule(selector='ndim>=2', value=True, required=True), Rule(selector='*', value=False, required=True))
    >>> parse_rules([("embed/*", "0.1")], value_type=float)
    (Rule(selector='embed/*', value=0.1, required=True),)
    >>> parse_rules("*/bias=maybe")
    Traceback (most recent call last):
    ...
    ValueError: weight decay rule '*/bias': value 'maybe' is not a boolean; use true/false (yes/no, on/off)
  """
  if spec is None:
    return ()
  if isinstance(spec, str):
    stripped = spec.strip()
    if stripped in PRESETS:
      if value_type not in (bool, DECAY):
        raise ValueError(
          f"{what} rules: preset {stripped!r} holds booleans; write "
          "'selector=number' items, e.g. 'embed/*=0.1'"
        )
      return PRESETS[stripped]
    if stripped and "=" not in stripped:
      close = difflib.get_close_matches(stripped, list(PRESETS), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(
        f"{what} rules {spec!r}: not a preset ({', '.join(PRESETS)}) nor "
        f"'selector=value' items like '*/bias=false, *=true'.{hint}"
      )
    items: Iterable[Any] = _parse_compact(spec, what)
  elif isinstance(spec, Mapping):
    items = spec.items()
  elif isinstance(spec, Sequence):
    items = spec
  else:
    raise ValueError(
      f"{what} rules: expected a preset name, a 'sel=value, ...' string, a "
      f"sequence of (selector, value) pairs or a mapping, got {spec!r}"
    )
  rules = []
  for item in items:
    if isinstance(item, Rule):
      rule = dataclasses.replace(item, value=_convert(item.value, value_type, item.selector, what))
    elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
      selector, value = item
      if not isinstance(selector, str):
        raise ValueError(f"{what} rule {item!r}: the selector must be a string")
      rule = Rule(selector.strip(), _convert(value, value_type, selector, what))
    else:
      raise ValueError(f"{what} rules: {item!r} is not a (selector, value) pair nor a Rule")
    rules.append(rule)
  return tuple(rules)


# --------------------------------------------------------------------------
# Partition rules: the same selectors, PartitionSpec values
# --------------------------------------------------------------------------

# An unprefixed partition-rule selector with one of these is a regex written
# for the first build's regex-only partition rules; it is read as "re:<it>".
_LEGACY_REGEX = re.compile(r"\.\*|\.\+|[()|+\\^${}]")


def partition_selector(selector: str) -> str:
  """A partition rule's selector in the mask language (legacy regexes get ``re:``).

  Examples:
    >>> partition_selector(".*kernel"), partition_selector("*/kernel")
    ('re:.*kernel', '*/kernel')

  Args:
    selector: a partition rule's selector as the config gives it.

  Returns:
    The selector in the mask language.
  """
  text = selector.strip()
  if re.match(r"(re|type):", text) or text.startswith("ndim") or " & " in text:
    return text
  return f"re:{text}" if _LEGACY_REGEX.search(text) else text


def parse_partition_rules(rules: Any) -> tuple[Rule, ...]:
  """``mesh.partition_rules`` as rules with ``PartitionSpec`` values.

  Args:
    rules: ``((selector, spec), ...)``; selectors in the mask language (globs,
      ``re:``, ``type:``, ``ndim``), and unprefixed regexes as the first build
      wrote them (``".*kernel"``, read as ``"re:.*kernel"``).

  Returns:
    The rules, in order (the first match wins).

  Raises:
    ValueError: naming the rule with a bad selector or spec.
  """
  pairs = []
  for i, rule in enumerate(rules or ()):
    if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"mesh.partition_rules[{i}]: must be a (selector, spec) pair, got {rule!r}")
    try:
      pairs.extend(parse_rules([(partition_selector(rule[0]), rule[1])], value_type=PartitionSpec,
                               what="partition"))  # fmt: skip
    except ValueError as e:
      raise ValueError(f"mesh.partition_rules[{i}]: {e}") from None
  return tuple(pairs)
