"""The errors a user can fix: bad config, workdir, data path or checkpoint.

The command line (``python -m train``) prints a :class:`UserError` as one to
three lines and exits with status 2, without a traceback unless
``--verbosity`` is given. An exception raised in the user's own code (model,
loss, dataset) is a :class:`UserCodeError`: a few lines naming the user's
frame and the batch, status 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import inspect
import os
import re
import sysconfig
import traceback
from collections.abc import Mapping
from typing import Any

# What was running, as the reports of the user's code name it.
TRAIN_STEP = "the train step (your model and loss)"
EVAL_STEP = "the eval step (your model and loss, train=False)"


class UserError(Exception):
  """An error in what the user gave (config, command line, workdir, data, checkpoint)."""


class WorkdirError(UserError):
  """A workdir that cannot be used: a file, read-only, or locked by another run."""


class UserCodeError(Exception):
  """An exception raised in the user's own code (model, loss, dataset), reported short.

  ``python -m train`` prints :attr:`report` (the user's frame, the line, the
  batch's keys and shapes, one line of advice) and exits with status 1; the
  original exception is the cause, shown with ``--verbosity=1``.

  Attributes:
    report: the lines to print.
  """

  def __init__(self, report: str):
    super().__init__(report)
    self.report = report


# The packages whose frames are library code wherever they are installed: this
# library's own dependencies (and theirs that appear in tracebacks). A user's
# own package installed into site-packages is the user's code.
_LIBRARY_PACKAGES = frozenset({
  "absl", "chex", "etils", "flax", "grain", "jax", "jaxlib", "ml_collections", "ml_dtypes",
  "numpy", "optax", "orbax", "tensorstore", "treescope", "typing_extensions", "_pytest",
  "pytest", "pluggy", "xdist", "execnet", "tensorboardX", "matplotlib", "PIL", "google",
  "msgpack", "simplejson", "yaml", "wandb", "array_record", "cloudpickle",
})  # fmt: skip


def _library_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(the standard library's and adamw_flax's dirs, the installed packages' dirs)."""
  paths = sysconfig.get_paths()
  own = {paths[k] for k in ("stdlib", "platstdlib") if k in paths}
  own.add(os.path.dirname(os.path.abspath(__file__)))  # adamw_flax itself
  installed = {paths[k] for k in ("purelib", "platlib") if k in paths}
  norm = lambda dirs: tuple(os.path.join(os.path.realpath(d), "") for d in dirs)
  return norm(own), norm(installed)


def _is_library(path: str, own: tuple[str, ...], installed: tuple[str, ...]) -> bool:
  for root in installed:  # first: site-packages sits inside the standard library's dir
    if path.startswith(root):
      top = path[len(root) :].split(os.sep, 1)[0].removesuffix(".py")
      return top in _LIBRARY_PACKAGES or top.startswith(("_virtualenv", "__editable__"))
  return path.startswith(own)


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
  """The innermost frame of ``exc``'s traceback in the user's own code, if any.

  The user's code is any file outside the standard library, ``adamw_flax``
  and the packages it builds on (jax, flax, optax, orbax, numpy, ...): a
  user's own package installed into site-packages is the user's code too.

  Args:
    exc: an exception with its traceback.

  Returns:
    The frame, or None when every frame is library code.
  """
  own, installed = _library_dirs()
  frames = traceback.extract_tb(exc.__traceback__)
  for frame in reversed(frames):
    path = os.path.realpath(frame.filename)
    if frame.filename.startswith("<") or _is_library(path, own, installed):
      continue
    return frame
  return None


def _shapes(batch: Any) -> str:
  if not isinstance(batch, dict):
    return type(batch).__name__
  parts = []
  for key, value in batch.items():
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    parts.append(
      f"{key} {dtype}[{', '.join(map(str, shape))}]"
      if shape is not None
      else f"{key} {value!r:.40}"
    )
  return ", ".join(parts) or "(empty)"


def _missing_key(exc: BaseException, batch: Any) -> str | None:
  """The batch key a KeyError is about: the user's line reads ``name[key]`` of a batch-like dict.

  ``name`` must be a local of the user's frame holding the batch's keys (the
  traced batch or a micro-batch of it), so a KeyError of another dict on the
  same line gets the general advice.
  """
  if not isinstance(exc, KeyError) or not isinstance(batch, dict) or len(exc.args) != 1:
    return None
  key, frame = exc.args[0], user_frame(exc)
  if not isinstance(key, str) or key in batch or frame is None:
    return None
  read = rf"""(\w+)\s*\[\s*['"]{re.escape(key)}['"]\s*\]"""
  names = set(re.findall(read, frame.line or ""))
  tb, frames = exc.__traceback__, []
  while tb is not None:
    frames.append((tb.tb_frame, tb.tb_lineno))
    tb = tb.tb_next
  for f, lineno in reversed(frames):  # the frame user_frame found, with its locals
    if f.f_code.co_filename == frame.filename and lineno == frame.lineno:
      local = f.f_locals
      held = [n for n in names if isinstance(local.get(n), Mapping) and set(local[n]) == set(batch)]
      return key if held else None
  return None


def _headline(exc: BaseException) -> str:
  """``Type: the message's first line`` (``Type`` alone for an empty message)."""
  message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
  return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def describe_user_exception(
  exc: BaseException, where: str, *, batch: Any = None, batch_fn: Any = None
) -> str:
  """A short report of an exception raised in user code: what, where, the batch, what to do.

  Args:
    exc: the exception.
    where: what was running (``"the train step (your model and loss)"``,
      ``"model (my.models:cnn)"``).
    batch: the batch it ran on, if any (its keys, dtypes and shapes are shown).
    batch_fn: called for the batch when ``batch`` is not given (the eval
      step's, read again only to be described); its own failure shows no batch.

  Returns:
    Two to four lines: ``error: Type: message``, the user's innermost frame
    (file:line, function and the line of code), the batch, one line of advice.
  """
  what = _headline(exc)
  frame = user_frame(exc)
  code = (frame.line or "").strip() if frame is not None else ""
  if frame is not None:
    where_line = f"{os.path.relpath(frame.filename)}:{frame.lineno} (in {frame.name})"
    lines = [f"error: {what[:300]}", f"  in {where} at {where_line}: {code[:160]}"]
  else:
    lines = [f"error: {what[:300]}", f"  in {where} (no frame of your code in the traceback)"]
  if batch is None and batch_fn is not None:
    try:
      batch = batch_fn()
    except Exception:  # noqa: BLE001 (the batch is only described; the error is exc's)
      batch = None
  if batch is not None:
    lines.append(f"  batch: {_shapes(batch)}")
  if (key := _missing_key(exc, batch)) is not None:
    lines.append(
      f"  your code reads batch[{key!r}], which the dataset does not give: read one of its "
      "keys above, or add it in the dataset (the full traceback: --verbosity=1)"
    )
  else:
    lines.append(
      "  (your code raised this: fix it and rerun the same command; the full traceback: "
      "--verbosity=1)"
    )
  return "\n".join(lines)


def _definition(fn: Any) -> str | None:
  """``file:line (in name): code`` of the line defining ``fn`` (its ``def``), if its source is readable."""
  fn = inspect.unwrap(getattr(fn, "func", fn))  # a functools.partial: its function
  try:
    lines, start = inspect.getsourcelines(fn)
    path = inspect.getsourcefile(fn)
  except (OSError, TypeError):
    return None
  if path is None or not lines:
    return None
  defs = [i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "async def "))]
  i = defs[0] if defs else 0  # past decorators (@nn.compact); a lambda: its first line
  name = getattr(fn, "__qualname__", getattr(fn, "__name__", "?"))
  return f"{os.path.relpath(path)}:{start + i} (in {name}): {lines[i].strip()[:160]}"


