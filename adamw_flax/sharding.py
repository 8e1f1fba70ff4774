"""Meshes, partition specs and shardings of the train state; per-process data to global arrays.

The distributed engine is JAX's own (``jax.sharding``, GSPMD through
``jax.jit``); this module only turns the config's ``mesh`` section into its
inputs:

* :func:`mesh_from_config`: a ``jax.sharding.Mesh`` over all devices of all
  processes, with named axes (one size may be ``-1``: the remaining devices);
  :func:`abstract_mesh_from_config`: the same without devices, for planning.
* :func:`param_specs`: a ``PartitionSpec`` per parameter, from the config's
  ``mesh.partition_rules`` (``(regex, spec)`` pairs, first match wins) or from
  the model's own NNX annotations (``nnx.with_partitioning``); unmatched
  parameters are replicated.
* :func:`state_shardings`: a ``NamedSharding`` for every leaf of a
  :class:`~adamw_flax.train_state.TrainState`, optimizer state included
  (sharded like its parameter, or further along the data axes: ZeRO-1).
* :func:`batch_sharding`, :func:`data_shard_info`, :func:`global_batch`: each
  process loads only its slice of a batch; the slices become one global array.
* :func:`per_device_bytes`: the memory a state takes on each device.

Partition rules
  ``config.mesh.partition_rules`` is a sequence of ``(regex, spec)`` pairs.
  The regex is matched with :func:`re.fullmatch` against the parameter's
  ``"/"``-joined path (``"blocks/0/attn/qkv/kernel"``, the paths of
  :mod:`adamw_flax.masks`); the spec is a tuple with one entry per leading
  dimension: a mesh axis name, a tuple of axis names, or ``None``
  (``("fsdp", None)``; ``()`` replicates). The first matching rule wins; a
  parameter no rule matches keeps its NNX annotation, or is replicated. A rule
  that matches no parameter is an error (a typo must not silently replicate a
  model that does not fit). Annotation or rule, every spec is checked: its
  axes must be mesh axes, used once, and divide the dimensions they shard.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from adamw_flax import config, sharding
  >>> cfg = config.default_config().mesh
  >>> cfg.axes, cfg.shape = ("data", "model"), (-1, 1)
  >>> cfg.partition_rules = ((".*kernel", (None, "model")),)
  >>> params = {"dense": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}
  >>> sharding.param_specs(params, cfg)
  {'dense': {'bias': P(), 'kernel': P(None, 'model')}}
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from adamw_flax import masks

PyTree = Any

__all__ = [
  "abstract_mesh_from_config",
  "batch_sharding",
  "data_shard_info",
  "global_batch",
  "mesh_config_errors",
  "mesh_from_config",
  "param_specs",
  "per_device_bytes",
  "state_shardings",
]


# ------------------------------------------------------------------- meshes


def _resolve_shape(axes: Sequence[str], shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  axes, shape = tuple(axes), tuple(int(s) for s in shape)
  if len(axes) != len(shape):
    raise ValueError(
      f"mesh.shape {shape} needs one size per axis of mesh.axes {axes}; give {len(axes)} sizes"
    )
  if len(set(axes)) != len(axes):
    raise ValueError(f"mesh.axes {axes} names an axis twice; axis names must be unique")
  if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(
      f"mesh.shape {shape}: sizes must be >= 1, with at most one -1 (the remaining devices)"
    )
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
        f"mesh.shape {shape} over axes {axes}: the {num_devices} devices are not divisible by "
        f"the fixed sizes' product {known}; pick sizes whose product divides {num_devices}"
      )
    return tuple(num_devices // known if s == -1 else s for s in shape)
  if known != num_devices:
    raise ValueError(
      f"mesh.shape {shape} over axes {axes} has {known} devices but {num_devices} are "
      f"available; make the product {num_devices}, or set one size to -1 (the rest)"
    )
  return shape


def mesh_from_config(
  mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None
) -> Mesh:
  """Builds the device mesh that ``config.mesh`` describes.

  Args:
    mesh_cfg: the ``mesh`` section: ``axes`` (names) and ``shape`` (sizes; one
      may be -1 for the devices the others leave).
    devices: the devices to lay out; default ``jax.devices()``, the devices of
      all processes. Call :func:`adamw_flax.distributed.initialize` first in a
      multi-process run.

  Returns:
    A ``jax.sharding.Mesh`` with ``Auto`` axes (GSPMD propagates shardings
    through the step; only inputs and outputs carry explicit shardings), its
    devices ordered for the hardware's topology by ``jax.make_mesh``.

  Raises:
    ValueError: sizes that do not match (or, with -1, do not divide) the
      device count, naming both.

  Examples:
    >>> from adamw_flax import config
    >>> cfg = config.default_config().mesh
    >>> cfg.axes, cfg.shape = ("data", "model"), (-1, 1)
    >>> mesh = mesh_from_config(cfg)
    >>> dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
    True
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(mesh_cfg.axes)
  shape = _resolve_shape(axes, mesh_cfg.shape, len(devices))
  if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
    # jax.make_mesh refuses multi-slice device sets; a hybrid (ICI x DCN) mesh
    # needs a DCN shape this config does not describe yet.
    raise ValueError(
      "the devices span several TPU slices; mesh_from_config builds single-slice meshes "
      "only (use jax.experimental.mesh_utils.create_hybrid_device_mesh and pass the mesh)"
    )
  axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
  return jax.make_mesh(shape, axes, axis_types, devices=devices)


