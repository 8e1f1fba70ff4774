"""Each config key declared once: name, type, default, allowed values or range, a one-line doc.

From these declarations come :func:`adamw_flax.config.default_config`, the
checks of :func:`adamw_flax.config.validate_config` (types, ranges, choices,
``None`` where allowed, unknown keys with "did you mean"), the typing of
command-line overrides, the typed sections of the run plan
(:func:`section_type`: frozen dataclasses, so nothing past the plan reads a
ConfigDict), the README's key table (:func:`markdown_table`) and the
generated bad-config suite (tests/test_config_generated.py). Adding an
option means its declaration here and the code that uses it.

Checks that tie several keys together (a warmup longer than its schedule, a
batch the accumulation does not split) are :data:`CROSS_CHECKS`.

Examples:
  >>> KEYS["optimizer.b2"].default, KEYS["optimizer.b2"].describe_range()
  (0.999, 'in [0, 1)')
  >>> KEYS["optimizer.b2"].problem(1.5)
  'must be in [0, 1), got 1.5'
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from adamw_flax import masks, offload, registry, schedules, transform

DTYPES = ("float32", "bfloat16", "float16")
MOMENT_DTYPES = (*DTYPES, "int8")  # int8: 8-bit block-quantized (adamw_flax.quantize)
# Sections whose fields are fixed by this schema. `model` and `data` belong to
# the registered model and dataset, which check their own fields.
CHECKED_SECTIONS = ("optimizer", "trainer", "checkpoint", "mesh")
SECTIONS = ("model", "data", *CHECKED_SECTIONS)
RULE_FIELDS = ("optimizer.weight_decay_mask", "optimizer.lr_multipliers", "optimizer.freeze",
               "optimizer.float_moments")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key.

  Attributes:
    name: ``"section.field"``.
    default: its default value (``None`` for optional keys).
    doc: one line: what it does (shown in the README table and ``--help``).
    type: the value's type (``float`` accepts ints; rule keys accept rule tuples).
    optional: ``None`` is allowed (it means "not set").
    choices: the allowed values (the tuple the code that uses them defines).
    low, high: the allowed range; ``low_open`` / ``high_open`` exclude the bound.
    check: a further check of the value, giving a message or None.
    explain: what the allowed values mean, said instead of listing them.
    items: the type of a tuple's entries, when they have one.
    adamw: the built-in ``adamw``/``nadamw`` optimizers pass it to
      :func:`adamw_flax.adamw` as the argument of the same name
      (:meth:`OptimizerSection.adamw_arguments`).
    fingerprint: it shapes the optimizer state, so checkpoints record it
      (:mod:`adamw_flax.fingerprint`): True, or the name of a key of the same
      section that must be set for it to be recorded.
    summary: shown on the start-up report's optimizer line.
    note: ``section settings -> text or None``: the start-up report's "also:"
      entry when the key turns something on (:func:`notes`).
  """

  name: str
  default: Any
  doc: str
  type: type
  optional: bool = False
  choices: tuple[Any, ...] | None = None
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  check: Callable[[Any], str | None] | None = None
  explain: str = ""
  items: type | None = None
  adamw: bool = False
  fingerprint: bool | str = False
  summary: bool = False
  note: Callable[[Any], str | None] | None = None

  @property
  def section(self) -> str:
    return self.name.split(".", 1)[0]

  @property
  def field(self) -> str:
    return self.name.split(".", 1)[1]

  def allowed(self) -> tuple[Any, ...] | None:
    """The allowed values, or None when any value of the type is."""
    return None if self.choices is None else tuple(self.choices)

  def describe_range(self) -> str:
    """``"in [0, 1)"``, ``">= 0"``, ``"> 0"``, or ``""``."""
    # An integer bound in full (2147483647, not 2.14748e+09).
    num = lambda x: str(x) if isinstance(x, int) and not isinstance(x, bool) else f"{x:g}"
    if self.low is not None and self.high is not None:
      return f"in {'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"
    if self.low is not None:
      return f"{'>' if self.low_open else '>='} {num(self.low)}"
    if self.high is not None:
      return f"{'<' if self.high_open else '<='} {num(self.high)}"
    return ""

  def type_problem(self, value: Any) -> str | None:
    """Why ``value`` is not of this key's type, or None."""
    if value is None:
      return None if self.optional else f"expected {self.type_name()}, got None"
    t = self.type
    if t is bool:
      ok = isinstance(value, bool)
    elif t is float:
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif t is int:
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is tuple:
      ok = isinstance(value, (tuple, list))
      if ok and self.items is not None:
        wrong = [v for v in value if not _is(v, self.items)]
        if wrong:
          return f"expected a tuple of {self.items.__name__}, got {tuple(value)!r}"
    elif self.name in RULE_FIELDS:
      ok = isinstance(value, (str, tuple, list))
    else:
      ok = isinstance(value, t)
    return None if ok else f"expected {self.type_name()}, got {value!r}"

  def type_name(self) -> str:
    return f"{self.type.__name__} or None" if self.optional else self.type.__name__

  def problem(self, value: Any) -> str | None:
    """Why ``value`` is not allowed here (type, range, choice, check), or None."""
    if (wrong := self.type_problem(value)) is not None:
      return wrong
    if value is None:
      return None
    allowed = self.allowed()
    if allowed is not None and value not in allowed:
      close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      text = self.explain or _choices_text(allowed, self.optional)
      return f"must be {text}, got {value!r}{hint}"
    if self.type in (int, float) and not _in_range(self, value):
      return f"must be {self.describe_range()}, got {value}"
    return self.check(value) if self.check is not None else None


