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
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from adamw_flax import errors, registry, schema
from adamw_flax.errors import UserCodeError, UserError

# The schema's names, re-exported (declared once, in adamw_flax.schema).
DTYPES, MOMENT_DTYPES = schema.DTYPES, schema.MOMENT_DTYPES
CHECKED_SECTIONS, SECTIONS = schema.CHECKED_SECTIONS, schema.SECTIONS
rule_field, mesh_config_errors = schema.rule_field, schema.mesh_config_errors


class ConfigError(UserError, ValueError):
  """A config that cannot be used; the message names each offending key."""


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
  return schema.default_config()


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
  defaults = default_config()
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
    known = _flat_keys(defaults[section], section + ".")
    given = _flat_keys(config[section], section + ".")
    for key, value in list(given.items()):
      if value == "None" and key in schema.KEYS and schema.KEYS[key].optional:
        # The command line gives optional fields as text: "None" means None.
        config[section][key.split(".", 1)[1]] = given[key] = value = None
    for key, value in given.items():
      if key not in known:
        errors.append(f"{key}: unknown key{_suggest(key, list(known))}")
      elif (wrong := schema.KEYS[key].type_problem(value)) is not None:
        errors.append(f"{key}: {wrong}")
  for section in ("model", "data"):
    if not isinstance(config[section].get("name", ""), str):
      errors.append(f"{section}.name: expected a string, got {config[section].name!r}")
  if not errors:
    errors += schema.value_problems(config)
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
      raise UserCodeError(errors.describe_user_exception(e, what)) from e
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