def abstract_mesh_from_config(
  mesh_cfg: ml_collections.ConfigDict, num_devices: int
) -> AbstractMesh:
  """The mesh ``config.mesh`` would give on ``num_devices`` devices, without the devices.

  For planning: :func:`state_shardings` and :func:`per_device_bytes` accept
  it, so the memory a pod config needs per chip can be computed anywhere.

  Examples:
    >>> from adamw_flax import config
    >>> cfg = config.default_config().mesh
    >>> cfg.axes, cfg.shape = ("data", "fsdp"), (-1, 16)
    >>> dict(abstract_mesh_from_config(cfg, 256).shape)
    {'data': 16, 'fsdp': 16}
  """
  axes = tuple(mesh_cfg.axes)
  shape = _resolve_shape(axes, mesh_cfg.shape, num_devices)
  return AbstractMesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def _axis_sizes(mesh_cfg: ml_collections.ConfigDict, mesh: Mesh | None) -> dict[str, int]:
  if mesh is not None:
    return {str(k): int(v) for k, v in mesh.shape.items()}
  shape = _resolve_shape(mesh_cfg.axes, mesh_cfg.shape, jax.device_count())
  return dict(zip(tuple(mesh_cfg.axes), shape, strict=True))


# ------------------------------------------------------------- param specs


def _key_tuple(keypath: Sequence[Any]) -> tuple[str, ...]:
  keys = [masks.key_str(k) for k in keypath]
  # An NNX Variable flattens to its `.value`; the path names the parameter.
  while (
    keys and keys[-1] == "value" and isinstance(keypath[len(keys) - 1], jax.tree_util.GetAttrKey)
  ):
    keys.pop()
  return tuple(keys)


def _spec_from_rule(raw: Any, where: str) -> PartitionSpec:
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


def _parse_partition_rules(rules: Any) -> list[tuple[str, re.Pattern[str], PartitionSpec]]:
  out = []
  for i, rule in enumerate(rules or ()):
    where = f"mesh.partition_rules[{i}]"
    if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"{where}: must be a (regex, spec) pair, got {rule!r}")
    try:
      pattern = re.compile(rule[0])
    except re.error as e:
      raise ValueError(f"{where}: invalid regex {rule[0]!r}: {e}") from e
    out.append((rule[0], pattern, _spec_from_rule(rule[1], f"{where} ({rule[0]!r})")))
  return out