def _is(value: Any, t: type) -> bool:
  if t is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, t) and not (t is int and isinstance(value, bool))


def _choices_text(allowed: tuple[Any, ...], optional: bool) -> str:
  """``'a' or 'b'``; ``one of ...`` for more, or with None."""
  if optional or len(allowed) > 2:
    return f"{'None or ' if optional else ''}one of {', '.join(repr(a) for a in allowed)}"
  *head, last = [repr(a) for a in allowed]
  return f"{', '.join(head)} or {last}" if head else last


def _in_range(key: Key, value: float) -> bool:
  if isinstance(value, float) and not math.isfinite(value):
    return False
  if key.low is not None and (value <= key.low if key.low_open else value < key.low):
    return False
  return not (key.high is not None and (value >= key.high if key.high_open else value > key.high))


def _k(name: str, default: Any, doc: str, **kw: Any) -> Key:
  """A declaration; the type is the default's unless given."""
  kw.setdefault("type", type(default) if default is not None else str)
  return Key(name, default, doc, **kw)


def _nonneg(name: str, default: Any, doc: str, **kw: Any) -> Key:
  return _k(name, default, doc, low=0, **kw)


def _positive(name: str, default: Any, doc: str, **kw: Any) -> Key:
  return _k(name, default, doc, low=0, low_open=True, **kw)


def rule_field(spec: Any, key: str) -> tuple[masks.Rule, ...]:
  """Reads one of the optimizer's rule fields (``weight_decay_mask``, ``lr_multipliers``, ``freeze``).

  Args:
    spec: the field's value (a preset, a ``"sel=value, ..."`` string, pairs).
    key: the field's name: values are floats for ``lr_multipliers``, booleans otherwise.

  Returns:
    The rules (``()`` for an empty field).
  """
  if spec in ("", None, ()):
    return ()
  what = {"weight_decay_mask": "weight decay", "lr_multipliers": "learning-rate multiplier"}
  value_type = {"lr_multipliers": float, "weight_decay_mask": masks.DECAY}.get(key, bool)
  return masks.parse_rules(spec, value_type=value_type, what=what.get(key, key))


def _rules(field: str) -> Callable[[Any], str | None]:
  def check(value: Any) -> str | None:
    try:
      rule_field(value, field)
    except ValueError as e:
      return str(e)
    return None

  return check


def _offload(value: str) -> str | None:
  try:
    offload.parse(value)
  except ValueError as e:
    return str(e)
  return None


