"""The config schema, its validation, and the optimizer built from it.

A launch is one ``ml_collections.ConfigDict`` with the sections ``model``,
``data``, ``optimizer``, ``trainer``, ``checkpoint`` and ``mesh``. Config files
in ``configs/`` are Python files with ``get_config()`` that start from
:func:`default_config` and override a few fields; any field can be overridden
on the command line (``--config.optimizer.learning_rate=3e-4``).

:func:`validate_config` checks a config where it enters (load, command line):
unknown keys (with a close-match suggestion), wrong types and out-of-range
values fail with one :class:`ConfigError` that names every offending key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import optax
from ml_collections import config_dict

from adamw_flax import registry, schedules

DTYPES = ("float32", "bfloat16", "float16")
# Sections whose fields are fixed by this schema. `model` and `data` belong to
# the registered model and dataset, which check their own fields.
CHECKED_SECTIONS = ("optimizer", "trainer", "checkpoint", "mesh")
SECTIONS = ("model", "data", *CHECKED_SECTIONS)


class ConfigError(ValueError):
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
  o.b1 = 0.9  # decay of the first moment
  o.b2 = 0.999  # decay of the second moment
  o.eps = 1e-8  # added to sqrt(nu_hat)
  o.eps_root = 0.0  # added to nu_hat inside the sqrt
  o.weight_decay = 1e-4  # decoupled weight decay strength (optax's default)
  o.weight_decay_mode = "lr"  # "lr": decay * lr(t) (optax, PyTorch); "paper": decay * lr(t)/peak
  o.weight_decay_mask = "default"  # rules on module paths (adamw_flax.masks): which params decay
  o.lr_multipliers = ""  # rules "selector=multiplier, ..." scaling the update per parameter group
  o.freeze = ""  # rules "selector=true, ..." selecting parameters that are not trained
  o.mu_dtype = _optional(str)  # dtype of the first moment; None = the params' dtype
  o.nu_dtype = _optional(str)  # dtype of the second moment; None = the params' dtype
  o.nesterov = False  # Nesterov momentum (NAdamW)
  o.update_from_stored_moments = False  # 16-bit mu: faster update, not optax's numbers
  o.grad_clip_norm = 0.0  # clip gradients to this global norm; 0 = off
  o.accumulate_steps = 1  # gradient accumulation (optax.MultiSteps) over this many steps
  o.skip_nonfinite = False  # skip steps whose gradients hold NaN/inf (optax.apply_if_finite)

  t = c.trainer = ml_collections.ConfigDict()
  t.num_steps = 1000  # optimizer steps to train
  t.log_every = 50  # steps between train-metric log lines
  t.eval_every = 250  # steps between evaluations; 0 = only at the end
  t.eval_batches = 20  # validation batches per evaluation
  t.seed = 0  # seed of parameter init and data order
  t.max_nonfinite_steps = 10  # stop after this many consecutive non-finite losses
  t.allow_config_change = False  # resume a workdir whose saved config differs
  t.progress = True  # show a progress bar on stderr

  k = c.checkpoint = ml_collections.ConfigDict()
  k.every_steps = 1000  # steps between saves; 0 = only at the end
  k.keep = 3  # keep this many latest checkpoints
  k.keep_best_by = ""  # eval metric (e.g. "loss") to keep the best checkpoints by; "" = off
  k.best_mode = "min"  # "min" or "max" for keep_best_by
  k.keep_period = 0  # also keep every step divisible by this permanently; 0 = off
  k.async_save = True  # write in the background while training goes on

  m = c.mesh = ml_collections.ConfigDict()
  m.axes = ("data",)  # mesh axis names
  m.shape = (-1,)  # axis sizes; one may be -1 for "the remaining devices"
  m.partition_rules = ()  # ((regex on param path, PartitionSpec tuple), ...); first match wins
  m.data_axes = ("data",)  # axes the batch dimension is sharded over
  m.shard_opt_state = "params"  # "params": like the params; "data": ZeRO-1, also over data axes
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
  need(
    o.warmup_steps <= total,
    "optimizer.warmup_steps",
    f"({o.warmup_steps}) must be <= the schedule's length ({total}: optimizer.decay_steps, "
    "or trainer.num_steps when that is 0)",
  )
  need(
    o.weight_decay_mode in ("lr", "paper"),
    "optimizer.weight_decay_mode",
    f"must be 'lr' (decay * lr(t), as optax) or 'paper' (decay * lr(t)/peak), got "
    f"{o.weight_decay_mode!r}",
  )
  for key in ("mu_dtype", "nu_dtype"):
    need(
      o[key] is None or o[key] in DTYPES,
      f"optimizer.{key}",
      f"must be None or one of {', '.join(DTYPES)}, got {o[key]!r}",
    )
  need(
    o.accumulate_steps >= 1,
    "optimizer.accumulate_steps",
    f"must be >= 1, got {o.accumulate_steps}",
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
  for key in ("weight_decay_mask", "lr_multipliers", "freeze"):
    try:
      _parse_rules(o[key], key)
    except ValueError as e:
      errors.append(f"optimizer.{key}: {e}")

  need(t.num_steps > 0, "trainer.num_steps", f"must be > 0, got {t.num_steps}")
  for key in ("log_every",):
    need(t[key] > 0, f"trainer.{key}", f"must be > 0, got {t[key]}")
  for key in ("eval_every", "eval_batches", "max_nonfinite_steps"):
    need(t[key] >= 0, f"trainer.{key}", f"must be >= 0, got {t[key]}")

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
  from adamw_flax import sharding  # lazily: it imports jax's sharding machinery

  errors.extend(sharding.mesh_config_errors(m))


def _parse_rules(spec: Any, key: str) -> Any:
  if spec in ("", None, ()):
    return ()
  from adamw_flax import masks  # imported lazily: masks pulls in flax

  value_type = float if key == "lr_multipliers" else bool
  return masks.parse_rules(spec, value_type=value_type)


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
  if isinstance(want, str) and key.endswith(("weight_decay_mask", "lr_multipliers", "freeze")):
    return isinstance(value, str | tuple | list)
  return isinstance(value, type(want))


def _type_name(want: Any, schema: ml_collections.ConfigDict, key: str) -> str:
  ftype = _field_type(schema, key)
  if want is None and ftype is not None:
    return f"{ftype.__name__} or None"
  return type(want).__name__


# --------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[str, Any]:
  """Parses ``"section.key=value"`` (``--config.`` prefix allowed) into (key, value)."""
  text = text.removeprefix("--").removeprefix("config.")
  if "=" not in text:
    raise ConfigError(f"override {text!r}: expected 'section.key=value'")
  key, raw = text.split("=", 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return key, value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies ``section.key=value`` overrides in place, as the command line does."""
  for text in overrides:
    key, value = parse_override(text)
    node = config
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
      if part not in node:
        raise ConfigError(f"{'.'.join(parents[: i + 1])}: unknown key in override {text!r}")
      node = node[part]
    if leaf not in node:
      raise ConfigError(
        f"{key}: unknown key in override {text!r}{_suggest(leaf, list(node.keys()))}"
      )
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"{key}: cannot set {value!r}: {e}") from e


