"""Path rules: which parameters get weight decay, which learning-rate multiplier, which are frozen.

One ordered list of ``(selector, value)`` rules answers each of these questions.
For every parameter the rules are tried in order and **the first rule whose
selector matches gives the value**. Put specific rules first and a catch-all
(``"*"``) last.

Parameter paths
  Each parameter is named by its path, the keys from the root joined by
  ``"/"``: ``model.blocks[0].attn.query.kernel`` of an NNX model is
  ``"blocks/0/attn/query/kernel"``; ``params["Dense_0"]["kernel"]`` of a Linen
  model is ``"Dense_0/kernel"`` (``"params/Dense_0/kernel"`` when the tree
  still holds the ``'params'`` collection level). The ``.value`` of NNX
  Variables (and of Linen ``Partitioned`` boxes) is not part of the path.
  ``python -m adamw_flax.inspect --config=...`` or :func:`report` prints every
  path with the module that owns it.

Selectors
  * glob (the default), matched with :func:`fnmatch.fnmatchcase`, where ``*``
    also crosses ``"/"``. A glob **without** ``"/"`` is matched against the
    parameter's name (the last path component), one with ``"/"`` against the
    whole path: ``"bias"`` and ``"*/bias"`` select every bias (the first also a
    top-level one), ``"embed/*"`` everything under ``embed``, ``"*"`` all.
  * ``"re:<regex>"``: :func:`re.fullmatch` on the whole path, e.g.
    ``"re:.*norm.*/scale"`` or ``"re:blocks/(0|1)/.*"``.
  * ``"type:<Class>"``: the class of the module that owns the parameter, by
    its name or the name of any base class, so one name covers NNX and Linen
    (``"type:LayerNorm"`` is ``nnx.LayerNorm`` and ``nn.LayerNorm``) and
    subclasses (``"type:Linear"`` covers ``nnx.LoRALinear``). ``|`` lists
    alternatives: ``"type:LayerNorm|RMSNorm|BatchNorm"``. The owner is the
    nearest enclosing module (``nnx.List``/``nnx.Dict`` containers are skipped).
    Type rules need the model: pass ``target=`` (an ``nnx.Module``, or
    :func:`linen_target` for Linen, also for a Linen module wrapped in
    ``nnx.bridge.ToNNX``, whose inner classes NNX does not see).
  * ``"ndim>=2"`` (also ``>``, ``<``, ``<=``, ``==``, ``!=``): the number of
    dimensions of the parameter. Prefer paths and types: a stacked (scanned)
    layer adds a dimension, so its biases and norm scales have ``ndim == 2``.
  * ``"A & B"`` (spaces around ``&``): all of them, e.g.
    ``"type:Linear & kernel"``.

Values
  ``bool`` for weight decay (``True`` = decay) and for frozen (``True`` =
  frozen); a non-negative ``float`` for learning-rate multipliers.

Writing rules (any of these forms; see :func:`parse_rules`)
  * a preset: ``"default"``, ``"all"``, ``"none"`` (for frozen: ``"none"``);
  * pairs: ``[("*/bias", False), ("type:Embed", False), ("*", True)]``, or a
    dict in insertion order;
  * one string, handy on the command line:
    ``--config.optimizer.weight_decay_mask='bias=false, type:Embed=false, *=true'``.

The ``"default"`` weight-decay preset decays the ``kernel`` of linear-like
layers (NNX ``Linear``, ``LinearGeneral``, ``Einsum``, ``Conv``,
``ConvTranspose``; Linen ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``,
``ConvTranspose``) and nothing else: no biases, no norm scales, no embeddings,
no custom ``nnx.Param`` outside those layers (a model without any such kernel
is an error: write rules for it). ``"all"`` decays everything and ``"none"``
nothing.

Mistakes are errors, raised when the rules are applied:
  * a rule that matches no parameter (a typo must not silently decay
    everything), and a rule whose every match is taken by an earlier rule (the
    order is wrong); the catch-all ``"*"`` is exempt;
  * a parameter no weight-decay rule matches (end the rules with ``"*"``);
    learning-rate multipliers default to 1 and frozen to ``False``;
  * a type rule without the model to read types from.

Masks are callables, not trees: :func:`weight_decay_mask` returns a function
that optax calls on whatever tree it is given (``nnx.State`` with Variable
leaves inside ``nnx.Optimizer``, the pure arrays of ``optimizer.update``, a
Linen params dict in a ``TrainState``) and that answers with a tree of the same
structure. A mask tree built ahead from ``nnx.split`` params has a different
structure from what ``nnx.Optimizer`` hands to optax and fails there
(jax#31256, flax#5372).

Examples:
  >>> import jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> from adamw_flax import masks
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.embed = nnx.Embed(10, 4, rngs=rngs)
  ...     self.dense = nnx.Linear(4, 4, rngs=rngs)
  ...     self.norm = nnx.LayerNorm(4, rngs=rngs)
  >>> model = Net(nnx.Rngs(0))
  >>> masks.path_values(model, "default")
  {'dense/bias': False, 'dense/kernel': True, 'embed/embedding': False, 'norm/bias': False, 'norm/scale': False}
  >>> masks.path_values(model, "bias=false, type:LayerNorm=false, *=true")
  {'dense/bias': False, 'dense/kernel': True, 'embed/embedding': True, 'norm/bias': False, 'norm/scale': False}
  >>> mask = masks.weight_decay_mask("default", target=model)
  >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.1, mask=mask), wrt=nnx.Param)
  >>> masks.path_values(model, "*/bias=true")
  Traceback (most recent call last):
  ...
  ValueError: weight decay: no rule matches 'dense/kernel', 'embed/embedding', 'norm/scale'; end the rules with a catch-all such as '*=false'
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

import jax
import numpy as np
from flax import nnx

PyTree = Any

#: Layer classes whose ``kernel`` the ``"default"`` preset decays (NNX and Linen names).
DEFAULT_DECAY_TYPES: tuple[str, ...] = (
  "Linear",
  "LinearGeneral",
  "Einsum",
  "Conv",
  "ConvTranspose",
  "Dense",
  "DenseGeneral",
)

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_CATCH_ALL = "*"
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


_REQUIRED: Any = _Required()


# --------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Param:
  """What a selector may look at: one parameter."""

  path: str
  ndim: int
  owner: tuple[str, ...] | None  # class names of the owning module and its bases


@dataclasses.dataclass(frozen=True)
class _Atom:
  kind: str  # "glob", "re", "type", "ndim"
  text: str
  pattern: Any

  def matches(self, p: _Param) -> bool:
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
  def needs_types(self) -> bool:
    """Whether the rule selects by module type (and so needs the model)."""
    return any(a.kind == "type" for a in self._atoms)

  def matches(self, param: _Param) -> bool:
    return all(a.matches(param) for a in self._atoms)


# --------------------------------------------------------------------------
# Rule specs
# --------------------------------------------------------------------------

_DEFAULT_PRESET = (
  Rule(f"type:{'|'.join(DEFAULT_DECAY_TYPES)} & kernel", True),
  Rule(_CATCH_ALL, False, required=False),
)
PRESETS: dict[str, tuple[Rule, ...]] = {
  "default": _DEFAULT_PRESET,
  "all": (Rule(_CATCH_ALL, True, required=False),),
  "none": (Rule(_CATCH_ALL, False, required=False),),
}

# `sel=value` items separated by commas; the value is the last `=` token before a comma, so
# selectors may hold `=`, `,` or spaces ("ndim>=2=true", "re:a{1,2}=false").
_ITEM_RE = re.compile(r"\s*(?P<sel>\S.*?)\s*=\s*(?P<val>[^\s,=]+)\s*(?:,|$)")


def _convert(value: Any, value_type: type, selector: str, what: str) -> Any:
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
  raise ValueError(f"value_type must be bool or float, got {value_type!r}")


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
      if value_type is not bool:
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
# Paths and targets
# --------------------------------------------------------------------------


def key_str(key: Any) -> str:
  """One key of a JAX key path as text: a dict key, attribute name or index."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(keypath: Sequence[Any]) -> str:
  """A key path as the "/"-joined text that rules match (``blocks/0/attn/qkv/kernel``)."""
  keys = list(keypath)
  # An NNX Variable (or a Linen Partitioned box) flattens to its `.value`; the
  # path names the parameter, not the box.
  while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys.pop()
  return "/".join(key_str(k) for k in keys)


