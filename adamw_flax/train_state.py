"""The train state of an NNX (or Linen) model and its compiled step.

:func:`create_train_state` splits a model once into its graph definition and
three trees of plain arrays (trainable params, frozen params, the rest:
batch statistics, RNG state, ...) and builds the optimizer state through
:func:`adamw_flax.optimizer_from_config`. :func:`state_factory` is the same
in steps (abstract state, shardings, jitted init with ``out_shardings``), for
the trainer to compose. The :class:`TrainState` is a pytree
of arrays only, so it jits, shards and checkpoints like any pytree; the
graph definition, optimizer and learning-rate schedule are static fields.

:func:`make_train_step` returns ``jax.jit`` of a pure function
``(state, batch) -> (state, metrics)``, with the state donated. The module is
re-assembled with ``nnx.merge`` inside the trace only, so a call costs what a
hand-written ``jax.jit`` step over ``(params, opt_state)`` costs, not the
graph traversal that ``nnx.jit`` pays on every call (flax PR 4399).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from adamw_flax import errors, masks, offload, optim, plan, quantize, registry, sharding, transform

PyTree = Any
Batch = dict[str, Any]
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


class StateSpec:
  """The static parts of a :class:`TrainState`: graph definition, optimizer, schedule.

  Compared and hashed by identity: ``jax.jit`` hashes a pytree's static data
  on every call, and hashing an NNX ``GraphDef`` costs about 0.5 ms, more than
  a small model's whole step. Every state of a run shares one spec.
  """

  def __init__(
    self,
    graphdef: Any,
    templates: Any,
    tx: optax.GradientTransformation,
    lr_fn: Any,
    *,
    ema: plan.EmaRule | None = None,
    spikes: plan.SpikeRule | None = None,
    module_types: masks.Target | None = None,
    offload: tuple[str, ...] = (),
  ):
    self.graphdef = graphdef
    self.templates = templates
    self.tx = tx
    self.lr_fn = lr_fn
    # The one source of the EMA's and the spike rule's settings: the train step
    # reads them here, so a state and its step can never disagree about them.
    self.ema = ema
    self.spikes = spikes
    # The class owning each parameter (no arrays), for `type:` partition rules.
    self.module_types = module_types
    # optimizer.offload: the optimizer-state fields kept in host memory (adamw_flax.offload).
    self.offload = tuple(offload)

  __hash__ = object.__hash__
  __eq__ = object.__eq__


class _ByName:
  """Read access by key, as ``extra["ema"]``: the first builds kept these states in dicts.

  A field that is None (not configured) reads as absent: ``"ema" in extra`` is
  False and ``extra["ema"]`` raises ``KeyError``.
  """

  def keys(self) -> list[str]:
    """The names of the fields that hold something, in declaration order."""
    return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

  def __contains__(self, name: object) -> bool:
    return name in self.keys()

  def __getitem__(self, name: str) -> Any:
    if name not in self.keys():
      raise KeyError(name)
    return getattr(self, name)

  def as_dict(self) -> dict[str, Any]:
    """``name -> value`` of the fields that hold something (nested states as dicts too).

    The form checkpoints hold: the same tree as the dicts of the first builds.
    """
    return {k: v.as_dict() if isinstance(v, _ByName) else v for k, v in
            ((k, getattr(self, k)) for k in self.keys())}  # fmt: skip


@struct.dataclass
class SpikeStats(_ByName):
  """The rolling statistics of :class:`~adamw_flax.plan.SpikeRule` (``optimizer.skip_spikes``).

  Attributes:
    loss: the last ``window`` steps' losses (float32 ring buffer).
    grad_norm: their gradient norms.
    count: finite steps seen (int32; the ring's write position mod ``window``).
    skipped: updates skipped as spikes (int32).
  """

  loss: jax.Array
  grad_norm: jax.Array
  count: jax.Array
  skipped: jax.Array


@struct.dataclass
class Extra(_ByName):
  """What the train step keeps beside the optimizer state, each part when configured.

  Attributes:
    ema: the EMA of the params (``trainer.ema_decay``), a tree like them; or None.
    spikes: the :class:`SpikeStats` of ``optimizer.skip_spikes``; or None.
  """

  ema: PyTree = None
  spikes: SpikeStats | None = None

  def __bool__(self) -> bool:
    return bool(self.keys())

  @classmethod
  def of(cls, value: Any) -> Extra:
    """An :class:`Extra` from itself or its dict form (a checkpoint's tree, ``{}``)."""
    if isinstance(value, Extra):
      return value
    unknown = set(value) - {"ema", "spikes"}
    if unknown:
      raise ValueError(f"TrainState.extra holds 'ema' and 'spikes', got {sorted(unknown)}")
    spikes = value.get("spikes")
    if isinstance(spikes, dict):
      spikes = SpikeStats(**spikes)
    return cls(ema=value.get("ema"), spikes=spikes)


class TrainState(struct.PyTreeNode):
  """Everything a training run updates, as a pytree of arrays.

  Attributes:
    step: int32 scalar, the number of optimizer updates applied (the one step
      counter of the run: the schedule, logs and checkpoints read it; a
      skipped non-finite update does not count).
    params: trainable parameters, a nested dict of arrays.
    frozen: parameters excluded from training by ``optimizer.freeze`` rules
      (no gradients, no optimizer state).
    rest: the module's non-parameter state (batch statistics, RNG keys and
      counters, ...), updated by the forward pass.
    opt_state: the optimizer state of ``params``.
    extra: what the train step keeps beside the optimizer (:class:`Extra`):
      ``ema`` (the EMA of ``params``, ``trainer.ema_decay``) and ``spikes``
      (rolling loss and gradient-norm statistics, ``optimizer.skip_spikes``),
      each None when not configured. A dict of those (a checkpoint's form,
      ``{}``) given here becomes an :class:`Extra`.
    spec: the static parts (graph definition, optimizer, schedule); also
      available as ``graphdef``, ``tx`` and ``lr_fn``.
  """

  step: jax.Array
  params: PyTree
  frozen: PyTree
  rest: PyTree
  opt_state: optax.OptState
  spec: StateSpec = struct.field(pytree_node=False)
  extra: Extra = struct.field(default_factory=Extra)

  def __post_init__(self):
    if isinstance(self.extra, dict):  # its checkpoint form, or a user's state.replace(extra={})
      object.__setattr__(self, "extra", Extra.of(self.extra))

  @property
  def graphdef(self) -> Any:
    return self.spec.graphdef

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.spec.tx

  @property
  def lr_fn(self) -> Callable[[Any], Any]:
    return self.spec.lr_fn

  def merge(self, params: PyTree | None = None, rest: PyTree | None = None) -> nnx.Module:
    """Returns the NNX module holding ``params`` and ``rest`` (default: the state's own)."""
    params = self.params if params is None else params
    rest = self.rest if rest is None else rest
    states = [
      _from_pure(t, tree)
      for t, tree in zip(self.spec.templates, (params, self.frozen, rest), strict=True)
    ]
    return nnx.merge(self.graphdef, *states)

  def shardings(self, mesh: jax.sharding.Mesh, mesh_cfg: plan.MeshSection) -> TrainState:
    """A ``NamedSharding`` for every leaf, as ``jax.jit``'s in/out shardings.

    * ``params``, ``frozen``: partition rules (``type:`` rules read the
      module classes the state's factory recorded), else the model's own
      annotations (logical names through ``mesh.logical_axis_rules``), else
      replicated (:func:`adamw_flax.sharding.param_specs`);
    * ``rest`` (RNG state, batch statistics): annotations, else replicated;
    * ``opt_state``: like the parameter each leaf mirrors, further over the
      data axes with ZeRO-1 (:func:`adamw_flax.sharding.opt_state_shardings`);
    * ``step``: replicated.

    Args:
      mesh: the device mesh (or an ``AbstractMesh`` for planning).
      mesh_cfg: the config's ``mesh`` section or its plan.

    Returns:
      A TrainState whose leaves are ``jax.sharding.NamedSharding``.
    """
    templates = self.spec.templates
    params, frozen = sharding.param_specs_of_groups(
      [self.params, self.frozen],
      mesh_cfg,
      mesh=mesh,
      templates=templates[:2],
      target=self.spec.module_types,
    )
    (rest,) = sharding.param_specs_of_groups(
      [self.rest], mesh_cfg, mesh=mesh, templates=templates[2:], rules=False
    )
    named = sharding.named(mesh)
    opt_state = sharding.opt_state_shardings(self.opt_state, self.params, params, mesh, mesh_cfg)
    if self.spec.offload:  # checked everywhere, applied where host memory is not the device's
      devices = list(getattr(mesh, "devices", np.empty(0)).flat)
      platform = devices[0].platform if devices else None
      placed = offload.place(self.opt_state, opt_state, self.spec.offload, platform)
      opt_state = placed if offload.effective(devices) else opt_state
    return self.replace(
      step=named(jax.sharding.PartitionSpec()),
      params=named(params),
      frozen=named(frozen),
      rest=named(rest),
      opt_state=opt_state,
      # The EMA is sharded like the params it follows; spike statistics replicated.
      extra=sharding.opt_state_shardings(self.extra, self.params, params, mesh, mesh_cfg),
    )

  def device_bytes(self) -> dict[str, int]:
    """Bytes each device holds, per field and ``total`` (see :func:`adamw_flax.sharding.per_device_bytes`)."""
    parts = {f: getattr(self, f) for f in ("params", "frozen", "rest", "opt_state")}
    if self.extra:
      parts["extra"] = self.extra
    out = sharding.per_device_bytes(parts, by_part=True)
    out["total"] = sharding.per_device_bytes({**parts, "step": self.step})["total"]
    return out

  @property
  def model(self) -> nnx.Module:
    """The NNX module with the current params and state."""
    return self.merge()


def _to_pure(state: nnx.State) -> PyTree:
  return state.to_pure_dict()


def _from_pure(treedef: Any, tree: PyTree) -> nnx.State:
  # The State of Variables and its pure dict flatten in the same (sorted key)
  # order, checked in create_train_state; unflattening by treedef keeps each
  # Variable's type and metadata (sharding annotations included).
  return jax.tree.unflatten(treedef, jax.tree.leaves(tree))


def _frozen_filter(frozen_paths: frozenset[str]) -> Callable[[Any, Any], bool]:
  def is_frozen(path, value):
    return isinstance(value, nnx.Param) and masks.path_str(path) in frozen_paths

  return is_frozen


def split_model(
  model: nnx.Module, frozen_paths: frozenset[str] = frozenset()
) -> tuple[Any, tuple[Any, Any, Any], tuple[PyTree, PyTree, PyTree]]:
  """Splits ``model`` into (graphdef, state treedefs, (params, frozen, rest) pure dicts).

  Args:
    model: the NNX module.
    frozen_paths: parameter paths that go to the frozen tree.

  Returns:
    ``(graphdef, (params, frozen, rest) State treedefs, (params, frozen, rest) pure dicts)``.
  """
  is_frozen = _frozen_filter(frozen_paths)
  graphdef, frozen, params, rest = nnx.split(model, is_frozen, nnx.Param, ...)
  states = (params, frozen, rest)
  pures = tuple(_to_pure(s) for s in states)
  treedefs = tuple(jax.tree.structure(s) for s in states)
  for state, pure in zip(states, pures, strict=True):
    a = [masks.path_str(p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    b = [masks.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
    if a != b:  # guards _from_pure's assumption against a change in Flax
      raise RuntimeError(f"NNX state and its pure dict flatten differently: {a[:3]} vs {b[:3]}")
  return graphdef, treedefs, pures


@dataclasses.dataclass(frozen=True)
class StateFactory:
  """How to build a run's :class:`TrainState`, before building it.

  Made by :func:`state_factory`. The trainer composes start-up from it (the
  big_vision / nanodo pattern): :meth:`abstract` gives shapes and dtypes
  without allocating, :meth:`TrainState.shardings` the placement of each leaf,
  and :meth:`create` runs the jitted ``init`` with those ``out_shardings``, so
  every leaf is created directly in its shards.

  Attributes:
    init: ``() -> TrainState`` at step 0, pure (jit-able).
    target: the abstract model that mask rules and the report are read from
      (an ``nnx.Module`` of ``ShapeDtypeStruct`` leaves; for a model with
      Linen parts, a :class:`~adamw_flax.masks.Target` that also knows their
      Linen classes).
    frozen_paths: the parameters that ``optimizer.freeze`` selects.
    jit_init: whether :meth:`create` may jit ``init`` (False for a concrete
      module passed in, whose arrays ``init`` only re-arranges).
  """

  init: Callable[[], TrainState]
  target: Any
  frozen_paths: frozenset[str]
  jit_init: bool = True

  def report(self, optimizer: plan.OptimizerPlan) -> str:
    """The table of what the optimizer's rules give each parameter (:func:`adamw_flax.masks.report`).

    Args:
      optimizer: the run plan's optimizer (its decay, multiplier and freeze rules).

    Returns:
      The table, ready to print.
    """
    return masks.report(
      self.target,
      decay_rules=optimizer.decay_rules or "none",
      lr_multipliers=optimizer.lr_multipliers,
      frozen=optimizer.freeze,
      params_dtype=optimizer.section.params_dtype,
    )

  def placement(self, shardings: TrainState) -> str:
    """Where each parameter lives: ``PartitionSpec``, per-device shape and bytes (:func:`adamw_flax.masks.placement`).

    Args:
      shardings: the state's shardings (:meth:`TrainState.shardings`).

    Returns:
      The table, ready to print.
    """
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
    table = {  # path -> sharding, trainable and frozen params alike
      masks.path_str(kp): s
      for tree in (shardings.params, shardings.frozen)
      for kp, s in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_sharding)[0]
    }
    return masks.placement(self.target, table)

  def abstract(self) -> TrainState:
    """The state's ``jax.ShapeDtypeStruct`` leaves (no allocation)."""
    return jax.eval_shape(self.init)

  def build(
    self,
    mesh: jax.sharding.Mesh | None = None,
    mesh_cfg: plan.MeshSection = None,
    *,
    abstract: bool = False,
  ) -> TrainState:
    """The state, or its abstract form, placed on ``mesh`` by :meth:`TrainState.shardings`.

    Args:
      mesh: the device mesh; None: one device (abstract: no shardings).
      mesh_cfg: the ``mesh`` section or its plan (with a mesh).
      abstract: ``jax.ShapeDtypeStruct`` leaves (with their shardings) instead of arrays.

    Returns:
      The :class:`TrainState` at step 0, or its abstract form.
    """
    if mesh is None:
      return self.abstract() if abstract else self.create()
    with sharding.use_mesh(mesh):
      shapes = self.abstract()
      shardings = shapes.shardings(mesh, mesh_cfg)
      return with_shardings(shapes, shardings) if abstract else self.create(shardings)

  def create(self, shardings: Any = None) -> TrainState:
    """The state at step 0, placed by ``shardings`` (a TrainState of Shardings) if given.

    One compiled ``init`` with those ``out_shardings``: every leaf is created
    in its shards. On CPU, a state under :data:`FAST_INIT_MAX_PARAMS` params
    compiles without LLVM's optimizations (:data:`FAST_INIT_OPTIONS`).
    """
    if not self.jit_init:
      state = self.init()
      return state if shardings is None else jax.device_put(state, shardings)
    init = jax.jit(self.init) if shardings is None else jax.jit(self.init, out_shardings=shardings)
    lowered = init.lower()
    small = param_count(lowered.out_info.params) < FAST_INIT_MAX_PARAMS
    if small and _platform(shardings) == "cpu":
      return lowered.compile(FAST_INIT_OPTIONS)()
    return lowered.compile()()


# An init runs once: on XLA:CPU, compiling a small model's init with LLVM's
# optimizations takes seconds (a 10k-param Linen ResNet: 14 CPU-seconds,
# against 1.2 without them; the 0.8M-param Tiny Shakespeare model: 4.7
# against 2.2), longer than running it unoptimised. Eager init is no faster:
# each op compiles on its own, optimised. The unoptimised init runs about 8x
# slower (0.18 against 0.02-0.03 CPU-microseconds a param), so above a few
# million params the optimised compile wins (benchmarks/startup.py). The
# values agree with the optimised compile's to the last bit or one ulp
# (floating-point contraction).
FAST_INIT_MAX_PARAMS = 4_000_000
FAST_INIT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _platform(shardings: Any) -> str:
  is_sharding = lambda s: isinstance(s, jax.sharding.Sharding)
  found = next((s for s in jax.tree.leaves(shardings, is_leaf=is_sharding) if is_sharding(s)), None)
  if found is None:
    return jax.default_backend()
  return next(iter(found.device_set)).platform


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
  """``tree`` with its floating leaves cast to ``dtype`` (others kept)."""
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def _is_linen(obj: Any) -> bool:
  return isinstance(obj, linen.Module)


class BridgedLinen(nnx.bridge.ToNNX):
  """``nnx.bridge.ToNNX`` of a registered Linen model: batch statistics update in training.

  Flax's imagenet example calls ``apply(..., mutable=["batch_stats"])`` in its
  train step; ``ToNNX`` calls with ``mutable=False`` unless told, so a Linen
  ``BatchNorm`` in training fails with "collection batch_stats is immutable".
  This wrapper makes the module's own non-parameter collections (those its
  init made: ``batch_stats``, ...; not ``intermediates``) mutable while the
  model is in training mode (``model.train()``, which the train step sets;
  ``model.eval()`` in the eval step), and the updated collections become the
  model's state, as in NNX. A call that passes ``mutable=`` itself is left
  as it is. Everything else is ``ToNNX``.
  """

  def __init__(self, module: linen.Module, rngs: Any = None):
    super().__init__(module, rngs=rngs)
    self.to_nnx__training = False

  # `Module.train()` / `.eval()` set `use_running_average` on every module that
  # has it (False / True), as for nnx.BatchNorm: the mode reaches the wrapper.
  @property
  def use_running_average(self) -> bool:
    return not self.to_nnx__training

  @use_running_average.setter
  def use_running_average(self, value: bool) -> None:
    self.to_nnx__training = not value

  def _state_collections(self) -> list[str]:
    attrs = [v for k, v in vars(self).items() if not k.startswith(("to_nnx__", "_pytree__"))]
    is_var = lambda x: isinstance(x, nnx.Variable)
    names = {nnx.variable_name_from_type(type(v)) for v in jax.tree.leaves(attrs, is_leaf=is_var)}
    return sorted(names - {"params", "intermediates"})

  def __call__(self, *args: Any, mutable: Any = None, **kwargs: Any) -> Any:
    if mutable is None and self.to_nnx__training:  # (lazy_init ignores it)
      mutable = self._state_collections() or None
    return super().__call__(*args, mutable=mutable, **kwargs)


def _concrete_inputs(example_inputs: Sequence[Any]) -> tuple[Any, ...]:
  # `example_inputs` may give shapes only (jax.ShapeDtypeStruct): a Linen init
  # computes with its inputs (a Conv's float(), an LSTM's argmax), so it gets
  # zeros of those shapes, built inside the trace of the (abstract or jitted)
  # init; the variables depend on the shapes only.
  is_shape = lambda x: isinstance(x, jax.ShapeDtypeStruct)
  return tuple(
    jax.tree.map(
      lambda x: jnp.zeros(x.shape, x.dtype) if is_shape(x) else x,
      tuple(example_inputs),
      is_leaf=is_shape,
    )
  )


def _bridge(module: linen.Module, example_inputs: Any, rngs: nnx.Rngs) -> nnx.Module:
  if example_inputs is None:
    raise ValueError(
      f"the Linen module {type(module).__name__} needs example inputs to initialise its "
      "variables: pass example_inputs=(x, ...) (one call's inputs), or register the model "
      "with register_model(..., example_inputs=fn)"
    )
  wrapped = BridgedLinen(module, rngs=rngs)
  inputs = _concrete_inputs(example_inputs)
  try:
    nnx.bridge.lazy_init(wrapped, *inputs)
  except TypeError as e:
    # Python's TypeError of a `__call__(self, x, train)` called with `x` alone
    # is raised in no frame of the user's code: say what the init passes.
    report = errors.describe_linen_init_call(module, inputs, e)
    if report is None:
      raise
    raise errors.UserCodeError(report) from e
  return wrapped


def _abstract_module(build: Callable[[], nnx.Module]) -> nnx.Module:
  """``build()``'s module with ``jax.ShapeDtypeStruct`` leaves, nothing allocated.

  ``nnx.eval_shape`` would also resolve every annotated variable's sharding
  against the current mesh, where a logical name (``"mlp"``) is not a mesh
  axis and fails; the run's shardings come from :meth:`TrainState.shardings`
  instead, which maps logical names through ``mesh.logical_axis_rules``.
  """
  graphdefs: list[Any] = []

  def state() -> nnx.State:
    graphdef, values = nnx.split(build())
    graphdefs.append(graphdef)
    return values

  values = jax.eval_shape(state)
  return nnx.merge(graphdefs[0], values)


def _check_has_params(target: masks.Target, module: nnx.Module) -> None:
  if target.entries:
    return
  bridged = any(isinstance(n, nnx.bridge.ToNNX) for _, n in nnx.iter_graph(module))
  hint = (
    "; an nnx.bridge.ToNNX creates its variables in lazy_init: build it as "
    "nnx.bridge.ToNNX(module, rngs=rngs).lazy_init(x)"
    if bridged
    else ""
  )
  raise ValueError(f"the model {type(module).__name__} has no nnx.Param to train{hint}")


def _resolve_model(model: Any, seed: int, example_inputs: tuple[Any, ...] | None):
  """``(build, module, target, types)`` of a module, a factory or a Linen module.

  ``build()`` makes the module (its params from ``seed``); ``module`` is the
  module itself or, for a factory, its abstract form (``jax.eval_shape``), with
  the classes of any Linen modules recorded as they initialise; ``target`` is
  what mask rules match against; ``types`` the module-type target.
  """
  if isinstance(model, nnx.Module):
    return (lambda: model), model, model, masks.module_target(model)
  if not (callable(model) or _is_linen(model)):
    raise TypeError(
      "create_train_state takes an nnx.Module, a factory rngs -> module, or a Linen module; "
      f"got {type(model).__name__}"
    )
  factory = (lambda rngs: model) if _is_linen(model) else model

  def build():
    out = factory(nnx.Rngs(seed))
    if _is_linen(out):
      out = _bridge(out, example_inputs, nnx.Rngs(seed))
    return out

  # Placement comes from jit's out_shardings; eager sharding would need a
  # mesh context for every annotated variable (flax 0.12).
  with nnx.use_eager_sharding(False), masks.LinenTypeRecorder() as recorder:
    module = _abstract_module(build)
  types = masks.module_target(module, recorder.calls)
  # With Linen parts, their classes are in `types`, not in the module.
  return build, module, (types if recorder.calls else module), types


def _frozen_paths(target: Any, rules: Any) -> frozenset[str]:
  """The param paths ``optimizer.freeze`` selects (none may be all of them)."""
  if not rules:
    return frozenset()
  try:
    values = masks.path_values(target, rules, default=False, what="freeze")
  except ValueError as e:
    raise ValueError(f"optimizer.freeze: {e}") from None
  frozen = frozenset(p for p, v in values.items() if v)
  if len(frozen) == len(values):
    raise ValueError("optimizer.freeze: selects every parameter; nothing would be trained")
  return frozen


def state_factory(
  model: nnx.Module | Callable[[nnx.Rngs], Any] | linen.Module,
  config: plan.RunConfig,
  *,
  example_inputs: tuple[Any, ...] | None = None,
  tx: optax.GradientTransformation | None = None,
) -> StateFactory:
  """The :class:`StateFactory` of a model under a config.

  The model is built once here, abstractly (``jax.eval_shape``: shapes,
  dtypes and annotations, no memory), under the current mesh if any (the
  trainer's: :func:`adamw_flax.sharding.use_mesh`), with the classes of any
  Linen modules recorded as they initialise (:class:`~adamw_flax.masks.LinenTypeRecorder`),
  so module-type rules (``default``, ``type:Dense``) see the Linen layers of
  a registered Linen model and of one the builder wrapped in
  ``nnx.bridge.ToNNX`` itself.

  Args:
    model: an ``nnx.Module``; a factory ``rngs -> module`` (preferred: the
      state can then be created directly in its shards), whose module may be
      NNX (or hold ``nnx.bridge.ToNNX`` parts) or Linen; or a Linen module.
    config: a full config or its :class:`~adamw_flax.plan.RunPlan`
      (``optimizer`` and ``trainer`` are read).
    example_inputs: one call's positional inputs, for Linen modules: arrays
      or ``jax.ShapeDtypeStruct`` (the init then sees zeros of that shape).
    tx: an optimizer to use instead of the one ``config.optimizer`` describes
      (its schedule is still the config's, for the ``lr`` metric).

  Returns:
    The factory.
  """
  run = plan.make_plan(config)
  seed = run.trainer.seed
  concrete = isinstance(model, nnx.Module)
  build, module, target, types = _resolve_model(model, seed, example_inputs)
  _check_has_params(types, module)
  module_types = dataclasses.replace(types, entries=[])
  frozen_paths = _frozen_paths(target, run.optimizer.freeze)

  opt = optim.optimizer_from_config(run.optimizer, target=target, seed=seed)
  params_dtype = run.optimizer.section.params_dtype
  tx = opt.tx if tx is None else tx
  specs: list[StateSpec] = []
  ema_dtype = jnp.dtype(run.trainer.ema_dtype)
  spikes = run.optimizer.spikes

  def extras(params: PyTree) -> Extra:
    return Extra(
      ema=jax.tree.map(lambda p: p.astype(ema_dtype), params) if run.trainer.ema else None,
      spikes=None if spikes is None else init_spike_stats(spikes.window),
    )

  def init() -> TrainState:
    with nnx.use_eager_sharding(False):
      module = build()
    graphdef, treedefs, (params, frozen, rest) = split_model(module, frozen_paths)
    if params_dtype is not None:  # trained params stored in this dtype (no float32 copy)
      params = cast_floating(params, jnp.dtype(params_dtype))
    if not specs:  # one spec for every trace of init, so all states share it
      specs.append(
        StateSpec(
          graphdef,
          treedefs,
          tx,
          opt.schedule,
          ema=run.trainer.ema,
          spikes=run.optimizer.spikes,
          module_types=module_types,
          offload=offload.parse(run.optimizer.section.get("offload", "")),
        )
      )
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      frozen=frozen,
      rest=rest,
      opt_state=tx.init(params),
      spec=specs[0],
      extra=extras(params),
    )

  return StateFactory(init=init, target=target, frozen_paths=frozen_paths, jit_init=not concrete)


def create_train_state(
  model: nnx.Module | Callable[[nnx.Rngs], Any] | linen.Module,
  config: plan.RunConfig,
  *,
  example_inputs: tuple[Any, ...] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  tx: optax.GradientTransformation | None = None,
  abstract: bool = False,
) -> TrainState:
  """Builds the train state of a model from a config.

  Args:
    model: an ``nnx.Module``; or a factory ``rngs -> module`` (preferred:
      with a mesh, the model is then created directly in its shards, never
      whole on one device), whose module may be NNX or Linen; or a Linen
      module (wrapped with ``nnx.bridge.ToNNX``; pass ``example_inputs``).
    config: a full config, or its :class:`~adamw_flax.plan.RunPlan`.
    example_inputs: positional inputs of one call, for Linen modules.
    mesh: place the state on this mesh with the shardings of
      :meth:`TrainState.shardings` (partition rules, the model's own
      annotations through ``mesh.logical_axis_rules``, ZeRO-1).
    tx: an optimizer to use instead of the one ``config.optimizer`` describes.
    abstract: return the state's shapes, dtypes (and, with a mesh,
      shardings) as ``jax.ShapeDtypeStruct`` leaves without allocating it.

  Returns:
    The :class:`TrainState` at step 0.
  """
  run = plan.make_plan(config)
  # The model is built (and Linen models initialised) under the mesh, as in training.
  with sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    factory = state_factory(model, run, example_inputs=example_inputs, tx=tx)
    return factory.build(mesh, run.mesh, abstract=abstract)


def with_shardings(abstract: TrainState, shardings: TrainState) -> TrainState:
  """``abstract``'s ``ShapeDtypeStruct`` leaves carrying ``shardings`` (a restore target).

  Weak types are kept, so a step lowered from this state is the program a
  call with the created state runs (the trainer's precompile).

  Args:
    abstract: from :meth:`StateFactory.abstract`.
    shardings: from :meth:`TrainState.shardings`.

  Returns:
    The abstract state with a sharding on every leaf.
  """
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=s, weak_type=getattr(x, "weak_type", False)
    ),
    abstract,
    shardings,
  )


def model_factory(config: plan.RunConfig, data_info: dict[str, Any]) -> Callable[[nnx.Rngs], Any]:
  """Returns ``rngs -> module`` for the registered model that ``config.model.name`` names.

  Args:
    config: a validated config or its plan.
    data_info: the dataset's ``info``.

  Returns:
    The factory.
  """
  entry = registry.MODELS.get(config.model.name)
  return lambda rngs: entry.build(config.model, rngs=rngs, data_info=dict(data_info))


def registered_state_factory(config: plan.RunConfig, data_info: dict[str, Any]) -> StateFactory:
  """The :class:`StateFactory` of the registered model a config names.

  Args:
    config: a validated full config, or its :class:`~adamw_flax.plan.RunPlan`.
    data_info: the dataset's ``info`` (e.g. ``vocab_size``), passed to the model builder.

  Returns:
    The factory (a Linen model gets its registered ``example_inputs``).
  """
  run = plan.make_plan(config)
  entry = registry.MODELS.get(run.model.name)
  inputs = entry.example_inputs(run.model, dict(data_info)) if entry.example_inputs else None
  return state_factory(model_factory(run, data_info), run, example_inputs=inputs)


def state_from_config(
  config: Any,
  data_info: dict[str, Any],
  *,
  mesh: jax.sharding.Mesh | None = None,
  abstract: bool = False,
) -> TrainState:
  """The train state of the registered model a config names (see :func:`create_train_state`).

  Args:
    config: a validated full config.
    data_info: the dataset's ``info`` (e.g. ``vocab_size``), passed to the model builder.
    mesh: place (or, abstract, annotate) the state on this mesh.
    abstract: return ``jax.ShapeDtypeStruct`` leaves (with shardings when a
      mesh is given) instead of arrays: a restore target built from the config
      alone, without allocating the state.

  Returns:
    A :class:`TrainState` at step 0, or its abstract form.
  """
  run = plan.make_plan(config)
  with sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    return registered_state_factory(run, data_info).build(mesh, run.mesh, abstract=abstract)


# Below this many scalars a tree's norm is taken over one concatenated vector:
# a small model's step is bound by per-op overhead, and one fused reduction
# instead of one per leaf (optax.global_norm) saves ~20% of its step time.
# Above it, per-leaf reductions avoid copying (and, sharded, gathering) the tree.
_CONCAT_NORM_MAX_SIZE = 1 << 22


def _tree_norm(tree: PyTree) -> jax.Array:
  leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)]
  if sum(x.size for x in leaves) <= _CONCAT_NORM_MAX_SIZE:
    flat = jnp.concatenate([x.ravel() for x in leaves])
    return jnp.sqrt(jnp.sum(jnp.square(flat)))
  return optax.global_norm(leaves)