def load_config(
  path: str | Path, overrides: Sequence[str] = (), arg: str | None = None
) -> ml_collections.ConfigDict:
  """Loads ``get_config()`` from a config file, applies overrides, validates.

  This is what ``python -m train`` does with ``--config=path``
  ``--config.key=value``, for use from Python and tests.

  Args:
    path: a Python file defining ``get_config(arg=None)`` (or ``get_config()``).
    overrides: strings ``"section.key=value"``.
    arg: passed to ``get_config`` (the ``--config=path:arg`` form).

  Returns:
    The validated config.
  """
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {str(path)!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_adamw_flax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {str(path)!r} defines no get_config()")
  config = module.get_config(arg) if arg is not None else module.get_config()
  apply_overrides(config, overrides)
  return validate_config(config)


# --------------------------------------------------------------- optimizer


def scale_by_multipliers(multipliers: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Multiplies each update leaf by its scalar from ``multipliers(updates)``.

  optax has no per-leaf constant scaling (``optax.multi_transform`` would
  split the optimizer state by group, changing its tree); this keeps the
  state of the wrapped optimizer as it is.
  """
  import jax

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    factors = multipliers(updates)
    updates = jax.tree.map(lambda u, f: u * jax.numpy.asarray(f, u.dtype), updates, factors)
    return updates, state

  return optax.GradientTransformation(init, update)


def optimizer_from_config(
  cfg: ml_collections.ConfigDict, *, num_steps: int | None = None, target: Any = None
) -> optax.GradientTransformationExtraArgs:
  """Builds the full optimizer chain that ``config.optimizer`` describes.

  The chain is, in order: gradient clipping (``grad_clip_norm``), the
  registered optimizer (``name``) with its schedule and weight-decay mask,
  per-group learning-rate multipliers (``lr_multipliers``), then the
  wrappers: skipping of non-finite steps (``skip_nonfinite``) and gradient
  accumulation (``accumulate_steps``). Frozen parameters (``freeze``) are
  removed from the trained tree by :func:`adamw_flax.create_train_state`, so
  they never reach this optimizer.

  Args:
    cfg: the ``optimizer`` section of a validated config.
    num_steps: the run's length, for schedules whose ``decay_steps`` is 0.
    target: the model (NNX module, or a params tree) that mask and multiplier
      rules are resolved against; needed for rules on module types.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> cfg = default_config().optimizer
    >>> cfg.weight_decay_mask = "all"
    >>> tx = optimizer_from_config(cfg)
    >>> state = tx.init({"w": jnp.ones(3)})
  """
  from adamw_flax import masks

  lr = schedules.schedule_from_config(cfg, num_steps)
  if cfg.schedule == "constant" and not cfg.warmup_steps:
    lr = float(cfg.learning_rate)  # a scalar keeps the state tree of optax.adamw(lr)
  decay_rules = _parse_rules(cfg.weight_decay_mask, "weight_decay_mask")
  mask = None
  # No decay, or decay of everything, needs no mask: the optimizer state is
  # then exactly plain optax.adamw's (no MaskedState), and no model is needed.
  if decay_rules and cfg.weight_decay and decay_rules != masks.PRESETS["all"]:
    mask = masks.weight_decay_mask(decay_rules, target)
  factory = registry.OPTIMIZERS.get(cfg.name)
  tx = factory(cfg, learning_rate=lr, weight_decay_mask=mask)

  parts = []
  if cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(tx)
  mult_rules = _parse_rules(cfg.lr_multipliers, "lr_multipliers")
  if mult_rules:
    parts.append(scale_by_multipliers(masks.lr_multiplier_fn(mult_rules, target)))
  tx = parts[0] if len(parts) == 1 else optax.chain(*parts)
  if cfg.skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
  if cfg.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps).gradient_transformation()
  return optax.with_extra_args_support(tx)