def describe_user_value(problem: str, where: str, fn: Any, *advice: str, batch: Any = None) -> str:
  """A short report of a value the user's function returned, or was called with, that cannot work.

  For mistakes found by checking the user's function rather than by an
  exception in it (a loss of shape ``(16,)``, a Linen ``__call__`` its example
  inputs cannot call): the report names ``fn`` where it is defined.

  Args:
    problem: what is wrong, naming the function and the value's shape.
    where: what was running (``"the train step (your model and loss)"``).
    fn: the user's function (its ``def`` line is shown).
    *advice: one or two lines of what to do.
    batch: the batch it ran on, if any (its keys, dtypes and shapes are shown).

  Returns:
    At most four lines: ``error: problem``, where and the ``def`` line, the
    batch or the context, what to do.
  """
  at = _definition(fn)
  lines = [f"error: {problem[:300]}", f"  in {where} at {at}" if at else f"  in {where}"]
  if batch is not None:
    lines.append(f"  batch: {_shapes(batch)}")
  lines += [f"  {a}" for a in advice]
  return "\n".join(lines)


# Values that put a Linen module in inference mode at init, as Flax's guides
# call init (`model.init(key, x, train=False)`; `deterministic=True`).
_INIT_FLAGS = {"train": "False", "training": "False", "is_training": "False",
               "deterministic": "True"}  # fmt: skip