def _finite_states(opt_state: Any) -> list[optax.ApplyIfFiniteState]:
  is_state = lambda x: isinstance(x, optax.ApplyIfFiniteState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]


def _accepts_rngs(fn: Callable[..., Any]) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == "rngs" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def init_spike_stats(window: int) -> SpikeStats:
  """The rolling statistics of :class:`~adamw_flax.plan.SpikeRule` before any step.

  Args:
    window: steps the statistics hold.

  Returns:
    ``loss`` and ``grad_norm`` buffers (float32, ``window``), ``count`` (steps
    seen) and ``skipped`` (spikes skipped), int32.
  """
  return SpikeStats(
    loss=jnp.zeros((window,), jnp.float32),
    grad_norm=jnp.zeros((window,), jnp.float32),
    count=jnp.zeros((), jnp.int32),
    skipped=jnp.zeros((), jnp.int32),
  )


def is_spike(stats: SpikeStats, rule: Any, loss: jax.Array, grad_norm: jax.Array):
  """Whether ``loss`` or ``grad_norm`` is beyond ``rule.threshold`` sigmas above the window's mean.

  The sample standard deviation (Bessel's N - 1, as OLMo-core and MaxText),
  floored at 1e-6 (as Levanter), so a window of equal values does not make
  every rise a spike by dividing by zero.

  Args:
    stats: from :func:`init_spike_stats` / :func:`push_spike_stats`.
    rule: the :class:`~adamw_flax.plan.SpikeRule`.
    loss: this step's loss.
    grad_norm: this step's gradient norm.

  Returns:
    A boolean scalar (False until ``rule.warmup`` steps are in the window).
  """
  window = stats.loss.shape[0]
  n = jnp.minimum(stats.count, window)
  valid = jnp.arange(window) < n

  def beyond(buf, x):
    mean = jnp.sum(jnp.where(valid, buf, 0.0)) / jnp.maximum(n, 1)
    var = jnp.sum(jnp.where(valid, jnp.square(buf - mean), 0.0)) / jnp.maximum(n - 1, 1)
    std = jnp.maximum(jnp.sqrt(var), 1e-6)
    return x.astype(jnp.float32) - mean > rule.threshold * std

  ready = n >= rule.warmup
  return ready & (beyond(stats.loss, loss) | beyond(stats.grad_norm, grad_norm))


