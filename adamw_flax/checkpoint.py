"""Orbax checkpoints of a training run: train state, data position, config and fingerprint.

A checkpoint is one step directory written by ``orbax.checkpoint``'s
``CheckpointManager`` with three items:

* ``state``: the arrays of the :class:`~adamw_flax.train_state.TrainState`
  (``step``, ``params``, ``frozen``, ``rest``, ``opt_state``), each leaf in its
  own dtype (bfloat16 moments stay bfloat16, int32 counters int32);
* ``data``: JSON, the data iterator's position (e.g. ``{"step": 1200}``);
* ``meta``: JSON, the config, the dataset's ``info``, package versions and a
  *fingerprint* of the state: optimizer name, scalar or schedule learning rate
  and weight decay, mask rules, the optimizer state's tree structure, and the
  path, dtype and shape of every leaf.

Restoring reads the fingerprint first and compares it with the state the new
run builds (an abstract target from
:func:`~adamw_flax.train_state.state_from_config`); a structural change (weight
decay switched from a scalar to a schedule, another ``mu_dtype``, other model
shapes) fails with a :class:`CheckpointMismatchError` naming the first path that
differs, both sides' dtypes and shapes and what changed, before any array is
read. Arrays are then read straight into the target's shardings, so a
checkpoint written on 8 devices restores onto 4, 1, or another mesh.

Writes are atomic (Orbax writes a step into ``<step>.orbax-checkpoint-tmp``
and renames it when complete): a step directory without that suffix is
complete, and a crash mid-save leaves only a temporary directory, which the
next :class:`Checkpoints` removes (on process 0) and which restores ignore.

Preemption: with ``jax.distributed``, :meth:`Checkpoints.reached_preemption`
tells the training loop when to save and exit (every process gets the same
answer at the same step); a single process's SIGTERM is caught by the
trainer. :class:`CheckpointReader` reads a directory without changing it.
The fingerprint lives in :mod:`adamw_flax.fingerprint`.

Examples:
  >>> import tempfile
  >>> from flax import nnx
  >>> from adamw_flax import config as config_lib, train_state
  >>> cfg = config_lib.default_config()
  >>> cfg.optimizer.mu_dtype = "bfloat16"
  >>> factory = lambda rngs: nnx.Linear(2, 3, rngs=rngs)
  >>> state = train_state.create_train_state(factory, cfg)
  >>> ckpts = Checkpoints(tempfile.mkdtemp(), cfg, data_info={})
  >>> ckpts.save(state, data_state={"step": 0}, force=True)
  True
  >>> target = train_state.create_train_state(factory, cfg, abstract=True)
  >>> restored, data_state = ckpts.restore(target)
  >>> data_state, restored.opt_state[0].mu["kernel"].dtype
  ({'step': 0}, dtype(bfloat16))
  >>> ckpts.close()
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from adamw_flax import fingerprint, fs, migrate, plan, train_state
from adamw_flax.config import config_diff, config_json, config_with_defaults, validate_config
from adamw_flax.errors import UserError
from adamw_flax.fingerprint import state_fingerprint
from adamw_flax.train_state import TrainState

log = logging.getLogger("adamw_flax")

PyTree = Any

STATE, DATA, META = "state", "data", "meta"
ARRAY_FIELDS = fingerprint.ARRAY_FIELDS
FORMAT_VERSION = 1
# Orbax names a step directory that is still being written "<step>" + this
# (older versions add a timestamp), and renames it to "<step>" once complete.
TMP_SUFFIX = ".orbax-checkpoint-tmp"

__all__ = [
  "CheckpointMismatchError",
  "CheckpointReader",
  "Checkpoints",
  "config_from_json",
  "newest_config",
  "restore_params",
  "restore_state",
  "save_state",
  "state_fingerprint",
]


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint whose state does not fit the state this run builds.

  Attributes:
    opt_state_only: only the optimizer state differs (in its tree or
      formats), which ``checkpoint.migrate_opt_state`` converts.
  """

  def __init__(self, message: str, *, opt_state_only: bool = False, details: str = ""):
    super().__init__(message)
    self.opt_state_only = opt_state_only
    self.details = details


# ----------------------------------------------------------- config and meta