def describe_linen_init_call(
  module: Any, inputs: tuple[Any, ...], exc: BaseException
) -> str | None:
  """The short report of a Linen model whose ``__call__`` its example inputs cannot call.

  The library initialises a registered (or passed) Linen module as
  ``module.init(key, *example_inputs)``: positional inputs only, no keywords,
  so a ``__call__(self, x, train: bool)`` fails there with a ``TypeError``
  raised by Python in no frame of the user's code.

  Args:
    module: the Linen module.
    inputs: the example inputs it was called with.
    exc: the ``TypeError`` of the call.

  Returns:
    Four lines naming the module, its ``__call__`` and the missing
    arguments, and how to pass them; None when the inputs do bind to
    ``__call__`` (the ``TypeError`` is then another one).
  """
  cls = type(module).__name__
  call = type(module).__call__
  try:
    signature = inspect.signature(call)
  except (TypeError, ValueError):
    return None
  try:
    signature.bind(module, *inputs)
  except TypeError:
    pass
  else:
    return None
  kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  params = list(signature.parameters.values())[1:]  # after self
  positional = [p for p in params if p.kind in kinds]
  given = positional[: len(inputs)]
  missing = [p for p in positional[len(inputs) :] if p.default is p.empty]
  keyword_only = [
    p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty
  ]
  value = lambda p: _INIT_FLAGS.get(p.name, "False" if p.annotation in (bool, "bool") else "...")
  names = ", ".join(p.name for p in missing + keyword_only)
  shown = ", ".join(p.name for p in given)
  context = (
    f"it is initialised as {cls}.init(key, *example_inputs): {len(inputs)} example input(s) "
    f"({shown}), no keywords; in the steps only your loss calls it, with the arguments the "
    "loss gives (model(x, train=train))"
  )
  if missing:
    values = ", ".join(value(p) for p in missing)
    keywords = ", ".join(f"{p.name}={value(p)}" for p in missing)
    advice = (
      f"pass {names} at init: example_inputs ({shown}, {values}), as Flax's "
      f"model.init(key, {shown}, {keywords}); or give it a default ({missing[0].name}: bool = "
      f"{value(missing[0])}) (the full traceback: --verbosity=1)"
    )
  elif keyword_only:
    p = keyword_only[0]
    advice = (
      f"give {names} a default (*, {p.name}: bool = {value(p)}): example_inputs are passed "
      "by position, so a keyword-only argument gets no value at init (the full traceback: "
      "--verbosity=1)"
    )
  else:
    advice = (
      f"make example_inputs the inputs of one call of {cls}.__call__{signature} (the full "
      "traceback: --verbosity=1)"
    )
  return describe_user_value(
    _headline(exc),
    f"the init of the Linen model {cls}",
    call,
    context,
    advice,
  )