def _profile_steps(value: tuple) -> str | None:
  ok = value == () or (len(value) == 2 and 0 <= value[0] < value[1])
  return None if ok else f"must be () or (start, stop) with 0 <= start < stop, got {tuple(value)}"


# What the start-up report says of a key that turns something on (Key.note).


def _note_wsd(o: Any) -> str | None:
  if o.schedule != "wsd":
    return None
  return f"wsd: last {o.wsd_decay_fraction:g} of the steps decay ({o.wsd_decay_shape})"


def _note_decay_to_init(o: Any) -> str | None:
  return "weight decay towards the initial params" if o.decay_to_init else None


def _note_moments_rounding(o: Any) -> str | None:
  stochastic = "int8" in (o.mu_dtype, o.nu_dtype) and o.moments_rounding == "stochastic"
  return "8-bit moments rounded stochastically" if stochastic else None


def _note_accumulation(o: Any) -> str | None:
  if o.accumulate_steps == 1:
    return None
  return f"each step's batch in {o.accumulate_steps} micro-batches (accumulate_steps)"


def _note_spikes(o: Any) -> str | None:
  if not o.skip_spikes:
    return None
  return (
    f"skip spikes ({o.spike_threshold} sigma over {o.spike_window} updates, after {o.spike_warmup})"
  )


def _note_update_rms_clip(o: Any) -> str | None:
  return f"update RMS clipped to {o.update_rms_clip} x lr" if o.update_rms_clip else None


def _note_ema(t: Any) -> str | None:
  return f"EMA of the params (decay {t.ema_decay}, {t.ema_dtype})" if t.ema_decay else None


# ------------------------------------------------------------------ the keys

