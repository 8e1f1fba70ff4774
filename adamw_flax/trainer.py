"""The training loop: config in, trained and checkpointed model out.

``train_and_evaluate(config, workdir)`` joins the library's pieces and is the
only place with the side effects of training (files, the workdir lock, logs,
signals). It reads top to bottom: plan the run (config, registered model and
data), claim the workdir, build the mesh and data, build or restore the state
(abstract state -> shardings -> jitted init with ``out_shardings``, or a
restore into those shardings), write ``config.json``, compile the steps, loop.

Workdir layout (a contract with users' scripts):
``config.json`` (the resolved config, written once the state is built or
restored), ``metrics.jsonl`` (one JSON object a logged step: ``step``,
``split``, ``loss``, ``lr``, throughput, wall time; each step once, also
across resumes), ``tensorboard/``, ``loss.png``, ``checkpoints/``,
``checkpoints.corrupt/`` (checkpoints that could not be read, moved aside,
never deleted) and ``.lock`` (held by the running trainer).

Steps: ``state.step`` counts optimizer updates; the data position (batches
drawn) is saved beside it in every checkpoint and restored, so a skipped
non-finite update draws a new batch, and a resumed run continues with the
batch it would have drawn.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from adamw_flax import (
  aot,
  checkpoint,
  distributed,
  errors,
  fs,
  plan,
  quantize,
  registry,
  reporting,
  sharding,
  train_state,
  watchdog,
)
from adamw_flax.config import (
  ConfigError,
  check_registered,
  config_diff,
  config_json,
  config_with_defaults,
  user_errors,
)
from adamw_flax.errors import UserCodeError, UserError, WorkdirError

log = logging.getLogger("adamw_flax")

# Keys whose change never needs allow_config_change: they say how to run, not what.
_RUN_ONLY_KEYS = ("trainer.allow_config_change", "trainer.progress", "checkpoint.migrate_opt_state")


class TrainingDiverged(RuntimeError):
  """The loss was non-finite for ``trainer.max_nonfinite_steps`` consecutive steps."""


# ------------------------------------------------------------------ workdir


class WorkdirLock:
  """An exclusive lock on a workdir (``.lock``), so two trainers never write one run.

  ``fcntl.flock`` is released by the kernel when the process exits, also
  after a crash or ``kill -9``: a lock file left by a dead process is taken
  over (with a message naming its pid). Object-store workdirs (``gs://``)
  cannot be locked; there the lock is skipped with a warning.
  """

  def __init__(self, workdir: epath.Path):
    self.workdir = workdir
    self._fd: int | None = None

  def acquire(self) -> None:
    if fs.is_remote(self.workdir):
      log.warning("%s is an object store: no workdir lock; run one trainer on it", self.workdir)
      return
    path = os.fspath(self.workdir / ".lock")
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
          raise WorkdirError(
            f"workdir {str(self.workdir)!r} is in use by another trainer (pid {holder}); wait "
            "for it to finish or stop it, or use another --workdir"
          ) from None
        raise
      # The holder removes the file when it releases: a lock taken on a file
      # that was unlinked meanwhile guards nothing, so take the new one.
      try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
    if previous and previous != str(os.getpid()):
      print(
        f"taking over the lock of {self.workdir} left by process {previous} (no longer running)",
        flush=True,
      )
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(os.fspath(self.workdir / ".lock"))  # while still holding it
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _prepare_workdir(workdir: epath.Path) -> bool:
  """Creates the workdir; a file in its place or a read-only one is a :class:`WorkdirError`.

  Returns:
    Whether the workdir was created here.
  """
  existed = workdir.exists()
  if existed and not workdir.is_dir():
    raise WorkdirError(f"workdir {str(workdir)!r} is a file; pass a directory as --workdir")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(
      f"workdir {str(workdir)!r} cannot be created ({e.strerror or e}); pick a writable --workdir"
    ) from None
  if not fs.is_remote(workdir) and not os.access(os.fspath(workdir), os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir {str(workdir)!r} is not writable; pick a writable --workdir")
  return not existed


@contextlib.contextmanager
def _user_code(where: str, batch: Any = None) -> Iterator[None]:
  """Reports an exception raised in the user's code (traced at a step's first call) in short."""
  try:
    yield
  except (UserError, UserCodeError, TrainingDiverged):
    raise
  except Exception as e:  # noqa: BLE001 (any exception of the user's model, loss or data)
    if errors.user_frame(e) is None:
      raise  # every frame is library code: a bug of ours (or theirs), with its traceback
    raise UserCodeError(errors.describe_user_exception(e, where, batch=batch)) from e


def _check_same_config(config: ml_collections.ConfigDict) -> None:
  """Refuses a job whose processes were given different configs (naming the first difference)."""
  if jax.process_count() == 1:
    return
  texts = distributed.exchange_text(json.dumps(config_json(config), sort_keys=True))
  for i, text in enumerate(texts[1:], start=1):
    if text != texts[0]:
      diff = config_diff(json.loads(texts[0]), json.loads(text))
      raise ConfigError(
        f"process {i} was given another config than process 0 ({diff[0] if diff else '?'}); "
        "start every process with the same --config and --config.* overrides"
      )


# What a full disk, a quota, a file-size limit or a read-only filesystem looks
# like, from Python's I/O (errno) and from TensorStore's writes in Orbax (text).
_STORAGE_ERRNOS = {
  errno.ENOSPC: "the disk is full",
  errno.EDQUOT: "the disk quota is exceeded",
  errno.EFBIG: "a file would exceed the size limit",
  errno.EROFS: "the filesystem is read-only",
}
_STORAGE_TEXTS = {
  "No space left on device": "the disk is full",
  "Disk quota exceeded": "the disk quota is exceeded",
  "File too large": "a file would exceed the size limit",
  "Read-only file system": "the filesystem is read-only",
}


def _storage_failure(e: BaseException) -> str | None:
  """Why ``e`` (or what caused it) failed to write to storage, or None for another failure."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
      return _STORAGE_ERRNOS[e.errno]
    text = str(e)
    for needle, reason in _STORAGE_TEXTS.items():
      if needle in text:
        return reason
    e = e.__cause__ or e.__context__
  return None