def push_spike_stats(stats: SpikeStats, loss, grad_norm, finite, spike) -> SpikeStats:
  """The statistics after a step: its loss and gradient norm enter the window, skipped or not.

  As in the references, "so spikes can become the new baseline" (MaxText): a
  lasting rise of the loss stops being a spike once the window has seen it.
  A non-finite step (left to ``optimizer.skip_nonfinite``) does not enter.

  Args:
    stats: the statistics before.
    loss: this step's loss.
    grad_norm: this step's gradient norm.
    finite: whether both are finite.
    spike: whether the step was skipped as a spike.

  Returns:
    The new statistics.
  """
  window = stats.loss.shape[0]
  i = stats.count % window
  put = lambda buf, x: jnp.where(finite, buf.at[i].set(x.astype(jnp.float32)), buf)
  return SpikeStats(
    loss=put(stats.loss, loss),
    grad_norm=put(stats.grad_norm, grad_norm),
    count=stats.count + finite.astype(jnp.int32),
    skipped=stats.skipped + spike.astype(jnp.int32),
  )


# Optimizer-state nodes whose count drives a schedule (learning rate, decay
# strength): they advance on a step skipped as a spike, as the references'
# schedules do (OLMo-core, Levanter); Adam's count and moments stay.
_SCHEDULE_STATES = (optax.ScaleByScheduleState, transform.DecayedWeightsState)


