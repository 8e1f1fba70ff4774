"""The optimizer a run plan describes: the optax chain and its learning-rate schedule.

:func:`optimizer_from_config` builds, in order: gradient clipping
(``grad_clip_norm``), the registered optimizer (``name``) with its schedule and
weight-decay mask, update-RMS clipping (``update_rms_clip``), per-group
learning-rate multipliers (``lr_multipliers``),
and skipping of non-finite updates (``skip_nonfinite``, ``optax.apply_if_finite``).
Gradient accumulation is not an optimizer wrapper here: the train step splits
its batch into ``accumulate_steps`` micro-batches (see
:func:`adamw_flax.train_state.make_train_step`), so one optimizer update is one
step of the run, and the schedule counts updates.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamw_flax import masks, plan, registry, schedules, transform


@contextlib.contextmanager
def _naming(key: str) -> Iterator[None]:
  # Rules are checked against the model here: the error names the config key.
  try:
    yield
  except ValueError as e:
    raise ValueError(f"{key}: {e}") from None


class Optimizer(NamedTuple):
  """What :func:`optimizer_from_config` returns.

  Attributes:
    tx: the optax transformation (``init``/``update``).
    schedule: step -> learning rate applied at that optimizer update (also
      for a constant rate), read by the train step for its ``lr`` metric.
  """

  tx: optax.GradientTransformationExtraArgs
  schedule: optax.Schedule


def scale_by_multipliers(multipliers: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Multiplies each update leaf by its scalar from ``multipliers(updates)``.

  optax has no per-leaf constant scaling (``optax.multi_transform`` would
  split the optimizer state by group, changing its tree); this keeps the
  state of the wrapped optimizer as it is.

  Args:
    multipliers: ``updates tree -> tree of floats`` of the same structure
      (e.g. :func:`adamw_flax.masks.lr_multiplier_fn`).

  Returns:
    A stateless ``optax.GradientTransformation``.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    factors = multipliers(updates)
    updates = jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors)
    return updates, state

  return optax.GradientTransformation(init, update)


def widen_updates() -> optax.GradientTransformation:
  """Casts 16-bit floating updates (gradients) to float32; stateless.

  optax has no dtype-casting transform; this keeps the rest of the chain's
  arithmetic, and its outputs, in float32 for 16-bit params.

  Returns:
    An ``optax.GradientTransformation`` with an ``optax.EmptyState``.
  """

  def update(updates, state, params=None):
    del params
    widen = lambda u: u.astype(jnp.float32) if u.dtype in (jnp.bfloat16, jnp.float16) else u
    return jax.tree.map(widen, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ClipUpdateRmsState(NamedTuple):
  """State of :func:`clip_update_rms`: the update count (reads the schedule)."""

  count: jax.Array


def clip_update_rms(max_rms: float, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Scales each tensor's update down to an RMS of at most ``max_rms * lr(t)``.

  optax clips gradients, not updates. Adam's update is about ``lr(t)`` per
  element; a tensor whose update RMS exceeds ``max_rms`` times that (a rare
  gradient of a tensor whose second moment is still small) is scaled back,
  as Levanter's ``update_rms_clipping`` and StableAdamW do.

  Args:
    max_rms: the bound, in units of the learning rate.
    schedule: the learning-rate schedule the updates were scaled by.

  Returns:
    An ``optax.GradientTransformation``.
  """

  def init(params):
    del params
    return ClipUpdateRmsState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    bound = max_rms * jnp.asarray(schedule(state.count), jnp.float32)

    def leaf(u):
      rms = jnp.sqrt(jnp.mean(jnp.square(u.astype(jnp.float32))))
      scale = jnp.where(rms > bound, bound / jnp.maximum(rms, 1e-30), 1.0)
      return (u * scale).astype(u.dtype)

    return jax.tree.map(leaf, updates), ClipUpdateRmsState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def _quantize_mask(p: plan.OptimizerPlan, target: Any) -> Any:
  """``params -> bools``: where 8-bit moments may be used (not ``float_moments``); None: all."""
  if "int8" not in (p.section.mu_dtype, p.section.nu_dtype) or not p.float_moments:
    return None
  with _naming("optimizer.float_moments"):
    keep_float = masks.RuleFn(
      p.float_moments, target, default=False, what="float_moments", value_type=bool
    )
  return lambda params: jax.tree.map(lambda f: not f, keep_float(params))