DECLARATIONS: tuple[Key, ...] = (
  _k("model.name", "", "registered model, e.g. 'examples.tiny_shakespeare:char_transformer'"),
  _k("data.name", "", "registered dataset, e.g. 'examples.tiny_shakespeare:tiny_shakespeare'"),
  _k("data.batch_size", 32, "global batch size (all processes together)", low=1),
  # ---- optimizer
  _k("optimizer.name", "adamw", "registered optimizer: 'adamw', 'nadamw' or a user one"),
  _positive("optimizer.learning_rate", 1e-3, "peak learning rate", type=float, summary=True),
  _k("optimizer.schedule", "constant", "learning-rate schedule", choices=schedules.SCHEDULES, summary=True, fingerprint=True, note=_note_wsd),
  _nonneg("optimizer.warmup_steps", 0, "linear warmup from 0 to learning_rate", summary=True),
  _nonneg("optimizer.decay_steps", 0, "length of the schedule, warmup included; 0 = trainer.num_steps"),
  _nonneg("optimizer.end_learning_rate", 0.0, "final value of warmup_cosine / warmup_linear"),
  _k("optimizer.piecewise_boundaries", (), "steps at which 'piecewise' scales the rate", items=int),
  _k("optimizer.piecewise_scales", (), "multiplicative scale at each boundary", items=float),
  _k("optimizer.wsd_decay_fraction", 0.1, "'wsd': share of the schedule's steps that decay (the rest stable)", low=0, high=1),
  _k("optimizer.wsd_decay_shape", "linear", "'wsd': the decay's shape", choices=schedules.WSD_SHAPES),
  _k("optimizer.b1", 0.9, "decay of the first moment", low=0, high=1, high_open=True, adamw=True, summary=True),
  _k("optimizer.b2", 0.999, "decay of the second moment", low=0, high=1, high_open=True, adamw=True, summary=True),
  _nonneg("optimizer.eps", 1e-8, "added to sqrt(nu_hat)", adamw=True, summary=True),
  _nonneg("optimizer.eps_root", 0.0, "added to nu_hat inside the sqrt", adamw=True),
  _nonneg("optimizer.weight_decay", 1e-4, "decoupled weight decay strength (optax's default)", adamw=True, summary=True),
  _k("optimizer.weight_decay_mode", "lr", "'lr': decay*lr(t) (optax); 'paper': decay*lr(t)/peak; 'adamc': decay*lr(t)^2/peak", choices=transform.WEIGHT_DECAY_MODES, explain="'lr' (decay * lr(t), as optax), 'paper' (decay * lr(t)/peak) or 'adamc' (decay * lr(t)^2/peak)", adamw=True, summary=True, fingerprint=True),
  _k("optimizer.weight_decay_mask", "default", "rules (adamw_flax.masks): which params decay, or how much", check=_rules("weight_decay_mask"), fingerprint=True),
  _k("optimizer.decay_to_init", False, "decay towards the initial params instead of 0 (fine-tuning)", adamw=True, note=_note_decay_to_init),
  _k("optimizer.lr_multipliers", "", "rules 'selector=multiplier, ...' scaling the update per parameter group", check=_rules("lr_multipliers"), fingerprint=True),
  _k("optimizer.freeze", "", "rules 'selector=true, ...' selecting parameters that are not trained", check=_rules("freeze"), fingerprint=True),
  _k("optimizer.mu_dtype", None, "dtype of the first moment; None = the params' dtype; or 'int8'", optional=True, choices=MOMENT_DTYPES, adamw=True, summary=True, fingerprint=True),
  _k("optimizer.nu_dtype", None, "dtype of the second moment; None = the params' dtype; or 'int8'", optional=True, choices=MOMENT_DTYPES, adamw=True, summary=True, fingerprint=True),
  _k("optimizer.quantize_block_size", 256, "int8 moments: elements per scale, along the last axis", low=16, adamw=True),
  _nonneg("optimizer.quantize_min_size", 4096, "int8 moments: smaller leaves keep float32 moments", adamw=True),
  _k("optimizer.float_moments", "embeddings", "int8 moments: rules 'selector=true' keeping float32 moments", check=_rules("float_moments")),
  _k("optimizer.params_dtype", None, "trained params' dtype; None = as the model builds them", optional=True, choices=("float32", "bfloat16"), fingerprint="params_dtype"),
  _k("optimizer.params_rounding", "stochastic", "bfloat16 params: how an update lands on them", choices=transform.ROUNDINGS, fingerprint="params_dtype"),
  _k("optimizer.moments_rounding", "stochastic", "int8 moments: codes rounded 'stochastic' (unbiased) or 'nearest'", choices=transform.MOMENTS_ROUNDINGS, adamw=True, note=_note_moments_rounding),
  _k("optimizer.offload", "", "optimizer state in host memory between steps: 'opt_state' or fields 'mu, nu'", check=_offload),
  _k("optimizer.nesterov", False, "Nesterov momentum (NAdamW)", adamw=True),
  _k("optimizer.update_from_stored_moments", False, "the update from the stored 16-bit or 8-bit moments: faster, not optax's numbers", adamw=True),
  _nonneg("optimizer.grad_clip_norm", 0.0, "clip gradients to this global norm; 0 = off", fingerprint=True),
  _k("optimizer.accumulate_steps", 1, "split each step's batch into this many micro-batches (same updates)", low=1, fingerprint=True, note=_note_accumulation),
  _k("optimizer.skip_nonfinite", False, "skip steps whose gradients hold NaN/inf (optax.apply_if_finite)", fingerprint=True),
  _k("optimizer.skip_spikes", False, "skip updates whose loss or grad norm is a spike (z-score, below)", note=_note_spikes),
  _k("optimizer.spike_window", 128, "skip_spikes: steps in the rolling mean and std (every step enters)", low=2),
  _positive("optimizer.spike_threshold", 6.0, "skip_spikes: z-score of a spike (MaxText/OLMo-core: 6)"),
  _k("optimizer.spike_warmup", 64, "skip_spikes: steps in the window before any is skipped (window // 2)", low=2),
  _k("optimizer.skip_spikes_max_consecutive", 32, "skip_spikes: stop the run after this many skips in a row", low=1),
  _nonneg("optimizer.update_rms_clip", 0.0, "clip each tensor's update RMS to this times lr(t); 0 = off", note=_note_update_rms_clip),
  # ---- trainer
  _positive("trainer.num_steps", 1000, "steps to train", high=2**31 - 1),  # the int32 step count
  _positive("trainer.log_every", 50, "steps between train-metric log lines"),
  _nonneg("trainer.eval_every", 250, "steps between evaluations; 0 = only at the end"),
  _nonneg("trainer.eval_batches", 20, "validation batches per evaluation; 0 = none during training"),
  _nonneg("trainer.final_eval_batches", 0, "validation batches of the evaluation at the end; 0 = eval_batches"),
  _k("trainer.seed", 0, "seed of parameter init and data order"),
  _nonneg("trainer.max_nonfinite_steps", 10, "stop after this many consecutive non-finite losses"),
  _k("trainer.allow_config_change", False, "resume a workdir whose saved config differs"),
  _k("trainer.progress", True, "show a progress bar on stderr"),
  _k("trainer.ema_decay", 0.0, "EMA of the params (e.g. 0.999), evaluated beside them; 0 = off", low=0, high=1, high_open=True, note=_note_ema),
  _k("trainer.ema_dtype", "float32", "storage dtype of the EMA params (the arithmetic is float32)", choices=DTYPES),
  _k("trainer.ema_warmup", False, "EMA decay min(ema_decay, (1 + t) / (10 + t)) at update t (timm, Kauldron)"),
  _k("trainer.wandb_project", "", "also log the metrics rows to this W&B project (needs wandb); '' = off"),
  _k("trainer.wandb_mode", "", "W&B's mode; '' = W&B's default (WANDB_MODE)", choices=("", "online", "offline", "disabled")),
  _k("trainer.profile_steps", (), "(start, stop): a JAX profiler trace of those updates in WORKDIR/profile", check=_profile_steps, items=int),
  _nonneg("trainer.stall_timeout_s", 900.0, "no progress this long: stacks, exit status 75; 0 = off"),
  _nonneg("trainer.peer_timeout_s", 30.0, "processes: another silent this long (died): exit status 75; 0 = off"),
  # ---- checkpoint
  _nonneg("checkpoint.every_steps", 1000, "steps between saves; 0 = only at the end"),
  _k("checkpoint.keep", 3, "keep this many latest checkpoints", low=1),
  _k("checkpoint.keep_best_by", "", "eval metric (e.g. 'loss') to keep the best checkpoints by, checked at start-up; '' = off"),
  _k("checkpoint.best_mode", "min", "'min' or 'max' for keep_best_by", choices=("min", "max")),
  _nonneg("checkpoint.keep_period", 0, "also keep every step divisible by this permanently; 0 = off"),
  _k("checkpoint.async_save", True, "write in the background while training goes on"),
  _k("checkpoint.migrate_opt_state", False, "convert an optimizer state saved in another format or tree"),
  # ---- mesh
  _k("mesh.axes", ("data",), "mesh axis names", items=str),
  _k("mesh.shape", (-1,), "axis sizes; one may be -1 for 'the remaining devices'", items=int),
  _k("mesh.partition_rules", (), "((selector, PartitionSpec tuple), ...), mask-rule selectors; first wins"),
  _k("mesh.data_axes", ("data",), "axes the batch dimension is sharded over", items=str),
  _k("mesh.shard_opt_state", "params", "'params': like the params; 'data': ZeRO-1, also over data axes", choices=("params", "data")),
  _k("mesh.logical_axis_rules", (), "((logical name, mesh axis | axes | None), ...) for annotations"),
)  # fmt: skip