def mesh_config_errors(mesh_cfg: ml_collections.ConfigDict) -> list[str]:
  """The problems of a ``mesh`` section found without devices or a model, as ``"key: message"``.

  For config validation: unique axis names, well-formed partition rules
  (compiling regexes, specs of mesh axes, each used once), unique data axes.
  What needs the devices or the parameters (sizes that divide) is checked by
  :func:`mesh_from_config` and :func:`param_specs`.

  Examples:
    >>> from adamw_flax import config
    >>> cfg = config.default_config().mesh
    >>> cfg.partition_rules = ((".*kernel", (None, "model")),)
    >>> mesh_config_errors(cfg)
    ["mesh.partition_rules[0] ('.*kernel'): axis 'model' is not in mesh.axes ('data',)"]
  """
  errors = []
  axes = tuple(mesh_cfg.axes)
  if len(set(axes)) != len(axes):
    errors.append(f"mesh.axes: {axes} names an axis twice")
  try:
    rules = _parse_partition_rules(mesh_cfg.get("partition_rules", ()))
  except ValueError as e:
    errors.append(str(e))
    rules = []
  for i, (text, _, spec) in enumerate(rules):
    used = _spec_axes(spec)
    for a in dict.fromkeys(used):
      if a not in axes:
        errors.append(
          f"mesh.partition_rules[{i}] ({text!r}): axis {a!r} is not in mesh.axes {axes}"
        )
    if len(set(used)) != len(used):
      errors.append(f"mesh.partition_rules[{i}] ({text!r}): {spec} uses a mesh axis twice")
  data_axes = tuple(mesh_cfg.get("data_axes", ()) or ())
  if len(set(data_axes)) != len(data_axes):
    errors.append(f"mesh.data_axes: {data_axes} names an axis twice")
  return errors


def _spec_axes(spec: PartitionSpec) -> list[str]:
  axes: list[str] = []
  for e in spec:
    if e is None:
      continue
    axes.extend((e,) if isinstance(e, str) else e)
  return axes


def _check_spec(
  spec: PartitionSpec, shape: tuple[int, ...], path: str, sizes: Mapping[str, int], source: str
) -> None:
  axes = _spec_axes(spec)
  for a in axes:
    if a not in sizes:
      raise ValueError(
        f"{path} (shape {shape}): {source} {spec} names axis {a!r}, which is not a mesh axis; "
        f"mesh.axes are {tuple(sizes)}"
      )
  if len(set(axes)) != len(axes):
    raise ValueError(f"{path} (shape {shape}): {source} {spec} uses a mesh axis twice")
  if len(spec) > len(shape):
    raise ValueError(
      f"{path} (shape {shape}): {source} {spec} has {len(spec)} entries for a "
      f"{len(shape)}-dimensional parameter; give at most {len(shape)}"
    )
  for dim, (n, e) in enumerate(zip(shape, spec, strict=False)):
    if e is None:
      continue
    k = math.prod(sizes[a] for a in ((e,) if isinstance(e, str) else e))
    if n % k:
      raise ValueError(
        f"{path} (shape {shape}): {source} {spec} shards dimension {dim} (size {n}) over "
        f"{e!r} of size {k}, which does not divide it; change the mesh or the rule"
      )


def _annotation(variable: Any) -> PartitionSpec | None:
  from flax import nnx

  if not isinstance(variable, nnx.Variable):
    return None
  # nnx.get_partition_spec also resolves logical axis names through the
  # Variable's `sharding_rules` metadata and any flax logical-axis context.
  spec = nnx.get_partition_spec(variable).get_value()
  return spec if isinstance(spec, PartitionSpec) else None


class _Entries:
  """The leaves of one params-like tree: paths, shapes, annotations, and how to rebuild it."""

  def __init__(self, tree: PyTree, template: Any = None):
    from flax import nnx

    leaves_with_path, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
    self.paths = [_key_tuple(kp) for kp, _ in leaves_with_path]
    self.shapes = [tuple(int(d) for d in np.shape(x)) for _, x in leaves_with_path]
    self.annotations: list[PartitionSpec | None] = [None] * len(self.paths)
    if template is not None:  # the nnx.State treedef of a TrainState field
      state = jax.tree.unflatten(template, [x for _, x in leaves_with_path])
      variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
      self.annotations = [_annotation(v) for v in variables]
    elif isinstance(tree, nnx.State):
      variables = jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))
      self.annotations = [_annotation(v) for v in variables]
      self.treedef = jax.tree.structure(tree.to_pure_dict())

  def unflatten(self, leaves: list[Any]) -> PyTree:
    return jax.tree.unflatten(self.treedef, leaves)


