"""Config in, trained and checkpointed model out: start-up in phases, then the loop.

``train_and_evaluate(config, workdir)`` reads top to bottom: plan the run,
claim the workdir, build the mesh, the data and the abstract state, start
compiling the train step on a second thread, restore the newest checkpoint
or create the state, write ``config.json``, print the start-up report, wait
for the step's compile, loop. Every start-up phase runs on every
process and ends them all alike when it fails on one
(:func:`adamw_flax.distributed.agree`). The loop dispatches a step, reads the
previous one's metrics (one step late, so the host never waits for the
device between steps) and hands everything else to its actions
(:mod:`adamw_flax.trainer.actions`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
from etils import epath

from adamw_flax import (
  aot,
  checkpoint,
  distributed,
  fs,
  plan,
  registry,
  reporting,
  sharding,
  train_state,
  watchdog,
)
from adamw_flax.config import ConfigError, check_registered, config_json, user_errors
from adamw_flax.errors import EVAL_STEP, TRAIN_STEP, UserError, WorkdirError
from adamw_flax.trainer import actions, report
from adamw_flax.trainer import workdir as wd_lib
from adamw_flax.trainer.actions import Loop, StepResult


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains the model and data that ``config`` names, in ``workdir``.

  Rerunning the same command resumes from the latest complete checkpoint.

  Args:
    config: a full config (validated here), or its :class:`~adamw_flax.plan.RunPlan`.
    workdir: the run's directory (created if missing).

  Returns:
    A summary: ``step`` reached, last ``train_loss`` and ``eval_loss``,
    ``wall_time``, ``preempted`` (stopped by a signal, after saving),
    ``interrupted`` (by SIGINT, Ctrl-C) and ``skipped`` (updates skipped).

  Raises:
    UserError: an invalid config, a workdir of another run or in use, a
      checkpoint that does not fit (nothing in the workdir is changed).
    TrainingDiverged: the loss stayed non-finite; the last good checkpoint is kept.
  """
  t_start = time.perf_counter()
  run = plan.make_plan(config)
  check_registered(run.config)
  workdir = fs.as_path(workdir)
  main = jax.process_index() == 0
  lock = wd_lib.WorkdirLock(workdir)
  created = False

  def claim() -> None:
    nonlocal created
    if main:  # process 0 claims the workdir for the job; the others learn the outcome
      created = wd_lib.prepare_workdir(workdir)
      lock.acquire()

  try:
    # Each phase runs the same collectives on every process, failed or not.
    distributed.agree(claim, "claiming the workdir")
    wd_lib.check_same_config(run.config)
    distributed.agree(
      lambda: wd_lib.check_workdir_config(run.config, workdir), "reading the workdir"
    )
    with _guards(run, workdir) as guards:
      try:
        return _train(run, workdir, main, guards, t_start)
      except Exception as e:
        if (reason := wd_lib.storage_failure(e)) is None:
          raise
        raise WorkdirError(
          f"workdir {str(workdir)!r} cannot be written ({reason}); free space or pick another "
          "--workdir (checkpoints already written are kept; rerun the same command to resume)"
        ) from e
  except UserError:
    if created and main and not fs.is_remote(workdir):
      lock.release()
      # A refused start leaves no trace: the workdir this call made is removed if empty.
      with contextlib.suppress(OSError):
        os.rmdir(os.fspath(workdir))
    raise
  finally:
    lock.release()


@contextlib.contextmanager
def _guards(run: plan.RunPlan, workdir: epath.Path):
  pid, tc = jax.process_index(), run.trainer
  stall = watchdog.Watchdog(tc.stall_timeout_s, workdir, pid)
  # Started with the loop (nothing is written into the workdir before that).
  peers = watchdog.PeerWatch(workdir, pid, jax.process_count(), tc.peer_timeout_s)
  with watchdog.StopSignals() as signals, stall:
    try:
      yield actions.Guards(signals, stall, peers)
    finally:
      peers.close()


