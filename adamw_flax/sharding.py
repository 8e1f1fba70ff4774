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

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from adamw_flax import masks, plan, quantize, schema

PyTree = Any

__all__ = [
  "abstract_mesh_from_config",
  "batch_sharding",
  "data_shard_info",
  "global_batch",
  "named",
  "opt_state_shardings",
  "param_specs_of_groups",
  "mesh_from_config",
  "param_specs",
  "per_device_bytes",
  "state_shardings",
  "traced_under_mesh",
  "use_mesh",
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


def mesh_from_config(mesh_cfg: plan.MeshSection, devices: Sequence[Any] | None = None) -> Mesh:
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
    devices ordered for the hardware's topology by ``jax.make_mesh``. Devices
    of several TPU slices (multi-slice) give a hybrid mesh
    (``mesh_utils.create_hybrid_device_mesh``): the slices run along the
    first of ``mesh.data_axes`` whose size their count divides (data
    parallelism over the data-center network), every other axis within a slice.

  Raises:
    ValueError: sizes that do not match (or, with -1, do not divide) the
      device count, naming both; a multi-slice mesh with no data axis the
      slice count divides.

  Examples:
    >>> from adamw_flax import config
    >>> cfg = config.default_config().mesh
    >>> cfg.axes, cfg.shape = ("data", "model"), (-1, 1)
    >>> mesh = mesh_from_config(cfg)
    >>> dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
    True
  """
  mesh_cfg = plan.as_mesh_plan(mesh_cfg)
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(mesh_cfg.axes)
  shape = _resolve_shape(axes, mesh_cfg.shape, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1:
    # jax.make_mesh refuses multi-slice device sets: a hybrid (ICI x DCN) mesh.
    ici, dcn = _dcn_split(axes, shape, mesh_cfg.data_axes, num_slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, axes, axis_types=axis_types)
  return jax.make_mesh(shape, axes, axis_types, devices=devices)


def _dcn_split(
  axes: tuple[str, ...], shape: tuple[int, ...], data_axes: Sequence[str], num_slices: int
) -> tuple[list[int], list[int]]:
  """(ICI shape, DCN shape) of a multi-slice mesh: the slices along the first data axis they divide.

  Data parallelism crosses the slow data-center network between slices (one
  gradient all-reduce a step); every other axis stays within a slice.
  """
  order = [axes.index(a) for a in data_axes if a in axes]
  order += [i for i in range(len(axes)) if i not in order]
  for i in order:
    if shape[i] % num_slices == 0:
      ici = list(shape)
      ici[i] //= num_slices
      return ici, [num_slices if j == i else 1 for j in range(len(axes))]
  raise ValueError(
    f"mesh.shape {dict(zip(axes, shape, strict=True))}: the devices span {num_slices} slices, "
    f"which run along the first data axis whose size they divide; make a data axis "
    f"({', '.join(data_axes)}) a multiple of {num_slices}"
  )


def abstract_mesh_from_config(mesh_cfg: plan.MeshSection, num_devices: int) -> AbstractMesh:
  """The mesh ``config.mesh`` would give on ``num_devices`` devices, without the devices.

  For planning: :func:`state_shardings` and :func:`per_device_bytes` accept
  it, so the memory a pod config needs per chip can be computed anywhere.

  Examples:
    >>> from adamw_flax import config
    >>> cfg = config.default_config().mesh
    >>> cfg.axes, cfg.shape = ("data", "fsdp"), (-1, 16)
    >>> dict(abstract_mesh_from_config(cfg, 256).shape)
    {'data': 16, 'fsdp': 16}

  Args:
    mesh_cfg: the ``mesh`` section or its plan.
    num_devices: the devices the mesh would span.

  Returns:
    A ``jax.sharding.AbstractMesh``.
  """
  mesh_cfg = plan.as_mesh_plan(mesh_cfg)
  axes = tuple(mesh_cfg.axes)
  shape = _resolve_shape(axes, mesh_cfg.shape, num_devices)
  return AbstractMesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def _axis_sizes(mesh_cfg: plan.MeshSection, mesh: Mesh | AbstractMesh | None) -> dict[str, int]:
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
        f"mesh.axes are {tuple(sizes)}; map logical names with mesh.logical_axis_rules"
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


def _annotation(
  variable: Any, sizes: Mapping[str, int], logical: Mapping[str, Any], unmapped: set[str]
) -> PartitionSpec | None:
  """The spec a Variable's own annotation asks for, its logical names mapped to mesh axes.

  NNX ``out_sharding`` (``nnx.with_partitioning``, ``nnx.Param(...,
  out_sharding=...)``) and Linen logical partitioning seen through
  ``nnx.bridge`` (the same metadata) name either mesh axes or logical axes;
  a name that is neither a mesh axis nor in ``mesh.logical_axis_rules``
  replicates that dimension and is recorded in ``unmapped``.
  """
  if not isinstance(variable, nnx.Variable):
    return None
  meta = variable.get_metadata()
  raw = meta.get("out_sharding", meta.get("sharding"))
  if raw is None:
    return None
  if isinstance(raw, PartitionSpec):
    raw = tuple(raw)
  entries = []
  for e in raw:
    names = () if e is None else (e,) if isinstance(e, str) else tuple(e)
    axes: list[str] = []
    for name in names:
      if name in logical:
        target = logical[name]
        axes.extend(() if target is None else (target,) if isinstance(target, str) else target)
      elif name in sizes:
        axes.append(name)
      else:
        unmapped.add(name)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*entries)


def _group_entries(tree: PyTree, template: Any) -> tuple[list[tuple[str, ...]], list, list, Any]:
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [_key_tuple(kp) for kp, _ in leaves_with_path]
  shapes = [tuple(int(d) for d in np.shape(x)) for _, x in leaves_with_path]
  variables: list[Any] = [None] * len(paths)
  if template is not None:  # the nnx.State treedef of a TrainState field
    state = jax.tree.unflatten(template, [x for _, x in leaves_with_path])
    variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  elif isinstance(tree, nnx.State):
    variables = jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))
    treedef = jax.tree.structure(tree.to_pure_dict())
  return paths, shapes, variables, treedef


def param_specs_of_groups(
  trees: Sequence[PyTree],
  mesh_cfg: plan.MeshSection,
  *,
  mesh: Mesh | AbstractMesh | None = None,
  templates: Sequence[Any] | None = None,
  rules: bool = True,
  target: Any = None,
  unmapped: set[str] | None = None,
) -> list[PyTree]:
  """The ``PartitionSpec`` of every leaf of several params-like trees that one rule list covers.

  For each leaf, the first partition rule whose selector matches its path
  gives the spec; otherwise its own annotation (logical names mapped by
  ``mesh.logical_axis_rules``); otherwise it is replicated. A rule that
  matches no leaf of any of the trees is an error.

  Args:
    trees: params-like trees (pure dicts, ``nnx.State``), e.g. a train
      state's trainable and frozen params.
    mesh_cfg: the ``mesh`` section or its plan.
    mesh: the mesh whose axis sizes the divisibility checks use; default:
      ``mesh_cfg`` over ``jax.device_count()`` devices.
    templates: per tree, the ``nnx.State`` treedef its leaves unflatten into
      (a :class:`~adamw_flax.train_state.TrainState`'s ``spec.templates``),
      to read the Variables' annotations.
    rules: apply the partition rules (False: annotations only, for
      non-parameter state).
    target: the model (``nnx.Module``, ``LinenTarget`` or ``masks.Target``) for ``type:`` rules.
    unmapped: if given, collects the logical axis names no rule maps.

  Returns:
    Per tree, a tree of ``PartitionSpec`` shaped like its pure dict.
  """
  mp = plan.as_mesh_plan(mesh_cfg)
  sizes = _axis_sizes(mp, mesh)
  logical = dict(mp.logical_axis_rules)
  unmapped = set() if unmapped is None else unmapped
  groups = [
    _group_entries(tree, None if templates is None else templates[i])
    for i, tree in enumerate(trees)
  ]
  ruled: dict[str, Any] = {}
  if rules and mp.partition_rules:
    entries = [
      ("/".join(p), jax.ShapeDtypeStruct(shape, np.float32))
      for paths, shapes, _, _ in groups
      for p, shape in zip(paths, shapes, strict=True)
    ]
    if target is not None:  # the model's name in errors, and its classes for `type:` rules
      view = dataclasses.replace(masks.as_target(target), entries=entries)
    else:
      view = masks.Target(
        entries,
        None,
        "params tree",
        hint="pass the model (an nnx.Module) to param_specs, or the state factory's target; "
        "or use path rules ('*/embedding', 're:.*attn.*/kernel')",
      )
    # Resolved to rule indices, so an error can name the rule that gave a spec.
    indexed = [dataclasses.replace(r, value=i) for i, r in enumerate(mp.partition_rules)]
    ruled = masks.resolve(view, indexed, None, "mesh.partition_rules")
  out = []
  for paths, shapes, variables, treedef in groups:
    specs = []
    for path_t, shape, var in zip(paths, shapes, variables, strict=True):
      path = "/".join(path_t)
      index = ruled.get(path)
      spec = source = None
      if index is not None:
        rule = mp.partition_rules[index]
        spec, source = rule.value, f"mesh.partition_rules[{index}] ({rule.selector!r})"
      if spec is None:
        spec = _annotation(var, sizes, logical, unmapped)
        source = "the parameter's annotation"
      if spec is None:
        spec = PartitionSpec()
      _check_spec(spec, shape, path, sizes, source)
      specs.append(spec)
    out.append(jax.tree.unflatten(treedef, specs))
  return out


def param_specs(
  params: Any,
  mesh_cfg: plan.MeshSection,
  *,
  mesh: Mesh | AbstractMesh | None = None,
) -> PyTree:
  """The ``PartitionSpec`` of every parameter, from partition rules or annotations.

  For each parameter, the first rule of ``mesh_cfg.partition_rules`` whose
  selector (the mask rule language: glob, ``re:``, ``type:``, ``ndim``)
  matches its path gives the spec; otherwise its own annotation
  (``nnx.with_partitioning`` / ``out_sharding`` metadata, Linen logical
  partitioning through the bridge, logical names mapped by
  ``mesh.logical_axis_rules``); otherwise it is replicated (``PartitionSpec()``).

  Args:
    params: an ``nnx.Module`` (its ``nnx.Param`` variables; ``type:`` rules
      work), an ``nnx.State``, or a plain tree of arrays /
      ``jax.ShapeDtypeStruct`` (path rules only). A
      :class:`~adamw_flax.train_state.TrainState`: use its ``shardings``.
    mesh_cfg: the config's ``mesh`` section or its plan.
    mesh: the mesh whose axis sizes the divisibility checks use; default: the
      sizes of ``mesh_cfg`` over ``jax.device_count()`` devices.

  Returns:
    A tree of ``PartitionSpec`` shaped like the params' pure dict (for a
    module or State) or like the tree itself.

  Raises:
    ValueError: a rule that matches no parameter, an axis that is not a mesh
      axis, a spec longer than the parameter's rank, or a dimension its axes
      do not divide, naming the path, shape and rule.
  """
  target = None
  if isinstance(params, nnx.Module):
    target, params = params, nnx.state(params, nnx.Param)
  (specs,) = param_specs_of_groups([params], mesh_cfg, mesh=mesh, target=target)
  return specs


@contextlib.contextmanager
def use_mesh(mesh: Mesh | AbstractMesh) -> Iterator[None]:
  """A context in which ``mesh`` is the current mesh (``jax.set_mesh``).

  Init, train and eval steps are traced inside it, so a model's own
  activation constraints (``jax.lax.with_sharding_constraint(x, P(...))``
  in mesh axis names, as Flax's gemma example and bonsai's models write them)
  and ``nnx.with_partitioning`` resolve against the run's mesh, as their
  authors intend (outside a mesh, ``P(...)`` constraints are an error).

  Logical axis names in parameter annotations resolve through
  ``mesh.logical_axis_rules`` in :func:`param_specs_of_groups` (a name no rule
  maps replicates), not through Flax's logical-axis-rules context, which this
  does not set: with it set under a mesh, Flax 0.12's ``DenseGeneral``
  constrains a logically partitioned 3-D kernel's flat 2-D init value by the
  kernel's names and fails, in ``init`` and in every ``apply``.

  Args:
    mesh: the run's mesh (a concrete one: ``jax.set_mesh``; or an
      ``AbstractMesh``: ``jax.sharding.use_abstract_mesh``, for planning).

  Yields:
    Nothing; the mesh is current inside.
  """
  enter = jax.sharding.use_abstract_mesh if isinstance(mesh, AbstractMesh) else jax.set_mesh
  with enter(mesh):
    yield


def traced_under_mesh(fn: Callable[..., Any], shardings: Any) -> Callable[..., Any]:
  """``fn`` whose trace runs with the mesh of ``shardings`` as the current (abstract) mesh.

  For functions ``jax.jit`` traces, so they work when called outside
  :func:`use_mesh` too: ``jax.set_mesh`` is refused inside a trace, so the
  step enters the mesh's abstract form there, which is all a ``P(...)``
  constraint needs (the devices are the jit's own, from its
  ``in_shardings``). A trace already under a mesh, or shardings without a
  ``NamedSharding``, leave ``fn`` as it is.

  Args:
    fn: the function ``jax.jit`` will trace.
    shardings: a tree of shardings (a train state's), or None.

  Returns:
    The function to jit.
  """
  is_named = lambda s: isinstance(s, NamedSharding)
  found = next((s for s in jax.tree.leaves(shardings, is_leaf=is_named) if is_named(s)), None)
  if found is None:
    return fn
  abstract = found.mesh.abstract_mesh

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    if not jax.sharding.get_abstract_mesh().empty:
      return fn(*args, **kwargs)
    with jax.sharding.use_abstract_mesh(abstract):
      return fn(*args, **kwargs)

  return traced


def named(mesh: Mesh | AbstractMesh) -> Callable[[Any], Any]:
  """``spec tree -> NamedSharding tree`` on ``mesh`` (a single spec gives one sharding).

  Args:
    mesh: the mesh the shardings place on.

  Returns:
    The function.
  """
  is_spec = lambda s: isinstance(s, PartitionSpec)
  return lambda specs: jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


def unmapped_logical_axes(
  templates: Sequence[Any],
  trees: Sequence[PyTree],
  mesh_cfg: plan.MeshSection,
  *,
  mesh: Mesh | AbstractMesh | None = None,
) -> list[str]:
  """Logical axis names in the annotations of ``trees`` that no mesh axis or rule maps (replicated).

  Args:
    templates: per tree, the ``nnx.State`` treedef (a TrainState's ``spec.templates``).
    trees: the trees whose Variables' annotations are read.
    mesh_cfg: the ``mesh`` section or its plan.
    mesh: the mesh (default: ``mesh_cfg`` over the visible devices).

  Returns:
    The names, sorted.
  """
  unmapped: set[str] = set()
  param_specs_of_groups(
    trees, mesh_cfg, mesh=mesh, templates=templates, rules=False, unmapped=unmapped
  )
  return sorted(unmapped)


# ------------------------------------------------------------ state shardings


def _data_axes(mesh_cfg: plan.MeshSection, mesh: Mesh) -> tuple[str, ...]:
  axes = plan.as_mesh_plan(mesh_cfg).data_axes
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


def opt_state_shardings(
  opt_state: Any,
  params: PyTree,
  specs: PyTree,
  mesh: Mesh | AbstractMesh,
  mesh_cfg: plan.MeshSection,
) -> PyTree:
  """A ``NamedSharding`` for every leaf of an optimizer state.

  A leaf shaped like a parameter (``mu``, ``nu``, accumulated gradients;
  found by the parameter's path being a suffix of the leaf's path, because
  optax states embed the params tree) is sharded like it. With
  ``mesh.shard_opt_state == "data"`` (ZeRO-1) it is also sharded over the
  data axes it does not use yet, on the first unsharded dimension their size
  divides (kept as is where none does); the params keep their own specs.
  Other leaves (step counts) are replicated.

  Args:
    opt_state: the (abstract) optimizer state.
    params: the (abstract) params tree it was initialised from.
    specs: the params' ``PartitionSpec`` tree.
    mesh: the device mesh.
    mesh_cfg: the ``mesh`` section or its plan.

  Returns:
    A tree like ``opt_state`` of ``NamedSharding``.
  """
  mp = plan.as_mesh_plan(mesh_cfg)
  key = schema.KEYS["mesh.shard_opt_state"]  # a section from the Python API, unvalidated
  if (problem := key.problem(mp.shard_opt_state)) is not None:
    raise ValueError(f"{key.name}: {problem}")
  sizes = _axis_sizes(mp, mesh)
  data_axes = _data_axes(mp, mesh) if mp.shard_opt_state == "data" else ()
  by_path: dict[tuple[str, ...], tuple[tuple[int, ...], PartitionSpec]] = {}
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
  for (kp, leaf), spec in zip(flat_params, flat_specs, strict=True):
    by_path[_key_tuple(kp)] = (tuple(np.shape(leaf)), spec)

  def param_spec(path: tuple[str, ...], shape: tuple[int, ...]) -> PartitionSpec | None:
    for start in range(len(path)):  # the longest parameter path that is a suffix
      hit = by_path.get(path[start:])
      if hit is not None and hit[0] == shape:
        return hit[1]
    return None

  def quantized_leaf(path: tuple[str, ...], leaf: quantize.QuantizedMoment) -> Any:
    # Codes and scales share the param's spec: blocks run along the last axis,
    # so a block stays on one device when the scales' dimension divides too.
    shape, scale_shape = tuple(np.shape(leaf.codes)), tuple(np.shape(leaf.scale))
    spec = param_spec(path, shape) or PartitionSpec()
    if data_axes:  # ZeRO-1 on a dimension that the scales' shape divides
      spec = _zero1_spec(spec, scale_shape, data_axes, sizes)
    for dim, entry in enumerate(list(spec)):
      axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      n = math.prod(sizes[a] for a in axes)
      if scale_shape[dim] % n:
        block = shape[-1] // scale_shape[-1]
        raise ValueError(
          f"8-bit moments of {'/'.join(path)} {shape}: its {scale_shape[dim]} blocks of "
          f"{block} along axis {dim} do not split evenly over {'x'.join(axes)} ({n} devices), so "
          "a block would straddle two devices; choose optimizer.quantize_block_size so that "
          f"{shape[-1]} / {n} is a multiple of the block, or keep it in float32 with "
          "optimizer.float_moments"
        )
    named = NamedSharding(mesh, spec)
    return quantize.QuantizedMoment(named, named)

  def opt_leaf(kp: Sequence[Any], leaf: Any) -> Any:
    path = _key_tuple(kp)
    if quantize.is_quantized(leaf):
      return quantized_leaf(path, leaf)
    shape = tuple(np.shape(leaf))
    spec = param_spec(path, shape)
    if spec is None:
      return NamedSharding(mesh, PartitionSpec())
    if data_axes:
      spec = _zero1_spec(spec, shape, data_axes, sizes)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(opt_leaf, opt_state, is_leaf=quantize.is_quantized)


def state_shardings(abstract_state: Any, mesh: Mesh, mesh_cfg: plan.MeshSection) -> PyTree:
  """The shardings of a train state: ``abstract_state.shardings(mesh, mesh_cfg)``.

  Kept for callers of the first build; see
  :meth:`adamw_flax.train_state.TrainState.shardings`.

  Args:
    abstract_state: a TrainState (abstract or concrete).
    mesh: the device mesh.
    mesh_cfg: the ``mesh`` section or its plan.

  Returns:
    A TrainState of ``NamedSharding``.
  """
  return abstract_state.shardings(mesh, mesh_cfg)


# --------------------------------------------------------------------- data


def batch_sharding(mesh: Mesh, mesh_cfg: plan.MeshSection) -> NamedSharding:
  """The sharding of a batch: leading dimension over ``mesh_cfg.data_axes``, the rest replicated.

  Examples:
    >>> from adamw_flax import config
    >>> cfg = config.default_config().mesh
    >>> batch_sharding(mesh_from_config(cfg), cfg).spec
    P('data',)

  Args:
    mesh: the device mesh.
    mesh_cfg: the ``mesh`` section or its plan (``data_axes``).

  Returns:
    The batch's ``NamedSharding``.
  """
  axes = _data_axes(mesh_cfg, mesh)
  if not axes:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else axes))


def check_batch_size(
  global_batch_size: int, mesh: Mesh, mesh_cfg: plan.MeshSection, accumulate_steps: int = 1
):
  """Refuses a batch the mesh cannot split, at start-up, with the numbers.

  Args:
    global_batch_size: rows of one global batch (``data.batch_size``).
    mesh: the device mesh.
    mesh_cfg: the ``mesh`` section or its plan (``data_axes``).
    accumulate_steps: micro-batches per step (each must split over the data devices too).

  Raises:
    ValueError: naming ``data.batch_size``, the data devices and the nearest sizes that work.
  """
  axes = _data_axes(mesh_cfg, mesh)
  ways = math.prod(int(mesh.shape[a]) for a in axes)
  need = ways * max(int(accumulate_steps), 1)
  if global_batch_size % need == 0:
    return
  lower, upper = (global_batch_size // need) * need, -(-global_batch_size // need) * need
  near = " or ".join(str(n) for n in (lower, upper) if n > 0)
  over = f"{ways} data devices (mesh {dict(mesh.shape)}, data axes {tuple(axes)})"
  if accumulate_steps > 1:
    over += f" x optimizer.accumulate_steps={accumulate_steps} micro-batches"
  raise ValueError(
    f"data.batch_size={global_batch_size} does not split over the {over}; make it a multiple "
    f"of {need}, e.g. {near}"
  )


def data_shard_info(mesh: Mesh, mesh_cfg: plan.MeshSection) -> tuple[int, int]:
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

  Args:
    mesh: the device mesh.
    mesh_cfg: the ``mesh`` section or its plan.

  Returns:
    ``(index, count)`` of this process's slice.
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
  mesh_cfg: plan.MeshSection,
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
        f"slices, which the data axes {_data_axes(mesh_cfg, mesh)} (size {rows}) do not divide; "
        f"make the global batch size a multiple of {rows}"
      )
    return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

  return jax.tree_util.tree_map_with_path(one, dict(local_batch))


# ------------------------------------------------------------------- memory


def itemsize(dtype: Any) -> int:
  """Bytes per element of ``dtype``; a typed PRNG key counts its key data."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    # A typed PRNG key (nnx.Rngs, nnx.Dropout, bridged Linen rngs): its bytes
    # are the key data's (two uint32 for the default threefry).
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
    return math.prod(data.shape) * np.dtype(data.dtype).itemsize
  return np.dtype(dtype).itemsize


def _tree_device_bytes(tree: PyTree) -> int:
  per_device: dict[Any, int] = {}
  unplaced = 0
  for leaf in jax.tree.leaves(tree):
    shape = tuple(np.shape(leaf))
    size = itemsize(leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      unplaced += math.prod(shape) * size
      continue
    if isinstance(sharding, NamedSharding):  # every device holds a shard of one shape
      n = math.prod(sharding.shard_shape(shape)) * size
      if isinstance(sharding.mesh, AbstractMesh):  # a plan without devices: one per mesh
        per_device[sharding.mesh] = per_device.get(sharding.mesh, 0) + n
        continue
      for d in sharding.device_set:
        per_device[d] = per_device.get(d, 0) + n
    else:
      for d, index in sharding.devices_indices_map(shape).items():
        n = math.prod(len(range(*s.indices(dim))) for s, dim in zip(index, shape, strict=True))
        per_device[d] = per_device.get(d, 0) + n * size
  # A leaf without a sharding (numpy, unplaced abstract) counts as whole on every device.
  return max(per_device.values(), default=0) + unplaced


def per_device_bytes(tree: Any, *, by_part: bool = False) -> dict[str, int]:
  """Bytes each device holds (the maximum over devices), from the leaves' shardings.

  Works on arrays and on abstract ``jax.ShapeDtypeStruct`` leaves that carry
  a sharding (``create_train_state(..., mesh=mesh, abstract=True)``), so the
  memory of a pod-sized state can be checked before allocating it, even on a
  machine without those devices (shardings on a ``jax.sharding.AbstractMesh``).

  Args:
    tree: any tree of arrays, or a :class:`~adamw_flax.train_state.TrainState`
      (its ``device_bytes()``: one entry per field). Typed PRNG keys count
      their key data's bytes.
    by_part: ``tree`` is a mapping ``name -> tree``: count each part too.

  Returns:
    ``total``, and with ``by_part`` (or for a TrainState) one entry per part.

  Examples:
    >>> import jax.numpy as jnp
    >>> per_device_bytes({"w": jnp.zeros((4, 8), jnp.float32)})
    {'total': 128}
  """
  if hasattr(tree, "device_bytes"):
    return tree.device_bytes()
  if by_part:
    out = {k: _tree_device_bytes(v) for k, v in tree.items()}
    out["total"] = _tree_device_bytes(tree)
    return out
  return {"total": _tree_device_bytes(tree)}