def _specs_for(
  groups: Sequence[_Entries],
  rules: Sequence[tuple[str, re.Pattern[str], PartitionSpec]],
  sizes: Mapping[str, int],
) -> list[list[PartitionSpec]]:
  used = [False] * len(rules)
  out = []
  for group in groups:
    specs = []
    for path_t, shape, ann in zip(group.paths, group.shapes, group.annotations, strict=True):
      path = "/".join(path_t)
      spec, source = (ann if ann is not None else PartitionSpec()), "NNX annotation"
      for i, (text, pattern, rule_spec) in enumerate(rules):
        if pattern.fullmatch(path):
          used[i] = True
          spec, source = rule_spec, f"mesh.partition_rules[{i}] ({text!r})"
          break
      _check_spec(spec, shape, path, sizes, source)
      specs.append(spec)
    out.append(specs)
  unused = [i for i, u in enumerate(used) if not u]
  if unused:
    i = unused[0]
    paths = ["/".join(p) for g in groups for p in g.paths]
    shown = ", ".join(repr(p) for p in paths[:6]) + (", ..." if len(paths) > 6 else "")
    raise ValueError(
      f"mesh.partition_rules[{i}] ({rules[i][0]!r}) matches no parameter (or only ones an "
      f"earlier rule took). Regexes are matched with re.fullmatch against '/'-joined paths "
      f"such as {shown}; e.g. '.*kernel' rather than 'kernel'"
    )
  return out


def _is_train_state(obj: Any) -> bool:
  return all(hasattr(obj, a) for a in ("params", "frozen", "rest", "opt_state", "spec"))


def param_specs(
  abstract_params_or_state: Any,
  mesh_cfg: ml_collections.ConfigDict,
  *,
  mesh: Mesh | None = None,
) -> PyTree:
  """The ``PartitionSpec`` of every parameter, from partition rules or NNX annotations.

  For each parameter, the first rule of ``mesh_cfg.partition_rules`` whose
  regex fullmatches its path gives the spec; otherwise its NNX annotation
  (``nnx.with_partitioning`` / ``out_sharding`` metadata); otherwise it is
  replicated (``PartitionSpec()``).

  Args:
    abstract_params_or_state: a :class:`~adamw_flax.train_state.TrainState`
      (abstract or concrete; annotations are read from its ``spec.templates``),
      an ``nnx.Module`` (its ``nnx.Param`` variables), an ``nnx.State``, or a
      plain tree of arrays / ``jax.ShapeDtypeStruct`` (rules only).
    mesh_cfg: the config's ``mesh`` section (``axes``, ``shape``,
      ``partition_rules``).
    mesh: the mesh whose axis sizes the divisibility checks use; default: the
      sizes of ``mesh_cfg`` over ``jax.device_count()`` devices.

  Returns:
    For a TrainState, ``{"params": ..., "frozen": ..., "rest": ...}``, each a
    nested dict of ``PartitionSpec`` shaped like that field (``rest`` follows
    annotations only; rules name parameters). Otherwise a tree of
    ``PartitionSpec`` shaped like the params' pure dict (for a module or
    State) or like the tree itself.

  Raises:
    ValueError: a rule that matches no parameter, an axis that is not a mesh
      axis, a spec longer than the parameter's rank, or a dimension its axes
      do not divide, naming the path, shape and rule.
  """
  from flax import nnx

  sizes = _axis_sizes(mesh_cfg, mesh)
  rules = _parse_partition_rules(mesh_cfg.get("partition_rules", ()))
  tree = abstract_params_or_state
  if _is_train_state(tree):
    templates = tree.spec.templates
    groups = [
      _Entries(getattr(tree, f), t)
      for f, t in zip(("params", "frozen"), templates[:2], strict=True)
    ]
    params, frozen = (
      g.unflatten(s) for g, s in zip(groups, _specs_for(groups, rules, sizes), strict=True)
    )
    rest_group = _Entries(tree.rest, templates[2])
    (rest,) = _specs_for([rest_group], (), sizes)
    return {"params": params, "frozen": frozen, "rest": rest_group.unflatten(rest)}
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  group = _Entries(tree)
  (specs,) = _specs_for([group], rules, sizes)
  return group.unflatten(specs)