KEYS: dict[str, Key] = {k.name: k for k in DECLARATIONS}


def section_keys(section: str) -> list[Key]:
  """The declared keys of ``section``, in declaration order."""
  return [k for k in DECLARATIONS if k.section == section]


class Settings:
  """A section's values read as a mapping too (``s["b1"]``, ``s.get("b1")``), like a ConfigDict.

  Registered optimizer factories written against the ConfigDict section keep working.
  """

  def __getitem__(self, key: str) -> Any:
    try:
      return getattr(self, key)
    except AttributeError:
      raise KeyError(key) from None

  def get(self, key: str, default: Any = None) -> Any:
    return getattr(self, key, default)

  def __contains__(self, key: str) -> bool:
    return key in self.keys()

  def keys(self) -> list[str]:
    return [f.name for f in dataclasses.fields(self)]


class OptimizerSection(Settings):
  """The ``optimizer`` section's base: what the built-in optimizers read of it."""

  def adamw_arguments(self) -> dict[str, Any]:
    """The keys declared ``adamw=True``, as :func:`adamw_flax.adamw`'s keyword arguments.

    With ``peak_learning_rate``: ``learning_rate`` (the schedule's peak) where
    ``weight_decay_mode`` divides by it (``transform.PEAK_MODES``), else None.
    """
    args = {k.field: getattr(self, k.field) for k in section_keys("optimizer") if k.adamw}
    paper = args["weight_decay_mode"] in transform.PEAK_MODES
    args["peak_learning_rate"] = self.learning_rate if paper else None
    return args