def advance_schedules(opt_state: Any) -> Any:
  """``opt_state`` with the counts of its schedules advanced by one (nothing else changed).

  Args:
    opt_state: an optimizer state.

  Returns:
    The same tree, each ``ScaleByScheduleState`` / ``DecayedWeightsState`` count + 1.
  """
  is_node = lambda x: isinstance(x, _SCHEDULE_STATES)
  bump = lambda x: x._replace(count=optax.safe_increment(x.count)) if is_node(x) else x
  return jax.tree.map(bump, opt_state, is_leaf=is_node)


# A stream of the seed's random bits of its own, for the EMA's stochastic rounding.
_EMA_STREAM = 0x454D41


def update_ema(rule: plan.EmaRule, ema: PyTree, params: PyTree, count: jax.Array, seed: int):
  """The EMA after applied update ``count`` (1-based): float32 arithmetic, stored in its dtype.

  Args:
    rule: the :class:`~adamw_flax.plan.EmaRule`.
    ema: the EMA before.
    params: the params after the update.
    count: the update's 1-based count (the warmup and the rounding bits read it).
    seed: the run's seed (the stochastic rounding's bits).

  Returns:
    The new EMA, each leaf in its own dtype; bfloat16 leaves rounded stochastically.
  """
  decay = jnp.asarray(rule.decay, jnp.float32)
  if rule.warmup:
    t = count.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _EMA_STREAM), count)
  leaves, treedef = jax.tree.flatten(ema)
  out = []
  for i, (e, p) in enumerate(zip(leaves, treedef.flatten_up_to(params), strict=True)):
    new = decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)
    if e.dtype == jnp.bfloat16:
      bits = quantize.random_bits16(jax.random.fold_in(key, i), e.shape)
      new = quantize.round_to_bfloat16(new, "stochastic", bits)
    out.append(new.astype(e.dtype))
  return treedef.unflatten(out)