# ------------------------------------------------------------ state shardings


def _data_axes(mesh_cfg: ml_collections.ConfigDict, mesh: Mesh) -> tuple[str, ...]:
  axes = tuple(mesh_cfg.get("data_axes", ()) or ())
  for a in axes:
    if a not in mesh.axis_names:
      raise ValueError(f"mesh.data_axes names {a!r}, which is not a mesh axis {mesh.axis_names}")
  return axes


def _zero1_spec(
  spec: PartitionSpec, shape: tuple[int, ...], data_axes: Sequence[str], sizes: Mapping[str, int]
) -> PartitionSpec:
  """``spec`` further sharded over the data axes it does not use yet, on the first free dimension they divide."""
  taken = set(_spec_axes(spec))
  free = [a for a in data_axes if a not in taken and sizes[a] > 1]
  k = math.prod(sizes[a] for a in free)
  if k == 1:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  for dim, n in enumerate(shape):
    if entries[dim] is None and n % k == 0:
      entries[dim] = free[0] if len(free) == 1 else tuple(free)
      return PartitionSpec(*entries)
  return spec


def state_shardings(abstract_state: Any, mesh: Mesh, mesh_cfg: ml_collections.ConfigDict) -> PyTree:
  """A ``NamedSharding`` for every leaf of a train state, as ``jax.jit``'s in/out shardings.

  * ``params``, ``frozen``: by :func:`param_specs`.
  * ``rest`` (RNG state, batch statistics, ...): by NNX annotations, else replicated.
  * ``opt_state``: a leaf shaped like a parameter (``mu``, ``nu``, accumulated
    gradients; found by the parameter's path being a suffix of the leaf's path,
    because optax states embed the params tree) is sharded like it. With
    ``mesh_cfg.shard_opt_state == "data"`` (ZeRO-1) it is also sharded over
    the data axes it does not use yet, on the first unsharded dimension their
    size divides (kept as is where none does); the params keep their own
    specs. Other leaves (step counts) are replicated.
  * ``step``: replicated.

  Args:
    abstract_state: a :class:`~adamw_flax.train_state.TrainState`, usually
      from ``jax.eval_shape`` (``create_train_state(..., abstract=True)``).
    mesh: the device mesh (:func:`mesh_from_config`).
    mesh_cfg: the config's ``mesh`` section.

  Returns:
    A TrainState whose array leaves are ``jax.sharding.NamedSharding``.
  """
  mode = mesh_cfg.get("shard_opt_state", "params")
  if mode not in ("params", "data"):
    raise ValueError(
      f"mesh.shard_opt_state must be 'params' (like the params) or 'data' (ZeRO-1), got {mode!r}"
    )
  sizes = _axis_sizes(mesh_cfg, mesh)
  specs = param_specs(abstract_state, mesh_cfg, mesh=mesh)
  named = lambda spec: NamedSharding(mesh, spec)
  data_axes = _data_axes(mesh_cfg, mesh) if mode == "data" else ()

  by_path: dict[tuple[str, ...], tuple[tuple[int, ...], PartitionSpec]] = {}
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
  flat_specs = jax.tree.leaves(specs["params"], is_leaf=lambda s: isinstance(s, PartitionSpec))
  for (kp, leaf), spec in zip(flat_params, flat_specs, strict=True):
    by_path[_key_tuple(kp)] = (tuple(np.shape(leaf)), spec)

  def opt_leaf(kp: Sequence[Any], leaf: Any) -> NamedSharding:
    path, shape = _key_tuple(kp), tuple(np.shape(leaf))
    for start in range(len(path)):  # the longest parameter path that is a suffix
      hit = by_path.get(path[start:])
      if hit is not None and hit[0] == shape:
        spec = hit[1]
        if data_axes:
          spec = _zero1_spec(spec, shape, data_axes, sizes)
        return named(spec)
    return named(PartitionSpec())

  is_spec = lambda s: isinstance(s, PartitionSpec)
  return abstract_state.replace(
    step=named(PartitionSpec()),
    params=jax.tree.map(named, specs["params"], is_leaf=is_spec),
    frozen=jax.tree.map(named, specs["frozen"], is_leaf=is_spec),
    rest=jax.tree.map(named, specs["rest"], is_leaf=is_spec),
    opt_state=jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state),
  )