def _check_space(workdir: epath.Path, state_bytes: int, step: int, last: int | None) -> None:
  """Refuses a save the disk has no room for, before anything of it is written.

  A save that runs out of space halfway fails inside Orbax's threads, with a
  page of their tracebacks; this says it in one line and keeps the workdir as
  it was. The checkpoint takes about the state's bytes (Orbax's OCDBT files
  add little); object stores are not checked.
  """
  if fs.is_remote(workdir):
    return
  try:
    free = shutil.disk_usage(os.fspath(workdir)).free
  except OSError:
    return
  need = int(state_bytes * 1.1) + (256 << 10)
  if free < need:
    kept = f"the checkpoint of step {last} is kept" if last is not None else "nothing was saved"
    raise WorkdirError(
      f"workdir {str(workdir)!r}: the disk is full (the checkpoint of step {step} needs about "
      f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free); free space or pick another "
      f"--workdir ({kept}; rerun the same command to resume)"
    )


def _holds_checkpoints(workdir: epath.Path) -> bool:
  """Whether ``workdir`` has a committed checkpoint, or unreadable ones moved aside."""
  # Orbax names a committed step's directory by the bare step number; a save in
  # progress (or interrupted) is "<step>.orbax-checkpoint-tmp-<n>".
  for name in ("checkpoints", "checkpoints.corrupt"):
    root = workdir / name
    if root.is_dir() and any(
      p.name.isdigit() or name.endswith("corrupt") for p in root.iterdir() if p.is_dir()
    ):
      return True
  return False


def check_workdir_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> list[str]:
  """Refuses a workdir holding a run of another config (unless allowed).

  Reads ``config.json`` only: nothing is written until the state is built.

  Returns:
    The changed keys (empty for the same config or a new workdir).

  Raises:
    ConfigError: listing the keys that differ, and how to proceed.

  Args:
    config: this run's config.
    workdir: the run's directory.
  """
  path = workdir / "config.json"
  if not path.exists() or not _holds_checkpoints(workdir):
    # A run that failed before its first checkpoint (a loss that raises at
    # step 1, a batch the mesh cannot split) holds no run: start this config.
    return []
  try:
    old = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(
      f"{path} is unreadable ({e}); move it away to start over in this workdir"
    ) from None
  old = config_json(config_with_defaults(old))  # fields added to the schema since: defaults
  changes = [
    c for c in config_diff(old, config_json(config)) if c.split(":")[0] not in _RUN_ONLY_KEYS
  ]
  # Converting the optimizer state is a decision to change the optimizer, so
  # migrate_opt_state allows optimizer.* changes; others need allow_config_change.
  needing = [
    c for c in changes if not (config.checkpoint.migrate_opt_state and c.startswith("optimizer."))
  ]
  if needing and not config.trainer.allow_config_change:
    shown = needing[:3] + ([f"... {len(needing) - 3} more"] if len(needing) > 3 else [])
    hint = (
      " (an optimizer change may also need --config.checkpoint.migrate_opt_state=True, which "
      "converts the saved optimizer state)"
      if any(c.startswith("optimizer.") for c in needing)
      else ""
    )
    raise ConfigError(
      f"workdir {str(workdir)!r} holds a run with another config ({'; '.join(shown)}); use "
      f"another --workdir, or --config.trainer.allow_config_change=True to resume it{hint}"
    )
  if changes and jax.process_index() == 0:
    print(f"resuming {workdir} with a changed config: {'; '.join(changes)}", flush=True)
  return changes