def optimizer_from_config(
  cfg: Any, *, num_steps: int | None = None, target: Any = None, seed: int = 0
) -> Optimizer:
  """Builds the optimizer chain and schedule that ``config.optimizer`` describes.

  Frozen parameters (``freeze``) are removed from the trained tree by
  :func:`adamw_flax.create_train_state`, so they never reach this optimizer.

  Args:
    cfg: the ``optimizer`` section of a validated config, or its
      :class:`~adamw_flax.plan.OptimizerPlan`.
    num_steps: the run's optimizer updates, for schedules whose
      ``decay_steps`` is 0 (ignored for a plan, which carries it).
    target: the model (NNX module, :class:`~adamw_flax.masks.LinenTarget`, or a
      params tree) that mask and multiplier rules are resolved against;
      needed for rules on module types.
    seed: the seed of ``params_rounding="stochastic"`` (the run's ``trainer.seed``).

  Returns:
    An :class:`Optimizer` ``(tx, schedule)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adamw_flax import config
    >>> cfg = config.default_config().optimizer
    >>> cfg.weight_decay_mask = "all"
    >>> tx, schedule = optimizer_from_config(cfg)
    >>> state = tx.init({"w": jnp.ones(3)})
    >>> float(schedule(10))
    0.001
  """
  p = plan.as_optimizer_plan(cfg, num_steps)
  section = p.section
  lr_fn = schedules.schedule_from_config(section, p.num_steps or None)
  lr: Any = lr_fn
  if section.schedule == "constant" and not section.warmup_steps:
    lr = float(section.learning_rate)  # a scalar keeps the state tree of optax.adamw(lr)
  mask = None
  # No decay, or decay of everything, needs no mask: the optimizer state is
  # then exactly plain optax.adamw's (no MaskedState), and no model is needed.
  if p.decay_rules and section.weight_decay and p.decay_rules != masks.PRESETS["all"]:
    with _naming("optimizer.weight_decay_mask"):
      if masks.is_boolean(r.value for r in p.decay_rules):
        mask = masks.weight_decay_mask(p.decay_rules, target)
      else:  # numbers: a strength per group (mask.strengths tells the factory)
        mask = masks.weight_decay_strengths(p.decay_rules, target)
  factory = registry.OPTIMIZERS.get(p.name)
  kwargs: dict[str, Any] = {}
  quantize_mask = _quantize_mask(p, target)
  if quantize_mask is not None and "quantize_mask" in inspect.signature(factory).parameters:
    kwargs["quantize_mask"] = quantize_mask
  if "rounding_seed" in inspect.signature(factory).parameters:  # moments_rounding's bits
    kwargs["rounding_seed"] = seed
  tx = factory(section, learning_rate=lr, weight_decay_mask=mask, **kwargs)

  parts = []
  if p.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(p.grad_clip_norm))
  parts.append(tx)
  if p.update_rms_clip:
    parts.append(clip_update_rms(p.update_rms_clip, lr_fn))
  if p.lr_multipliers:
    with _naming("optimizer.lr_multipliers"):
      multipliers = masks.lr_multiplier_fn(p.lr_multipliers, target)
    parts.append(scale_by_multipliers(multipliers))
  if section.params_dtype == "bfloat16":
    # Last, so that it rounds the update that optax.apply_updates will add.
    parts.append(transform.round_params(section.params_rounding, seed))
  tx = parts[0] if len(parts) == 1 else optax.chain(*parts)
  if p.skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
  if section.params_dtype == "bfloat16":
    # bfloat16 gradients are widened first, outside apply_if_finite: the chain
    # then returns float32 updates (the exact rounded steps of round_params),
    # and a skipped step's zero updates have the same dtypes.
    tx = optax.chain(widen_updates(), tx)
  return Optimizer(optax.with_extra_args_support(tx), lr_fn)