def _flatten(tree: PyTree) -> tuple[list[tuple[str, Any]], Any]:
  keyed, treedef = jax.tree_util.tree_flatten_with_path(tree)
  entries = [(path_str(kp), leaf) for kp, leaf in keyed]
  seen: set[str] = set()
  for path, _ in entries:
    if path in seen:
      raise ValueError(
        f"two leaves share the path {path!r} (a key containing '/' or a "
        "non-array leaf inside a parameter); rename the key"
      )
    seen.add(path)
  return entries, treedef


def tree_paths(tree: PyTree) -> list[str]:
  """Returns the ``"/"``-joined paths of the leaves of ``tree``, in leaf order.

  NNX ``Variable`` boxes and their ``.value`` do not appear in the path; dict
  keys, attribute names and sequence indices do. For an ``nnx.Module`` the
  paths of its ``nnx.Param`` variables are returned.

  Examples:
    >>> tree_paths({"a": [1.0, 2.0], "b": {"c": 3.0}})
    ['a/0', 'a/1', 'b/c']
  """
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  elif isinstance(tree, LinenTarget):
    tree = tree.params
  return [path for path, _ in _flatten(tree)[0]]


@dataclasses.dataclass(frozen=True)
class LinenTarget:
  """A Linen model's parameters together with the classes of its modules.

  Build it with :func:`linen_target`; pass it as ``target`` so that type rules
  work for Linen. Paths are those of ``params`` (the inner ``'params'``
  collection); callables built from it also accept trees that keep the outer
  ``{'params': ...}`` level.

  Attributes:
    params: the ``'params'`` collection (arrays or ``jax.ShapeDtypeStruct``).
    module_types: ``"/"``-joined module path (``""`` for the root) -> class.
  """

  params: Mapping[str, Any]
  module_types: Mapping[str, type]