def step_key(seed: int, step: Any) -> jax.Array:
  """The RNG key of optimizer update ``step``: ``fold_in(key(seed), step)``.

  A pure function of the seed and the update count, so resuming, resharding
  and changing the process count give every step the same key. The train
  step passes ``nnx.Rngs(step_key(seed, step))`` (micro-batch ``i`` of an
  accumulated step: folded once more with ``i``) to a loss function that has
  an ``rngs`` parameter.

  Args:
    seed: ``trainer.seed``.
    step: the update count (an int or a traced scalar).

  Returns:
    A typed PRNG key.
  """
  return jax.random.fold_in(jax.random.key(seed), step)


def split_micro_batches(batch: Batch, k: int) -> Batch:
  """``batch`` (leading dimension ``B``) as ``k`` micro-batches: leaves ``(k, B // k, ...)``.

  Micro-batch ``i`` holds rows ``i, i + k, i + 2k, ...``: every device's
  contiguous block of a data-sharded batch contributes rows to every
  micro-batch, so each micro-batch stays sharded over all data devices.

  Examples:
    >>> import numpy as np
    >>> split_micro_batches({"x": np.arange(6)}, 3)["x"].tolist()
    [[0, 3], [1, 4], [2, 5]]

  Args:
    batch: a dict of arrays with a leading batch dimension.
    k: the number of micro-batches; must divide ``B``.

  Returns:
    The same dict, each leaf ``(k, B // k, ...)``.
  """

  def one(x):
    if x.shape[0] % k:
      raise ValueError(
        f"a batch of {x.shape[0]} rows does not split into optimizer.accumulate_steps={k} "
        "micro-batches; make data.batch_size a multiple of it"
      )
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(one, batch)