def write_workdir_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Writes ``config.json`` atomically (process 0).

  Args:
    config: the run's config.
    workdir: the run's directory.
  """
  if jax.process_index() != 0:
    return
  path = workdir / "config.json"
  text = json.dumps(config_json(config), indent=2, sort_keys=True) + "\n"
  if fs.is_remote(path):
    path.write_text(text)  # an object write is atomic
  else:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------ signals


@dataclasses.dataclass
class _Guards:
  """What keeps a run from hanging or losing work: stop signals and the stall watchdog."""

  signals: watchdog.StopSignals
  watchdog: watchdog.Watchdog
  peers: watchdog.PeerWatch


# ------------------------------------------------------------------ start-up


def evaluate(
  eval_step, state, dataset, num_batches: int, mesh, mesh_cfg, *, beat=None
) -> dict[str, float]:
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

  Returns:
    ``metric -> mean``.
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
    pending = metrics
  if pending is not None:
    read(pending)
  return {k: v / max(count, 1) for k, v in totals.items()}


def evaluate_all(
  eval_steps, state, dataset, num_batches: int, mesh, mesh_cfg, *, beat=None
) -> dict[str, float]:
  """:func:`evaluate` with each eval step, its metrics prefixed by the step's key.

  Args:
    eval_steps: ``prefix -> eval step`` (``""``: the params, ``"ema_"``: the EMA weights).
    state: the train state.
    dataset: the run's dataset.
    num_batches: validation batches.
    mesh: the device mesh.
    mesh_cfg: the ``mesh`` section or its plan.
    beat: as for :func:`evaluate`.

  Returns:
    ``prefix + metric -> mean``.
  """
  out: dict[str, float] = {}
  for prefix, step in eval_steps.items():
    metrics = evaluate(step, state, dataset, num_batches, mesh, mesh_cfg, beat=beat)
    out.update({prefix + k: v for k, v in metrics.items()})
  return out


def _bytes_per_param(state) -> str:
  """The state's bytes per trained param: params, each moment (by format), the rest."""
  n = max(train_state.param_count(state.params), 1)
  nbytes = lambda tree: sum(
    math.prod(np.shape(x)) * sharding.itemsize(x.dtype) for x in jax.tree.leaves(tree)
  )
  params_bytes, opt_bytes = nbytes(state.params), nbytes(state.opt_state)
  dtypes = "/".join(sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}))
  moments = quantize.moments_summary(state.opt_state)
  parts = [f"params {params_bytes / n:.2f} ({dtypes})"]
  for kind, m in moments.items():
    if not m["params"]:
      continue
    split = ""
    if m["int8_params"]:
      split = f" (int8 {m['int8_params']:,}, float {m['float_params']:,} params)"
    parts.append(f"{kind} {m['bytes'] / n:.2f}{split}")
  other = opt_bytes - sum(m["bytes"] for m in moments.values())
  parts.append(f"other optimizer state {other / n:.2f}")
  parts.append(f"total {(params_bytes + opt_bytes) / n:.2f}")
  return "bytes per trained param: " + ", ".join(parts)


