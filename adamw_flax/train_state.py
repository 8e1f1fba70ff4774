"""The train state of an NNX (or Linen) model and its compiled step.

:func:`create_train_state` splits a model once into its graph definition and
three trees of plain arrays (trainable params, frozen params, the rest:
batch statistics, RNG state, ...) and builds the optimizer state through
:func:`adamw_flax.optimizer_from_config`. The :class:`TrainState` is a pytree
of arrays only, so it jits, shards and checkpoints like any pytree; the
graph definition, optimizer and learning-rate schedule are static fields.

:func:`make_train_step` returns ``jax.jit`` of a pure function
``(state, batch) -> (state, metrics)``, with the state donated. The module is
re-assembled with ``nnx.merge`` inside the trace only, so a call costs what a
hand-written ``jax.jit`` step over ``(params, opt_state)`` costs, not the
graph traversal that ``nnx.jit`` pays on every call (flax PR 4399).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from adamw_flax import masks

PyTree = Any
Batch = dict[str, Any]
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


class StateSpec:
  """The static parts of a :class:`TrainState`: graph definition, optimizer, schedule.

  Compared and hashed by identity: ``jax.jit`` hashes a pytree's static data
  on every call, and hashing an NNX ``GraphDef`` costs about 0.5 ms, more than
  a small model's whole step. Every state of a run shares one spec.
  """

  def __init__(self, graphdef: Any, templates: Any, tx: optax.GradientTransformation, lr_fn: Any):
    self.graphdef = graphdef
    self.templates = templates
    self.tx = tx
    self.lr_fn = lr_fn

  __hash__ = object.__hash__
  __eq__ = object.__eq__


class TrainState(struct.PyTreeNode):
  """Everything a training run updates, as a pytree of arrays.

  Attributes:
    step: int32 scalar, the number of train steps taken (the one step counter
      of the run: schedules and logs read it).
    params: trainable parameters, a nested dict of arrays.
    frozen: parameters excluded from training by ``optimizer.freeze`` rules
      (no gradients, no optimizer state).
    rest: the module's non-parameter state (batch statistics, RNG keys and
      counters, ...), updated by the forward pass.
    opt_state: the optimizer state of ``params``.
    spec: the static parts (graph definition, optimizer, schedule); also
      available as ``graphdef``, ``tx`` and ``lr_fn``.
  """

  step: jax.Array
  params: PyTree
  frozen: PyTree
  rest: PyTree
  opt_state: optax.OptState
  spec: StateSpec = struct.field(pytree_node=False)

  @property
  def graphdef(self) -> Any:
    return self.spec.graphdef

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.spec.tx

  @property
  def lr_fn(self) -> Callable[[Any], Any]:
    return self.spec.lr_fn

  def merge(self, params: PyTree | None = None) -> nnx.Module:
    """Returns the NNX module holding ``params`` (default: ``self.params``)."""
    params = self.params if params is None else params
    states = [
      _from_pure(t, tree)
      for t, tree in zip(self.spec.templates, (params, self.frozen, self.rest), strict=True)
    ]
    return nnx.merge(self.graphdef, *states)

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
  """Splits ``model`` into (graphdef, state treedefs, (params, frozen, rest) pure dicts)."""
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


def _as_nnx(model: Any, example_inputs: tuple[Any, ...] | None, seed: int) -> nnx.Module:
  from flax import linen

  if isinstance(model, linen.Module):
    if example_inputs is None:
      raise ValueError(
        "a Linen module needs example_inputs=(x, ...) to initialise its variables; pass the "
        "inputs of one call (a batch of the right shape and dtype)"
      )
    wrapped = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(seed))
    nnx.bridge.lazy_init(wrapped, *example_inputs)
    return wrapped
  if not isinstance(model, nnx.Module):
    raise TypeError(
      f"create_train_state takes an nnx.Module, a factory rngs -> nnx.Module, or a Linen module; "
      f"got {type(model).__name__}"
    )
  return model


def create_train_state(
  model: nnx.Module | Callable[[nnx.Rngs], nnx.Module] | Any,
  config: ml_collections.ConfigDict,
  *,
  example_inputs: tuple[Any, ...] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  tx: optax.GradientTransformation | None = None,
  abstract: bool = False,
) -> TrainState:
  """Builds the train state of a model from a config.

  Args:
    model: an ``nnx.Module``; or a factory ``rngs -> nnx.Module`` (preferred:
      with a mesh, the model is then created directly in its shards, never
      whole on one device); or a Linen module (wrapped with
      ``nnx.bridge.ToNNX``; pass ``example_inputs``).
    config: a full config (``optimizer`` and ``trainer`` sections are read;
      ``mesh`` when ``mesh`` is given).
    example_inputs: positional inputs of one call, for Linen modules.
    mesh: place the state on this mesh with the shardings of
      :func:`adamw_flax.sharding.state_shardings`.
    tx: an optimizer to use instead of the one ``config.optimizer`` describes.
    abstract: return the state's shapes, dtypes (and, with a mesh,
      shardings) as ``jax.ShapeDtypeStruct`` leaves without allocating it.

  Returns:
    The :class:`TrainState` at step 0.
  """
  from adamw_flax import schedules
  from adamw_flax.config import _parse_rules, optimizer_from_config

  seed = int(config.trainer.seed)
  num_steps = int(config.trainer.num_steps)
  freeze_rules = _parse_rules(config.optimizer.freeze, "freeze")

  if callable(model) and not isinstance(model, nnx.Module) and not _is_linen(model):
    factory = model
    with nnx.use_eager_sharding(False):
      abstract_model = nnx.eval_shape(lambda: factory(nnx.Rngs(seed)))
  else:
    factory = None
    linen_module = model if _is_linen(model) else None
    model = _as_nnx(model, example_inputs, seed)
    abstract_model = model
    if linen_module is not None:
      # Module-type rules need the Linen layer classes, which ToNNX hides;
      # this target carries them, under the same paths as the wrapped state.
      abstract_model = masks.linen_target(linen_module, *example_inputs)

  frozen_paths: frozenset[str] = frozenset()
  if freeze_rules:
    values = masks.path_values(abstract_model, freeze_rules, default=False, what="freeze")
    frozen_paths = frozenset(p for p, v in values.items() if v)
    if len(frozen_paths) == len(values):
      raise ValueError("optimizer.freeze selects every parameter: nothing would be trained")

  if tx is None:
    tx = optimizer_from_config(config.optimizer, num_steps=num_steps, target=abstract_model)
  lr_fn = schedules.schedule_from_config(config.optimizer, num_steps)
  accumulate = int(config.optimizer.get("accumulate_steps", 1))
  if accumulate > 1:
    base_lr = lr_fn
    lr_fn = lambda step: base_lr(step // accumulate)

  specs: list[StateSpec] = []

  def build_from(module: nnx.Module) -> TrainState:
    graphdef, treedefs, (params, frozen, rest) = split_model(module, frozen_paths)
    if not specs:  # one spec for every trace of init, so all states share it
      specs.append(StateSpec(graphdef, treedefs, tx, lr_fn))
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      frozen=frozen,
      rest=rest,
      opt_state=tx.init(params),
      spec=specs[0],
    )

  if factory is not None:

    def init():
      # Placement comes from jit's out_shardings; eager sharding would need a
      # mesh context for every annotated variable (flax 0.12).
      with nnx.use_eager_sharding(False):
        return build_from(factory(nnx.Rngs(seed)))

  else:
    init = lambda: build_from(model)

  if abstract:
    out = jax.eval_shape(init)
    if mesh is not None:
      from adamw_flax import sharding

      shardings = sharding.state_shardings(out, mesh, config.mesh)
      out = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), out, shardings
      )
    return out
  if mesh is None:
    return jax.jit(init)() if factory is not None else init()

  from adamw_flax import sharding

  shardings = sharding.state_shardings(jax.eval_shape(init), mesh, config.mesh)
  if factory is not None:
    return jax.jit(init, out_shardings=shardings)()
  return jax.device_put(init(), shardings)


def model_factory(
  config: ml_collections.ConfigDict, data_info: dict[str, Any]
) -> Callable[[nnx.Rngs], nnx.Module]:
  """Returns ``rngs -> module`` for the registered model that ``config.model.name`` names."""
  from adamw_flax import registry

  entry = registry.MODELS.get(config.model.name)
  return lambda rngs: entry.build(config.model, rngs=rngs, data_info=dict(data_info))


def state_from_config(
  config: ml_collections.ConfigDict,
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
  return create_train_state(model_factory(config, data_info), config, mesh=mesh, abstract=abstract)


def _is_linen(obj: Any) -> bool:
  from flax import linen

  return isinstance(obj, linen.Module)


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


def _skipped_steps(opt_state: Any) -> jax.Array:
  """Total non-finite steps skipped by ``optax.apply_if_finite`` inside ``opt_state``."""
  found = [
    s.total_notfinite
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState))
    if isinstance(s, optax.ApplyIfFiniteState)
  ]
  return sum(found) if found else jnp.zeros((), jnp.int32)


def make_train_step(
  loss_fn: LossFn,
  *,
  donate: bool = True,
  batch_sharding: Any = None,
  state_sharding: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Returns the compiled train step ``step(state, batch) -> (state, metrics)``.

  Args:
    loss_fn: ``loss_fn(model, batch, *, train) -> (loss, metrics)`` where
      ``model`` is the NNX module (re-assembled inside the trace).
    donate: donate the input state's buffers to the output (the caller must
      not use the old state after the call).
    batch_sharding: sharding of the batch (a ``jax.sharding.Sharding``), if any.
    state_sharding: shardings of the state pytree, if any; the output keeps them.

  Returns:
    A ``jax.jit``-compiled function. Metrics: ``loss``, ``lr`` (at this step),
    ``grad_norm``, ``update_norm``, ``skipped`` (total non-finite steps
    skipped so far) and the loss function's own metrics.
  """

  def step(state: TrainState, batch: Batch):
    def compute_loss(params):
      model = state.merge(params)
      loss, aux = loss_fn(model, batch, train=True)
      rest = _to_pure(nnx.state(model, nnx.Not(nnx.Param)))
      return loss, (aux, rest)

    (loss, (aux, rest)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": loss,
      "lr": jnp.asarray(state.lr_fn(state.step), jnp.float32),
      "grad_norm": _tree_norm(grads),
      "update_norm": _tree_norm(updates),
      "skipped": _skipped_steps(opt_state),
      **aux,
    }
    new_state = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
    return new_state, metrics

  kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
  if state_sharding is not None or batch_sharding is not None:
    kwargs["in_shardings"] = (state_sharding, batch_sharding)
    kwargs["out_shardings"] = (state_sharding, None)
  return jax.jit(step, **kwargs)


def make_eval_step(
  loss_fn: LossFn, *, batch_sharding: Any = None, state_sharding: Any = None
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """Returns the compiled ``eval_step(state, batch) -> metrics`` (``train=False``)."""

  def eval_step(state: TrainState, batch: Batch):
    loss, aux = loss_fn(state.merge(), batch, train=False)
    return {"loss": loss, **aux}

  kwargs: dict[str, Any] = {}
  if state_sharding is not None or batch_sharding is not None:
    kwargs["in_shardings"] = (state_sharding, batch_sharding)
  return jax.jit(eval_step, **kwargs)


def param_count(tree: PyTree) -> int:
  """Number of scalars in a tree of arrays."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