def _check_loss_output(
  loss_fn: LossFn, out: Any, batch: Batch, *, train: bool, scalar_metrics: bool = False
) -> tuple[Any, Mapping[str, Any]]:
  """``loss_fn``'s ``(loss, metrics)``, checked while the step is traced: shapes are known then.

  ``jax.grad`` of a loss of shape ``(16,)`` (a forgotten ``.mean()``) fails in
  JAX's frames with no word of the loss function; a metric that is not a
  scalar would fail only when the trainer logs it, steps later.

  Args:
    loss_fn: the user's loss function (named in the report).
    out: what it returned.
    batch: the batch it got (described in the report).
    train: whether this is the train step (else the eval step).
    scalar_metrics: require every metric to be a scalar (the trainer logs
      each as one float).

  Returns:
    ``(loss, metrics)``.

  Raises:
    UserCodeError: ``out`` is not a pair, the loss is not a scalar, the
      metrics are not a dict (of scalars, with ``scalar_metrics``).
  """
  fn = inspect.unwrap(loss_fn)
  name = getattr(fn, "__qualname__", type(fn).__name__)
  rerun = "then rerun the same command"

  def fail(problem: str, advice: str):
    report = errors.describe_user_value(
      problem, errors.TRAIN_STEP if train else errors.EVAL_STEP, fn, advice, batch=batch
    )
    raise errors.UserCodeError(report)

  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    got = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
    fail(
      f"the loss function {name} returned {got}, not (loss, metrics)",
      f"return the scalar loss and a dict of scalar metrics: return loss, {{}}; {rerun}",
    )
  loss, metrics = out
  if np.shape(loss) != ():
    fail(
      f"the loss function {name} returned a loss of shape {np.shape(loss)} "
      f"({getattr(loss, 'dtype', type(loss).__name__)}); the loss must be a scalar",
      "reduce it to one number, the mean over the batch's rows: return loss.mean(), metrics "
      f"(jax.grad needs a scalar; the mean keeps optimizer.accumulate_steps exact); {rerun}",
    )
  if not isinstance(metrics, Mapping):
    fail(
      f"the loss function {name} returned metrics of type {type(metrics).__name__}, not a dict",
      f"return the loss and a dict name -> scalar: return loss, {{'accuracy': acc}}; {rerun}",
    )
  for key, value in metrics.items() if scalar_metrics else ():
    if not hasattr(value, "shape") and not isinstance(value, (int, float, np.number)):
      fail(
        f"the loss function {name} returned the metric {key!r} as a {type(value).__name__}; "
        "a metric must be a scalar",
        f"make it one number per batch (the trainer logs each metric as a float); {rerun}",
      )
    if np.shape(value) != ():
      fail(
        f"the loss function {name} returned the metric {key!r} of shape {np.shape(value)} "
        f"({getattr(value, 'dtype', '')}); a metric must be a scalar",
        f"reduce it to one number per batch, e.g. its mean over the rows, jnp.mean(...) (the "
        f"trainer logs each metric as one float per step); {rerun}",
      )
  return loss, metrics