def config_from_json(data: dict[str, Any]) -> ml_collections.ConfigDict:
  """Rebuilds a config saved in a checkpoint's ``meta`` or ``config.json`` and validates it.

  Lists become tuples, and fields the schema gained since it was written get
  their defaults (see :func:`adamw_flax.config.config_with_defaults`).

  Args:
    data: the saved config (JSON types).

  Returns:
    The validated config.
  """
  return validate_config(config_with_defaults(data))


@functools.cache
def _versions() -> dict[str, str]:
  out = {}
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "adamw_flax"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = "unknown"
  return out


def _jsonable(tree: Any, what: str) -> Any:
  try:
    return json.loads(json.dumps(tree, default=_to_py))
  except TypeError as e:
    raise TypeError(
      f"{what} must be JSON-serializable (numbers, strings, lists, dicts): {e}"
    ) from e


def _to_py(x: Any) -> Any:
  if isinstance(x, jax.Array | np.ndarray | np.generic):
    return np.asarray(x).item() if np.ndim(x) == 0 else np.asarray(x).tolist()
  raise TypeError(f"{type(x).__name__} {x!r} is not JSON-serializable")


# ----------------------------------------------------------- arrays


def _key_impl(x: Any) -> Any:
  # jax.random.key_impl accepts key arrays but not a ShapeDtypeStruct; it does
  # accept the tracer a trace of the struct gives.
  found = []
  jax.eval_shape(
    lambda k: found.append(jax.random.key_impl(k)), jax.ShapeDtypeStruct(x.shape, x.dtype)
  )
  return found[0]


def _to_saveable(arrays: dict[str, Any]) -> dict[str, Any]:
  # Orbax 0.12.8 writes a typed PRNG key (nnx.Rngs state in `rest`) as its raw
  # uint32 key data but restores that as a uint32 array, losing the key type
  # and its impl; the explicit key_data / wrap_key_data round trip is exact.
  return jax.tree.map(lambda x: jax.random.key_data(x) if fingerprint.is_key(x) else x, arrays)


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _restore_item(target: dict[str, Any]) -> dict[str, Any]:
  """ShapeDtypeStructs with shardings for Orbax: keys as their key data, no leaf left unplaced."""

  def leaf(x):
    sharding = getattr(x, "sharding", None) or _default_sharding()
    if fingerprint.is_key(x):
      data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

  return jax.tree.map(leaf, target)


