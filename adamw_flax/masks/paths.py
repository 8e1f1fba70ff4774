"""Parameter paths, and targets: a model's parameters as the rules see them.

A target is what rules are applied to: an ``nnx.Module`` (module types known),
a :class:`LinenTarget` (a Linen model's params and module classes), or a plain
params tree (paths only).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

PyTree = Any


def key_str(key: Any) -> str:
  """One key of a JAX key path as text: a dict key, attribute name or index.

  Args:
    key: a ``DictKey``, ``GetAttrKey``, ``SequenceKey`` or ``FlattenedIndexKey``.

  Returns:
    The key as text.
  """
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
  """A key path as the "/"-joined text that rules match (``blocks/0/attn/qkv/kernel``).

  Args:
    keypath: a JAX key path (from ``tree_flatten_with_path``).

  Returns:
    The path, without a trailing ``value`` of a Variable box.
  """
  keys = list(keypath)
  # An NNX Variable (or a Linen Partitioned box) flattens to its `.value`; the
  # path names the parameter, not the box.
  while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys.pop()
  return "/".join(key_str(k) for k in keys)


def flatten_paths(tree: PyTree) -> tuple[list[tuple[str, Any]], Any]:
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

  Args:
    tree: any pytree, an ``nnx.Module`` or a :class:`LinenTarget`.

  Returns:
    The paths, in leaf order.
  """
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  elif isinstance(tree, LinenTarget):
    tree = tree.params
  return [path for path, _ in flatten_paths(tree)[0]]


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
    >>> from adamw_flax.masks import path_values
    >>> path_values(target, "default")
    {'layers_0/bias': False, 'layers_0/kernel': True, 'layers_1/bias': False, 'layers_1/scale': False}
  """

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
class Target:
  """A target as the rules see it."""

  entries: list[tuple[str, Any]]
  owners: dict[str, type] | None  # param path -> owning module class; None: no type info
  kind: str
  linen: bool = False
  hint: str = ""  # what to do when type rules meet a target without types


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


class LinenTypeRecorder:
  """Records the classes of the Linen modules that run while it is active.

  A context manager around ``flax.linen.intercept_methods``: each outermost
  Linen call (an ``init`` or ``apply``, such as the one
  ``nnx.bridge.ToNNX(...).lazy_init(x)`` makes) gives one entry of
  :attr:`calls`, ``"/"``-joined module path (``""``: the root) -> class.
  :func:`module_target` matches them to the ``ToNNX`` parts of a model, whose
  Linen classes NNX does not see. Used by
  :func:`adamw_flax.train_state.state_factory` around the model's abstract
  build, so module-type rules (``default``, ``type:Dense``) work for a Linen
  model the user wrapped in ``ToNNX`` themselves.

  Attributes:
    calls: one ``{module path: class}`` per outermost Linen call, in call order.
  """

  def __init__(self) -> None:
    self.calls: list[dict[str, type]] = []
    self._depth = 0
    self._stack = contextlib.ExitStack()

  def _record(self, next_fun, args, kwargs, context):
    if self._depth == 0:
      self.calls.append({})
    # Inside lifted transforms a module is also seen at a relative path; the
    # first sighting of a path is the one in the outer tree.
    path = "/".join(str(k) for k in context.module.path)
    self.calls[-1].setdefault(path, type(context.module))
    self._depth += 1
    try:
      return next_fun(*args, **kwargs)
    finally:
      self._depth -= 1

  def __enter__(self) -> LinenTypeRecorder:
    self._stack.enter_context(nn.intercept_methods(self._record))
    return self

  def __exit__(self, *exc: Any) -> None:
    self._stack.close()


def _bridged_parts(types: Mapping[str, type]) -> list[str]:
  """Paths of the ``nnx.bridge.ToNNX`` modules of a model (their Linen classes are hidden)."""
  return [path for path, cls in types.items() if issubclass(cls, nnx.bridge.ToNNX)]


def _linen_owner(
  path: str, part: str, calls: Sequence[Mapping[str, type]], root: type | None, used: set[int]
) -> tuple[int, type] | None:
  """The recorded call of ``ToNNX`` part ``part`` (root class ``root``), and ``path``'s owner in it.

  Of the calls with that root class, the one that knows the innermost module
  above ``path`` (a Linen call that only ran ``setup`` knows the root alone);
  between equals, one not matched to another part yet.
  """
  parents = (path[len(part) + 1 :] if part else path).split("/")[:-1]
  best: tuple[int, int, int] | None = None  # (depth, unused, -index)
  for i, call in enumerate(calls):
    if call.get("") is not root:
      continue
    depth = next(d for d in range(len(parents), -1, -1) if "/".join(parents[:d]) in call)
    rank = (depth, i not in used, -i)
    if best is None or rank > best:
      best = rank
  if best is None:
    return None
  i = -best[2]
  return i, _nearest_owner("/".join(parents + ["_"]), calls[i])


def module_target(model: nnx.Module, linen_calls: Sequence[Mapping[str, type]] = ()) -> Target:
  """The target of an NNX model: its ``nnx.Param`` paths and the class owning each.

  The classes of Linen modules inside ``nnx.bridge.ToNNX`` parts come from
  ``linen_calls`` (a :class:`LinenTypeRecorder`'s, recorded while the model
  was built); without them such a model carries no module types for its
  bridged parameters, and type rules are an error that says what to do.

  Args:
    model: the NNX module (abstract or concrete).
    linen_calls: the recorded Linen calls (:attr:`LinenTypeRecorder.calls`).

  Returns:
    A :class:`Target`.
  """
  entries, _ = flatten_paths(nnx.state(model, nnx.Param))
  types = _nnx_module_types(model)
  owners = {path: _nearest_owner(path, types) for path, _ in entries}
  parts = sorted(_bridged_parts(types), key=len, reverse=True)  # the innermost part first
  if not parts:
    return Target(entries, owners, f"NNX model {type(model).__name__}")
  nodes = {
    "/".join(str(k) for k in p): n
    for p, n in nnx.iter_graph(model)
    if "/".join(str(k) for k in p) in parts
  }
  used: set[int] = set()
  unknown = []
  for path, _ in entries:
    part = next((p for p in parts if not p or path.startswith(p + "/")), None)
    if part is None:
      continue
    root = type(nodes[part].to_nnx__module)
    found = _linen_owner(path, part, linen_calls, root, used)
    if found is None:
      unknown.append(path)
      continue
    used.add(found[0])
    owners[path] = found[1]
  if unknown:
    # The Linen modules inside nnx.bridge.ToNNX are not NNX graph nodes: their
    # classes are unknown here unless their init was recorded.
    return Target(
      entries,
      None,
      f"NNX model {type(model).__name__} wrapping Linen via nnx.bridge.ToNNX, whose Linen "
      "module types NNX does not see",
      hint="build the ToNNX and call its lazy_init inside the model factory (the registered "
      "builder), where its Linen classes are recorded; or pass "
      "linen_target(linen_module, *example_inputs) instead, its paths are the same; or use "
      "path rules such as weight_decay_mask='*/kernel=true, *=false'",
    )
  name = type(model).__name__
  if "" in parts:
    name = f"{type(nodes[''].to_nnx__module).__name__} (Linen, through nnx.bridge.ToNNX)"
  return Target(entries, owners, f"model {name}")


def as_target(target: Any) -> Target:
  """``target`` as the rules see it: paths, owning classes (when known) and a name.

  Args:
    target: a :class:`Target`, an ``nnx.Module`` (:func:`module_target`), a
      :class:`LinenTarget`, or a params tree (paths only).

  Returns:
    A :class:`Target`.
  """
  if isinstance(target, Target):
    return target
  if isinstance(target, nnx.Module):
    return module_target(target)
  if isinstance(target, LinenTarget):
    entries, _ = flatten_paths(target.params)
    owners = {path: _nearest_owner(path, target.module_types) for path, _ in entries}
    root = target.module_types.get("")
    return Target(entries, owners, f"Linen model {getattr(root, '__name__', '?')}", linen=True)
  entries, _ = flatten_paths(target)
  kind = "nnx.State" if isinstance(target, nnx.State) else type(target).__name__
  return Target(entries, None, kind)


def leaf_ndim(leaf: Any) -> int:
  shape = getattr(leaf, "shape", None)
  return len(shape) if shape is not None else np.ndim(leaf)


def mro_names(cls: type | None) -> tuple[str, ...] | None:
  return None if cls is None else tuple(c.__name__ for c in cls.__mro__)
