"""Learning-rate schedules from config, built with optax's schedules.

``config.optimizer.schedule`` names the shape; ``learning_rate`` is always the
peak value, so the paper weight-decay mode (decay scaled by lr(t) / peak) and
the logs mean the same thing whatever the shape.

============== =====================================================
schedule        shape
============== =====================================================
constant        linear warmup from 0 (if ``warmup_steps``), then flat
warmup_cosine   linear warmup, cosine decay to ``end_learning_rate``
warmup_linear   linear warmup, linear decay to ``end_learning_rate``
rsqrt           linear warmup, then ``peak * sqrt(warmup / step)``
piecewise       ``peak`` scaled by ``piecewise_scales`` at
                ``piecewise_boundaries`` (optax's piecewise constant)
wsd             warmup-stable-decay: linear warmup, ``peak`` until the
                last ``wsd_decay_fraction`` of the schedule, then a
                decay to ``end_learning_rate`` shaped ``wsd_decay_shape``
                (``linear``, ``cosine`` or ``1-sqrt``, Hägele et al. 2024)
============== =====================================================

A cooldown from any stable-phase checkpoint of a ``wsd`` run (MaxText's and
Levanter's use of WSD): resume it with ``trainer.num_steps`` set to
``S + D`` (``S`` the checkpoint's step, ``D`` the cooldown's length) and
``optimizer.wsd_decay_fraction = D / (S + D)``, with
``--config.trainer.allow_config_change=True``. Up to ``S`` that schedule is
the one the checkpoint was trained with (warmup, then ``peak``), so the
resumed run continues it exactly and decays over the last ``D`` steps.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "rsqrt", "piecewise", "wsd")
WSD_SHAPES = ("linear", "cosine", "1-sqrt")
# The schedules that decay after their warmup: they need steps left to decay over.
DECAYING = ("warmup_cosine", "warmup_linear")


def piecewise_problem(boundaries: Any, scales: Any) -> str | None:
  """Why ``piecewise`` cannot use these boundaries and scales (one scale each), or None."""
  if len(boundaries) == len(scales):
    return None
  return (
    f"optimizer.piecewise_scales: must have one scale per entry of "
    f"optimizer.piecewise_boundaries ({len(scales)} scales, {len(boundaries)} boundaries)"
  )


def decay_steps(cfg: Any, num_steps: int | None) -> int:
  """Steps over which the schedule runs: ``cfg.decay_steps`` or, if 0, the run's length.

  Args:
    cfg: the optimizer section.
    num_steps: the run's optimizer updates.

  Returns:
    The schedule's length in updates.
  """
  steps = int(cfg.decay_steps)
  if steps:
    return steps
  if num_steps is None:
    raise ValueError(
      f"optimizer.schedule={cfg.schedule!r} needs a length: set optimizer.decay_steps or pass "
      "num_steps (the trainer passes trainer.num_steps)"
    )
  return int(num_steps)


def schedule_from_config(cfg: Any, num_steps: int | None = None) -> optax.Schedule:
  """Builds the learning-rate schedule that ``cfg`` (``config.optimizer``) describes.

  Args:
    cfg: the optimizer section (fields ``learning_rate``, ``schedule``,
      ``warmup_steps``, ``decay_steps``, ``end_learning_rate``,
      ``piecewise_boundaries``, ``piecewise_scales``).
    num_steps: the run's length, used when ``cfg.decay_steps`` is 0.

  Returns:
    A function step -> learning rate (always a callable, also for a constant
    rate, so callers can log the rate at any step).

  Examples:
    >>> import ml_collections
    >>> cfg = ml_collections.ConfigDict(dict(learning_rate=1e-3, schedule="warmup_cosine",
    ...     warmup_steps=100, decay_steps=0, end_learning_rate=1e-4))
    >>> lr = schedule_from_config(cfg, num_steps=2000)
    >>> [round(float(lr(s)), 6) for s in (0, 50, 100, 2000)]
    [0.0, 0.0005, 0.001, 0.0001]
  """
  peak = float(cfg.learning_rate)
  name = cfg.schedule
  warmup = int(cfg.warmup_steps)
  end = float(cfg.end_learning_rate)

  if name == "constant":
    if not warmup:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )
  if name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=decay_steps(cfg, num_steps),
      end_value=end,
    )
  if name == "warmup_linear":
    total = decay_steps(cfg, num_steps)
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, peak, warmup),
        optax.linear_schedule(peak, end, max(total - warmup, 1)),
      ],
      [warmup],
    )
  if name == "rsqrt":
    # optax has no inverse-square-root decay; this is the T5/big_vision form,
    # continuous with the warmup at step == warmup.
    timescale = max(warmup, 1)

    def rsqrt(step):
      step = jnp.asarray(step, jnp.float32)
      decay = peak * jnp.sqrt(timescale / jnp.maximum(step, timescale))
      return jnp.where(step < warmup, peak * step / timescale, decay)

    return rsqrt
  if name == "piecewise":
    bounds = tuple(int(b) for b in cfg.piecewise_boundaries)
    scales = tuple(float(s) for s in cfg.piecewise_scales)
    if (problem := piecewise_problem(bounds, scales)) is not None:
      raise ValueError(problem)
    return optax.piecewise_constant_schedule(peak, dict(zip(bounds, scales, strict=True)))
  if name == "wsd":
    return wsd_schedule(
      peak,
      total=decay_steps(cfg, num_steps),
      warmup=warmup,
      decay_fraction=float(cfg.wsd_decay_fraction),
      shape=str(cfg.wsd_decay_shape),
      end=end,
    )
  raise ValueError(f"unknown optimizer.schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def wsd_schedule(
  peak: float, *, total: int, warmup: int, decay_fraction: float, shape: str, end: float = 0.0
) -> optax.Schedule:
  """Warmup-stable-decay: ``0 -> peak`` linearly, ``peak``, then ``peak -> end`` over the last part.

  optax has no WSD schedule. The decay runs over the last
  ``round(decay_fraction * total)`` steps (at least 1 when the fraction is
  positive), reaching ``end`` at step ``total``:

  * ``linear``: ``end + (peak - end) * (1 - x)``;
  * ``cosine``: ``end + (peak - end) * (1 + cos(pi x)) / 2``;
  * ``1-sqrt``: ``end + (peak - end) * (1 - sqrt(x))``;

  with ``x`` the fraction of the decay done.

  Args:
    peak: the stable learning rate.
    total: the schedule's length (steps); the rate stays ``end`` after it.
    warmup: linear warmup steps from 0.
    decay_fraction: the share of ``total`` the decay takes, in ``[0, 1]``.
    shape: ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.
    end: the final rate.

  Returns:
    A schedule ``step -> learning rate``.

  Examples:
    >>> lr = wsd_schedule(1.0, total=100, warmup=10, decay_fraction=0.2, shape="linear")
    >>> [round(float(lr(s)), 3) for s in (0, 5, 10, 50, 80, 90, 100, 120)]
    [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
  """
  if shape not in WSD_SHAPES:
    raise ValueError(f"wsd decay shape must be one of {', '.join(WSD_SHAPES)}, got {shape!r}")
  length = round(decay_fraction * total)
  if decay_fraction > 0:
    length = max(length, 1)
  start = total - length
  if start < warmup:
    raise ValueError(
      f"wsd: the decay (last {length} of {total} steps) would start at step {start}, inside "
      f"the warmup ({warmup} steps); lower optimizer.wsd_decay_fraction or warmup_steps"
    )

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    x = jnp.clip((step - start) / max(length, 1), 0.0, 1.0)
    if shape == "linear":
      factor = 1.0 - x
    elif shape == "cosine":
      factor = 0.5 * (1.0 + jnp.cos(jnp.pi * x))
    else:
      factor = 1.0 - jnp.sqrt(x)
    decayed = end + (peak - end) * factor
    return jnp.where(step < warmup, warm, jnp.where(step < start, peak, decayed))

  return schedule