def linen_target(
  module: Any, *example_inputs: Any, rngs: Any = None, **init_kwargs: Any
) -> LinenTarget:
  """Records a Linen module's parameter shapes and module classes, without allocating.

  Runs ``jax.eval_shape(module.init, rngs, *example_inputs, **init_kwargs)``
  under ``flax.linen.intercept_methods`` and records the class of every module
  that runs. Modules inside lifted transforms (``nn.scan``, ``nn.remat``) are
  recorded at their own path with their own class.

  Args:
    module: a ``flax.linen.Module``.
    *example_inputs: inputs for ``module.init`` (arrays or ``ShapeDtypeStruct``).
    rngs: a key or a dict of keys for ``init``; defaults to ``jax.random.key(0)``.
    **init_kwargs: keyword arguments for ``module.init``.

  Returns:
    A :class:`LinenTarget`.

  Examples:
    >>> import flax.linen as nn, jax.numpy as jnp
    >>> target = linen_target(nn.Sequential([nn.Dense(3), nn.LayerNorm()]), jnp.ones((1, 2)))
    >>> path_values(target, "default")
    {'layers_0/bias': False, 'layers_0/kernel': True, 'layers_1/bias': False, 'layers_1/scale': False}
  """
  import flax.linen as nn  # Linen users only; NNX users do not pay for it.

  types: dict[str, type] = {}

  def record(next_fun, args, kwargs, context):
    # Inside lifted transforms a module is also seen at a relative path; the
    # first sighting of a path is the one in the outer tree.
    types.setdefault("/".join(str(k) for k in context.module.path), type(context.module))
    return next_fun(*args, **kwargs)

  if rngs is None:
    rngs = jax.random.key(0)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(module.init, rngs, *example_inputs, **init_kwargs)
  if "params" not in variables:
    raise ValueError(
      f"{type(module).__name__}.init made no 'params' collection (got "
      f"{sorted(variables)}); nothing to select"
    )
  return LinenTarget(params=variables["params"], module_types=types)