def _train(run: plan.RunPlan, workdir: epath.Path, main: bool, guards, t_start: float):
  def place():
    with user_errors("mesh"):
      mesh = sharding.mesh_from_config(run.mesh)
      # Processes that hold replicas of the same batch rows (a model axis across
      # processes) load the same slice: the mesh, not the process id, decides.
      return mesh, *sharding.data_shard_info(mesh, run.mesh)

  mesh, data_index, data_count = distributed.agree(place, "building the mesh")
  # Init, train and eval steps traced under the run's mesh: models' own P(...) constraints.
  with sharding.use_mesh(mesh):
    dataset = distributed.agree(lambda: _data(run, mesh, data_index, data_count), "loading data")
    factory, abstract, shardings, unmapped = distributed.agree(
      lambda: _model(run, mesh, dataset), "building the model"
    )
    batch_sharding = sharding.batch_sharding(mesh, run.mesh)
    loss = registry.MODELS.get(run.model.name).loss
    steps = train_state.make_run_steps(
      run, loss, state_sharding=shardings, batch_sharding=batch_sharding
    )
    target = train_state.with_shardings(abstract, shardings)  # the restore's and the precompile's
    distributed.agree(
      lambda: _check_best_metric(run, steps, target, dataset, batch_sharding, data_count),
      "checking checkpoint.keep_best_by",
    )
    warm = _precompile(workdir, mesh, dataset, data_count, steps, target, batch_sharding)
    try:
      ckpts = distributed.agree(
        lambda: _checkpoints(run, workdir, mesh, dataset), "opening checkpoints"
      )
      try:
        state, data_state = _state(run, workdir, main, mesh, ckpts, factory, target, shardings,
                                   unmapped)  # fmt: skip
        if warm is not None:  # its compile serves the first step (JAX's caches), never run twice
          guards.watchdog.beat(None, "compiling the train step")  # what a stall report names
          warm.join()
        loop = _start(run, workdir, main, guards, t_start, mesh, dataset, ckpts, steps, state,
                      data_state, batch_sharding)  # fmt: skip
        return _loop(loop)
      finally:
        _close_checkpoints(ckpts, sys.exc_info()[1])
    finally:
      if warm is not None:  # a failed start-up still waits for it (no compile left running)
        warm.join()


def _data(run: plan.RunPlan, mesh, data_index: int, data_count: int):
  where = f"data ({run.data.name})"
  with actions.user_code(where), user_errors(where):
    dataset = registry.DATASETS.get(run.data.name)(
      run.data, seed=run.trainer.seed, process_index=data_index, process_count=data_count
    )
  with user_errors("mesh"):
    sharding.check_batch_size(
      int(dataset.global_batch_size), mesh, run.mesh, run.optimizer.accumulate_steps
    )
  return dataset


def _model(run: plan.RunPlan, mesh, dataset):
  """The state's factory, abstract form, shardings, and the logical axes no rule maps.

  The parameter table is made here too, so a rule that matches nothing of this
  model (the ``default`` decay preset on a model with no kernel) is a one-line
  config error before anything is built.
  """
  where = f"model ({run.model.name})"
  with actions.user_code(where), user_errors(where):
    factory = train_state.registered_state_factory(run, dataset.info)
    abstract = factory.abstract()
    shardings = abstract.shardings(mesh, run.mesh)
    trees = [abstract.params, abstract.frozen, abstract.rest]
    unmapped = sharding.unmapped_logical_axes(abstract.spec.templates, trees, run.mesh, mesh=mesh)
    factory.report(run.optimizer)
  return factory, abstract, shardings, unmapped


def _check_best_metric(run, steps, target, dataset, batch_sharding, data_count: int) -> None:
  """Fails before training if ``checkpoint.keep_best_by`` is no metric the evaluation gives.

  The metrics' names come from tracing the eval steps (``jax.eval_shape``,
  no compile; the first evaluation's call reuses the trace), so a name they
  never give stops the run here, not at its first save after steps trained.
  """
  best = run.checkpoint.keep_best_by
  spec = aot.eval_batch_spec(dataset, batch_sharding, data_count) if best else None
  if spec is None:
    return
  with actions.user_code(EVAL_STEP, spec):
    names = sorted(p + k for p, fn in steps.evals.items() for k in jax.eval_shape(fn, target, spec))
  if best not in names:
    raise ConfigError(
      f"checkpoint.keep_best_by: {best!r} is not a metric of the evaluation, which gives "
      f"{', '.join(names)}; set it to one of those"
    )