def _from_restored(restored: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
  return jax.tree.map(
    lambda r, t: jax.random.wrap_key_data(r, impl=_key_impl(t)) if fingerprint.is_key(t) else r,
    restored,
    target,
  )


def _host_int(x: Any) -> int:
  if isinstance(x, jax.Array):
    # A replicated global array: every process holds the value.
    return int(np.asarray(x.addressable_data(0)))
  return int(x)


# ----------------------------------------------------------- the manager


def _resolve_directory(directory: str | Path) -> Path:
  """The checkpoint root to read: ``directory``, or its ``checkpoints/`` for a workdir."""
  path = fs.as_path(directory)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
  if not path.is_dir():
    raise FileNotFoundError(f"checkpoint directory {str(path)!r} is not a directory")
  sub = path / "checkpoints"
  if sub.is_dir() and not _step_dirs(path):
    return sub
  return path


def _step_dirs(path: Path) -> list[int]:
  return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def _tmp_dirs(path: Path) -> list[Path]:
  if not path.is_dir():
    return []
  return sorted(p for p in path.iterdir() if TMP_SUFFIX in p.name)


def _no_checkpoint_error(
  path: Path, step: int | None, available: Sequence[int]
) -> FileNotFoundError:
  tmp = _tmp_dirs(path)
  note = (
    f"; {len(tmp)} incomplete save(s) ({', '.join(p.name for p in tmp[:3])}) are ignored"
    if tmp
    else ""
  )
  if step is None:
    return FileNotFoundError(f"no complete checkpoint in {str(path)!r}{note}")
  return FileNotFoundError(
    f"no complete checkpoint of step {step} in {str(path)!r}; complete steps: "
    f"{list(available) or 'none'}{note}"
  )


def _preservation_policy(k: plan.CheckpointPlan) -> Any:
  pp = checkpoint_managers.preservation_policy
  keep = int(k.keep)
  policies: list[Any] = [pp.LatestN(n=keep)]
  if k.keep_best_by:
    policies.append(
      pp.BestN(
        get_metric_fn=_metric_fn(k.keep_best_by, k.best_mode),
        reverse=k.best_mode == "min",
        n=keep,
        # Checkpoints saved without metrics are the latest ones' business
        # (LatestN above); kept forever, they would fill the disk.
        keep_checkpoints_without_metrics=False,
      )
    )
  if k.keep_period:
    policies.append(pp.EveryNSteps(interval_steps=int(k.keep_period)))
  return pp.AnyPreservationPolicy(policies)


def _metric_fn(name: str, mode: str) -> Callable[[dict[str, Any]], float]:
  """A step's ``keep_best_by`` value; the worst there is for a step whose metrics lack it.

  (Metrics of another name, e.g. saved before ``keep_best_by`` changed, or
  ``{}``: Orbax's keep rule raised a KeyError at the next save.)
  """
  worst = math.inf if mode == "min" else -math.inf
  return lambda metrics: float(metrics.get(name, worst))


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, reading an unreadable ``metrics`` item of a step as none, noted.

  Orbax reads every step's metrics file when it opens a directory, and one
  that is empty or not JSON (a write cut short, a disk fault) raises there:
  the directory could not be opened at all, so no earlier step could resume
  either. Orbax has no option for it; here the step is noted in
  ``unreadable_metrics`` (step -> reason), :meth:`Checkpoints.restore`
  refuses it like any damaged step, and a reader still reads the rest.
  """

  def __init__(self, *args: Any, **kwargs: Any):
    self.unreadable_metrics: dict[int, str] = {}  # filled while Orbax opens the directory
    super().__init__(*args, **kwargs)

  def _get_metrics(self, step: int) -> Any:
    try:
      metrics = super()._get_metrics(step)  # a missing file is Orbax's None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      self.unreadable_metrics[step] = str(e) or type(e).__name__
      return None
    if metrics is not None and not isinstance(metrics, dict):
      self.unreadable_metrics[step] = f"holds a {type(metrics).__name__}, not an object"
      return None
    return metrics

  def reload(self) -> None:
    self.unreadable_metrics.clear()
    super().reload()


class Checkpoints:
  """The training loop's handle on a checkpoint directory (``WORKDIR/checkpoints``).

  A thin layer over ``orbax.checkpoint.CheckpointManager``, configured by
  ``config.checkpoint``:

  * ``every_steps``: :meth:`should_save` is true at multiples of it (0: never;
    the loop then saves at the end with ``force=True``);
  * ``keep``: the ``keep`` latest checkpoints are kept; with ``keep_best_by``
    (an eval metric, ``best_mode`` "min" or "max") the ``keep`` best by it are
    kept too; with ``keep_period`` every step divisible by it is kept for good;
  * ``async_save``: :meth:`save` returns once the arrays are copied off the
    device and writes in the background; the next save, :meth:`wait` and
    :meth:`close` wait for it and raise its error if it failed.

  ``on_commit`` holds callables told each step this object saved once it is
  complete on disk (the trainer records the run's ``config.json`` then).

  Creating it (on process 0) removes temporary directories that a crash left
  in the middle of a save; they are logged, never restored from. In a
  multi-process run, call ``jax.distributed.initialize`` before creating it.

  The loop, on every process::

    ckpts = Checkpoints(workdir / "checkpoints", config, data_info=info, mesh=mesh)
    if ckpts.latest_step() is not None:
      state, data_state = ckpts.restore(state_from_config(..., mesh=mesh, abstract=True))
    for step in range(start, num_steps):
      state, metrics = train_step(state, batch(step))
      if ckpts.should_save(step + 1):
        ckpts.save(state, data_state={"step": step + 1}, metrics=eval_metrics)
      if ckpts.reached_preemption(step + 1):
        ckpts.save(state, data_state={"step": step + 1}, force=True)
        break
    ckpts.close()  # waits for the last write

  Args:
    directory: the checkpoint root; created if missing.
    config: the run's config (saved in every checkpoint).
    data_info: the dataset's ``info`` the model was built with (saved too).
    mesh: the run's device mesh (informational; restores use the target's
      shardings).
  """

  def __init__(
    self,
    directory: str | Path,
    config: ml_collections.ConfigDict,
    *,
    data_info: dict[str, Any],
    mesh: jax.sharding.Mesh | None = None,
  ):
    self.directory = fs.as_path(directory)
    if self.directory.exists() and not self.directory.is_dir():
      raise FileExistsError(f"checkpoint directory {str(self.directory)!r} is a file")
    self.config = config
    self.data_info = _jsonable(dict(data_info), "data_info")
    self.mesh = mesh
    k = plan.as_checkpoint_plan(config.checkpoint)
    self._every_steps = int(k.every_steps)
    self._async = bool(k.async_save)
    self._best_by = str(k.keep_best_by or "")

    stale = _tmp_dirs(self.directory)
    if stale and jax.process_index() == 0:
      log.warning(
        "removing %d incomplete checkpoint(s) left by an interrupted save in %s: %s",
        len(stale),
        self.directory,
        ", ".join(p.name for p in stale),
      )
    sdp = checkpoint_managers.save_decision_policy
    save_policies: list[Any] = [sdp.PreemptionCheckpointingPolicy()]
    if self._every_steps > 0:
      save_policies.insert(0, sdp.FixedIntervalPolicy(self._every_steps))
    options = ocp.CheckpointManagerOptions(
      save_decision_policy=sdp.AnySavePolicy(save_policies),
      # max_to_keep / keep_period are deprecated in Orbax 0.12.8 in favour of a
      # preservation policy; best_fn is still what makes Orbax write metrics.
      preservation_policy=_preservation_policy(k),
      best_fn=_metric_fn(self._best_by, str(k.best_mode)) if self._best_by else None,
      best_mode=str(k.best_mode),
      enable_async_checkpointing=self._async,
      cleanup_tmp_directories=True,
      create=True,
    )
    self._manager = _Manager(self.directory, options=options)
    if not self.directory.is_dir():
      # Process 0 created it; another process not seeing it means each host
      # has its own disk, and its shards would never meet process 0's.
      raise FileNotFoundError(
        f"process {jax.process_index()} does not see checkpoint directory "
        f"{str(self.directory)!r} created by process 0: checkpoints need a path on a "
        "filesystem shared by all processes"
      )
    self._fingerprint_cache: tuple[Any, dict[str, Any]] | None = None
    # Called with each step this object saved, once it is complete on disk
    # (known at the next save, wait or close; a save that failed is never told).
    self.on_commit: list[Callable[[int], None]] = []
    self._writing: list[int] = []  # saved steps not yet reported to on_commit
    # jax < 0.9 has no such option (its preemption service is always on).
    service = getattr(jax.config, "jax_enable_preemption_service", True)
    if jax.distributed.is_initialized() and not service:
      log.warning("jax_enable_preemption_service is off: SIGTERM will not trigger a save")

  # -- queries

  def latest_step(self) -> int | None:
    """The latest complete (or, while an async save runs, committed-to) step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps kept, in increasing order."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The best step by ``checkpoint.keep_best_by`` (the latest without it), or None."""
    return self._manager.best_step()

  def unreadable_steps(self) -> dict[int, str]:
    """Steps whose ``metrics`` item is unreadable (step -> reason); :meth:`restore` refuses them."""
    return dict(self._manager.unreadable_metrics)

  def should_save(self, step: int) -> bool:
    """Whether the loop should save after ``step`` steps (multiples of ``every_steps``).

    Also true at a multi-process preemption sync point; false for a step at or
    before the latest checkpoint. Call it on every process.
    """
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """Whether JAX's preemption service asks all processes to save after ``step`` and exit.

    With ``jax.distributed`` initialized (before this object was created),
    JAX's preemption service catches SIGTERM on any process and all processes
    agree on the step to stop at (``reached_preemption_sync_point``); every
    process must then call this at every step, with increasing ``step``.
    Without ``jax.distributed`` it is always False: a single process's
    SIGTERM is the trainer's to catch (it installs the handler).
    """
    if jax.distributed.is_initialized():
      return self._manager.reached_preemption(step)
    return False

  # -- save

  def save(
    self,
    state: TrainState,
    *,
    data_state: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    force: bool = False,
    step: int | None = None,
  ) -> bool:
    """Saves ``state`` (asynchronously if ``checkpoint.async_save``) when :meth:`should_save`.

    Args:
      state: the train state; every array leaf is saved in its own dtype.
      data_state: JSON-able data iterator position, e.g. ``{"step": 1200}``.
      metrics: eval metrics of this state (numbers); needed for
        ``checkpoint.keep_best_by``.
      force: save even when :meth:`should_save` says no (end of training,
        preemption).
      step: the checkpoint's step; default ``state.step``.

    Returns:
      Whether a checkpoint was started (False when not due, or when this step
      is already saved).
    """
    step = _host_int(state.step) if step is None else int(step)
    if step in self._manager.all_steps():
      log.info("step %d is already checkpointed in %s", step, self.directory)
      return False
    if metrics is not None:
      metrics = _jsonable(dict(metrics), "metrics")
      if self._best_by and self._best_by not in metrics:
        raise KeyError(
          f"metrics have no {self._best_by!r} (checkpoint.keep_best_by); got {sorted(metrics)}"
        )
    arrays = fingerprint.state_arrays(state)
    meta = {
      "format": FORMAT_VERSION,
      "step": step,
      "config": config_json(self.config),
      "data_info": self.data_info,
      "versions": dict(_versions()),
      "fingerprint": self._fingerprint(arrays),
    }
    args = ocp.args.Composite(
      **{
        STATE: ocp.args.PyTreeSave(_to_saveable(arrays)),
        DATA: ocp.args.JsonSave(_jsonable(dict(data_state), "data_state")),
        META: ocp.args.JsonSave(meta),
      }
    )
    try:
      started = self._manager.save(step, args=args, metrics=metrics, force=force)
    except BaseException:
      self._writing.clear()  # it may be the previous save's error: that step is never reported
      raise
    if started:
      # Orbax's save first waits for the previous one: all but an async save
      # of this step are complete now.
      self._writing.append(step)
      self._report_commits(pending=step if self._async else None)
    return started

  def _report_commits(self, pending: int | None = None) -> None:
    done = [s for s in self._writing if s != pending]
    self._writing = [s for s in self._writing if s == pending]
    for step in done:
      for fn in self.on_commit:
        fn(step)

  def _fingerprint(self, arrays: dict[str, Any]) -> dict[str, Any]:
    # Computed once per structure: walking a large tree on every save would
    # add to the time an asynchronous save blocks the loop.
    leaves, treedef = jax.tree.flatten(arrays)
    key = (treedef, tuple((np.shape(x), str(x.dtype)) for x in leaves))
    if self._fingerprint_cache is None or self._fingerprint_cache[0] != key:
      self._fingerprint_cache = (key, fingerprint.state_fingerprint(arrays, self.config))
    return self._fingerprint_cache[1]

  def wait(self) -> None:
    """Waits for a background save to finish; raises the error it ended with, if any."""
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except BaseException:
      self._writing.clear()  # a failed save is never reported as complete
      raise
    self._report_commits()

  def reload(self) -> None:
    """Re-reads the steps on disk (after a step directory was moved away)."""
    self._manager.reload()

  def close(self) -> None:
    """Waits for background saves and releases Orbax's resources."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # -- restore

  def meta(self, step: int | None = None) -> dict[str, Any]:
    """The ``meta`` item of a step (config, data_info, versions, fingerprint)."""
    self.wait()
    return _read_meta(self._manager, self.directory, step)

  def restore(
    self, target: TrainState, *, step: int | None = None, migrate: bool = False
  ) -> tuple[TrainState, dict]:
    """Restores a step (default: the latest) into ``target``'s structure, dtypes and shardings.

    Args:
      target: the state this run builds, usually abstract
        (``state_from_config(config, data_info, mesh=mesh, abstract=True)``);
        each leaf is placed with its sharding (one device if it has none).
      step: the step to restore; default the latest complete one.
      migrate: convert an optimizer state saved in another format or tree
        (``checkpoint.migrate_opt_state``; see :mod:`adamw_flax.migrate`);
        everything else must still fit.

    Returns:
      ``(state, data_state)``: the restored :class:`TrainState` (with
      ``target``'s static ``spec``) and the saved data iterator position.

    Raises:
      FileNotFoundError: no complete checkpoint (of ``step``) in the directory.
      ValueError: the step's ``metrics`` item is unreadable (:meth:`unreadable_steps`).
      CheckpointMismatchError: the checkpoint's structure, shapes or dtypes
        differ from ``target``'s (checked before reading any array).
    """
    self.wait()  # a step still being written in the background is not readable yet
    step, meta = _step_and_meta(self._manager, self.directory, step)
    if (reason := self._manager.unreadable_metrics.get(step)) is not None:
      raise ValueError(f"{self.directory / str(step) / 'metrics'}: {reason}")
    where = f"{self.directory}/{step}"
    try:
      _check_fits(meta, target, self.config, where)
    except CheckpointMismatchError as e:
      if not (migrate and e.opt_state_only):
        raise
      return _migrate(self._manager, step, meta, target, self.config, where)
    arrays = _restore_arrays(self._manager, step, fingerprint.state_arrays(target), with_data=True)
    data_state = arrays.pop(DATA)
    return target.replace(**arrays), data_state


def _step_and_meta(
  manager: ocp.CheckpointManager, directory: Path, step: int | None
) -> tuple[int, dict[str, Any]]:
  steps = manager.all_steps()
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise _no_checkpoint_error(directory, None, steps)
  elif step not in steps:
    raise _no_checkpoint_error(directory, step, sorted(steps))
  return step, _read_meta(manager, directory, step)


def _read_meta(manager: ocp.CheckpointManager, directory: Path, step: int | None) -> dict[str, Any]:
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise _no_checkpoint_error(directory, None, [])
  if not (directory / str(step) / META).exists():
    raise FileNotFoundError(
      f"{directory / str(step)} has no '{META}' item: not a checkpoint written by adamw_flax"
    )
  return manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]


def _check_fits(meta: dict[str, Any], target: Any, config: Any, where: str, fields=None) -> None:
  wanted = fingerprint.state_fingerprint(fingerprint.state_arrays(target), config)
  saved_entries = meta["fingerprint"]["entries"]
  wanted_entries = wanted["entries"]
  if fields is not None:
    keep = lambda e: e[0].split("/", 1)[0] in fields
    saved_entries = [e for e in saved_entries if keep(e)]
    wanted_entries = [e for e in wanted_entries if keep(e)]
  first = fingerprint.first_difference(saved_entries, wanted_entries)
  if first is not None:
    if first[0].startswith("opt_state") and not fingerprint.differs_outside_opt_state(
      saved_entries, wanted_entries
    ):
      raise CheckpointMismatchError(
        fingerprint.opt_state_message(where, meta, wanted, config, first), opt_state_only=True
      )
    line, details = fingerprint.mismatch_message(where, meta, wanted, config, first)
    raise CheckpointMismatchError(line, details=details)
  changed = config_diff(meta["fingerprint"]["optimizer"], wanted["optimizer"])
  if changed and fields is None:
    log.warning("restoring %s with a changed optimizer setup: %s", where, "; ".join(changed))


def _migrate(
  manager: ocp.CheckpointManager, step: int, meta: dict, target: Any, config: Any, where: str
) -> tuple[Any, dict]:
  """Restores everything but the optimizer state as is, and converts that (checkpoint.migrate_opt_state)."""
  wanted = fingerprint.state_arrays(target)
  others = {k: v for k, v in wanted.items() if k != "opt_state"}
  _check_fits(meta, target, config, where, fields=set(others))
  arrays = _restore_arrays(manager, step, others, with_data=True, partial=True)
  data_state = arrays.pop(DATA)
  # The saved optimizer state in its own tree and dtypes: Orbax without a
  # target gives nested dicts/lists (read whole on each process).
  saved_meta = manager.item_metadata(step)[STATE]
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_meta)
  raw = manager.restore(
    step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(restore_args=as_numpy)})
  )
  saved_opt = raw[STATE]["opt_state"]
  fresh = jax.jit(target.tx.init)(arrays["params"])
  try:
    converted, notes = migrate.convert_opt_state(saved_opt, fresh)
  except ValueError as e:
    raise CheckpointMismatchError(
      f"checkpoint {where}: its optimizer state cannot be converted: {e}"
    ) from None
  leaves, treedef = jax.tree.flatten(converted)
  like = jax.tree.leaves(target.opt_state)
  placed = [
    jax.device_put(x, t.sharding) if getattr(t, "sharding", None) is not None else x
    for x, t in zip(leaves, like, strict=True)
  ]
  converted = jax.tree.unflatten(treedef, placed)
  if jax.process_index() == 0:
    print(f"converted the optimizer state of {where}: " + "; ".join(notes), flush=True)
  return target.replace(opt_state=converted, **arrays), data_state


def _restore_arrays(
  manager: ocp.CheckpointManager,
  step: int,
  target: dict[str, Any],
  *,
  with_data: bool,
  partial: bool = False,
) -> dict[str, Any]:
  item = _restore_item(target)
  state_args = ocp.args.PyTreeRestore(
    item=item,
    restore_args=ocp.checkpoint_utils.construct_restore_args(item),
    partial_restore=partial,
  )
  items = {STATE: state_args}
  if with_data:
    items[DATA] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  out = _from_restored(dict(restored[STATE]), target)
  if with_data:
    out[DATA] = restored[DATA]
  return out


# ----------------------------------------------------------- library API


def _reader(directory: Path) -> ocp.CheckpointManager:
  # read_only: a restore never creates, cleans or deletes anything (the other
  # two options are what read_only implies; given, Orbax does not warn).
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  return _Manager(directory, options=options)


def save_state(
  directory: str | Path,
  state: TrainState,
  config: ml_collections.ConfigDict,
  *,
  data_info: dict[str, Any],
  step: int | None = None,
) -> None:
  """Saves ``state`` as a checkpoint (synchronously) outside a training loop.

  Args:
    directory: the checkpoint root (created if missing); ``config.checkpoint``'s
      keep rules apply to the steps in it.
    state: the train state.
    config: its config, saved with it.
    data_info: the dataset's ``info`` the model was built with.
    step: the checkpoint's step; default ``state.step``.
  """
  step = _host_int(state.step) if step is None else int(step)
  with Checkpoints(directory, config, data_info=data_info) as ckpts:
    if not ckpts.save(state, data_state={"step": step}, force=True, step=step):
      raise FileExistsError(f"step {step} is already checkpointed in {str(ckpts.directory)!r}")


def _load_target(
  manager: ocp.CheckpointManager,
  directory: Path,
  step: int | None,
  config: ml_collections.ConfigDict | None,
  data_info: dict[str, Any] | None,
  mesh: jax.sharding.Mesh | None,
) -> tuple[int, dict[str, Any], ml_collections.ConfigDict, TrainState]:
  step, meta = _step_and_meta(manager, directory, step)
  if config is None:
    config = config_from_json(meta["config"])
  if data_info is None:
    data_info = meta.get("data_info", {})
  target = train_state.state_from_config(config, data_info, mesh=mesh, abstract=True)
  return step, meta, config, target


def restore_state(
  directory: str | Path,
  *,
  config: ml_collections.ConfigDict | None = None,
  mesh: jax.sharding.Mesh | None = None,
  step: int | None = None,
  data_info: dict[str, Any] | None = None,
) -> TrainState:
  """Restores a train state from a checkpoint directory, with nothing of the run that wrote it.

  Args:
    directory: a checkpoint root, or a workdir holding ``checkpoints/``.
    config: the config to build the target from; default the one saved in the
      checkpoint (its model is found through ``config.model.name``,
      ``"module:name"`` importing the module that registers it).
    mesh: place the state on this mesh (the config's ``mesh`` rules); default
      one device.
    step: the step; default the latest complete one.
    data_info: the dataset's ``info`` for the model builder; default the saved one.

  Returns:
    The :class:`TrainState`.

  Raises:
    FileNotFoundError: a missing directory or no complete checkpoint in it.
    CheckpointMismatchError: the checkpoint does not fit ``config``'s state.
  """
  path = _resolve_directory(directory)
  with _reader(path) as manager:
    step, meta, config, target = _load_target(manager, path, step, config, data_info, mesh)
    _check_fits(meta, target, config, f"{path}/{step}")
    arrays = _restore_arrays(manager, step, fingerprint.state_arrays(target), with_data=False)
  return target.replace(**arrays)


def restore_params(
  directory: str | Path,
  *,
  step: int | None = None,
  config: ml_collections.ConfigDict | None = None,
  ema: bool = False,
) -> Any:
  """Restores just the model (parameters and module state, no optimizer state), for inference.

  Args:
    directory: a checkpoint root, or a workdir holding ``checkpoints/``.
    step: the step; default the latest complete one.
    config: default the one saved in the checkpoint.
    ema: the EMA of the parameters instead (a run with ``trainer.ema_decay``).

  Returns:
    The ``nnx.Module`` with the checkpoint's parameters, on one device.
  """
  path = _resolve_directory(directory)
  fields = ("params", "frozen", "rest") + (("extra",) if ema else ())
  with _reader(path) as manager:
    step, meta, config, target = _load_target(manager, path, step, config, None, None)
    _check_fits(meta, target, config, f"{path}/{step}", fields=fields)
    wanted = {k: v for k, v in fingerprint.state_arrays(target).items() if k in fields}
    if ema and "ema" not in wanted.get("extra", {}):
      raise ValueError(
        f"checkpoint {path}/{step} holds no EMA weights: its run had trainer.ema_decay=0"
      )
    arrays = _restore_arrays(manager, step, wanted, with_data=False, partial=True)
  state = target.replace(opt_state=None, **arrays)
  if ema:
    cast = lambda e, p: e.astype(p.dtype)
    return state.merge(jax.tree.map(cast, state.extra.ema, state.params))
  return state.merge()


def newest_config(directory: str | Path) -> tuple[int, dict[str, Any]] | None:
  """The newest complete step of ``directory`` whose ``meta`` reads, and the config saved in it.

  Read from the files (Orbax's JSON item ``meta/metadata``), not through a
  manager: this runs before a trainer holds the workdir, and Orbax's restore
  synchronizes all processes.

  Returns:
    ``(step, config as JSON)``, or None without such a step.
  """
  path = fs.as_path(directory)
  if not path.is_dir():
    return None
  for step in reversed(_step_dirs(path)):
    try:
      return step, json.loads((path / str(step) / META / "metadata").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):  # a damaged step: its restore moves it aside
      continue
  return None


class CheckpointReader:
  """A read-only view of a checkpoint directory: steps, metrics, meta, state, params.

  Opening it creates, cleans, locks and deletes nothing and installs no
  signal handler (Orbax's manager is opened ``read_only``), so it is safe on
  the workdir of a run that is still training, for sampling or evaluation.

  Args:
    directory: a checkpoint root, or a workdir holding ``checkpoints/``.

  Examples:
    >>> import tempfile
    >>> from flax import nnx
    >>> from adamw_flax import config as config_lib, train_state
    >>> cfg = config_lib.default_config()
    >>> cfg.checkpoint.keep_best_by = "loss"  # Orbax records metrics for it
    >>> state = train_state.create_train_state(lambda rngs: nnx.Linear(2, 3, rngs=rngs), cfg)
    >>> root = tempfile.mkdtemp()
    >>> with Checkpoints(root, cfg, data_info={"n": 1}) as ckpts:
    ...   ckpts.save(state, data_state={"step": 0}, metrics={"loss": 1.5}, force=True)
    True
    >>> with CheckpointReader(root) as reader:
    ...   reader.all_steps(), reader.best_step("loss"), reader.meta()["data_info"]
    ([0], 0, {'n': 1})
  """

  def __init__(self, directory: str | Path):
    self.directory = _resolve_directory(directory)
    self._manager = _reader(self.directory)

  def all_steps(self) -> list[int]:
    """The complete steps, in increasing order."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The latest complete step, or None."""
    return self._manager.latest_step()

  def metrics(self, step: int) -> dict[str, Any] | None:
    """The eval metrics saved with ``step`` (None without; Orbax records them under ``keep_best_by``)."""
    found = self._manager.metrics(step)
    return dict(found) if found else None

  def best_step(self, metric: str = "loss", mode: str = "min") -> int | None:
    """The step with the best saved ``metric`` (``mode`` "min" or "max"); None without metrics."""
    scored = [(m[metric], s) for s in self.all_steps() if (m := self.metrics(s)) and metric in m]
    if not scored:
      return None
    return (min if mode == "min" else max)(scored)[1]

  def meta(self, step: int | None = None) -> dict[str, Any]:
    """The ``meta`` item of a step (default the latest): config, data_info, versions, fingerprint."""
    return _read_meta(self._manager, self.directory, step)

  def data_state(self, step: int | None = None) -> dict[str, Any]:
    """The data position saved with a step (default the latest)."""
    step, _ = _step_and_meta(self._manager, self.directory, step)
    return self._manager.restore(step, args=ocp.args.Composite(**{DATA: ocp.args.JsonRestore()}))[
      DATA
    ]

  def close(self) -> None:
    """Releases Orbax's resources."""
    self._manager.close()

  def __enter__(self) -> CheckpointReader:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