def _scalar_metrics(loss_fn: LossFn) -> LossFn:
  """``loss_fn`` whose metrics are checked to be scalars when a step is traced (the trainer's)."""

  @functools.wraps(loss_fn)  # its signature too: whether it takes `rngs`
  def checked(model, batch, *, train, **kwargs):
    out = loss_fn(model, batch, train=train, **kwargs)
    return _check_loss_output(loss_fn, out, batch, train=train, scalar_metrics=True)

  return checked


def _loss_and_grads(state: TrainState, batch: Batch, loss_fn: LossFn, k: int, key, wants_rngs):
  """Loss, the loss function's metrics, the new model state and the gradients (accumulated)."""

  def compute_loss(params, rest, batch, key):
    model = state.merge(params, rest)
    model.train()
    extra = {"rngs": nnx.Rngs(key)} if wants_rngs else {}
    out = loss_fn(model, batch, train=True, **extra)
    loss, aux = _check_loss_output(loss_fn, out, batch, train=True)
    new_rest = _to_pure(nnx.state(model, nnx.Not(nnx.Param)))
    return loss, (aux, new_rest)

  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  if k == 1:
    (loss, (aux, rest)), grads = grad_fn(state.params, state.rest, batch, key)
    return loss, aux, rest, grads
  micro = split_micro_batches(batch, k)

  def body(carry, xs):
    grads_sum, rest, loss_sum, aux_sum = carry
    mb, i = xs
    (loss, (aux, rest)), g = grad_fn(state.params, rest, mb, jax.random.fold_in(key, i))
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    return (add(grads_sum, g), rest, loss_sum + loss, add(aux_sum, aux)), None

  first = jax.tree.map(lambda x: x[0], micro)
  (loss_shape, (aux_shape, _)), _ = jax.eval_shape(grad_fn, state.params, state.rest, first, key)
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  carry = (zeros(state.params), state.rest, zeros(loss_shape), zeros(aux_shape))
  (grads, rest, loss, aux), _ = jax.lax.scan(body, carry, (micro, jnp.arange(k)))
  mean = lambda tree: jax.tree.map(lambda x: x / k, tree)
  return loss / k, mean(aux), rest, mean(grads)


def _apply_update(state: TrainState, grads: PyTree, skip: jax.Array | None):
  """``(params, opt_state, updates)`` after the optimizer update, or kept when ``skip`` is true.

  A skipped update is a branch that never computes the update; its
  schedules still advance (:func:`advance_schedules`).
  """

  def apply():
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, updates

  if skip is None:
    return apply()
  shapes = jax.eval_shape(apply)[2]
  keep = lambda: (
    state.params,
    advance_schedules(state.opt_state),
    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
  )
  return jax.lax.cond(skip, keep, apply)


def _step_rules(state: TrainState, spikes: Any, ema_decay: float | None):
  """The spike and EMA rules of a step: the state's own (its spec), checked against arguments."""
  spec_spikes, spec_ema = state.spec.spikes, state.spec.ema
  if spikes is not None and spec_spikes is None and state.extra.spikes is None:
    raise ValueError(
      "make_train_step(spikes=...): the state has no spike statistics; build it with "
      "optimizer.skip_spikes=True (its rule then comes with the state)"
    )
  # A state whose extra lacks them (state.replace(extra={})) steps without them.
  rule = spikes if spikes is not None else (spec_spikes if state.extra.spikes is not None else None)
  ema = spec_ema if state.extra.ema is not None else None
  if ema_decay is not None:
    if spec_ema is not None and float(ema_decay) != spec_ema.decay:
      raise ValueError(
        f"make_train_step(ema_decay={ema_decay}) disagrees with the state's EMA decay "
        f"{spec_ema.decay} (trainer.ema_decay); leave ema_decay unset to use the state's"
      )
    if ema_decay and state.extra.ema is None:
      raise ValueError("make_train_step(ema_decay=...): the state has no EMA (trainer.ema_decay)")
    if spec_ema is None and ema_decay:
      ema = plan.EmaRule(float(ema_decay))
  return rule, ema