_SECTION_TYPES: dict[str, type] = {}
_SECTION_BASES: dict[str, type] = {"optimizer": OptimizerSection}


def section_type(section: str) -> type:
  """A frozen dataclass with one typed field per declared key of ``section`` (the plan's form).

  Args:
    section: a checked section (``"optimizer"``, ``"trainer"``, ...).

  Returns:
    The dataclass (made once per section), e.g. ``OptimizerSettings``.
  """
  if section not in _SECTION_TYPES:
    fields = [(k.field, k.type | None if k.optional else k.type) for k in section_keys(section)]
    name = f"{section.capitalize()}Settings"
    base = _SECTION_BASES.get(section, Settings)
    cls = dataclasses.make_dataclass(name, fields, bases=(base,), frozen=True)
    cls.__doc__ = (
      f"The validated ``{section}`` section, one typed field per key (adamw_flax.schema)."
    )
    cls.__module__ = __name__
    globals()[name] = cls  # importable by name: instances pickle
    _SECTION_TYPES[section] = cls
  return _SECTION_TYPES[section]


def settings(section: str, values: Any) -> Any:
  """``values`` (a validated ConfigDict section) as the section's frozen dataclass.

  Args:
    section: the section's name.
    values: its validated values (tuples stay tuples).

  Returns:
    An instance of :func:`section_type`.
  """
  freeze = lambda v: tuple(freeze(x) for x in v) if isinstance(v, list | tuple) else v
  return section_type(section)(**{k.field: freeze(values[k.field]) for k in section_keys(section)})


def fingerprinted(values: Any) -> dict[str, Any]:
  """``field -> value`` of the ``optimizer`` keys declared ``fingerprint`` (set where so declared).

  Args:
    values: the ``optimizer`` section (a ConfigDict or its settings).
  """
  out = {}
  for k in section_keys("optimizer"):
    wanted = k.fingerprint if isinstance(k.fingerprint, bool) else bool(values.get(k.fingerprint))
    if wanted:
      out[k.field] = values.get(k.field)
  return out


def summary(values: Any) -> str:
  """``"learning_rate 0.001, schedule constant, ..."``: the ``optimizer`` keys declared ``summary``."""
  return ", ".join(
    f"{k.field} {values.get(k.field)}" for k in section_keys("optimizer") if k.summary
  )


def notes(sections: dict[str, Any]) -> list[str]:
  """What the keys that turn something on say of it (``Key.note``), in declaration order.

  Args:
    sections: ``section name -> its settings`` (those without notes may be left out).
  """
  out = []
  for k in DECLARATIONS:
    if k.note is not None and k.section in sections:
      text = k.note(sections[k.section])
      if text:
        out.append(text)
  return out


def markdown_table() -> str:
  """The README's table of every key: name, default, allowed values, what it does.

  Returns:
    The Markdown table.
  """
  rows = ["| key | default | allowed | what |", "|---|---|---|---|"]
  for k in DECLARATIONS:
    allowed = k.allowed()
    if allowed is not None:
      what = " / ".join(f"`{a!r}`" for a in allowed)
      allowed_text = f"None / {what}" if k.optional else what
    else:
      allowed_text = k.describe_range() or k.type_name()
    doc = k.doc.replace("|", "\\|")
    rows.append(f"| `{k.name}` | `{k.default!r}` | {allowed_text} | {doc} |")
  return "\n".join(rows)


