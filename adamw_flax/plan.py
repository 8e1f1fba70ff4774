"""The run plan: a validated config, parsed once into plain typed objects.

:func:`make_plan` validates a launch config (:func:`adamw_flax.config.validate_config`)
and reads every string the rest of the code would otherwise parse again:
mask, learning-rate multiplier, freeze and partition rules become
:class:`~adamw_flax.masks.Rule` tuples, dtype names stay names checked against
the schema, the mesh section becomes tuples. The library's consumers
(:mod:`adamw_flax.optim`, :mod:`adamw_flax.sharding`,
:mod:`adamw_flax.checkpoint`, :mod:`adamw_flax.train_state`, the trainer) take
these objects; they accept the matching config section too, and turn it into
its plan at the door with the ``as_*`` functions below, so a user calling
``sharding.mesh_from_config(cfg.mesh)`` keeps working.

Examples:
  >>> from adamw_flax import config, plan
  >>> cfg = config.default_config()
  >>> cfg.model.name, cfg.data.name = "m", "d"
  >>> cfg.optimizer.weight_decay_mask = "*/bias=false, *=true"
  >>> p = plan.make_plan(cfg)
  >>> [r.selector for r in p.optimizer.decay_rules], p.mesh.axes, p.trainer.num_steps
  (['*/bias', '*'], ('data',), 1000)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from adamw_flax import masks, schema
from adamw_flax.config import validate_config
from adamw_flax.schema import rule_field

Rules = tuple[masks.Rule, ...]


@dataclasses.dataclass(frozen=True)
class SpikeRule:
  """When the train step skips an update as a loss or gradient-norm spike (``optimizer.skip_spikes``).

  As OLMo-core's ``SkipStepOptimizer``, MaxText's ``skip_step_on_spikes`` and
  Levanter's ``skip_bad_steps`` do: an update is skipped when its loss or
  gradient norm exceeds the mean of the last ``window`` steps by more than
  ``threshold`` sample standard deviations, once ``warmup`` steps are in the
  window. Every step's loss and gradient norm enters the window, skipped or
  not, so a lasting rise (a data-mixture change) becomes the new baseline
  instead of making every later update a spike. A skipped step consumes its
  batch and counts toward ``trainer.num_steps``; its schedules advance, Adam's
  moments and count do not. ``max_consecutive`` skips in a row stop the run.

  Attributes:
    window: steps in the rolling statistics.
    threshold: the z-score beyond which an update is a spike.
    warmup: steps in the window before any is skipped (the references: ``window // 2``).
    max_consecutive: skips in a row that stop the run.
  """

  window: int = 128
  threshold: float = 6.0
  warmup: int = 64
  max_consecutive: int = 32


@dataclasses.dataclass(frozen=True)
class EmaRule:
  """The EMA of the params kept beside them (``trainer.ema_decay``, ``ema_dtype``, ``ema_warmup``).

  After each applied update :math:`t` (1-based), ``ema = d_t * ema + (1 - d_t)
  * params`` in float32, with ``d_t = min(decay, (1 + t) / (10 + t))`` under
  ``warmup`` (Kauldron's ``ema_params``, after Stable Diffusion) and ``decay``
  otherwise; a 16-bit (bfloat16) EMA is stored with stochastic rounding, so
  it moves even when one step's change is below half a bfloat16 ulp.

  Attributes:
    decay: the decay (0 < decay < 1).
    dtype: the EMA's storage dtype name.
    warmup: ramp the decay up from 2/11 as above.
  """

  decay: float
  dtype: str = "float32"
  warmup: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerPlan:
  """The ``optimizer`` section, parsed.

  Every key of the section reads as an attribute (``plan.learning_rate``,
  from :attr:`section`); the parsed forms are fields of their own.

  Attributes:
    section: the validated section as a frozen dataclass
      (:func:`adamw_flax.schema.settings`; registered optimizer factories read it).
    num_steps: optimizer updates of the run (the schedule's length when
      ``decay_steps`` is 0).
    decay_rules / lr_multipliers / freeze: the parsed rules (``()``: none).
    float_moments: the rules of params whose moments stay float32 when
      ``mu_dtype``/``nu_dtype`` is ``"int8"``.
    spikes: the spike-skipping rule, or None.
  """

  section: Any
  num_steps: int
  decay_rules: Rules
  lr_multipliers: Rules
  freeze: Rules
  spikes: SpikeRule | None = None
  float_moments: Rules = ()

  def __getattr__(self, name: str) -> Any:
    # Only reached for names that are not fields: the section's keys.
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.section, name)


@dataclasses.dataclass(frozen=True)
class MeshPlan:
  """The ``mesh`` section, parsed (see :mod:`adamw_flax.sharding`)."""

  axes: tuple[str, ...]
  shape: tuple[int, ...]
  partition_rules: Rules
  data_axes: tuple[str, ...]
  shard_opt_state: str
  logical_axis_rules: tuple[tuple[str, Any], ...]


class TrainerPlan(schema.section_type("trainer")):
  """The ``trainer`` section: one typed field per declared key (:mod:`adamw_flax.schema`)."""

  @property
  def ema(self) -> EmaRule | None:
    """The :class:`EmaRule`, or None without an EMA."""
    return EmaRule(self.ema_decay, self.ema_dtype, self.ema_warmup) if self.ema_decay else None


class CheckpointPlan(schema.section_type("checkpoint")):
  """The ``checkpoint`` section: one typed field per declared key (:mod:`adamw_flax.schema`)."""


# What the functions taking a section accept: its plan, or the ConfigDict
# section, which they turn into its plan at the door (as_mesh_plan, ...).
MeshSection = MeshPlan | ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """A whole launch: the validated config and its parsed sections.

  ``model`` and ``data`` stay ``ConfigDict`` sections: their fields belong to
  the registered model and dataset, whose builders read them.
  """

  config: ml_collections.ConfigDict
  model: ml_collections.ConfigDict
  data: ml_collections.ConfigDict
  optimizer: OptimizerPlan
  trainer: TrainerPlan
  checkpoint: CheckpointPlan
  mesh: MeshPlan


# What the functions taking a whole launch accept: the config, or its plan
# (make_plan returns a plan as it is).
RunConfig = RunPlan | ml_collections.ConfigDict


def as_optimizer_plan(section: Any, num_steps: int | None = None) -> OptimizerPlan:
  """The plan of an ``optimizer`` section (returned as is if it already is one).

  Args:
    section: a validated ``config.optimizer`` (every schema field present) or
      an :class:`OptimizerPlan`.
    num_steps: the run's optimizer updates (``trainer.num_steps``); needed by
      schedules whose ``decay_steps`` is 0.

  Returns:
    The :class:`OptimizerPlan`.
  """
  if isinstance(section, OptimizerPlan):
    return section
  o = schema.settings("optimizer", section)
  spikes = SpikeRule(o.spike_window, o.spike_threshold, o.spike_warmup,
                     o.skip_spikes_max_consecutive)  # fmt: skip
  return OptimizerPlan(
    section=o,
    num_steps=int(o.decay_steps or 0) if num_steps is None else int(num_steps),
    decay_rules=rule_field(o.weight_decay_mask, "weight_decay_mask"),
    lr_multipliers=rule_field(o.lr_multipliers, "lr_multipliers"),
    freeze=rule_field(o.freeze, "freeze"),
    spikes=spikes if o.skip_spikes else None,
    float_moments=rule_field(o.float_moments, "float_moments"),
  )


def as_mesh_plan(section: Any) -> MeshPlan:
  """The plan of a ``mesh`` section (returned as is if it already is one).

  Args:
    section: a validated ``config.mesh``, or a :class:`MeshPlan`.

  Returns:
    The :class:`MeshPlan`.
  """
  if isinstance(section, MeshPlan):
    return section
  m = schema.settings("mesh", section)
  rules = tuple((str(n), None if a is None else a if isinstance(a, str) else tuple(a))
                for n, a in m.logical_axis_rules)  # fmt: skip
  return MeshPlan(
    axes=tuple(str(a) for a in m.axes),
    shape=tuple(int(s) for s in m.shape),
    partition_rules=masks.parse_partition_rules(m.partition_rules),
    data_axes=tuple(str(a) for a in m.data_axes),
    shard_opt_state=m.shard_opt_state,
    logical_axis_rules=rules,
  )


def as_trainer_plan(section: Any) -> TrainerPlan:
  """The plan of a ``trainer`` section.

  Args:
    section: a validated ``config.trainer``, or a :class:`TrainerPlan`.

  Returns:
    The :class:`TrainerPlan`.
  """
  if isinstance(section, TrainerPlan):
    return section
  return TrainerPlan(**dataclasses.asdict(schema.settings("trainer", section)))


def as_checkpoint_plan(section: Any) -> CheckpointPlan:
  """The plan of a ``checkpoint`` section.

  Args:
    section: a validated ``config.checkpoint``, or a :class:`CheckpointPlan`.

  Returns:
    The :class:`CheckpointPlan`.
  """
  if isinstance(section, CheckpointPlan):
    return section
  return CheckpointPlan(**dataclasses.asdict(schema.settings("checkpoint", section)))


def make_plan(config: RunConfig) -> RunPlan:
  """Validates a launch config and parses it once.

  Args:
    config: a full launch config.

  Returns:
    The :class:`RunPlan`.

  Raises:
    adamw_flax.config.ConfigError: naming every invalid key.
  """
  if isinstance(config, RunPlan):
    return config
  validate_config(config)
  trainer = as_trainer_plan(config.trainer)
  return RunPlan(
    config=config,
    model=config.model,
    data=config.data,
    optimizer=as_optimizer_plan(config.optimizer, trainer.num_steps),
    trainer=trainer,
    checkpoint=as_checkpoint_plan(config.checkpoint),
    mesh=as_mesh_plan(config.mesh),
  )