def _checkpoints(run: plan.RunPlan, workdir: epath.Path, mesh, dataset) -> checkpoint.Checkpoints:
  try:
    return checkpoint.Checkpoints(
      workdir / "checkpoints", run.config, data_info=dataset.info, mesh=mesh
    )
  except (FileExistsError, PermissionError) as e:
    raise WorkdirError(f"checkpoints: {e}") from None


def _close_checkpoints(ckpts: checkpoint.Checkpoints, failing: BaseException | None) -> None:
  if failing is not None and wd_lib.storage_failure(failing) is not None:
    # The failed save's TensorStore writes call back into Orbax's closed event
    # loop, each printing a traceback: the error that matters is reported.
    with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(Exception):
      ckpts.close()
  else:
    ckpts.close()


def _state(run, workdir, main, mesh, ckpts, factory, target, shardings, unmapped):
  """Restores the newest checkpoint into ``target``, or creates the state; writes config.json."""
  migrate = run.checkpoint.migrate_opt_state
  state, data_state = wd_lib.restore_newest(ckpts, target, workdir, main, migrate=migrate)
  if state is None:
    state, data_state = factory.create(shardings), {}
  elif main:
    print(f"resumed from step {int(state.step)} of {workdir / 'checkpoints'}", flush=True)
  wd_lib.write_workdir_config(run.config, workdir)  # a new run's, once its state is built
  if main:
    print(report.startup_report(run, state, mesh, factory, unmapped), flush=True)
  return state, data_state


def _start(run, workdir, main, guards, t_start, mesh, dataset, ckpts, steps, state, data_state,
           batch_sharding) -> Loop:  # fmt: skip
  """The writers and the steps (loaded if ``python -m train.compile`` saved them): the :class:`Loop`."""
  # Steps that python -m train.compile saved in WORKDIR/compiled load instead of compiling.
  steps, note = aot.use_saved_steps(steps, workdir, run, mesh, state, batch_sharding, dataset)
  if note and main:
    print(note, flush=True)
  tc, start = run.trainer, int(state.step)
  writer = None
  if main:
    wandb = reporting.wandb_writer(
      workdir, tc.wandb_project, config_json(run.config), tc.wandb_mode or None
    )
    writer = reporting.MetricsWriter(workdir, resume_step=start, wandb=wandb)
  # A checkpoint of the first build has {"step": n} only: position == step then.
  position = int(data_state.get("position", data_state.get("step", start)))
  progress = reporting.ProgressBar(tc.num_steps, start=start, enabled=main and tc.progress)
  return Loop(run, workdir, main, mesh, dataset, ckpts, steps, guards, state, start, position,
              t_start, writer, progress, last_good_step=ckpts.latest_step(), start=start)  # fmt: skip


def _precompile(
  workdir, mesh, dataset, data_count, steps, target, batch_sharding
) -> threading.Thread | None:
  """Starts compiling the train step, from abstract values, beside the state's restore or init.

  XLA compiles without holding Python's GIL, so on two or more cores the
  step's compile and the state's (restore, or init's compile and run) overlap:
  a small model's start-up is about the longer of the two instead of their
  sum. The compiled program lands in JAX's in-memory caches, where the first
  step's call finds it (same function, shapes, dtypes and shardings). Any
  failure here is dropped: the first step then traces and compiles as before
  and reports the user's error with its frame and batch
  (:func:`_dispatch`). Not started when ``WORKDIR/compiled`` holds steps from
  ``python -m train.compile`` (they load instead).

  Args:
    data_count: the slices each global batch is loaded in (the dataset's batches are one).
    target: the abstract state with its shardings (the restore's target).

  Returns:
    The thread (joined before the first step), or None.
  """
  if aot.read_saved(workdir) is not None:
    return None

  def compile_train_step() -> None:
    try:
      batch = aot.train_batch_spec(dataset, batch_sharding, data_count)  # reads train batch 0
      with sharding.use_mesh(mesh):  # the mesh context is per thread
        steps.train.lower(target, batch).compile()
    except Exception:  # noqa: BLE001 (the first step's own compile reports it)
      pass

  thread = threading.Thread(target=compile_train_step, name="precompile", daemon=True)
  thread.start()
  return thread