# ------------------------------------------------------------------ checks of several keys


def _schedule_length(c: Any) -> int:
  return c.optimizer.decay_steps or c.trainer.num_steps


def _warmup_fits(c: Any) -> list[str]:
  o, total = c.optimizer, _schedule_length(c)
  # A decaying schedule needs steps after its warmup to decay over (optax's
  # cosine decay fails on a zero-length decay).
  decaying = o.schedule in schedules.DECAYING
  if (o.warmup_steps < total) if decaying else (o.warmup_steps <= total):
    return []
  return [
    f"optimizer.warmup_steps: ({o.warmup_steps}) must be {'<' if decaying else '<='} the "
    f"schedule's length ({total}: optimizer.decay_steps, or trainer.num_steps when that is 0)"
  ]


def _wsd_fits(c: Any) -> list[str]:
  o, total = c.optimizer, _schedule_length(c)
  if o.schedule != "wsd" or o.wsd_decay_shape not in schedules.WSD_SHAPES:
    return []
  length = round(o.wsd_decay_fraction * total)
  length = max(length, 1) if o.wsd_decay_fraction > 0 else 0
  if total - length >= o.warmup_steps:
    return []
  return [
    f"optimizer.wsd_decay_fraction: the decay (last {length} of {total} steps) overlaps the "
    f"warmup ({o.warmup_steps}); lower it or optimizer.warmup_steps"
  ]


def _piecewise_fits(c: Any) -> list[str]:
  problem = schedules.piecewise_problem(
    c.optimizer.piecewise_boundaries, c.optimizer.piecewise_scales
  )
  return [] if problem is None else [problem]


def _best_is_evaluated(c: Any) -> list[str]:
  """``checkpoint.keep_best_by`` names a metric some evaluation gives (its name is checked at start-up)."""
  best, t = c.checkpoint.keep_best_by, c.trainer
  if not best:
    return []
  if not (t.final_eval_batches or t.eval_batches):
    return [
      f"checkpoint.keep_best_by: {best!r} needs evaluations, and trainer.eval_batches and "
      "final_eval_batches are 0; set trainer.eval_batches > 0, or keep_best_by=''"
    ]
  if best.startswith("ema_") and not t.ema_decay:
    return [
      f"checkpoint.keep_best_by: {best!r} is a metric of the EMA weights, which this run does "
      f"not keep; set trainer.ema_decay (e.g. 0.999), or keep_best_by={best[4:]!r}"
    ]
  return []


def _batch_splits(c: Any) -> list[str]:
  batch, k = c.data.get("batch_size"), c.optimizer.accumulate_steps
  if not isinstance(batch, int) or batch < 1 or k < 1 or batch % k == 0:
    return []
  return [
    f"data.batch_size: ({batch}) must be a multiple of optimizer.accumulate_steps ({k}): "
    "each step's batch is split into that many micro-batches"
  ]


def _optimizer_registered(c: Any) -> list[str]:
  name = c.optimizer.name
  if name == "" or ":" in name or name in (known := registry.OPTIMIZERS.names()):
    return []
  close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return [f"optimizer.name: unknown optimizer {name!r}{hint}; registered: {', '.join(known)}"]


def _mesh_shape(c: Any) -> list[str]:
  m, out = c.mesh, []
  axes, shape = tuple(m.axes), tuple(m.shape)
  if len(axes) != len(shape):
    out.append(f"mesh.shape: needs one size per axis of mesh.axes {axes}, got {shape}")
  if sum(1 for s in shape if s == -1) > 1:
    out.append(f"mesh.shape: at most one size may be -1, got {shape}")
  if not all(s == -1 or s >= 1 for s in shape):
    out.append(f"mesh.shape: sizes must be >= 1 or -1, got {shape}")
  out += [
    f"mesh.data_axes: axis {a!r} is not in mesh.axes {axes}" for a in m.data_axes if a not in axes
  ]
  return out + mesh_config_errors(m)