@dataclasses.dataclass(frozen=True)
class _Params:
  """A target as the rules see it."""

  entries: list[tuple[str, Any]]
  owners: dict[str, type] | None  # param path -> owning module class; None: no type info
  kind: str
  linen: bool = False


def _nearest_owner(path: str, modules: Mapping[str, type]) -> type | None:
  parts = path.split("/")[:-1]
  for i in range(len(parts), -1, -1):
    owner = modules.get("/".join(parts[:i]))
    if owner is not None:
      return owner
  return None


def _nnx_module_types(model: nnx.Module) -> dict[str, type]:
  # nnx.List / nnx.Dict are containers, not layers: a Param in a list belongs to
  # the module holding the list.
  containers = (nnx.List, nnx.Dict)
  return {
    "/".join(str(k) for k in path): type(node)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Module) and not isinstance(node, containers)
  }


def _as_params(target: Any) -> _Params:
  if isinstance(target, _Params):
    return target
  if isinstance(target, nnx.Module):
    entries, _ = _flatten(nnx.state(target, nnx.Param))
    types = _nnx_module_types(target)
    owners = {path: _nearest_owner(path, types) for path, _ in entries}
    if any(owner is not None and issubclass(owner, nnx.bridge.ToNNX) for owner in owners.values()):
      # The Linen modules inside nnx.bridge.ToNNX are not NNX graph nodes: their
      # classes are unknown here (linen_target records them).
      return _Params(
        entries,
        None,
        f"NNX model {type(target).__name__} wrapping Linen via "
        "nnx.bridge.ToNNX, whose Linen module types NNX does not see; pass "
        "linen_target(linen_module, *example_inputs) instead, its paths are the same",
      )
    return _Params(entries, owners, f"NNX model {type(target).__name__}")
  if isinstance(target, LinenTarget):
    entries, _ = _flatten(target.params)
    owners = {path: _nearest_owner(path, target.module_types) for path, _ in entries}
    root = target.module_types.get("")
    return _Params(entries, owners, f"Linen model {getattr(root, '__name__', '?')}", linen=True)
  entries, _ = _flatten(target)
  kind = "nnx.State" if isinstance(target, nnx.State) else type(target).__name__
  return _Params(entries, None, kind)


def _ndim(leaf: Any) -> int:
  shape = getattr(leaf, "shape", None)
  return len(shape) if shape is not None else np.ndim(leaf)


def _mro_names(cls: type | None) -> tuple[str, ...] | None:
  return None if cls is None else tuple(c.__name__ for c in cls.__mro__)


def _check_types_available(rules: Sequence[Rule], kind: str, what: str) -> None:
  for i, rule in enumerate(rules, 1):
    if rule.needs_types:
      raise ValueError(
        f"{what} rule #{i} {rule.selector!r} selects by module type, but the target "
        f"({kind}) carries no module types; pass the model as `target` (an nnx.Module, "
        "or adamw_flax.masks.linen_target(module, *example_inputs) for Linen), or use path "
        "rules ('*/bias', 're:.*norm.*/scale')"
      )


# --------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------


def _examples(paths: Sequence[str], n: int = 5) -> str:
  shown = ", ".join(repr(p) for p in paths[:n])
  return shown + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def _diagnose_unmatched(rule: Rule, params: list[_Param]) -> str:
  """Why a rule matched nothing: which part, and what is close."""
  notes = []
  for atom in rule._atoms:
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


