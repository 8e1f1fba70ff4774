"""Name -> factory registries for optimizers, models and datasets.

Configs name what they train (``config.optimizer.name = "adamw"``,
``config.model.name = "examples.tiny_shakespeare:char_transformer"``); the
registries turn those names into code, so new models, datasets and optimizers
plug in without touching the trainer (the big_vision pattern).

A name of the form ``"some.module:name"`` imports ``some.module`` first (whose
import registers ``name``), so a config (or a saved ``config.json``) is enough
to find the code of a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from adamw_flax import transform
from adamw_flax.errors import UserError

T = TypeVar("T")


class RegistryError(UserError, KeyError):
  """An unknown or duplicate name in a registry."""

  def __str__(self) -> str:  # KeyError would quote the message.
    return str(self.args[0])


def _origin(obj: Any) -> str:
  target = getattr(obj, "build", obj)  # a ModelEntry names its builder
  return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def _same_definition(old: Any, new: Any) -> bool:
  """The same code registering again: a module imported twice (under two names, or reloaded)."""
  return _origin(old) == _origin(new) and _origin(old) != "?.?"


class Registry(Generic[T]):
  """A name -> object map with helpful errors.

  Args:
    kind: what the registry holds ("optimizer", "model", ...), used in errors.
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}
    # name -> the config fields the entry reads (beside `name`), when declared
    self._fields: dict[str, tuple[str, ...]] = {}

  def declare_fields(self, name: str, fields: Any) -> None:
    """Records the config fields entry ``name`` reads, so typos in its section are caught."""
    if fields is not None:
      self._fields[name] = tuple(str(f) for f in fields)

  def fields(self, name: str) -> tuple[str, ...] | None:
    """The declared config fields of ``name`` (importing ``module:`` prefixes), or None."""
    self.get(name)
    return self._fields.get(name.rsplit(":", 1)[-1])

  def register(self, name: str, obj: T) -> T:
    if not isinstance(name, str) or not name or ":" in name:
      raise ValueError(f"{self.kind} name must be a non-empty string without ':', got {name!r}")
    if name in self._entries and not _same_definition(self._entries[name], obj):
      raise RegistryError(
        f"{self.kind} {name!r} is already registered (by {_origin(self._entries[name])}); "
        f"pick another name, or rebind it temporarily with "
        f"`adamw_flax.registry.{self.kind.upper()}S.override(name, obj)` in tests"
      )
    self._entries[name] = obj
    return obj

  def get(self, name: str) -> T:
    """Returns the entry named ``name``, importing ``module:`` prefixes first."""
    key = name
    if ":" in name:
      module, key = name.rsplit(":", 1)
      try:
        importlib.import_module(module)
      except ImportError as e:
        raise RegistryError(
          f"{self.kind} {name!r}: cannot import module {module!r} ({e}); make it importable: "
          "install the package that provides it, or run from the directory that holds it "
          "(or add that directory to PYTHONPATH)"
        ) from e
    if key not in self._entries:
      known = sorted(self._entries)
      close = difflib.get_close_matches(key, known, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise RegistryError(
        f"unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: "
        f"{', '.join(known) or '(none)'}. A name 'module.path:{key}' imports the module "
        "that registers it."
      )
    return self._entries[key]

  def names(self) -> list[str]:
    return sorted(self._entries)

  @contextlib.contextmanager
  def override(self, name: str, obj: T) -> Iterator[T]:
    """Temporarily (re)binds ``name``; for tests."""
    missing = object()
    old = self._entries.get(name, missing)
    self._entries[name] = obj
    try:
      yield obj
    finally:
      if old is missing:
        del self._entries[name]
      else:
        self._entries[name] = old


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A registered model.

  Attributes:
    build: ``build(model_config, *, rngs, data_info) -> module``: an
      ``nnx.Module``, or a Linen module (then ``example_inputs`` is needed).
    loss: ``loss(model, batch, *, train[, rngs]) -> (scalar loss, dict of
      scalar metrics)``; with an ``rngs`` parameter it gets the step's RNGs.
    example_inputs: ``(model_config, data_info) -> tuple`` of one call's
      positional inputs (arrays or ``jax.ShapeDtypeStruct``), for Linen models.
  """

  build: Callable[..., Any]
  loss: Callable[..., Any]
  example_inputs: Callable[..., tuple[Any, ...]] | None = None


OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer")
MODELS: Registry[ModelEntry] = Registry("model")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")


def register_optimizer(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Registers ``factory(cfg, *, learning_rate, weight_decay_mask) -> GradientTransformation``.

  The factory receives the validated ``config.optimizer`` section, the
  learning rate already built from it (a float or an optax schedule) and the
  weight-decay mask (a callable params -> bool tree, or None); the
  surrounding chain (clipping, masks, multipliers, accumulation, non-finite
  skipping) is added by :func:`adamw_flax.optimizer_from_config`.

  Example:
    >>> import optax, adamw_flax
    >>> @adamw_flax.register_optimizer("my_sgd_doc")
    ... def my_sgd(cfg, *, learning_rate, weight_decay_mask):
    ...   return optax.sgd(learning_rate, momentum=cfg.b1)
    >>> "my_sgd_doc" in adamw_flax.registry.OPTIMIZERS.names()
    True

  Args:
    name: the name configs use in ``config.optimizer.name``.

  Returns:
    A decorator that registers the factory and returns it.
  """

  def deco(factory):
    return OPTIMIZERS.register(name, factory)

  return deco


def register_model(
  name: str,
  *,
  loss: Callable[..., Any],
  example_inputs: Callable[..., tuple[Any, ...]] | None = None,
  config_fields: Any = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Registers a model builder and its loss.

  Args:
    name: the name configs use in ``config.model.name``.
    loss: ``loss(model, batch, *, train: bool[, rngs]) -> (loss, metrics)``,
      where ``model`` is the NNX module (a Linen model arrives wrapped in
      ``nnx.bridge.ToNNX``), ``batch`` a dict of arrays, ``loss`` a float
      scalar (a mean over the batch) and ``metrics`` a dict of extra scalars
      (may be empty). A loss with an ``rngs`` parameter gets an
      ``nnx.Rngs`` of the step's key (for dropout).
    example_inputs: ``(model_config, data_info) -> tuple`` of one call's
      inputs; needed when ``build`` returns a Linen module.
    config_fields: the fields of ``config.model`` the builder reads (beside
      ``name``); when given, an unknown field is a config error with a "did
      you mean".

  Returns:
    A decorator for ``build(model_config, *, rngs, data_info) -> module``.
  """

  def deco(build):
    MODELS.register(name, ModelEntry(build=build, loss=loss, example_inputs=example_inputs))
    MODELS.declare_fields(name, config_fields)
    return build

  return deco


def register_dataset(
  name: str, *, config_fields: Any = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Registers ``build(data_config, *, seed, process_index, process_count) -> dataset``.

  The dataset object provides (see ``adamw_flax.trainer`` for how it is used):
    * ``info``: dict passed to the model builder (e.g. ``vocab_size``);
    * ``global_batch_size``: examples per step over all processes;
    * ``tokens_per_example``: for throughput (1 for non-sequence data);
    * ``train_batch(step) -> dict[str, np.ndarray]``: this process's slice of
      global batch ``step``, a pure function of (seed, step) so that resuming
      and changing the process count reproduce the same global batches;
    * ``eval_batches(num) -> Iterable[dict]``: this process's slices of a
      fixed set of ``num`` validation batches.

  Args:
    name: the name configs use in ``config.data.name``.
    config_fields: the fields of ``config.data`` the builder reads (beside
      ``name``); when given, an unknown field is a config error.

  Returns:
    A decorator that registers the builder and returns it.
  """

  def deco(build):
    DATASETS.register(name, build)
    DATASETS.declare_fields(name, config_fields)
    return build

  return deco


# ------------------------------------------------------------------ built-ins


def _adam_family(cfg, *, learning_rate, weight_decay_mask, quantize_mask=None, rounding_seed=None,
                 **overrides):  # fmt: skip
  # The section's keys declared `adamw=True` (adamw_flax.schema) are adamw's
  # arguments of the same names, as big_vision hands `config.optax` to optax.
  # A mask of decay multipliers (rules with numbers) is a strength per leaf.
  strengths = getattr(weight_decay_mask, "strengths", False)
  if not hasattr(cfg, "adamw_arguments"):
    raise TypeError(
      "the built-in optimizers take the optimizer section's settings: pass "
      "adamw_flax.plan.as_optimizer_plan(config.optimizer).section, or call "
      "adamw_flax.optimizer_from_config(config.optimizer)"
    )
  return transform.adamw(
    learning_rate,
    **{**cfg.adamw_arguments(), **overrides},
    mask=None if strengths else weight_decay_mask,
    weight_decay_multipliers=weight_decay_mask if strengths else None,
    quantize_mask=quantize_mask,
    rounding_seed=rounding_seed,
  )


@register_optimizer("adamw")
def _adamw(cfg, *, learning_rate, weight_decay_mask, quantize_mask=None, rounding_seed=None):
  return _adam_family(
    cfg,
    learning_rate=learning_rate,
    weight_decay_mask=weight_decay_mask,
    quantize_mask=quantize_mask,
    rounding_seed=rounding_seed,
  )


@register_optimizer("nadamw")
def _nadamw(cfg, *, learning_rate, weight_decay_mask, quantize_mask=None, rounding_seed=None):
  return _adam_family(
    cfg,
    learning_rate=learning_rate,
    weight_decay_mask=weight_decay_mask,
    quantize_mask=quantize_mask,
    rounding_seed=rounding_seed,
    nesterov=True,
  )
