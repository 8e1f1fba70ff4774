"""The config schema, its validation, and the optimizer built from it.

A launch is one ``ml_collections.ConfigDict`` with the sections ``model``,
``data``, ``optimizer``, ``trainer``, ``checkpoint`` and ``mesh``. Config files
in ``configs/`` are Python files with ``get_config()`` that start from
:func:`default_config` and override a few fields; any field can be overridden
on the command line (``--config.optimizer.learning_rate=3e-4``).

:func:`validate_config` checks a config where it enters (load, command line):
unknown keys (with a close-match suggestion), wrong types and out-of-range
values fail with one :class:`ConfigError` that names every offending key.
:mod:`adamw_flax.plan` turns a validated config into typed objects, and
:mod:`adamw_flax.optim` builds its optimizer.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import json
import math
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from adamw_flax import errors, masks, offload, registry, schedules, transform
from adamw_flax.errors import UserCodeError, UserError

DTYPES = ("float32", "bfloat16", "float16")
MOMENT_DTYPES = (*DTYPES, "int8")  # int8: 8-bit block-quantized (adamw_flax.quantize)
# Sections whose fields are fixed by this schema. `model` and `data` belong to
# the registered model and dataset, which check their own fields.
CHECKED_SECTIONS = ("optimizer", "trainer", "checkpoint", "mesh")
SECTIONS = ("model", "data", *CHECKED_SECTIONS)


class ConfigError(UserError, ValueError):
  """A config that cannot be used; the message names each offending key."""


def _optional(field_type: type) -> config_dict.FieldReference:
  # A plain None default could not be overridden from the command line
  # (ml_collections#33): a typed reference can.
  return config_dict.FieldReference(None, field_type=field_type)


def default_config() -> ml_collections.ConfigDict:
  """Returns the full schema with its defaults; every field is documented.

  Defaults follow common practice: optax's AdamW hyperparameters (so the
  default optimizer is exactly ``optax.adamw``), a constant learning rate,
  the "default" weight-decay mask (kernels decayed; biases, norm scales and
  embeddings not).

  Examples:
    >>> cfg = default_config()
    >>> cfg.optimizer.name, cfg.optimizer.b2, cfg.optimizer.weight_decay_mode
    ('adamw', 0.999, 'lr')
  """
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = ""  # registered model, e.g. "examples.tiny_shakespeare:char_transformer"

  c.data = ml_collections.ConfigDict()
  c.data.name = ""  # registered dataset, e.g. "examples.tiny_shakespeare:tiny_shakespeare"
  c.data.batch_size = 32  # global batch size (all processes together)

  o = c.optimizer = ml_collections.ConfigDict()
  o.name = "adamw"  # registered optimizer: "adamw", "nadamw" or a user one
  o.learning_rate = 1e-3  # peak learning rate
  o.schedule = "constant"  # one of adamw_flax.schedules.SCHEDULES
  o.warmup_steps = 0  # linear warmup from 0 to learning_rate
  o.decay_steps = 0  # length of the schedule, warmup included; 0 = trainer.num_steps
  o.end_learning_rate = 0.0  # final value of warmup_cosine / warmup_linear
  o.piecewise_boundaries = ()  # steps at which "piecewise" scales the rate
  o.piecewise_scales = ()  # multiplicative scale at each boundary
  o.wsd_decay_fraction = 0.1  # "wsd": share of the schedule's steps that decay (the rest stable)
  o.wsd_decay_shape = "linear"  # "wsd": "linear", "cosine" or "1-sqrt"
  o.b1 = 0.9  # decay of the first moment
  o.b2 = 0.999  # decay of the second moment
  o.eps = 1e-8  # added to sqrt(nu_hat)
  o.eps_root = 0.0  # added to nu_hat inside the sqrt
  o.weight_decay = 1e-4  # decoupled weight decay strength (optax's default)
  o.weight_decay_mode = "lr"  # "lr": decay*lr(t) (optax); "paper": decay*lr(t)/peak; "adamc"
  o.weight_decay_mask = "default"  # rules (adamw_flax.masks): which params decay, or how much
  o.decay_to_init = False  # decay towards the initial params instead of 0 (fine-tuning)
  o.lr_multipliers = ""  # rules "selector=multiplier, ..." scaling the update per parameter group
  o.freeze = ""  # rules "selector=true, ..." selecting parameters that are not trained
  o.mu_dtype = _optional(str)  # dtype of the first moment; None = the params' dtype; or "int8"
  o.nu_dtype = _optional(str)  # dtype of the second moment; None = the params' dtype; or "int8"
  o.quantize_block_size = 256  # int8 moments: elements per scale, along the last axis
  o.quantize_min_size = 4096  # int8 moments: smaller leaves keep float32 moments
  o.float_moments = "embeddings"  # int8 moments: rules "selector=true" keeping float32 moments
  o.params_dtype = _optional(str)  # trained params' dtype; None = as built; "bfloat16"
  o.params_rounding = "stochastic"  # bfloat16 params: "stochastic", "kahan" or "nearest"
  o.moments_rounding = "nearest"  # int8 moments: codes rounded "nearest" or "stochastic"
  o.offload = ""  # optimizer state in host memory between steps: "opt_state" or fields "mu, nu"
  o.nesterov = False  # Nesterov momentum (NAdamW)
  o.update_from_stored_moments = False  # 16-bit mu: faster update, not optax's numbers
  o.grad_clip_norm = 0.0  # clip gradients to this global norm; 0 = off
  o.accumulate_steps = 1  # split each step's batch into this many micro-batches (same updates)
  o.skip_nonfinite = False  # skip steps whose gradients hold NaN/inf (optax.apply_if_finite)
  o.skip_spikes = False  # skip updates whose loss or grad norm is a spike (z-score, below)
  o.spike_window = 128  # skip_spikes: steps in the rolling mean and std (every step enters)
  o.spike_threshold = 6.0  # skip_spikes: z-score of a spike (MaxText/OLMo-core: 6)
  o.spike_warmup = 64  # skip_spikes: steps in the window before any is skipped (window // 2)
  o.skip_spikes_max_consecutive = 32  # skip_spikes: stop the run after this many skips in a row
  o.update_rms_clip = 0.0  # clip each tensor's update RMS to this times lr(t); 0 = off

  t = c.trainer = ml_collections.ConfigDict()
  t.num_steps = 1000  # optimizer steps to train
  t.log_every = 50  # steps between train-metric log lines
  t.eval_every = 250  # steps between evaluations; 0 = only at the end
  t.eval_batches = 20  # validation batches per evaluation
  t.final_eval_batches = 0  # validation batches of the evaluation at the end; 0 = eval_batches
  t.seed = 0  # seed of parameter init and data order
  t.max_nonfinite_steps = 10  # stop after this many consecutive non-finite losses
  t.allow_config_change = False  # resume a workdir whose saved config differs
  t.progress = True  # show a progress bar on stderr
  t.ema_decay = 0.0  # EMA of the params (e.g. 0.999), evaluated beside them; 0 = off
  t.ema_dtype = "float32"  # storage dtype of the EMA params (the arithmetic is float32)
  t.ema_warmup = False  # EMA decay min(ema_decay, (1 + t) / (10 + t)) at update t (timm, Kauldron)
  t.wandb_project = ""  # also log the metrics rows to this W&B project (needs wandb); "" = off
  t.wandb_mode = ""  # "online", "offline" or "disabled"; "" = W&B's default (WANDB_MODE)
  t.profile_steps = ()  # (start, stop): a JAX profiler trace of those updates in WORKDIR/profile
  t.stall_timeout_s = 900.0  # no progress this long: stacks, exit status 75; 0 = off
  t.peer_timeout_s = 30.0  # processes: another silent this long (died): exit status 75; 0 = off

  k = c.checkpoint = ml_collections.ConfigDict()
  k.every_steps = 1000  # steps between saves; 0 = only at the end
  k.keep = 3  # keep this many latest checkpoints
  k.keep_best_by = ""  # eval metric (e.g. "loss") to keep the best checkpoints by; "" = off
  k.best_mode = "min"  # "min" or "max" for keep_best_by
  k.keep_period = 0  # also keep every step divisible by this permanently; 0 = off
  k.async_save = True  # write in the background while training goes on
  k.migrate_opt_state = False  # convert an optimizer state saved in another format or tree

  m = c.mesh = ml_collections.ConfigDict()
  m.axes = ("data",)  # mesh axis names
  m.shape = (-1,)  # axis sizes; one may be -1 for "the remaining devices"
  m.partition_rules = ()  # ((selector, PartitionSpec tuple), ...), mask-rule selectors; first wins
  m.data_axes = ("data",)  # axes the batch dimension is sharded over
  m.shard_opt_state = "params"  # "params": like the params; "data": ZeRO-1, also over data axes
  # Maps the logical names of Linen/NNX sharding annotations to mesh axes;
  # unmapped names replicate.
  m.logical_axis_rules = ()  # ((logical name, mesh axis | axes | None), ...) for annotations
  return c


# ----------------------------------------------------------------- validation


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat_keys(value, name + "."))
    else:
      out[name] = value
  return out


def _suggest(key: str, known: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
  return f"; did you mean '{close[0]}'?" if close else ""


def _check_ranges(c: ml_collections.ConfigDict, errors: list[str]) -> None:
  o, t, k = c.optimizer, c.trainer, c.checkpoint

  def need(ok: bool, key: str, msg: str) -> None:
    if not ok:
      errors.append(f"{key}: {msg}")

  for key in ("b1", "b2"):
    need(0.0 <= o[key] < 1.0, f"optimizer.{key}", f"must be in [0, 1), got {o[key]}")
  for key in ("eps", "eps_root", "weight_decay", "grad_clip_norm", "end_learning_rate"):
    need(o[key] >= 0.0, f"optimizer.{key}", f"must be >= 0, got {o[key]}")
  need(
    o.learning_rate > 0.0 and math.isfinite(o.learning_rate),
    "optimizer.learning_rate",
    f"must be > 0, got {o.learning_rate}",
  )
  need(
    o.schedule in schedules.SCHEDULES,
    "optimizer.schedule",
    f"must be one of {', '.join(schedules.SCHEDULES)}, got {o.schedule!r}"
    + _suggest(str(o.schedule), schedules.SCHEDULES),
  )
  need(o.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
  need(o.decay_steps >= 0, "optimizer.decay_steps", f"must be >= 0, got {o.decay_steps}")
  total = o.decay_steps or t.num_steps
  # A decaying schedule needs steps after its warmup to decay over (optax's
  # cosine decay fails on a zero-length decay).
  decaying = o.schedule in ("warmup_cosine", "warmup_linear")
  need(
    o.warmup_steps < total if decaying else o.warmup_steps <= total,
    "optimizer.warmup_steps",
    f"({o.warmup_steps}) must be {'<' if decaying else '<='} the schedule's length ({total}: "
    "optimizer.decay_steps, or trainer.num_steps when that is 0)",
  )
  need(
    o.weight_decay_mode in ("lr", "paper", "adamc"),
    "optimizer.weight_decay_mode",
    f"must be 'lr' (decay * lr(t), as optax), 'paper' (decay * lr(t)/peak) or 'adamc' "
    f"(decay * lr(t)^2/peak), got {o.weight_decay_mode!r}",
  )
  for key in ("mu_dtype", "nu_dtype"):
    need(
      o[key] is None or o[key] in MOMENT_DTYPES,
      f"optimizer.{key}",
      f"must be None or one of {', '.join(MOMENT_DTYPES)}, got {o[key]!r}",
    )
  need(
    o.params_dtype in (None, "float32", "bfloat16"),
    "optimizer.params_dtype",
    f"must be None (as the model builds them), 'float32' or 'bfloat16', got {o.params_dtype!r}",
  )
  need(
    o.params_rounding in transform.ROUNDINGS,
    "optimizer.params_rounding",
    f"must be one of {', '.join(map(repr, transform.ROUNDINGS))}, got {o.params_rounding!r}",
  )
  offload_error = ""
  if not isinstance(o.offload, str):
    offload_error = f"must be a string such as 'opt_state' or 'mu,nu', got {o.offload!r}"
  else:
    try:
      offload.parse(o.offload)
    except ValueError as e:
      offload_error = str(e)
  need(not offload_error, "optimizer.offload", offload_error)
  need(
    o.moments_rounding in transform.MOMENTS_ROUNDINGS,
    "optimizer.moments_rounding",
    f"must be one of {', '.join(map(repr, transform.MOMENTS_ROUNDINGS))}, "
    f"got {o.moments_rounding!r}",
  )
  need(
    o.quantize_block_size >= 16,
    "optimizer.quantize_block_size",
    f"must be >= 16, got {o.quantize_block_size}",
  )
  need(
    o.quantize_min_size >= 0,
    "optimizer.quantize_min_size",
    f"must be >= 0, got {o.quantize_min_size}",
  )
  need(
    o.accumulate_steps >= 1,
    "optimizer.accumulate_steps",
    f"must be >= 1, got {o.accumulate_steps}",
  )
  batch = c.data.get("batch_size")
  if isinstance(batch, int):
    need(batch >= 1, "data.batch_size", f"must be >= 1, got {batch}")
    need(
      o.accumulate_steps < 1 or batch % o.accumulate_steps == 0,
      "data.batch_size",
      f"({batch}) must be a multiple of optimizer.accumulate_steps ({o.accumulate_steps}): "
      "each step's batch is split into that many micro-batches",
    )
  need(
    0.0 <= o.wsd_decay_fraction <= 1.0,
    "optimizer.wsd_decay_fraction",
    f"must be in [0, 1], got {o.wsd_decay_fraction}",
  )
  need(
    o.wsd_decay_shape in schedules.WSD_SHAPES,
    "optimizer.wsd_decay_shape",
    f"must be one of {', '.join(schedules.WSD_SHAPES)}, got {o.wsd_decay_shape!r}",
  )
  if o.schedule == "wsd" and o.wsd_decay_shape in schedules.WSD_SHAPES:
    length = round(o.wsd_decay_fraction * total)
    length = max(length, 1) if o.wsd_decay_fraction > 0 else 0
    need(
      total - length >= o.warmup_steps,
      "optimizer.wsd_decay_fraction",
      f"the decay (last {length} of {total} steps) overlaps the warmup ({o.warmup_steps}); "
      "lower it or optimizer.warmup_steps",
    )
  need(
    len(o.piecewise_boundaries) == len(o.piecewise_scales),
    "optimizer.piecewise_scales",
    "must have one scale per entry of optimizer.piecewise_boundaries",
  )
  if o.name not in ("",) and ":" not in o.name:
    known = registry.OPTIMIZERS.names()
    need(
      o.name in known,
      "optimizer.name",
      f"unknown optimizer {o.name!r}{_suggest(o.name, known)}; registered: {', '.join(known)}",
    )
  for key in ("weight_decay_mask", "lr_multipliers", "freeze", "float_moments"):
    try:
      rule_field(o[key], key)
    except ValueError as e:
      errors.append(f"optimizer.{key}: {e}")

  need(t.num_steps > 0, "trainer.num_steps", f"must be > 0, got {t.num_steps}")
  need(
    t.final_eval_batches >= 0,
    "trainer.final_eval_batches",
    f"must be >= 0 (0: trainer.eval_batches), got {t.final_eval_batches}",
  )
  for key in ("log_every",):
    need(t[key] > 0, f"trainer.{key}", f"must be > 0, got {t[key]}")
  for key in ("eval_every", "eval_batches", "max_nonfinite_steps"):
    need(t[key] >= 0, f"trainer.{key}", f"must be >= 0, got {t[key]}")
  need(
    t.profile_steps == ()
    or (len(t.profile_steps) == 2 and 0 <= t.profile_steps[0] < t.profile_steps[1]),
    "trainer.profile_steps",
    f"must be () or (start, stop) with 0 <= start < stop, got {tuple(t.profile_steps)}",
  )
  need(
    t.wandb_mode in ("", "online", "offline", "disabled"),
    "trainer.wandb_mode",
    f"must be '', 'online', 'offline' or 'disabled', got {t.wandb_mode!r}",
  )
  need(0.0 <= t.ema_decay < 1.0, "trainer.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
  need(
    t.ema_dtype in DTYPES,
    "trainer.ema_dtype",
    f"must be one of {', '.join(DTYPES)}, got {t.ema_dtype!r}",
  )
  need(o.spike_window >= 2, "optimizer.spike_window", f"must be >= 2, got {o.spike_window}")
  need(o.spike_threshold > 0, "optimizer.spike_threshold", f"must be > 0, got {o.spike_threshold}")
  need(o.spike_warmup >= 2, "optimizer.spike_warmup", f"must be >= 2, got {o.spike_warmup}")
  need(
    o.skip_spikes_max_consecutive >= 1,
    "optimizer.skip_spikes_max_consecutive",
    f"must be >= 1, got {o.skip_spikes_max_consecutive}",
  )
  need(
    t.peer_timeout_s >= 0,
    "trainer.peer_timeout_s",
    f"must be >= 0 seconds (0: no watch), got {t.peer_timeout_s}",
  )
  need(
    t.stall_timeout_s >= 0,
    "trainer.stall_timeout_s",
    f"must be >= 0 seconds (0: no watchdog), got {t.stall_timeout_s}",
  )
  need(
    o.update_rms_clip >= 0, "optimizer.update_rms_clip", f"must be >= 0, got {o.update_rms_clip}"
  )

  need(k.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {k.every_steps}")
  need(k.keep >= 1, "checkpoint.keep", f"must be >= 1, got {k.keep}")
  need(k.keep_period >= 0, "checkpoint.keep_period", f"must be >= 0, got {k.keep_period}")
  need(
    k.best_mode in ("min", "max"),
    "checkpoint.best_mode",
    f"must be 'min' or 'max', got {k.best_mode!r}",
  )

  m = c.mesh
  need(
    len(m.axes) == len(m.shape),
    "mesh.shape",
    f"needs one size per axis of mesh.axes {tuple(m.axes)}, got {tuple(m.shape)}",
  )
  need(
    sum(1 for s in m.shape if s == -1) <= 1,
    "mesh.shape",
    f"at most one size may be -1, got {tuple(m.shape)}",
  )
  need(
    all(s == -1 or s >= 1 for s in m.shape),
    "mesh.shape",
    f"sizes must be >= 1 or -1, got {tuple(m.shape)}",
  )
  for ax in m.data_axes:
    need(ax in m.axes, "mesh.data_axes", f"axis {ax!r} is not in mesh.axes {tuple(m.axes)}")
  need(
    m.shard_opt_state in ("params", "data"),
    "mesh.shard_opt_state",
    f"must be 'params' (like the params) or 'data' (ZeRO-1), got {m.shard_opt_state!r}",
  )
  errors.extend(mesh_config_errors(m))


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


def mesh_config_errors(mesh_cfg: ml_collections.ConfigDict) -> list[str]:
  """The problems of a ``mesh`` section found without devices or a model, as ``"key: message"``.

  Unique axis names, well-formed partition rules whose specs name mesh axes
  (each once), data axes and logical-axis rules that name mesh axes. What
  needs the devices or the parameters (sizes that divide) is checked by
  :func:`adamw_flax.sharding.mesh_from_config` and
  :func:`adamw_flax.sharding.param_specs`.

  Examples:
    >>> cfg = default_config().mesh
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
    text = mesh_cfg.partition_rules[i][0]
    used = [a for e in rule.value if e is not None for a in ((e,) if isinstance(e, str) else e)]
    for a in dict.fromkeys(used):
      if a not in axes:
        errors.append(
          f"mesh.partition_rules[{i}] ({text!r}): axis {a!r} is not in mesh.axes {axes}"
        )
    if len(set(used)) != len(used):
      errors.append(f"mesh.partition_rules[{i}] ({text!r}): {rule.value} uses a mesh axis twice")
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
    for a in names:
      if a not in axes:
        errors.append(
          f"mesh.logical_axis_rules[{i}] ({rule[0]!r}): axis {a!r} is not in mesh.axes {axes}"
        )
  return errors


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks ``config`` against the schema; returns it unchanged if it is valid.

  Args:
    config: a full launch config (the sections of :func:`default_config`).

  Returns:
    ``config``.

  Raises:
    ConfigError: naming every unknown key (with a close match), wrongly typed
      field and out-of-range value.

  Examples:
    >>> cfg = default_config()
    >>> cfg.optimizer.lerning_rate = 3e-4
    >>> validate_config(cfg)
    Traceback (most recent call last):
    ...
    adamw_flax.config.ConfigError: invalid config:
      optimizer.lerning_rate: unknown key; did you mean 'optimizer.learning_rate'?
  """
  schema = default_config()
  errors: list[str] = []
  for section in config.keys():
    if section not in SECTIONS:
      errors.append(f"{section}: unknown section{_suggest(section, SECTIONS)}")
  for section in SECTIONS:
    if section not in config:
      errors.append(f"{section}: missing section")
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

  for section in CHECKED_SECTIONS:
    known = _flat_keys(schema[section], section + ".")
    given = _flat_keys(config[section], section + ".")
    for key, value in list(given.items()):
      if value == "None" and key in known and known[key] is None:
        # The command line gives optional fields as text: "None" means None.
        config[section][key.split(".", 1)[1]] = given[key] = value = None
    for key, value in given.items():
      if key not in known:
        errors.append(f"{key}: unknown key{_suggest(key, list(known))}")
        continue
      want = known[key]
      ok = _same_type(value, want, schema, key)
      if not ok:
        errors.append(f"{key}: expected {_type_name(want, schema, key)}, got {value!r}")
  for section in ("model", "data"):
    if not isinstance(config[section].get("name", ""), str):
      errors.append(f"{section}.name: expected a string, got {config[section].name!r}")
  if not errors:
    _check_ranges(config, errors)
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  return config


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
  """Turns the ValueError / FileNotFoundError of a user's input into a :class:`ConfigError`.

  For the boundaries where a config meets code that checks it (mask rules
  against the model, the mesh against the devices, the data path): the
  message is prefixed with ``what`` and the original stays as the cause.

  Args:
    what: the part of the config the wrapped code checks (``"mesh"``, ``"data (name)"``).

  Returns:
    A context manager.
  """
  try:
    yield
  except UserError:
    raise
  except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
    text = str(e)
    named = re.match(rf"({'|'.join(SECTIONS)})\.\w", text)  # the message names its key
    if not named and not isinstance(e, OSError) and errors.user_frame(e) is not None:
      # Raised by the user's own code (a model's __init__), not about a config value.
      raise UserCodeError(errors.describe_user_exception(e, f"{what}, in your code")) from e
    raise ConfigError(text if named else f"{what}: {text}") from e


def check_registered(config: ml_collections.ConfigDict) -> None:
  """Checks that ``model.name`` and ``data.name`` are registered, and their declared fields.

  Imports the modules that ``"module:name"`` names (which register them).
  A model or dataset registered with ``config_fields`` gets its section
  checked like the schema's: an unknown key is an error with a close match.

  Raises:
    ConfigError: naming each bad key.

  Args:
    config: a full launch config.
  """
  errors = []
  for section, reg in (("model", registry.MODELS), ("data", registry.DATASETS)):
    name = config[section].get("name", "")
    if not name:
      errors.append(f"{section}.name: empty; name a registered {reg.kind} ('module.path:name')")
      continue
    try:
      fields = reg.fields(name)
    except registry.RegistryError as e:
      errors.append(f"{section}.name: {e}")
      continue
    if fields is None:
      continue
    for key in config[section].keys():
      if key != "name" and key not in fields:
        errors.append(
          f"{section}.{key}: unknown key for {reg.kind} {name!r}"
          + _suggest(f"{section}.{key}", [f"{section}.{f}" for f in fields])
        )
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _field_type(schema: ml_collections.ConfigDict, key: str) -> type | None:
  section, name = key.split(".", 1)
  ref = schema[section].get_ref(name) if "." not in name else None
  return ref.get_type() if ref is not None else None


def _same_type(value: Any, want: Any, schema: ml_collections.ConfigDict, key: str) -> bool:
  ftype = _field_type(schema, key)
  if value is None:
    return want is None
  if ftype is not None and want is None:
    return isinstance(value, ftype)
  if isinstance(want, bool):
    return isinstance(value, bool)
  if isinstance(want, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(want, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(want, tuple | list):
    return isinstance(value, tuple | list)
  if isinstance(want, str) and key.endswith(
    ("weight_decay_mask", "lr_multipliers", "freeze", "float_moments")
  ):
    return isinstance(value, str | tuple | list)
  return isinstance(value, type(want))


def _type_name(want: Any, schema: ml_collections.ConfigDict, key: str) -> str:
  ftype = _field_type(schema, key)
  if want is None and ftype is not None:
    return f"{ftype.__name__} or None"
  return type(want).__name__


# --------------------------------------------------------------- JSON and diffs


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as a JSON-able dict (what ``config.json`` and checkpoints hold).

  ``to_json_best_effort`` writes what JSON cannot hold as its repr, so a
  config with an odd value still saves (its restore then names the key).

  Args:
    config: the config.

  Returns:
    A dict of JSON types (sequences as lists).
  """
  return json.loads(config.to_json_best_effort())


