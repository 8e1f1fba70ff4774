"""The workdir: its lock, its config, its checkpoints' faults, its disk.

One trainer (one job) writes a workdir at a time (:class:`WorkdirLock`); it
holds a run only once it holds a checkpoint, and the run's config is the one
saved with its newest checkpoint (:func:`check_workdir_config`);
``config.json`` is a copy of that for scripts: written once a new run's state
is built (:func:`write_workdir_config`), and on a resume only once a
checkpoint of the new config is complete; an unreadable checkpoint is moved
aside and the newest readable one restores, on every process alike, and
with only unreadable ones the run stops until they are removed
(:func:`restore_newest`); a disk without room for a save is said before the
save writes anything (:func:`check_space`), and any failure to write is one
line (:func:`storage_failure`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time

import jax
import ml_collections
from etils import epath

from adamw_flax import checkpoint, distributed, fs
from adamw_flax.config import ConfigError, config_diff, config_json, config_with_defaults
from adamw_flax.errors import WorkdirError

log = logging.getLogger("adamw_flax")

# Keys whose change never needs allow_config_change: they say how to run, not what.
RUN_ONLY_KEYS = (
  "trainer.allow_config_change",
  "trainer.progress",
  "trainer.stall_timeout_s",
  "trainer.peer_timeout_s",
  "checkpoint.migrate_opt_state",
)


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


def prepare_workdir(workdir: epath.Path) -> bool:
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


def check_same_config(config: ml_collections.ConfigDict) -> None:
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


def storage_failure(e: BaseException) -> str | None:
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


def check_space(workdir: epath.Path, state_bytes: int, step: int, last: int | None) -> None:
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


def check_workdir_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> list[str]:
  """Refuses a workdir holding a run of another config (unless allowed).

  The run's config is the one saved with its newest checkpoint (``config.json``
  is a copy of it, for scripts): a workdir without a checkpoint holds no run
  yet. Reads only: nothing is written until the state is built.

  Returns:
    The changed keys (empty for the same config or a new workdir).

  Raises:
    ConfigError: listing the keys that differ, and how to proceed.
    WorkdirError: ``config.json`` is unreadable.

  Args:
    config: this run's config.
    workdir: the run's directory.
  """
  found = checkpoint.newest_config(workdir / "checkpoints")
  if found is None:
    # A run that failed before its first checkpoint (a loss that raises at
    # step 1, a batch the mesh cannot split) holds no run: start this config.
    # Only damaged checkpoints: restore_newest refuses.
    return []
  step, saved = found
  path = workdir / "config.json"
  if path.exists() and _read_config(path) is None:
    raise WorkdirError(
      f"{path} is unreadable; remove it to have it written again from checkpoint {step}, or use "
      "another --workdir to start over"
    )
  changes = config_changes(config, saved, workdir)
  if changes and jax.process_index() == 0:
    print(f"resuming {workdir} with a changed config: {'; '.join(changes)}", flush=True)
  return changes


def config_changes(
  config: ml_collections.ConfigDict, saved: dict, workdir: epath.Path
) -> list[str]:
  """The keys ``config`` changes from the ``saved`` one of ``workdir``'s run; refuses unless allowed.

  Raises:
    ConfigError: listing the keys that differ, and how to proceed.
  """
  old = _normalized(saved)
  changes = [
    c for c in config_diff(old, config_json(config)) if c.split(":")[0] not in RUN_ONLY_KEYS
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
  return changes


def _normalized(saved: dict) -> dict:
  """A saved config as :func:`config_json` gives it (fields added to the schema since: defaults)."""
  return config_json(config_with_defaults(saved))


def _read_config(path: epath.Path) -> dict | None:
  """A saved config as :func:`config_json` gives it, or None if missing or unreadable."""
  try:
    return _normalized(json.loads(path.read_text()))
  except Exception:  # noqa: BLE001 (missing, not JSON, not a config: all unreadable)
    return None


def write_workdir_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Writes ``config.json`` of a run that starts without a checkpoint (process 0).

  A resumed run's ``config.json`` stays its checkpoints' config until this
  run completes one (:func:`restore_newest` arranges that), so a resume that
  trains nothing, or is killed before its first save, changes nothing.

  Args:
    config: the run's config.
    workdir: the run's directory.
  """
  root = workdir / "checkpoints"
  if root.is_dir() and any(p.name.isdigit() for p in root.iterdir()):
    return
  _write_config(config_json(config), workdir)