def _startup_report(run: plan.RunPlan, state, mesh, factory, unmapped: list[str]) -> str:
  o = run.optimizer.section
  per_device = state.device_bytes()
  lines = [
    f"model {run.model.name}: {train_state.param_count(state.params):,} trainable params, "
    f"{train_state.param_count(state.frozen):,} frozen",
    f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)",
    f"optimizer {o.name}: lr {o.learning_rate} ({o.schedule}, warmup {o.warmup_steps}), "
    f"b1 {o.b1}, b2 {o.b2}, eps {o.eps}, weight_decay {o.weight_decay} "
    f"(mode {o.weight_decay_mode!r}), mu_dtype {o.mu_dtype}, nu_dtype {o.nu_dtype}"
    + (f", accumulate_steps {o.accumulate_steps}" if o.accumulate_steps > 1 else ""),
    "per-device bytes: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in per_device.items()),
    _bytes_per_param(state),
  ]
  extras = []
  if run.trainer.ema_decay:
    extras.append(f"EMA of the params (decay {run.trainer.ema_decay}, {run.trainer.ema_dtype})")
  if run.optimizer.spikes is not None:
    r = run.optimizer.spikes
    extras.append(f"skip spikes ({r.threshold} sigma over {r.window} updates, after {r.warmup})")
  if run.optimizer.update_rms_clip:
    extras.append(f"update RMS clipped to {run.optimizer.update_rms_clip} x lr")
  if o.decay_to_init:
    extras.append("weight decay towards the initial params")
  if o.schedule == "wsd":
    extras.append(f"wsd: last {o.wsd_decay_fraction:g} of the steps decay ({o.wsd_decay_shape})")
  if extras:
    lines.append("also: " + "; ".join(extras))
  if unmapped:
    lines.append(
      "logical axes not mapped to a mesh axis (replicated; map them with "
      f"mesh.logical_axis_rules): {', '.join(unmapped)}"
    )
  lines.append(factory.report(run.optimizer))
  return "\n".join(lines)


def _move_aside(ckpts: checkpoint.Checkpoints, workdir: epath.Path, step: int) -> epath.Path:
  """Moves an unreadable checkpoint step out of ``checkpoints/`` (kept, never deleted)."""
  dest_root = workdir / "checkpoints.corrupt"
  dest_root.mkdir(parents=True, exist_ok=True)
  dest = dest_root / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
  shutil.move(os.fspath(ckpts.directory / str(step)), os.fspath(dest))
  ckpts.reload()
  return dest


def _restore_newest(ckpts, target, workdir: epath.Path, main: bool, migrate: bool = False):
  """Restores the newest checkpoint that reads; unreadable ones are moved aside.

  Returns:
    ``(state, data_state)``, or ``(None, None)`` without any checkpoint.

  Raises:
    CheckpointMismatchError: the newest readable one does not fit this run.
    WorkdirError: checkpoints exist and none restores.
  """
  moved = []
  while (step := ckpts.latest_step()) is not None:

    def attempt(step=step):
      try:
        return ckpts.restore(target, step=step, migrate=migrate), ""
      except checkpoint.CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 (any failure to read a step: TensorStore, JSON, I/O)
        return None, (str(e).splitlines()[0][:200] if str(e) else type(e).__name__)

    # Every process tries the step; if it fails to read on any, all of them
    # fall back to the same earlier one (a process may read only its shards).
    restored, reason = distributed.agree(attempt, f"restoring checkpoint {step}")
    reasons = [r for r in distributed.exchange_text(reason) if r]
    if reasons:
      dest = _move_aside(ckpts, workdir, step) if main else None
      distributed.exchange_text("")  # every process waits until process 0 has moved it
      if not main:
        ckpts.reload()
      if main:
        print(f"checkpoint {step} is unreadable ({reasons[0]}); moved to {dest}", flush=True)
      moved.append(step)
      continue
    state, data_state = restored
    if moved:
      print(f"resumed from step {step}, the newest readable checkpoint", flush=True)
    return state, data_state
  if moved:
    raise WorkdirError(
      f"no checkpoint in {str(workdir / 'checkpoints')!r} restores (unreadable: "
      f"{', '.join(map(str, moved))}, moved to checkpoints.corrupt/); remove "
      "checkpoints.corrupt/ and config.json to start over"
    )
  return None, None


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

  def __bool__(self) -> bool:
    return self.range is not None

  def at(self, step: int, state: Any) -> None:
    """Starts or stops the trace before dispatching update ``step``."""
    start, stop = self.range
    if not self.active and start <= step < stop:
      jax.profiler.start_trace(os.fspath(self.directory))
      self.active = True
    elif self.active and step >= stop:
      self.stop(state)

  def stop(self, state: Any) -> None:
    """Stops the trace (if running) after the dispatched work is done."""
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      print(f"profiler trace of updates {self.range} in {self.directory}", flush=True)


@dataclasses.dataclass
class _Counters:
  """What the host knows of the run while steps are in flight."""

  step: int  # optimizer updates confirmed (metrics read)
  position: int  # batches drawn
  nonfinite: int = 0
  spikes_in_a_row: int = 0
  loss_sum: float = 0.0
  loss_count: int = 0
  train_loss: float = float("nan")