def _tuples(value: Any) -> Any:
  # JSON has no tuples; the config schema uses tuples throughout.
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def config_with_defaults(data: dict[str, Any]) -> ml_collections.ConfigDict:
  """A config saved as JSON, on top of :func:`default_config` (not validated).

  A ``config.json`` or checkpoint written before the schema gained a field
  (e.g. ``mesh.logical_axis_rules``) reads with that field at its default,
  so an old run resumes and compares equal to today's config of it.

  Examples:
    >>> cfg = config_with_defaults({"mesh": {"axes": ["data"], "shape": [-1]}})
    >>> cfg.mesh.axes, cfg.mesh.logical_axis_rules
    (('data',), ())

  Args:
    data: the saved config (JSON types).

  Returns:
    The config, lists as tuples, missing fields at their defaults.
  """
  config = default_config()
  config.update(_tuples(data))
  return config


def flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
  """A nested dict as ``{"section.key": value}`` (sequences as lists).

  Args:
    tree: a nested dict (a config as :func:`config_json` gives it).
    prefix: prepended to every key.

  Returns:
    The flat dict.
  """
  if isinstance(tree, dict):
    out: dict[str, Any] = {}
    for key, value in tree.items():
      out.update(flat_config(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple | list) else tree}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """The keys whose values differ between two configs, as ``"key: old -> new"`` lines.

  Args:
    old: a config as :func:`config_json` gives it (or a flat dict).
    new: the same for the other side.

  Returns:
    One line per differing key, sorted; a key only one side has shows
    ``(absent)`` on the other.

  Examples:
    >>> config_diff({"optimizer": {"b1": 0.9, "b2": 0.99}}, {"optimizer": {"b1": 0.9, "b2": 0.95}})
    ['optimizer.b2: 0.99 -> 0.95']
  """
  a, b = flat_config(old), flat_config(new)
  out = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key, "(absent)"), b.get(key, "(absent)")
    if x != y:
      out.append(f"{key}: {x!r} -> {y!r}")
  return out


