"""The training loop's side actions, each a small object: log, skip report, eval, save, stop, ...

As clu's ``periodic_actions`` do for Flax's examples and nanodo, every side
action of the loop is an object that says when it is due and runs then; the
loop (:mod:`adamw_flax.trainer.loop`) only dispatches steps, reads their
metrics and calls the actions. clu's ``PeriodicAction`` takes a step and a
time; ours also need the run's state, metrics and files, so they get the
:class:`Loop` they act on (clu is not a dependency for these few lines).

Three kinds, by when they run:

* per step, on each step's metrics once read (:class:`Divergence`,
  :class:`SkipLog`, :class:`TrainLog`): ``on_step(loop, result)``;
* at a boundary, with the state read back (:class:`Evaluate`,
  :class:`Save`, :class:`Stop`): ``due(loop, step)`` is asked at every step
  (``Stop`` must: JAX's preemption sync point is polled at each step on every
  process), ``run(loop, applied)`` when due;
* around the loop (:class:`Profile`, :class:`Plots`, :class:`Timing`):
  ``close(loop)`` at the end, whatever ended it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from adamw_flax import (
  checkpoint,
  distributed,
  errors,
  plan,
  reporting,
  sharding,
  train_state,
  watchdog,
)
from adamw_flax.errors import UserCodeError, UserError
from adamw_flax.trainer.workdir import check_space


class TrainingDiverged(RuntimeError):
  """The run cannot go on: the loss stayed non-finite, or every step is a spike."""


@dataclasses.dataclass
class Guards:
  """What keeps a run from hanging or losing work: stop signals, the stall and peer watchdogs."""

  signals: watchdog.StopSignals
  watchdog: watchdog.Watchdog
  peers: watchdog.PeerWatch


@dataclasses.dataclass
class Loop:
  """A training loop's state, which its actions read and advance.

  Attributes:
    run: the run plan.
    workdir: the run's directory.
    main: whether this is process 0 (it writes the shared files).
    mesh: the device mesh.
    dataset: the run's dataset.
    ckpts: the run's checkpoints.
    steps: the compiled train and eval steps.
    guards: the stop signals and watchdogs.
    state: the train state (the last dispatched step's output).
    step: steps whose metrics were read (applied or skipped as spikes).
    position: batches drawn.
    t_start: the run's start (``time.perf_counter``).
    writer: the metrics writer (process 0), or None.
    progress: the progress display.
    costs: the run's fixed costs so far, in seconds.
    eval_metrics: the last evaluation's metrics.
    last_good_step: the latest checkpoint's step, or None.
    start: the step this run (or resumption) started from.
    skipped_total: updates skipped so far (non-finite and spikes).
    train_loss: the last step's loss.
    stopped: ``"preempted"`` or ``"interrupted"`` once a signal's save is done.
  """

  run: plan.RunPlan
  workdir: epath.Path
  main: bool
  mesh: Any
  dataset: Any
  ckpts: checkpoint.Checkpoints
  steps: train_state.RunSteps
  guards: Guards
  state: Any
  step: int
  position: int
  t_start: float
  writer: reporting.MetricsWriter | None
  progress: reporting.ProgressBar
  costs: dict[str, float] = dataclasses.field(
    default_factory=lambda: {"first_step": 0.0, "evals": 0.0, "saves": 0.0, "plots": 0.0}
  )
  eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  last_good_step: int | None = None
  start: int = 0
  skipped_total: int = 0
  train_loss: float = float("nan")
  stopped: str = ""

  @property
  def data_state(self) -> dict[str, int]:
    """What a checkpoint saves of the data: the step and the batches drawn."""
    return {"step": self.step, "position": self.position}


class StepResult(NamedTuple):
  """A step's metrics, read on the host.

  Attributes:
    metrics: the train step's metrics (numpy scalars).
    position: the batch it trained on.
    applied: whether its update was applied.
    spike: whether it was skipped as a spike (it counts as a step).
  """

  metrics: dict[str, Any]
  position: int
  applied: bool
  spike: bool


@contextlib.contextmanager
def user_code(where: str, batch: Any = None, *, batch_fn: Any = None) -> Iterator[None]:
  """Reports an exception raised in the user's code (traced at a step's first call) in short.

  Args:
    where: what was running (``"the train step (your model and loss)"``).
    batch: the batch it ran on, if any.
    batch_fn: called for the batch to describe when there is no ``batch``
      (only if the user's code raised).

  Returns:
    A context manager.
  """
  try:
    yield
  except (UserError, UserCodeError, TrainingDiverged):
    raise
  except Exception as e:  # noqa: BLE001 (any exception of the user's model, loss or data)
    if errors.user_frame(e) is None:
      raise  # every frame is library code: a bug of ours (or theirs), with its traceback
    report = errors.describe_user_exception(e, where, batch=batch, batch_fn=batch_fn)
    raise UserCodeError(report) from e


# ------------------------------------------------------------------ evaluation


def evaluate(
  eval_step, state, dataset, num_batches: int, mesh, mesh_cfg, *, beat=None, stop=None
) -> dict[str, float] | None:
  """Mean of ``eval_step``'s metrics over ``num_batches`` validation batches.

  At most two eval steps are in flight: batch ``i + 1`` is dispatched before
  batch ``i``'s metrics are read, and the metrics are summed on the host in
  float64. Dispatching every batch at once (and adding the metrics on the
  devices) deadlocked multi-device runs: XLA:CPU launches a multi-device
  program device by device, each device admits a bounded number of programs
  in flight, and with hundreds queued, one device's part of an all-reduce
  waited for a slot held by programs queued behind that very all-reduce on
  another device (1 process x 4 devices aborted at XLA's rendezvous timeout,
  2 processes x 2 devices hung).

  Args:
    eval_step: the compiled eval step.
    state: the train state.
    dataset: the run's dataset (``eval_batches``).
    num_batches: how many validation batches.
    mesh: the device mesh.
    mesh_cfg: the ``mesh`` section or its plan.
    beat: called with the batch index after each batch's metrics are read
      (the stall watchdog's progress), if given.
    stop: called after each batch's metrics are read, if given: True stops
      the evaluation (a stop signal), which then returns None.

  Returns:
    ``metric -> mean``, or None if stopped.
  """
  totals: dict[str, float] = {}
  count = 0

  def read(metrics) -> None:
    nonlocal count
    for key, value in jax.device_get(metrics).items():
      totals[key] = totals.get(key, 0.0) + float(value)
    count += 1
    if beat is not None:
      beat(count)

  pending = None
  for batch in dataset.eval_batches(num_batches):
    metrics = eval_step(state, sharding.global_batch(batch, mesh, mesh_cfg))
    if pending is not None:
      read(pending)
      if stop is not None and stop():
        jax.block_until_ready(metrics)  # nothing left running
        return None
    pending = metrics
  if pending is not None:
    read(pending)
  return {k: v / max(count, 1) for k, v in totals.items()}


def evaluate_all(
  eval_steps, state, dataset, num_batches: int, mesh, mesh_cfg, *, beat=None, stop=None
) -> dict[str, float] | None:
  """:func:`evaluate` with each eval step, its metrics prefixed by the step's key.

  Args:
    eval_steps: ``prefix -> eval step`` (``""``: the params, ``"ema_"``: the EMA weights).
    state: the train state.
    dataset: the run's dataset.
    num_batches: validation batches.
    mesh: the device mesh.
    mesh_cfg: the ``mesh`` section or its plan.
    beat: as for :func:`evaluate`.
    stop: as for :func:`evaluate`.

  Returns:
    ``prefix + metric -> mean``, or None if stopped.
  """
  out: dict[str, float] = {}
  for prefix, step in eval_steps.items():
    metrics = evaluate(step, state, dataset, num_batches, mesh, mesh_cfg, beat=beat, stop=stop)
    if metrics is None:
      return None
    out.update({prefix + k: v for k, v in metrics.items()})
  return out


def run_evaluation(
  loop: Loop, num_batches: int, *, stoppable: bool = False
) -> dict[str, float] | None:
  """Evaluates ``loop.state`` over ``num_batches`` (watchdog beats per batch; timed).

  ``stoppable``: a stop signal ends the evaluation between batches (one
  process: several would have to agree where), which then returns None and
  records nothing.
  """
  what = f"the evaluation at step {loop.step}"
  signals = loop.guards.signals
  stop = signals.is_set if stoppable and jax.process_count() == 1 else None
  wd = loop.guards.watchdog
  wd.beat(None, what)
  t = time.perf_counter()
  # The batch the eval step was traced on, read again only to be described when it raised.
  first = lambda: sharding.global_batch(
    next(iter(loop.dataset.eval_batches(1))), loop.mesh, loop.run.mesh
  )
  with user_code(errors.EVAL_STEP, batch_fn=first):
    metrics = evaluate_all(
      loop.steps.evals, loop.state, loop.dataset, num_batches, loop.mesh, loop.run.mesh,
      beat=lambda i: wd.beat(f"batch {i} of {what}", what), stop=stop,
    )  # fmt: skip
  loop.costs["evals"] += time.perf_counter() - t
  if metrics is None:
    return None
  loop.eval_metrics = metrics
  if loop.writer:
    row = {**loop.eval_metrics, "wall_time": time.perf_counter() - loop.t_start}
    loop.writer.write(loop.step, "eval", row)
  return loop.eval_metrics


def save(loop: Loop) -> bool:
  """Saves ``loop.state`` (checked for room first; timed; the watchdogs told); False if not finite.

  A state holding a NaN or an infinity (a loss gone non-finite, its update
  applied) is never a checkpoint: it is not saved, and the last good one
  stays the newest.
  """
  if not bool(_all_finite(loop.state)):
    if loop.main:
      loop.progress.write(
        f"step {loop.step}: the state holds NaN or inf: not saved ({_last_good(loop)})"
      )
    return False
  t = time.perf_counter()
  check_space(loop.workdir, _state_bytes(loop.state), loop.step, loop.last_good_step)
  loop.guards.watchdog.beat(None, f"the checkpoint save of step {loop.step}")
  loop.ckpts.save(
    loop.state, data_state=loop.data_state, metrics=loop.eval_metrics or None, force=True
  )
  loop.guards.watchdog.beat(f"the checkpoint save of step {loop.step}", "training")
  loop.guards.peers.note = f"step {loop.step}"
  loop.costs["saves"] += time.perf_counter() - t
  loop.last_good_step = loop.step
  return True


@jax.jit
def _all_finite(state: Any) -> jax.Array:
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in floats]))


def _last_good(loop: Loop) -> str:
  if loop.last_good_step is None:
    return "no checkpoint was written"
  return f"the last good checkpoint (step {loop.last_good_step}) is kept in {loop.workdir / 'checkpoints'}"


def finish(loop: Loop) -> None:
  """The end of training: the final evaluation and the last checkpoint, in the order that loses least.

  Without ``checkpoint.keep_best_by`` the last state is saved first (its
  write runs beside the evaluation), so a kill during a long final
  evaluation loses no training; with it, after the evaluation, whose metrics
  it records. A stop signal during the evaluation (one process) ends it:
  the state is saved and the rerun evaluates. A rerun of a finished run does
  not evaluate again what ``metrics.jsonl`` holds.

  Raises:
    TrainingDiverged: the last state is not finite (not saved).
  """
  tc = loop.run.trainer
  batches = tc.final_eval_batches or tc.eval_batches
  saved = loop.ckpts.latest_step() == loop.step
  if not saved and not loop.run.checkpoint.keep_best_by:
    saved = _save_last(loop)
  if batches and not _recorded_final_eval(loop):
    if run_evaluation(loop, batches, stoppable=True) is None:  # a stop signal
      if not saved:
        _save_last(loop)
      _stopped(loop, "the final evaluation did not run")
      return
  if not saved:
    _save_last(loop)
  wait_for_writes(loop)


def _save_last(loop: Loop) -> bool:
  if not save(loop):
    raise TrainingDiverged(
      f"the state at the last step ({loop.step}) holds NaN or inf: not saved; {_last_good(loop)}. "
      "To go on: lower optimizer.learning_rate or set optimizer.grad_clip_norm."
    )
  return True


def _recorded_final_eval(loop: Loop) -> bool:
  """Whether this run trained nothing and ``metrics.jsonl`` has its step's evaluation (a rerun).

  A run that trained nothing takes its summary's train loss (and, if
  recorded, eval metrics) from the file. Process 0 reads it and tells the
  others (the evaluation is a collective: all processes or none).
  """
  if loop.step != loop.start:
    return False
  text = "{}"
  if loop.main:
    rows = reporting.read_metrics(loop.workdir / "metrics.jsonl")
    last = lambda split: next(
      (r for r in reversed(rows) if r.get("split") == split and r.get("step", -1) <= loop.step), {}
    )
    evals = last("eval")
    text = json.dumps(
      {"train": last("train"), "eval": evals if evals.get("step") == loop.step else {}}
    )
  recorded = json.loads(distributed.exchange_text(text)[0])
  loop.train_loss = float(recorded["train"].get("loss", float("nan")))
  if not recorded["eval"]:
    return False
  drop = ("step", "split", "wall_time")
  loop.eval_metrics = {k: v for k, v in recorded["eval"].items() if k not in drop}
  if loop.main:
    print(
      f"step {loop.step}: trained and evaluated already (metrics.jsonl); nothing to do", flush=True
    )
  return True


def _stopped(loop: Loop, note: str = "") -> None:
  """Marks the run stopped by its signal and says what was saved."""
  wait_for_writes(loop)
  interrupted = loop.guards.signals.received == signal.SIGINT
  loop.stopped = "interrupted" if interrupted else "preempted"
  if loop.main:
    saved = f"saved step {loop.step}" if loop.last_good_step == loop.step else _last_good(loop)
    print(
      f"\n{loop.stopped}: {saved}{'; ' + note if note else ''}; rerun the same command to resume",
      flush=True,
    )


def _state_bytes(state: Any) -> int:
  return sum(math.prod(x.shape) * sharding.itemsize(x.dtype) for x in jax.tree.leaves(state))


def wait_for_writes(loop: Loop) -> None:
  """Waits until the last checkpoint is on disk (timed as a save)."""
  t = time.perf_counter()
  loop.guards.watchdog.beat(None, f"writing the checkpoint of step {loop.step}")
  loop.ckpts.wait()
  loop.costs["saves"] += time.perf_counter() - t


# ------------------------------------------------------------------ per step


class Divergence:
  """Stops the run after ``trainer.max_nonfinite_steps`` non-finite losses in a row."""

  def __init__(self, run: plan.RunPlan):
    self.limit = run.trainer.max_nonfinite_steps
    self.skip_nonfinite = run.optimizer.skip_nonfinite
    self.count = 0

  def on_step(self, loop: Loop, result: StepResult) -> None:
    finite = np.isfinite(float(result.metrics["loss"]))
    self.count = 0 if finite else self.count + 1
    if not (self.limit and self.count >= self.limit):
      return
    fixes = "lower optimizer.learning_rate or set optimizer.grad_clip_norm"
    if not self.skip_nonfinite:
      fixes += ", or set optimizer.skip_nonfinite=True"
    raise TrainingDiverged(
      f"loss was non-finite for {self.count} consecutive steps (at step {loop.step}); stopped "
      f"without saving; {_last_good(loop)}. To go on: {fixes}."
    )


class SkipLog:
  """Logs each skipped update (``split: "skipped"``); a spike also prints; too many stop the run."""

  def __init__(self, run: plan.RunPlan):
    self.rule = run.optimizer.spikes
    self.in_a_row = 0

  def on_step(self, loop: Loop, result: StepResult) -> None:
    m = result.metrics
    self.in_a_row = self.in_a_row + 1 if result.spike else 0
    if result.applied:
      return
    loss = float(m["loss"])
    if loop.writer:
      row = {"loss": loss, "grad_norm": float(m["grad_norm"]),
             "reason": "spike" if result.spike else "nonfinite",
             "skipped": loop.skipped_total, "position": result.position}  # fmt: skip
      if "skipped_spikes" in m:
        row["skipped_spikes"] = int(m["skipped_spikes"])
      loop.writer.write(loop.step, "skipped", row)  # a spike's step is counted already
    if not result.spike:
      return
    if loop.main:  # a spike consumes its step (as in MaxText, OLMo-core, Levanter): say so
      loop.progress.write(
        f"step {loop.step}: skipped as a loss spike (loss {loss:.4g}, grad norm "
        f"{float(m['grad_norm']):.4g}; {self.in_a_row} in a row)"
      )
    if self.in_a_row >= self.rule.max_consecutive:
      raise TrainingDiverged(
        f"{self.in_a_row} steps in a row were skipped as loss spikes (to step {loop.step}): the "
        "loss has risen for good. Stopped; the last checkpoint is kept. To go on: raise "
        "optimizer.spike_threshold or optimizer.skip_spikes_max_consecutive, or set "
        "optimizer.skip_spikes=False."
      )


class TrainLog:
  """A ``split: "train"`` row every ``trainer.log_every`` steps: the mean loss since the last, rates."""

  def __init__(self, loop: Loop):
    tc = loop.run.trainer
    self.every, self.num_steps = tc.log_every, tc.num_steps
    per_example = getattr(loop.dataset, "tokens_per_example", 1)
    self.per_step = loop.dataset.global_batch_size * per_example
    self.unit = "tokens" if per_example > 1 else "examples"
    self.t, self.since = time.perf_counter(), loop.step
    self.loss_sum, self.count = 0.0, 0

  def pause(self, seconds: float) -> None:
    """Leaves ``seconds`` (an evaluation) out of the throughput."""
    self.t += seconds

  def on_step(self, loop: Loop, result: StepResult) -> None:
    if not result.applied:
      return
    loss = float(result.metrics["loss"])
    loop.train_loss = loss
    self.loss_sum, self.count = self.loss_sum + loss, self.count + 1
    if loop.step % self.every and loop.step != self.num_steps:
      return
    now = time.perf_counter()
    rate = (loop.step - self.since) * self.per_step / max(now - self.t, 1e-9)
    row = {k: float(v) for k, v in result.metrics.items()}
    # The mean over the steps since the last log line: one step's loss is one
    # batch's, too noisy to read a curve from.
    row["loss"] = self.loss_sum / max(self.count, 1)
    self.loss_sum, self.count = 0.0, 0
    row[f"{self.unit}_per_sec"] = rate
    row["wall_time"] = now - loop.t_start
    self.t, self.since = now, loop.step
    if loop.writer:
      loop.writer.write(loop.step, "train", row)
    progress = {"loss": row["loss"], "lr": row["lr"], f"{self.unit}/s": int(rate)}
    loop.progress.update(loop.step, progress)


# ------------------------------------------------------------------ at boundaries


class Evaluate:
  """Evaluates every ``trainer.eval_every`` steps (not at the end: that is the final evaluation)."""

  def __init__(self, loop: Loop, log: TrainLog, plots: Plots):
    self.every, self.num_steps = loop.run.trainer.eval_every, loop.run.trainer.num_steps
    self.batches = loop.run.trainer.eval_batches
    self.log, self.plots = log, plots

  def due(self, loop: Loop, step: int) -> bool:
    del loop
    return bool(self.every and self.batches) and step % self.every == 0 and step < self.num_steps

  def run(self, loop: Loop, applied: bool) -> None:
    if not applied:
      return
    t = time.perf_counter()
    metrics = run_evaluation(loop, self.batches)
    self.log.pause(time.perf_counter() - t)  # throughput counts training time only
    if loop.writer:
      self.plots.submit(loop.workdir)
    loop.progress.update(loop.step, {"eval_loss": metrics["loss"]})


class Save:
  """Saves every ``checkpoint.every_steps`` steps (the end has its own save)."""

  def __init__(self, loop: Loop):
    self.every, self.num_steps = loop.run.checkpoint.every_steps, loop.run.trainer.num_steps

  def due(self, loop: Loop, step: int) -> bool:
    del loop
    return bool(self.every) and step % self.every == 0 and step < self.num_steps

  def run(self, loop: Loop, applied: bool) -> None:
    if applied:
      save(loop)


class Stop:
  """SIGTERM, Ctrl-C or JAX's preemption notice: save, say so, stop."""

  def due(self, loop: Loop, step: int) -> bool:
    del step
    # One process stops on its own signal; several stop where JAX's preemption
    # service tells all of them to (StopSignals forwards the signal to it).
    own = loop.guards.signals.is_set() and jax.process_count() == 1
    return own or loop.ckpts.reached_preemption(loop.position)

  def run(self, loop: Loop, applied: bool) -> None:
    del applied
    save(loop)
    _stopped(loop)


# ------------------------------------------------------------------ around the loop


class Profile:
  """A JAX profiler trace of updates ``[start, stop)`` (``trainer.profile_steps``), in ``profile/``.

  ``jax.profiler`` writes a trace that TensorBoard's profile plugin opens
  (``tensorboard --logdir WORKDIR/profile``) and Perfetto reads. Started
  before update ``start`` is dispatched, stopped once update ``stop - 1`` is
  done (the device is waited for, so the trace holds the whole step).
  """

  def __init__(self, directory: epath.Path, steps: tuple[int, ...]):
    self.directory = directory
    self.range = tuple(int(s) for s in steps) if steps else None
    self.active = False

  def at(self, step: int, state: Any) -> None:
    """Starts or stops the trace before dispatching update ``step``."""
    if self.range is None:
      return
    start, stop = self.range
    if not self.active and start <= step < stop:
      jax.profiler.start_trace(os.fspath(self.directory))
      self.active = True
    elif self.active and step >= stop:
      self.close(state)

  def close(self, state: Any) -> None:
    """Stops the trace (if running) after the dispatched work is done."""
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      print(f"profiler trace of updates {self.range} in {self.directory}", flush=True)


class Plots:
  """``loss.png`` drawn in a background thread (about 0.3 s) while training goes on."""

  def __init__(self) -> None:
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plot")
    self.seconds: list[float] = []

  def submit(self, workdir: epath.Path) -> None:
    self._pool.submit(self._draw, workdir)

  def _draw(self, workdir: epath.Path) -> None:
    t = time.perf_counter()
    reporting.plot_losses(workdir)
    self.seconds.append(time.perf_counter() - t)

  def close(self) -> float:
    """Waits for the plots in flight; returns the seconds spent plotting."""
    self._pool.shutdown(wait=True)
    return sum(self.seconds)


def write_timing(loop: Loop, t_loop: float, plots_s: float) -> dict[str, float]:
  """The run's fixed costs, to ``WORKDIR/timing.json`` (process 0; best effort on a full disk).

  Args:
    loop: the loop.
    t_loop: when the loop started (``time.perf_counter``).
    plots_s: seconds spent plotting.

  Returns:
    The costs written.
  """
  timing = {
    "startup": t_loop - loop.t_start,
    **loop.costs,
    "plots": plots_s,
    "wall_time": time.perf_counter() - loop.t_start,
  }
  with contextlib.suppress(OSError):
    if loop.main:  # this run's (or this resumption's) fixed costs, beside metrics.jsonl
      text = json.dumps({"step": loop.step, **timing}, indent=1)
      (loop.workdir / "timing.json").write_text(text)
  return timing


def close_writer(loop: Loop) -> None:
  """Closes the metrics writer and draws the last ``loss.png`` (best effort on a full disk)."""
  if loop.writer is None:
    return
  with contextlib.suppress(OSError):
    loop.writer.close()
  with contextlib.suppress(OSError):
    if reporting.read_metrics(loop.workdir / "metrics.jsonl"):
      reporting.plot_losses(loop.workdir)


PerStep = Callable[[Loop, StepResult], None]