def _loop(loop: Loop) -> dict[str, Any]:
  """Dispatches the steps, reads each one late, runs the actions; returns the summary."""
  tc, num_steps = loop.run.trainer, loop.run.trainer.num_steps
  plots, log = actions.Plots(), actions.TrainLog(loop)
  per_step = [actions.Divergence(loop.run), actions.SkipLog(loop.run), log]
  boundary = [actions.Evaluate(loop, log, plots), actions.Save(loop), actions.Stop()]
  profile = actions.Profile(loop.workdir / "profile", tc.profile_steps if loop.main else ())
  loop.guards.peers.note = f"step {loop.last_good_step}" if loop.last_good_step is not None else ""
  loop.guards.peers.start()
  pending, first, t_loop = None, loop.position, time.perf_counter()
  try:
    while loop.step + (pending is not None) < num_steps:
      profile.at(loop.step + (pending is not None), loop.state)
      dispatched = _dispatch(loop, pending is not None, first=loop.position == first)
      if pending is not None:  # the previous step, read with this one already dispatched
        _read(loop, pending, per_step, t_loop)
      pending, step = dispatched, loop.step + 1  # the step count if this one is applied
      due = [action for action in boundary if action.due(loop, step)]  # asks every action
      if not due and step != num_steps:
        continue
      applied = _read(loop, pending, per_step, t_loop)  # a boundary: the state is read back
      pending = None
      for action in due:
        action.run(loop, applied)
      if loop.stopped:
        break
    if pending is not None:
      _read(loop, pending, per_step, t_loop)
    if not loop.stopped:
      actions.finish(loop)
  finally:
    profile.close(loop.state)
    loop.progress.close()
    timing = actions.write_timing(loop, t_loop, plots.close())
    actions.close_writer(loop)
  return _summary(loop, timing)


def _dispatch(loop: Loop, behind: bool, *, first: bool) -> tuple[Any, int]:
  """Loads the next batch and dispatches its step; returns ``(metrics, position)``."""
  wd, n = loop.guards.watchdog, loop.step + 1 + behind
  wd.beat(None, f"loading batch {loop.position} (train step {n})")
  reading = actions.user_code(f"the train_batch of data ({loop.run.data.name})")
  with reading if first else _nothing():
    batch = sharding.global_batch(
      loop.dataset.train_batch(loop.position),
      loop.mesh,
      loop.run.mesh,
      global_batch_size=loop.dataset.global_batch_size,
    )
  wd.beat(None, f"train step {n}")
  with actions.user_code(TRAIN_STEP, batch) if first else _nothing():
    loop.state, metrics = loop.steps.train(loop.state, batch)  # traced at the first call
  loop.position += 1
  return metrics, loop.position - 1


def _read(loop: Loop, dispatched, per_step, t_loop: float) -> bool:
  """Reads a dispatched step's metrics and runs the per-step actions; True if it counted."""
  metrics, position = dispatched
  m = jax.device_get(metrics)
  loop.guards.watchdog.beat(
    f"train step {loop.step + 1}", f"train step {loop.step + 2}", first=False
  )
  if not loop.costs["first_step"]:  # dispatch to done of the first step: compilation, mostly
    loop.costs["first_step"] = time.perf_counter() - t_loop
  loop.skipped_total = int(m["skipped"]) + int(m.get("skipped_spikes", 0))
  result = StepResult(m, position, bool(m["applied"]), bool(m.get("spike", 0)))
  divergence, *after = per_step
  divergence.on_step(loop, result)
  loop.step += result.applied or result.spike  # a spike consumes its step; a non-finite one not
  for action in after:
    action.on_step(loop, result)
  return result.applied or result.spike  # a boundary's eval and save run for a counted step


@contextlib.contextmanager
def _nothing():
  yield


def _summary(loop: Loop, timing: dict[str, float]) -> dict[str, Any]:
  summary = {
    "step": int(loop.state.step),
    "train_loss": loop.train_loss,
    "eval_loss": loop.eval_metrics.get("loss", float("nan")),
    "wall_time": time.perf_counter() - loop.t_start,
    "preempted": bool(loop.stopped),
    "interrupted": loop.stopped == "interrupted",
    "skipped": loop.skipped_total,
  }
  if loop.main:
    print(report.summary_lines(summary, timing), flush=True)
  return summary