# --------------------------------------------------------------- loading


def _parse_value(raw: str, current: Any, field_type: type | None, key: str) -> Any:
  """A command-line value read by the type of the field it sets."""
  text = raw.strip()
  if text == "None":
    return None
  kind = field_type or (type(current) if current is not None else None)
  if kind is str:
    return raw  # a string field takes the text as written ("1e-3" stays a string)
  if kind is bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() in words:
      return words[text.lower()]
    raise ConfigError(f"{key}: expected true or false, got {raw!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if kind in (int, float, tuple, list):
      raise ConfigError(
        f"{key}: cannot read {raw!r} as {kind.__name__}; write e.g. "
        + {int: "8", float: "3e-4", tuple: "'(4, 2)'", list: "'[1, 2]'"}[kind]
      ) from None
    return raw
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if kind is tuple and isinstance(value, list):
    value = tuple(value)
  if kind is tuple and not isinstance(value, tuple):
    value = (value,)
  return value


def parse_override(text: str) -> tuple[str, str]:
  """Splits ``"section.key=value"`` (``--config.`` prefix allowed) into (key, raw value).

  Args:
    text: one override.

  Returns:
    ``(key, raw value text)``.
  """
  text = text.removeprefix("--").removeprefix("config.")
  if "=" not in text:
    raise ConfigError(f"override {text!r}: expected 'section.key=value'")
  key, raw = text.split("=", 1)
  return key.strip(), raw


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies ``section.key=value`` overrides in place: the one parser of the command line.

  A value is read by the type of the field it sets: text for string fields
  (``None`` for None), ``true``/``false`` for booleans, Python literals for
  numbers and tuples. An unknown section or key is an error with a close
  match.

  Args:
    config: the config to change.
    overrides: strings ``"section.key=value"`` (``--config.`` prefix allowed).

  Raises:
    ConfigError: naming the key.

  Examples:
    >>> cfg = default_config()
    >>> apply_overrides(cfg, ["optimizer.learning_rate=3e-4", "optimizer.mu_dtype=bfloat16"])
    >>> cfg.optimizer.learning_rate, cfg.optimizer.mu_dtype
    (0.0003, 'bfloat16')
    >>> apply_overrides(cfg, ["optimizer.lerning_rate=1e-3"])
    Traceback (most recent call last):
    ...
    adamw_flax.config.ConfigError: optimizer.lerning_rate: unknown key; did you mean 'optimizer.learning_rate'?
  """
  for text in overrides:
    key, raw = parse_override(text)
    node = config
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parents[: i + 1])
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        what = "unknown section" if i == 0 else "unknown key"
        close = difflib.get_close_matches(part, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{'.'.join([*parents[:i], close[0]])}'?" if close else ""
        raise ConfigError(f"{where}: {what}{hint}")
      node = node[part]
    if leaf not in node:
      known = [".".join([*parents, k]) for k in node.keys()]
      raise ConfigError(f"{key}: unknown key{_suggest(key, known)}")
    ref = node.get_ref(leaf) if not isinstance(node[leaf], ml_collections.ConfigDict) else None
    if ref is None:
      raise ConfigError(f"{key}: is a section; set one of its keys ({key}.KEY=value)")
    value = _parse_value(raw, node[leaf], ref.get_type(), key)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{key}: cannot set {value!r} ({e})") from None


def load_config(
  path: str | Path,
  overrides: Sequence[str] = (),
  arg: str | None = None,
  *,
  validate: bool = True,
) -> ml_collections.ConfigDict:
  """Loads ``get_config()`` from a config file, applies overrides, validates.

  This is what ``python -m train`` does with ``--config=path``
  ``--config.key=value``, for use from Python and tests.

  Args:
    path: a Python file defining ``get_config(arg=None)`` (or ``get_config()``).
    overrides: strings ``"section.key=value"``.
    arg: passed to ``get_config`` (the ``--config=path:arg`` form).
    validate: validate the result (False: return it as overridden).

  Returns:
    The validated config.
  """
  path = Path(path)
  if arg is None and not path.is_file() and ":" in str(path):
    head, tail = str(path).rsplit(":", 1)  # the --config=path:arg form
    if Path(head).is_file():
      path, arg = Path(head), tail
  if not path.is_file():
    raise ConfigError(f"--config: file {str(path)!r} does not exist; pass a configs/*.py file")
  spec = importlib.util.spec_from_file_location(f"_adamw_flax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  # A config may import its siblings ("from configs import base"): while it
  # loads, the directory holding its folder is importable, from any cwd.
  root = str(path.resolve().parent.parent)
  added = root not in sys.path
  if added:
    sys.path.insert(0, root)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(
        f"--config: {str(path)!r} defines no get_config(); define get_config() returning "
        "the run's ConfigDict (see configs/smoke.py)"
      )
    config = module.get_config(arg) if arg is not None else module.get_config()
  except SyntaxError as e:
    where = f"{e.filename or path}, line {e.lineno}"
    lines = [f"--config: syntax error in {where}: {e.msg}"]
    if e.text:
      text = e.text.rstrip("\n")
      indent = len(text) - len(text.lstrip())
      lines += [f"| {text.strip()}", "| " + " " * max((e.offset or 1) - 1 - indent, 0) + "^"]
    raise ConfigError("\n".join(lines)) from None
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 (the config file's own code raised)
    mine = path.resolve()
    tb = traceback.extract_tb(e.__traceback__)
    frames = [f for f in tb if Path(f.filename).resolve() == mine]
    at = f" at line {frames[-1].lineno}: {(frames[-1].line or '').strip()}" if frames else ""
    what = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    raise ConfigError(f"--config: {str(path)!r} raised {what}{at}") from e
  finally:
    if added:
      sys.path.remove(root)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f"--config: get_config() in {str(path)!r} returned a {type(config).__name__}, not an "
      "ml_collections.ConfigDict; return adamw_flax.config.default_config() with your changes"
    )
  apply_overrides(config, overrides)
  return validate_config(config) if validate else config