# --------------------------------------------------------------------- data


def batch_sharding(mesh: Mesh, mesh_cfg: ml_collections.ConfigDict) -> NamedSharding:
  """The sharding of a batch: leading dimension over ``mesh_cfg.data_axes``, the rest replicated.

  Examples:
    >>> from adamw_flax import config
    >>> cfg = config.default_config().mesh
    >>> batch_sharding(mesh_from_config(cfg), cfg).spec
    P('data',)
  """
  axes = _data_axes(mesh_cfg, mesh)
  if not axes:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else axes))


def data_shard_info(mesh: Mesh, mesh_cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """Which slice of each global batch this process loads: ``(index, count)``.

  The batch is split into ``count`` equal slices; this process loads slice
  ``index``. With the data axes laid out process by process (the usual mesh)
  this is ``(jax.process_index(), jax.process_count())``; where several
  processes hold replicas of the same rows (data axes smaller than the
  process count, e.g. a pure model-parallel mesh), they share an index. Pass
  it to the dataset as its ``process_index`` / ``process_count``.

  Examples:
    >>> from adamw_flax import config
    >>> cfg = config.default_config().mesh
    >>> data_shard_info(mesh_from_config(cfg), cfg)
    (0, 1)
  """
  sharding = batch_sharding(mesh, mesh_cfg)
  rows = math.prod(mesh.shape[a] for a in _data_axes(mesh_cfg, mesh))
  # One row per data-axis position: the rows each process's devices hold.
  rows_of: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((rows,)).items():
    rows_of.setdefault(device.process_index, set()).update(range(rows)[index[0]])
  blocks = sorted({tuple(sorted(r)) for r in rows_of.values()})
  covered = sorted(i for b in blocks for i in b)
  if covered != list(range(rows)):
    raise ValueError(
      f"the mesh {dict(mesh.shape)} gives processes overlapping parts of the batch rows "
      f"({blocks}); lay the data axes out so each process holds whole, disjoint slices"
    )
  return blocks.index(tuple(sorted(rows_of[jax.process_index()]))), len(blocks)


def global_batch(
  local_batch: Mapping[str, Any],
  mesh: Mesh,
  mesh_cfg: ml_collections.ConfigDict,
  *,
  global_batch_size: int | None = None,
) -> dict[str, jax.Array]:
  """Joins every process's slice of a batch into global arrays sharded over the data axes.

  Each process passes only its own slice (see :func:`data_shard_info`); no
  process ever holds the whole batch (``jax.make_array_from_process_local_data``).

  Args:
    local_batch: ``name -> array`` of this process's rows (leading dimension).
    mesh: the device mesh.
    mesh_cfg: the config's ``mesh`` section (``data_axes``).
    global_batch_size: if given, the rows all slices must add up to; a
      dataset built for another split (e.g. ``jax.process_count()`` slices
      where processes hold replicas) is then an error instead of a batch of
      the wrong size.

  Returns:
    ``name -> jax.Array`` of the global batch, sharded by :func:`batch_sharding`.

  Examples:
    >>> import numpy as np
    >>> from adamw_flax import config
    >>> cfg = config.default_config().mesh
    >>> mesh = mesh_from_config(cfg)
    >>> batch = global_batch({"x": np.zeros((8, 3), np.float32)}, mesh, cfg)
    >>> batch["x"].shape
    (8, 3)
  """
  sharding = batch_sharding(mesh, mesh_cfg)
  _, count = data_shard_info(mesh, mesh_cfg)
  rows = math.prod(mesh.shape[a] for a in _data_axes(mesh_cfg, mesh))

  def one(path: Any, x: Any) -> jax.Array:
    x = np.asarray(x)
    name = jax.tree_util.keystr(path)
    if x.ndim == 0:
      raise ValueError(
        f"batch{name} is a scalar; every batch entry needs a leading batch dimension"
      )
    global_rows = x.shape[0] * count
    if global_batch_size is not None and global_rows != global_batch_size:
      raise ValueError(
        f"batch{name} has {x.shape[0]} rows in this process; this mesh splits each batch into "
        f"{count} slices, so a global batch of {global_batch_size} needs "
        f"{global_batch_size / count:g} per process. Build the dataset with "
        f"(process_index, process_count) = data_shard_info(mesh, mesh_cfg) = "
        f"{data_shard_info(mesh, mesh_cfg)}"
      )
    if global_rows % rows:
      raise ValueError(
        f"batch{name} has {x.shape[0]} rows in this process, {global_rows} in all {count} "
        f"slices, which the data axes {tuple(mesh_cfg.data_axes)} (size {rows}) do not divide; "
        f"make the global batch size a multiple of {rows}"
      )
    return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

  return jax.tree_util.tree_map_with_path(one, dict(local_batch))


# ------------------------------------------------------------------- memory


def _tree_device_bytes(tree: PyTree) -> int:
  per_device: dict[Any, int] = {}
  unplaced = 0
  for leaf in jax.tree.leaves(tree):
    shape = tuple(np.shape(leaf))
    itemsize = np.dtype(leaf.dtype).itemsize
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      unplaced += math.prod(shape) * itemsize
      continue
    if isinstance(sharding, NamedSharding):  # every device holds a shard of one shape
      n = math.prod(sharding.shard_shape(shape)) * itemsize
      if isinstance(sharding.mesh, AbstractMesh):  # a plan without devices: one per mesh
        per_device[sharding.mesh] = per_device.get(sharding.mesh, 0) + n
        continue
      for d in sharding.device_set:
        per_device[d] = per_device.get(d, 0) + n
    else:
      for d, index in sharding.devices_indices_map(shape).items():
        n = math.prod(len(range(*s.indices(dim))) for s, dim in zip(index, shape, strict=True))
        per_device[d] = per_device.get(d, 0) + n * itemsize
  # A leaf without a sharding (numpy, unplaced abstract) counts as whole on every device.
  return max(per_device.values(), default=0) + unplaced


def per_device_bytes(state_or_tree: Any) -> dict[str, int]:
  """Bytes each device holds (the maximum over devices), from the leaves' shardings.

  Works on arrays and on abstract ``jax.ShapeDtypeStruct`` leaves that carry
  a sharding (``create_train_state(..., mesh=mesh, abstract=True)``), so the
  memory of a pod-sized state can be checked before allocating it, even on a
  machine without those devices (shardings on a ``jax.sharding.AbstractMesh``).

  Args:
    state_or_tree: a :class:`~adamw_flax.train_state.TrainState`, or any tree.

  Returns:
    For a TrainState: ``params``, ``frozen``, ``rest``, ``opt_state`` and
    ``total``; for another tree: ``total``.

  Examples:
    >>> import jax.numpy as jnp
    >>> per_device_bytes({"w": jnp.zeros((4, 8), jnp.float32)})
    {'total': 128}
  """
  if _is_train_state(state_or_tree):
    s = state_or_tree
    out = {f: _tree_device_bytes(getattr(s, f)) for f in ("params", "frozen", "rest", "opt_state")}
    out["total"] = _tree_device_bytes(s)
    return out
  return {"total": _tree_device_bytes(state_or_tree)}