def mesh_config_errors(mesh_cfg: Any) -> list[str]:
  """The problems of a ``mesh`` section found without devices or a model, as ``"key: message"``.

  Unique axis names, well-formed partition rules whose specs name mesh axes
  (each once), data axes and logical-axis rules that name mesh axes. What
  needs the devices or the parameters (sizes that divide) is checked by
  :func:`adamw_flax.sharding.mesh_from_config` and
  :func:`adamw_flax.sharding.param_specs`.

  Examples:
    >>> from adamw_flax import config
    >>> cfg = config.default_config().mesh
    >>> cfg.partition_rules = ((".*kernel", (None, "model")),)
    >>> mesh_config_errors(cfg)
    ["mesh.partition_rules[0] ('.*kernel'): axis 'model' is not in mesh.axes ('data',)"]

  Args:
    mesh_cfg: the ``mesh`` section.

  Returns:
    ``"key: message"`` lines, empty for a good section.
  """
  errors = []
  axes = tuple(mesh_cfg.axes)
  if len(set(axes)) != len(axes):
    errors.append(f"mesh.axes: {axes} names an axis twice")
  try:
    rules = masks.parse_partition_rules(mesh_cfg.partition_rules)
  except ValueError as e:
    errors.append(str(e))
    rules = ()
  for i, rule in enumerate(rules):
    errors += _partition_rule_errors(i, mesh_cfg.partition_rules[i][0], rule.value, axes)
  data_axes = tuple(mesh_cfg.data_axes)
  if len(set(data_axes)) != len(data_axes):
    errors.append(f"mesh.data_axes: {data_axes} names an axis twice")
  for i, rule in enumerate(mesh_cfg.logical_axis_rules):
    if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
      errors.append(
        f"mesh.logical_axis_rules[{i}]: must be a (logical name, mesh axis or None) pair, "
        f"got {rule!r}"
      )
      continue
    target = rule[1]
    names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    errors += [
      f"mesh.logical_axis_rules[{i}] ({rule[0]!r}): axis {a!r} is not in mesh.axes {axes}"
      for a in names
      if a not in axes
    ]
  return errors


def _partition_rule_errors(i: int, text: str, spec: Any, axes: tuple[str, ...]) -> list[str]:
  used = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
  out = [
    f"mesh.partition_rules[{i}] ({text!r}): axis {a!r} is not in mesh.axes {axes}"
    for a in dict.fromkeys(used)
    if a not in axes
  ]
  if len(set(used)) != len(used):
    out.append(f"mesh.partition_rules[{i}] ({text!r}): {spec} uses a mesh axis twice")
  return out


CROSS_CHECKS: tuple[Callable[[Any], list[str]], ...] = (
  _warmup_fits,
  _batch_splits,
  _best_is_evaluated,
  _wsd_fits,
  _piecewise_fits,
  _optimizer_registered,
  _mesh_shape,
)


def value_problems(config: Any) -> list[str]:
  """Every declared key's problem, then the checks of several keys, as ``"key: message"``.

  Args:
    config: a config whose sections and keys are known (unknown keys are
      :func:`adamw_flax.config.validate_config`'s to report).

  Returns:
    The problems, empty for a valid config.
  """
  out = []
  for k in DECLARATIONS:
    section = config[k.section]
    if k.field in section and (problem := k.problem(section[k.field])) is not None:
      out.append(f"{k.name}: {problem}")
  for check in CROSS_CHECKS:  # values are of their types here (validate_config checks first)
    out += check(config)
  return out


def default_config() -> Any:
  """The full config with every declared key at its default (see :func:`adamw_flax.config.default_config`)."""
  c = ml_collections.ConfigDict()
  for section in SECTIONS:
    c[section] = ml_collections.ConfigDict()
  for k in DECLARATIONS:
    # A plain None default could not be overridden from the command line
    # (ml_collections#33): a typed reference can.
    value = config_dict.FieldReference(None, field_type=k.type) if k.optional else k.default
    c[k.section][k.field] = value
  return c