def _write_config(saved: dict, workdir: epath.Path) -> bool:
  """Writes ``config.json`` atomically on process 0, unless it holds the same; True if written."""
  path = workdir / "config.json"
  text = json.dumps(saved, indent=2, sort_keys=True) + "\n"
  if jax.process_index() != 0 or (path.exists() and path.read_bytes() == text.encode()):
    return False
  fs.write_atomic(path, text)
  return True


def move_aside(ckpts: checkpoint.Checkpoints, workdir: epath.Path, step: int) -> epath.Path:
  """Moves an unreadable checkpoint step out of ``checkpoints/`` (kept, never deleted)."""
  dest_root = workdir / "checkpoints.corrupt"
  dest_root.mkdir(parents=True, exist_ok=True)
  dest = dest_root / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
  shutil.move(os.fspath(ckpts.directory / str(step)), os.fspath(dest))
  ckpts.reload()
  return dest


def restore_newest(ckpts, target, workdir: epath.Path, main: bool, migrate: bool = False):
  """Restores the newest checkpoint that reads; unreadable ones are moved aside.

  ``config.json`` then holds the restored checkpoint's config, and each
  checkpoint this run completes records the run's config there.

  Returns:
    ``(state, data_state)``, or ``(None, None)`` without any checkpoint.

  Raises:
    CheckpointMismatchError: the newest readable one does not fit this run.
    ConfigError: it holds another config (see :func:`config_changes`).
    WorkdirError: checkpoints exist, or were moved aside, and none restores.
  """
  moved = []
  # Steps whose metrics are unreadable first, so none is left to the keep rules.
  while (step := max(ckpts.unreadable_steps(), default=ckpts.latest_step())) is not None:

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
      dest = move_aside(ckpts, workdir, step) if main else None
      distributed.exchange_text("")  # every process waits until process 0 has moved it
      if not main:
        ckpts.reload()
      if main:
        print(f"checkpoint {step} is unreadable ({reasons[0]}); moved to {dest}", flush=True)
      moved.append(step)
      continue
    # The start compared the config with the newest checkpoint's; this one is restored.
    saved = ckpts.meta(step)["config"]
    config_changes(ckpts.config, saved, workdir)
    if moved:
      print(f"resumed from step {step}, the newest readable checkpoint", flush=True)
    _record_config(ckpts, workdir, step, saved)
    return restored
  corrupt = workdir / "checkpoints.corrupt"
  names = [p.name for p in corrupt.iterdir()] if corrupt.is_dir() else []
  kept = sorted({int(n.split(".")[0]) for n in names if n.split(".")[0].isdigit()})
  if moved or kept:
    # Also on the next start: a rerun never silently starts over beside them.
    raise WorkdirError(
      f"no checkpoint in {str(workdir / 'checkpoints')!r} restores (unreadable: "
      f"{', '.join(map(str, moved or kept))}, moved to checkpoints.corrupt/); remove "
      "checkpoints.corrupt/ and config.json to start over"
    )
  _record_config(ckpts, workdir, None, None)
  return None, None


def _record_config(ckpts, workdir: epath.Path, step: int | None, saved: dict | None) -> None:
  """``config.json``: the restored checkpoint's config now, the run's once it saved one."""
  if saved is not None:
    path, saved = workdir / "config.json", _normalized(saved)
    old = _read_config(path)
    why = "it was missing" if not path.exists() else "it was unreadable" if old is None else ""
    if old != saved and _write_config(saved, workdir):
      print(
        f"wrote config.json from checkpoint {step} ({why or 'it held another config'})", flush=True
      )
  ckpts.on_commit.append(lambda _: _write_config(config_json(ckpts.config), workdir))