# ------------------------------------------------------------------ the run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains the model and data that ``config`` names, in ``workdir``.

  Rerunning the same command resumes from the latest complete checkpoint.

  Args:
    config: a full config (validated here).
    workdir: the run's directory (created if missing).

  Returns:
    A summary: ``step`` reached, last ``train_loss`` and ``eval_loss``,
    ``wall_time``, ``preempted`` (stopped by a signal, after saving), ``interrupted`` (by
    SIGINT, Ctrl-C) and ``skipped`` (updates skipped).

  Raises:
    UserError: an invalid config, a workdir of another run or in use, a
      checkpoint that does not fit (nothing in the workdir is changed).
    TrainingDiverged: the loss stayed non-finite; the last good checkpoint is kept.
  """
  t_start = time.perf_counter()
  run = plan.make_plan(config)
  check_registered(config)
  workdir = fs.as_path(workdir)
  main = jax.process_index() == 0
  lock = WorkdirLock(workdir)
  created = False

  def claim() -> None:
    nonlocal created
    if main:  # process 0 claims the workdir for the job; the others learn the outcome
      created = _prepare_workdir(workdir)
      lock.acquire()

  try:
    # Each phase runs the same collectives on every process, failed or not.
    distributed.agree(claim, "claiming the workdir")
    _check_same_config(config)
    distributed.agree(lambda: check_workdir_config(config, workdir), "reading the workdir")
    tc = run.trainer
    pid = jax.process_index()
    guard = watchdog.Watchdog(tc.stall_timeout_s, workdir, pid)
    # Started with the loop (nothing is written into the workdir before that).
    peers = watchdog.PeerWatch(workdir, pid, jax.process_count(), tc.peer_timeout_s)
    with watchdog.StopSignals() as signals, guard:
      try:
        try:
          return _train(run, workdir, main, _Guards(signals, guard, peers), t_start)
        except Exception as e:
          reason = _storage_failure(e)
          if reason is None:
            raise
          raise WorkdirError(
            f"workdir {str(workdir)!r} cannot be written ({reason}); free space or pick another "
            "--workdir (checkpoints already written are kept; rerun the same command to resume)"
          ) from e
      finally:
        peers.close()
  except UserError:
    if created and main and not fs.is_remote(workdir):
      lock.release()
      # A refused start leaves no trace: the workdir this call made is removed if empty.
      with contextlib.suppress(OSError):
        os.rmdir(os.fspath(workdir))
    raise
  finally:
    lock.release()


def _train(run: plan.RunPlan, workdir: epath.Path, main: bool, guards: _Guards, t_start):
  # --- the run: mesh, data, model
  def place():
    with user_errors("mesh"):
      mesh = sharding.mesh_from_config(run.mesh)
      # Processes that hold replicas of the same batch rows (a model axis across
      # processes) load the same slice: the mesh, not the process id, decides.
      return mesh, *sharding.data_shard_info(mesh, run.mesh)

  mesh, data_index, data_count = distributed.agree(place, "building the mesh")
  # Init, train and eval steps traced under the run's mesh: models' own P(...) constraints.
  with sharding.use_mesh(mesh):
    return _train_on_mesh(run, workdir, main, guards, t_start, mesh, data_index, data_count)


def _train_on_mesh(run, workdir, main, guards, t_start, mesh, data_index, data_count):
  config = run.config

  def data():
    with user_errors(f"data ({run.data.name})"):
      dataset = registry.DATASETS.get(run.data.name)(
        run.data, seed=run.trainer.seed, process_index=data_index, process_count=data_count
      )
    with user_errors("mesh"):
      sharding.check_batch_size(
        int(dataset.global_batch_size), mesh, run.mesh, run.optimizer.accumulate_steps
      )
    return dataset

  def model():  # the state: abstract -> shardings -> restored from a checkpoint, or created
    with user_errors(f"model ({run.model.name})"):
      factory = train_state.registered_state_factory(run, dataset.info)
      abstract = factory.abstract()
      shardings = abstract.shardings(mesh, run.mesh)
      unmapped = sharding.unmapped_logical_axes(
        abstract.spec.templates,
        [abstract.params, abstract.frozen, abstract.rest],
        run.mesh,
        mesh=mesh,
      )
    return factory, abstract, shardings, unmapped

  def checkpoints():
    try:
      return checkpoint.Checkpoints(
        workdir / "checkpoints", config, data_info=dataset.info, mesh=mesh
      )
    except (FileExistsError, PermissionError) as e:
      raise WorkdirError(f"checkpoints: {e}") from None

  # A failure on one process ends all of them alike, phase by phase (a phase's
  # collectives, if any, run on every process).
  dataset = distributed.agree(data, "loading the data")
  factory, abstract, shardings, unmapped = distributed.agree(model, "building the model")
  ckpts = distributed.agree(checkpoints, "opening the checkpoints")
  model_entry = registry.MODELS.get(run.model.name)
  target = train_state.with_shardings(abstract, shardings)
  try:
    state, data_state = _restore_newest(
      ckpts, target, workdir, main, migrate=run.checkpoint.migrate_opt_state
    )
    if state is None:
      state = factory.create(shardings)
      data_state = {}
    elif main:
      print(f"resumed from step {int(state.step)} of {workdir / 'checkpoints'}", flush=True)
    # Only now is this workdir this config's run.
    write_workdir_config(config, workdir)
    if main:
      print(_startup_report(run, state, mesh, factory, unmapped), flush=True)
    return _loop(
      run,
      workdir,
      main,
      guards,
      t_start,
      mesh,
      dataset,
      model_entry,
      ckpts,
      state,
      shardings,
      data_state,
    )
  finally:
    failing = sys.exc_info()[1]
    if failing is not None and _storage_failure(failing) is not None:
      # The failed save's TensorStore writes call back into Orbax's closed event
      # loop, each printing a traceback: the error that matters is reported.
      with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(Exception):
        ckpts.close()
    else:
      ckpts.close()


def _loop(run, workdir, main, guards, t_start, mesh, dataset, model_entry, ckpts, state,
          state_sharding, data_state):  # fmt: skip
  tc, cc = run.trainer, run.checkpoint
  num_steps = tc.num_steps
  batch_sharding = sharding.batch_sharding(mesh, run.mesh)
  steps = train_state.make_run_steps(
    run, model_entry.loss, state_sharding=state_sharding, batch_sharding=batch_sharding
  )
  # Steps that python -m train.compile saved in WORKDIR/compiled load instead of compiling.
  steps, note = aot.use_saved_steps(steps, workdir, run, mesh, state, batch_sharding, dataset)
  if note and main:
    print(note, flush=True)
  train_step, eval_steps = steps.train, steps.evals
  start = int(state.step)
  # A checkpoint of the first build has {"step": n} only: position == step then.
  c = _Counters(step=start, position=int(data_state.get("position", data_state.get("step", start))))
  writer = None
  if main:
    wandb = reporting.wandb_writer(
      workdir, tc.wandb_project, config_json(run.config), tc.wandb_mode or None
    )
    writer = reporting.MetricsWriter(workdir, resume_step=start, wandb=wandb)
  # Plotting takes ~0.3 s: a background thread draws while training goes on.
  plots = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plot")
  progress = reporting.ProgressBar(num_steps, start=start, enabled=main and tc.progress)
  tokens_per_step = dataset.global_batch_size * getattr(dataset, "tokens_per_example", 1)
  unit = "tokens" if getattr(dataset, "tokens_per_example", 1) > 1 else "examples"
  eval_metrics: dict[str, float] = {}
  # The run's fixed costs, in seconds (written to WORKDIR/timing.json at the end).
  costs = {"first_step": 0.0, "evals": 0.0, "saves": 0.0, "plots": 0.0}
  plot_times: list[float] = []

  def plot(path: epath.Path) -> None:
    t = time.perf_counter()
    reporting.plot_losses(path)
    plot_times.append(time.perf_counter() - t)

  wd = guards.watchdog

  state_bytes = sum(math.prod(x.shape) * sharding.itemsize(x.dtype) for x in jax.tree.leaves(state))

  def save() -> None:
    t = time.perf_counter()
    _check_space(workdir, state_bytes, c.step, last_good_step)
    wd.beat(None, f"the checkpoint save of step {c.step}")
    ckpts.save(state, data_state=data_pos(), metrics=eval_metrics or None, force=True)
    wd.beat(f"the checkpoint save of step {c.step}", "training")
    guards.peers.note = f"step {c.step}"
    costs["saves"] += time.perf_counter() - t

  last_good_step = ckpts.latest_step()
  skipped_total = 0
  preempted = interrupted = False
  t_log, step_log = time.perf_counter(), start

  def data_pos() -> dict[str, int]:
    return {"step": c.step, "position": c.position}

  def finish(dispatched: tuple[dict[str, Any], int]) -> bool:
    """Reads a dispatched step's metrics (one step late); True if its update was applied."""
    nonlocal t_log, step_log, skipped_total
    metrics, position = dispatched
    m = jax.device_get(metrics)
    wd.beat(f"train step {c.step + 1}", f"train step {c.step + 2}", first=False)
    if not costs["first_step"]:  # dispatch to done of the first step: compilation, mostly
      costs["first_step"] = time.perf_counter() - t_loop
    loss, applied = float(m["loss"]), bool(m["applied"])
    skipped_total = int(m["skipped"]) + int(m.get("skipped_spikes", 0))
    c.nonfinite = 0 if np.isfinite(loss) else c.nonfinite + 1
    if tc.max_nonfinite_steps and c.nonfinite >= tc.max_nonfinite_steps:
      where = (
        f"the last good checkpoint (step {last_good_step}) is kept in {workdir / 'checkpoints'}"
        if last_good_step is not None
        else "no checkpoint was written"
      )
      fixes = "lower optimizer.learning_rate or set optimizer.grad_clip_norm"
      if not run.optimizer.skip_nonfinite:
        fixes += ", or set optimizer.skip_nonfinite=True"
      raise TrainingDiverged(
        f"loss was non-finite for {c.nonfinite} consecutive steps (at step {c.step}); stopped "
        f"without saving; {where}. To go on: {fixes}."
      )
    spike = bool(m.get("spike", 0))
    c.spikes_in_a_row = c.spikes_in_a_row + 1 if spike else 0
    if not applied:
      reason = "spike" if spike else "nonfinite"
      if writer:
        row = {"loss": loss, "grad_norm": float(m["grad_norm"]), "reason": reason,
               "skipped": skipped_total, "position": position}  # fmt: skip
        if "skipped_spikes" in m:
          row["skipped_spikes"] = int(m["skipped_spikes"])
        writer.write(c.step + spike, "skipped", row)
      if not spike:
        return False
      # A spike consumes its step (as in MaxText, OLMo-core, Levanter): say so.
      c.step += 1
      if main:
        progress.write(
          f"step {c.step}: skipped as a loss spike (loss {loss:.4g}, grad norm "
          f"{float(m['grad_norm']):.4g}; {c.spikes_in_a_row} in a row)"
        )
      rule = run.optimizer.spikes
      if c.spikes_in_a_row >= rule.max_consecutive:
        raise TrainingDiverged(
          f"{c.spikes_in_a_row} steps in a row were skipped as loss spikes (to step {c.step}): "
          f"the loss has risen for good. Stopped; the last checkpoint is kept. To go on: raise "
          f"optimizer.spike_threshold or optimizer.skip_spikes_max_consecutive, or set "
          f"optimizer.skip_spikes=False."
        )
      return True
    c.step += 1
    c.train_loss = loss
    c.loss_sum += loss
    c.loss_count += 1
    if c.step % tc.log_every == 0 or c.step == num_steps:
      now = time.perf_counter()
      rate = (c.step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
      row = {k: float(v) for k, v in m.items()}
      # The mean over the steps since the last log line: one step's loss is
      # one batch's, too noisy to read a curve from.
      row["loss"] = c.loss_sum / max(c.loss_count, 1)
      c.loss_sum, c.loss_count = 0.0, 0
      row[f"{unit}_per_sec"] = rate
      row["wall_time"] = now - t_start
      t_log, step_log = now, c.step
      if writer:
        writer.write(c.step, "train", row)
      progress.update(c.step, {"loss": row["loss"], "lr": row["lr"], f"{unit}/s": int(rate)})
    return True

  def run_eval(step: int) -> None:
    nonlocal eval_metrics, t_log
    t_eval = time.perf_counter()
    with _user_code("the eval step (your model and loss, train=False)"):
      eval_metrics = evaluate_all(
        eval_steps, state, dataset, tc.eval_batches, mesh, run.mesh, beat=eval_beat(step)
      )
    t_log += time.perf_counter() - t_eval  # throughput counts training time only
    costs["evals"] += time.perf_counter() - t_eval
    if writer:
      writer.write(step, "eval", {**eval_metrics, "wall_time": time.perf_counter() - t_start})
      plots.submit(plot, workdir)
    progress.update(step, {"eval_loss": eval_metrics["loss"]})

  def eval_beat(step: int):
    what = f"the evaluation at step {step}"
    wd.beat(None, what)
    return lambda i: wd.beat(f"batch {i} of {what}", what)

  pending = None  # the metrics of the last dispatched step, read one step late
  first_position = c.position
  guards.peers.note = f"step {last_good_step}" if last_good_step is not None else ""
  guards.peers.start()
  profile = Profile(workdir / "profile", tc.profile_steps) if main else None
  t_loop = time.perf_counter()
  try:
    while c.step + (pending is not None) < num_steps:
      if profile:
        profile.at(c.step + (pending is not None), state)
      wd.beat(None, f"loading batch {c.position} (train step {c.step + 1 + (pending is not None)})")
      batch = sharding.global_batch(
        dataset.train_batch(c.position), mesh, run.mesh, global_batch_size=dataset.global_batch_size
      )
      wd.beat(None, f"train step {c.step + 1 + (pending is not None)}")
      if c.position == first_position:  # traced now: the user's model and loss run
        with _user_code("the train step (your model and loss)", batch):
          state, metrics = train_step(state, batch)
      else:
        state, metrics = train_step(state, batch)
      dispatched = (metrics, c.position)
      c.position += 1
      # Read the previous step's metrics only now, with this step already
      # dispatched, so the host never waits for the device in between.
      if pending is not None:
        finish(pending)
      pending = dispatched
      due = c.step + 1  # the update count if this step is applied
      is_eval = bool(tc.eval_every) and due % tc.eval_every == 0 and due < num_steps
      is_save = bool(cc.every_steps) and due % cc.every_steps == 0 and due < num_steps
      # One process stops on its own signal; several stop where JAX's
      # preemption service tells all of them to (StopSignals forwards to it).
      stop = (guards.signals.is_set() and jax.process_count() == 1) or ckpts.reached_preemption(
        c.position
      )
      if not (is_eval or is_save or stop or due == num_steps):
        continue
      # A boundary: read this step now (never evaluate or save an unchecked state).
      applied = finish(pending)
      pending = None
      if applied and is_eval:
        run_eval(c.step)
      if applied and is_save:
        save()
        last_good_step = c.step
      if stop:
        save()
        wd.beat(None, f"writing the checkpoint of step {c.step}")
        ckpts.wait()
        preempted = True
        interrupted = guards.signals.received == signal.SIGINT
        if main:
          what = "interrupted" if interrupted else "preempted"
          print(f"\n{what}: saved step {c.step}; rerun the same command to resume", flush=True)
        break
    if pending is not None:
      finish(pending)
    if not preempted:
      final_batches = tc.final_eval_batches or tc.eval_batches
      if final_batches:
        t_eval = time.perf_counter()
        with _user_code("the eval step (your model and loss, train=False)"):
          eval_metrics = evaluate_all(
            eval_steps, state, dataset, final_batches, mesh, run.mesh, beat=eval_beat(c.step)
          )
        costs["evals"] += time.perf_counter() - t_eval
        if writer:
          writer.write(c.step, "eval", {**eval_metrics, "wall_time": time.perf_counter() - t_start})
      if ckpts.latest_step() != c.step:
        save()
      t_wait = time.perf_counter()
      wd.beat(None, f"writing the checkpoint of step {c.step}")
      ckpts.wait()
      costs["saves"] += time.perf_counter() - t_wait
  finally:
    if profile:
      profile.stop(state)
    progress.close()
    plots.shutdown(wait=True)
    costs["plots"] = sum(plot_times)
    timing = {
      "startup": t_loop - t_start,
      **costs,
      "wall_time": time.perf_counter() - t_start,
    }
    # Best effort: on a full disk these fail too, and the error that stopped the run matters.
    with contextlib.suppress(OSError):
      if main:  # this run's (or this resumption's) fixed costs, beside metrics.jsonl
        (workdir / "timing.json").write_text(json.dumps({"step": c.step, **timing}, indent=1))
    if writer:
      with contextlib.suppress(OSError):
        writer.close()
      with contextlib.suppress(OSError):
        if reporting.read_metrics(workdir / "metrics.jsonl"):
          reporting.plot_losses(workdir)

  summary = {
    "step": int(state.step),
    "train_loss": c.train_loss,
    "eval_loss": eval_metrics.get("loss", float("nan")),
    "wall_time": time.perf_counter() - t_start,
    "preempted": preempted,
    "interrupted": interrupted,
    "skipped": skipped_total,
  }
  if main:
    print(
      f"\nstep {summary['step']}: train loss {c.train_loss:.4f}, eval loss "
      f"{summary['eval_loss']:.4f}, {summary['wall_time']:.1f} s",
      flush=True,
    )
    named = {"startup": "start-up", "first_step": "first step (compile)",
             "evals": "evals", "saves": "saves (blocking)", "plots": "plots (background)"}  # fmt: skip
    print(
      "fixed costs: " + ", ".join(f"{named[k]} {timing[k]:.1f} s" for k in named if k in timing),
      flush=True,
    )
  return summary
