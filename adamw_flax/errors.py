"""The errors a user can fix: bad config, workdir, data path or checkpoint.

The command line (``python -m train``) prints a :class:`UserError` as one to
three lines and exits with status 2, without a traceback unless
``--verbosity`` is given. An exception raised in the user's own code (model,
loss, dataset) is a :class:`UserCodeError`: a few lines naming the user's
frame and the batch, status 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sysconfig
import traceback
from collections.abc import Mapping
from typing import Any


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
  message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
  what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
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
