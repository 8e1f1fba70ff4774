"""Where training metrics go: JSON lines, TensorBoard, a loss plot, a progress line.

Each writer is a small object the trainer calls on process 0; none of them
touches JAX, so they cost nothing on the device path.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from adamw_flax import fs


def _import_tensorboardx() -> Any:
  """``tensorboardX.SummaryWriter``, imported without importing PyTorch.

  tensorboardX imports torch at import time when it is installed (only to
  accept torch tensors; we log Python floats), which added 1.4 s to every
  launch on a machine with torch (measured with ``python -X importtime``).
  Unless the process has imported torch itself, the import of tensorboardX
  sees torch as absent; the marker is removed afterwards, so a later
  ``import torch`` works as usual.
  """
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter as writer  # noqa: PLC0415 (the guard above)
  finally:
    if blocked:
      del sys.modules["torch"]
  return writer


SummaryWriter = _import_tensorboardx()


def _clean(value: Any) -> Any:
  """JSON-safe Python scalars (NaN/inf become strings, as JSON has none)."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends one JSON object a line to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

  Args:
    workdir: the run's directory; writes ``metrics.jsonl`` and ``tensorboard/``.
    tensorboard: also write TensorBoard event files.
    resume_step: the step a run resumes from: rows of later steps, written
      before a crash and about to be replayed, are dropped first, so a resumed
      run's ``metrics.jsonl`` holds each step once.
    wandb: a :class:`WandbWriter` that gets the same rows, or None.
  """

  def __init__(
    self,
    workdir: str | Path,
    *,
    tensorboard: bool = True,
    resume_step: int | None = None,
    wandb: WandbWriter | None = None,
  ):
    self._wandb = wandb
    self.path = fs.as_path(workdir) / "metrics.jsonl"
    if resume_step is not None and self.path.exists():
      _drop_rows_after(self.path, resume_step)
    # Object stores (gs://) cannot append: there the file is rewritten whole
    # on each write (a few KB: one line per logged step).
    self._lines: list[str] | None = None
    self._file = None
    if fs.is_remote(self.path):
      self._lines = self.path.read_text().splitlines(True) if self.path.exists() else []
    else:
      self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
    self._tb = None
    if tensorboard:
      self._tb = SummaryWriter(str(fs.as_path(workdir) / "tensorboard"), flush_secs=30)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    """Writes ``{"step", "split", **metrics}`` as one line (and to TensorBoard)."""
    row = {"step": int(step), "split": split, **{k: _clean(v) for k, v in metrics.items()}}
    line = json.dumps(row) + "\n"
    if self._lines is not None:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key not in ("step", "split") and isinstance(value, int | float):
          self._tb.add_scalar(f"{split}/{key}", value, global_step=int(step))
    if self._wandb is not None:
      self._wandb.write(row)

  def close(self) -> None:
    """Closes the file and the TensorBoard and W&B writers."""
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()


class WandbWriter:
  """The rows of ``metrics.jsonl`` to Weights & Biases (optional: needs ``pip install wandb``).

  Numeric entries are logged as ``split/key`` at the row's ``step``. The run's
  W&B id is kept in ``WORKDIR/wandb_id``, so a resumed run continues the same
  W&B run (``resume="allow"``); files go under ``WORKDIR/wandb/``. Offline
  (``WANDB_MODE=offline``, or ``mode="offline"``) it writes there and needs no
  network (``wandb sync`` uploads later).

  Args:
    workdir: the run's directory.
    project: the W&B project.
    config: the run's config, as a JSON-able dict.
    mode: ``"online"``, ``"offline"`` or ``"disabled"``; None: W&B's own
      default (``WANDB_MODE``).
  """

  def __init__(self, workdir: str | Path, project: str, config: dict, mode: str | None = None):
    import wandb  # noqa: PLC0415 (optional dependency: only runs that log to W&B need it)

    workdir = fs.as_path(workdir)
    id_path = workdir / "wandb_id"
    run_id = id_path.read_text().strip() if id_path.exists() else secrets.token_hex(6)
    if not id_path.exists():
      id_path.write_text(run_id + "\n")
    (workdir / "wandb").mkdir(exist_ok=True)
    self.run = wandb.init(
      project=project,
      id=run_id,
      resume="allow",
      dir=str(workdir),
      config=config,
      mode=mode,
      name=workdir.name,
    )

  def write(self, row: Mapping[str, Any]) -> None:
    """Logs a ``metrics.jsonl`` row."""
    split = row["split"]
    values = {
      f"{split}/{k}": v
      for k, v in row.items()
      if k not in ("step", "split") and isinstance(v, int | float)
    }
    self.run.log(values, step=int(row["step"]))

  def close(self) -> None:
    """Finishes the W&B run."""
    self.run.finish()


def wandb_writer(workdir, project: str, config: dict, mode: str | None = None):
  """A :class:`WandbWriter`, or None (with a warning) when ``wandb`` is not installed.

  Args:
    workdir: the run's directory.
    project: the W&B project ("" : None, no W&B).
    config: the run's config as a dict.
    mode: as for :class:`WandbWriter`.

  Returns:
    The writer, or None.
  """
  if not project:
    return None
  if importlib.util.find_spec("wandb") is None:
    print(
      f"trainer.wandb_project={project!r} but wandb is not installed (pip install wandb): "
      "logging to metrics.jsonl and TensorBoard only",
      file=sys.stderr,
      flush=True,
    )
    return None
  return WandbWriter(workdir, project, config, mode)


def _drop_rows_after(path: Any, step: int) -> None:
  lines = path.read_text().splitlines(True)
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # the partial last line of a killed run
    if int(row.get("step", 0)) <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) == len(lines):
    return
  fs.write_atomic(path, "".join(kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
  """Reads ``metrics.jsonl``; a partly written last line (a killed run) is skipped.

  Args:
    path: the ``metrics.jsonl`` file (local or remote).

  Returns:
    The rows, in file order (none for a missing file).
  """
  rows = []
  path = fs.as_path(path)
  if not path.exists():
    return rows
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def plot_losses(workdir: str | Path) -> Path:
  """Draws ``loss.png``: train and eval loss vs step, learning rate on a second axis.

  Reads ``metrics.jsonl``, so a resumed run's plot holds its whole history
  (for a step logged twice, by a run and its resumption, the last row wins).

  Returns:
    The path of the written PNG.

  Args:
    workdir: the run's directory (reads ``metrics.jsonl``, writes ``loss.png``).
  """
  # The object API (no pyplot): no global state, so plots can be drawn in a
  # background thread while training goes on. Imported here: matplotlib is
  # 0.25 s of a launch's imports, and the first plot comes after the first eval.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (see above)
  from matplotlib.figure import Figure  # noqa: PLC0415 (see above)

  workdir = fs.as_path(workdir)
  rows = read_metrics(workdir / "metrics.jsonl")
  series: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "eval": {}}
  for row in rows:
    if row.get("split") in series:
      series[row["split"]][row["step"]] = row

  def xy(split: str, key: str) -> tuple[list[int], list[float]]:
    pts = sorted(
      (s, r[key]) for s, r in series[split].items() if isinstance(r.get(key), int | float)
    )
    return [p[0] for p in pts], [p[1] for p in pts]

  fig = Figure(figsize=(8, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for split, style in (("train", "-"), ("eval", "o-")):
    x, y = xy(split, "loss")
    if x:
      ax.plot(x, y, style, label=f"{split} loss", markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  x, y = xy("train", "lr")
  handles, labels = ax.get_legend_handles_labels()
  if x:
    ax2 = ax.twinx()
    (line,) = ax2.plot(x, y, color="gray", alpha=0.6, linewidth=1, label="learning rate")
    ax2.set_ylabel("learning rate")
    handles.append(line)
    labels.append("learning rate")
  if handles:
    ax.legend(handles, labels, loc="upper right")
  ax.set_title(workdir.name)
  fig.tight_layout()
  out = workdir / "loss.png"
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  fs.write_atomic(out, buffer.getvalue())  # a reader never sees a half-written plot
  return out


class ProgressBar:
  """A one-line progress display on a terminal, a plain line per update otherwise.

  Written by hand: tqdm is not a dependency, and the trainer needs only
  step / total, a few metrics and a rate.
  """

  def __init__(self, total: int, *, start: int = 0, stream: TextIO | None = None, enabled=True):
    self.total = total
    self.start = start
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._t0 = time.perf_counter()

  def update(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    frac = step / max(self.total, 1)
    width = 24
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    parts = [f"{step:>{len(str(self.total))}}/{self.total} [{bar}]"]
    for key, value in metrics.items():
      if isinstance(value, float):
        parts.append(f"{key} {value:.4g}")
      else:
        parts.append(f"{key} {value}")
    line = "  ".join(parts)
    if self._tty:
      self.stream.write("\r" + line + "\x1b[K")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def write(self, line: str) -> None:
    """Prints ``line`` on a line of its own (the bar, on a terminal, is redrawn after it)."""
    self.stream.write(("\r\x1b[K" if self._tty else "") + line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self._tty:
      self.stream.write("\n")
      self.stream.flush()