def _resolve(target: _Params, rules: Sequence[Rule], default: Any, what: str) -> dict[str, Any]:
  if target.owners is None:
    _check_types_available(rules, target.kind, what)
  params = [
    _Param(path, _ndim(leaf), _mro_names(target.owners.get(path)) if target.owners else None)
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
    if won[i] or not rule.required or rule.selector == _CATCH_ALL:
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
        f" Parameters: {_examples([p.path for p in params])}.{hint}"
      )
    earlier = sorted({winner_of[path] for path in matched[i]})
    raise ValueError(
      f"{label} matches {_examples(matched[i], 3)}, but each is taken by an earlier rule ("
      + ", ".join(f"#{j + 1} {rules[j].selector!r}" for j in earlier)
      + "); the first matching rule wins, so put the more specific rule first"
    )
  if unmatched:
    if default is _REQUIRED:
      raise ValueError(
        f"{what}: no rule matches {_examples(unmatched, 3)}; end the rules with a catch-all "
        "such as '*=false'"
      )
    values.update(dict.fromkeys(unmatched, default))
  return {p.path: values[p.path] for p in params}


def path_values(
  target: Any,
  rules: Any,
  *,
  default: Any = _REQUIRED,
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
  return _resolve(
    _as_params(target), parse_rules(rules, value_type=value_type, what=what), default, what
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
    self.what = what
    self.default = default
    self.value_type = value_type
    self.values: dict[str, Any] | None = None
    self._linen = False
    if target is None:
      _check_types_available(self.rules, "params tree given to the optimizer", what)
    else:
      resolved = _as_params(target)
      self.values = _resolve(resolved, self.rules, default, what)
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
      f"{hint}. Target paths: {_examples(list(self.values))}. Build the function from the same "
      "model whose parameters the optimizer receives."
    )

  def __call__(self, tree: PyTree) -> PyTree:
    entries, treedef = _flatten(tree)
    if self.values is None:
      table = _resolve(_Params(entries, None, "params tree"), self.rules, self.default, self.what)
      values = [table[path] for path, _ in entries]
    else:
      values = [self._lookup(path) for path, _ in entries]
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
  return RuleFn(rules, target, default=_REQUIRED, what="weight decay", value_type=bool)


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


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


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
  """

  path: str
  module: str | None
  shape: tuple[int, ...]
  dtype: str
  size: int
  bytes: int
  decay: bool
  lr_multiplier: float
  frozen: bool
  per_device_bytes: int | None = None


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
      f"shardings: no sharding for {_examples(missing, 3)}; give a tree like the "
      f"params or a dict path -> Sharding (have: {_examples(sorted(table), 3)})"
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

  Returns:
    The rows.
  """
  params = _as_params(target)
  decay = _resolve(params, parse_rules(decay_rules, what="weight decay"), _REQUIRED, "weight decay")
  lr = _resolve(
    params,
    parse_rules(lr_multipliers, value_type=float, what="learning-rate multiplier"),
    1.0,
    "learning-rate multiplier",
  )
  frz = _resolve(params, parse_rules(frozen, what="freeze"), False, "freeze")
  paths = [path for path, _ in params.entries]
  table = _sharding_table(shardings, paths) if shardings is not None else None
  rows = []
  for path, leaf in params.entries:
    shape = tuple(int(d) for d in getattr(leaf, "shape", np.shape(leaf)))
    dtype = np.dtype(getattr(leaf, "dtype", np.result_type(leaf)))
    size = math.prod(shape)
    owner = params.owners.get(path) if params.owners else None
    per_device = None
    if table is not None:
      per_device = math.prod(table[path].shard_shape(shape)) * dtype.itemsize
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
      )
    )
  return rows


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
) -> str:
  """A table of every parameter and what the rules give it, with totals.

  Columns: path, owning module class (when known), shape, dtype, weight decay,
  learning-rate multiplier, frozen, and per-device bytes when ``shardings``
  is given. Totals count tensors, elements and bytes for all parameters and
  for the trainable decayed, trainable not-decayed and frozen groups (these
  three add up to the total).

  Args:
    target: as for :func:`report_rows`.
    decay_rules: as for :func:`report_rows`.
    lr_multipliers: as for :func:`report_rows`.
    frozen: as for :func:`report_rows`.
    shardings: as for :func:`report_rows`.

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
      "yes" if r.decay else "no",
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