def make_train_step(
  loss_fn: LossFn,
  *,
  donate: bool = True,
  batch_sharding: Any = None,
  state_sharding: Any = None,
  accumulate_steps: int = 1,
  seed: int = 0,
  spikes: Any = None,
  ema_decay: float | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Returns the compiled train step ``step(state, batch) -> (state, metrics)``.

  One call is one step: ``state.step`` counts steps, and the schedules are
  read at that count. With ``accumulate_steps=k`` the batch is split into
  ``k`` micro-batches (:func:`split_micro_batches`) whose gradients are
  averaged inside the step (a ``jax.lax.scan``): the update, the schedule and
  the data order are those of ``k=1`` up to float summation order, and only
  the activations' peak memory shrinks (MaxText's and nanodo's accumulation).
  A non-finite update skipped by ``optimizer.skip_nonfinite``
  (``optax.apply_if_finite``) leaves the whole state as it was, ``step``
  included. An update skipped as a spike (:class:`~adamw_flax.plan.SpikeRule`)
  counts as a step: ``step`` and the schedules advance, params, moments, model
  state and EMA stay.

  The step's parts, each one job: gradients (:func:`_loss_and_grads`, with
  accumulation), the update decision (spike; non-finite is
  ``optax.apply_if_finite``'s inside the optimizer), applying the update
  (:func:`_apply_update`, rounding is the optimizer's last transform), the EMA
  (:func:`update_ema`), metrics.

  Args:
    loss_fn: ``loss_fn(model, batch, *, train) -> (loss, metrics)`` where
      ``model`` is the NNX module (re-assembled inside the trace, in
      ``model.train()`` mode). If it has an ``rngs`` parameter it gets
      ``rngs=nnx.Rngs(key)`` with the key of :func:`step_key`, for dropout
      (``nnx.Dropout(rate)(x, rngs=rngs)``). The loss must be a scalar, a
      mean over the batch's rows for accumulation to give the same update,
      and ``metrics`` a dict; both are checked when the step is traced (a
      :class:`~adamw_flax.errors.UserCodeError` naming the loss function).
    donate: donate the input state's buffers to the output (the caller must
      not use the old state after the call).
    batch_sharding: sharding of the batch (a ``jax.sharding.Sharding``), if any.
    state_sharding: shardings of the state pytree, if any; the output keeps them.
    accumulate_steps: micro-batches per update.
    seed: the run's seed, for the loss's RNG keys and the EMA's rounding.
    spikes: a :class:`~adamw_flax.plan.SpikeRule` overriding the state's own
      (``optimizer.skip_spikes``; the state must hold ``extra.spikes``).
      Default: the state's.
    ema_decay: checked against the state's EMA decay (``trainer.ema_decay``);
      default: the state's, which is the one source of the EMA's settings.

  Returns:
    A ``jax.jit``-compiled function. Metrics: ``loss`` (mean over the
    micro-batches), ``lr`` (applied at this step), ``grad_norm``,
    ``update_norm``, ``applied`` (1, or 0 for a skipped update), ``skipped``
    (total non-finite updates skipped so far), with spike skipping ``spike``
    and ``skipped_spikes``, and the loss function's own metrics (means over the
    micro-batches).
  """
  k = int(accumulate_steps)
  if k < 1:
    raise ValueError(f"accumulate_steps must be >= 1, got {k}")
  wants_rngs = _accepts_rngs(loss_fn)

  opt_shardings = None if state_sharding is None else state_sharding.opt_state

  def step(state: TrainState, batch: Batch):
    # optimizer.offload: the state's host-memory leaves, in device memory for the update.
    state = state.replace(opt_state=offload.to_device(state.opt_state, opt_shardings))
    rule, ema = _step_rules(state, spikes, ema_decay)
    key = step_key(seed, state.step)
    loss, aux, rest, grads = _loss_and_grads(state, batch, loss_fn, k, key, wants_rngs)
    grad_norm = _tree_norm(grads)
    extra = state.extra
    spike = jnp.zeros((), jnp.bool_)
    if rule is not None:  # decided before the update, which a spike skips altogether
      finite_inputs = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # non-finite: apply_if_finite
      spike = finite_inputs & is_spike(extra.spikes, rule, loss, grad_norm)
      extra = extra.replace(
        spikes=push_spike_stats(extra.spikes, loss, grad_norm, finite_inputs, spike)
      )
    params, opt_state, updates = _apply_update(state, grads, spike if rule is not None else None)
    finite = _finite_states(opt_state)
    applied, skipped = ~spike, jnp.zeros((), jnp.int32)
    if finite:
      applied = applied & jnp.logical_and.reduce(jnp.stack([s.last_finite for s in finite]))
      skipped = sum(s.total_notfinite for s in finite)
    counted = applied | spike  # a spike consumes its step; a non-finite update moves no counter
    new_step = state.step + counted.astype(state.step.dtype)
    if ema is not None:
      extra = extra.replace(ema=update_ema(ema, extra.ema, params, new_step, seed))
    # A skipped update leaves the state as it was: optax.apply_if_finite keeps
    # params and moments on a non-finite one (and counts it), a spike skips
    # the update above; the model state and the EMA are kept here.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, old)
    if finite or rule is not None:
      rest = keep(rest, state.rest)
      if ema is not None:
        extra = extra.replace(ema=keep(extra.ema, state.extra.ema))
    metrics = {
      "loss": loss,
      "lr": jnp.asarray(state.lr_fn(state.step), jnp.float32),
      "grad_norm": grad_norm,
      "update_norm": _tree_norm(updates),
      "applied": applied.astype(jnp.int32),
      "skipped": jnp.asarray(skipped, jnp.int32),
      **aux,
    }
    if rule is not None:
      metrics["spike"] = spike.astype(jnp.int32)
      metrics["skipped_spikes"] = extra.spikes.skipped
    opt_state = offload.to_host(opt_state, opt_shardings)  # back to host memory, if offloaded
    new_state = state.replace(
      step=new_step, params=params, rest=rest, opt_state=opt_state, extra=extra
    )
    return new_state, metrics

  kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
  if state_sharding is not None or batch_sharding is not None:
    kwargs["in_shardings"] = (state_sharding, batch_sharding)
    kwargs["out_shardings"] = (state_sharding, None)
  # Traced under the state's mesh: the model's own P(...) activation constraints need one.
  return jax.jit(sharding.traced_under_mesh(step, state_sharding), **kwargs)


def make_eval_step(
  loss_fn: LossFn,
  *,
  batch_sharding: Any = None,
  state_sharding: Any = None,
  seed: int = 0,
  ema: bool = False,
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """Returns the compiled ``eval_step(state, batch) -> metrics``.

  The model is in ``model.eval()`` mode and the loss gets ``train=False``
  (and, if it takes ``rngs``, a fixed key from ``seed``).

  Args:
    loss_fn: as for :func:`make_train_step`.
    batch_sharding: sharding of the batch, if any.
    state_sharding: shardings of the state, if any.
    seed: the run's seed, for a loss that takes ``rngs``.
    ema: evaluate the EMA of the params (``state.extra.ema``) instead.

  Returns:
    A ``jax.jit``-compiled function ``(state, batch) -> metrics``.
  """
  wants_rngs = _accepts_rngs(loss_fn)

  def eval_step(state: TrainState, batch: Batch):
    params = None
    if ema:  # the EMA weights, in the params' dtypes
      params = jax.tree.map(lambda e, p: e.astype(p.dtype), state.extra.ema, state.params)
    model = state.merge(params)
    model.eval()
    extra = {"rngs": nnx.Rngs(jax.random.key(seed))} if wants_rngs else {}
    out = loss_fn(model, batch, train=False, **extra)
    loss, aux = _check_loss_output(loss_fn, out, batch, train=False)
    return {"loss": loss, **aux}

  kwargs: dict[str, Any] = {}
  if state_sharding is not None or batch_sharding is not None:
    kwargs["in_shardings"] = (state_sharding, batch_sharding)
  # Traced under the state's mesh: the model's own P(...) activation constraints need one.
  return jax.jit(sharding.traced_under_mesh(eval_step, state_sharding), **kwargs)


@dataclasses.dataclass(frozen=True)
class RunSteps:
  """The compiled steps of a run, as ``python -m train`` runs them.

  Attributes:
    train: the train step (:func:`make_train_step`), state donated.
    evals: ``metric prefix -> eval step`` (``""``: the params; ``"ema_"``: the
      EMA weights, when the run keeps an EMA).
  """

  train: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
  evals: dict[str, Callable[[TrainState, Batch], dict[str, jax.Array]]]


def make_run_steps(
  run: Any, loss_fn: LossFn, *, state_sharding: Any = None, batch_sharding: Any = None
) -> RunSteps:
  """The train and eval steps a run plan describes: the trainer's and ``train.compile``'s.

  Args:
    run: the :class:`~adamw_flax.plan.RunPlan` (or a full config).
    loss_fn: the registered model's loss.
    state_sharding: shardings of the state (a :class:`TrainState` of shardings), if any.
    batch_sharding: sharding of a batch, if any.

  Returns:
    The :class:`RunSteps`; their tracing checks that every metric of the
    loss is a scalar (:func:`_check_loss_output`).
  """
  run = plan.make_plan(run)
  tc = run.trainer
  placed = {"state_sharding": state_sharding, "batch_sharding": batch_sharding}
  # The trainer logs every metric as one float: a non-scalar one is an error
  # when the step is traced, not a traceback at the first log step.
  loss_fn = _scalar_metrics(loss_fn)
  train = make_train_step(
    loss_fn, accumulate_steps=run.optimizer.accumulate_steps, seed=tc.seed, **placed
  )
  evals = {"": make_eval_step(loss_fn, seed=tc.seed, **placed)}
  if tc.ema_decay:  # the EMA weights too: metrics "ema_loss", ...
    evals["ema_"] = make_eval_step(loss_fn, seed=tc.seed, ema=True, **placed)
  return RunSteps(train=train, evals=evals)


def param_count(tree: PyTree) -> int:
  """Number of scalars in a tree of arrays.

  Args:
    tree: a tree of arrays or ``ShapeDtypeStruct``.

  Returns:
    The count.
  """
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
