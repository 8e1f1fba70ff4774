"""The training loop: config in, trained and checkpointed model out.

``train_and_evaluate(config, workdir)`` joins the library's pieces and is the
only place with the side effects of training (files, logs, signals). It reads
top to bottom: resolve the run (config, mesh, data), create or restore the
state, compile the steps, loop.

Workdir layout (a contract with users' scripts):
``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON object a
logged step: ``step``, ``split``, ``loss``, ``lr``, throughput, wall time),
``tensorboard/``, ``loss.png``, ``checkpoints/``.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from adamw_flax import checkpoint, fs, registry, reporting, sharding, train_state
from adamw_flax.config import ConfigError, validate_config

log = logging.getLogger("adamw_flax")


class TrainingDiverged(RuntimeError):
  """The loss was non-finite for ``trainer.max_nonfinite_steps`` consecutive steps."""


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      name = f"{prefix}{key}"
      if key not in old:
        out.append(f"{name}: added ({new[key]!r})")
      elif key not in new:
        out.append(f"{name}: removed (was {old[key]!r})")
      else:
        out.extend(_diff(old[key], new[key], name + "."))
    return out
  if isinstance(old, list | tuple) and isinstance(new, list | tuple):
    old, new = list(old), list(new)
  return (
    [] if old == new else [f"{prefix[:-1] if prefix.endswith('.') else prefix}: {old!r} -> {new!r}"]
  )


def check_workdir_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Refuses a workdir holding a run of another config (unless allowed); writes config.json.

  Raises:
    ConfigError: listing the keys that differ, and how to proceed.
  """
  path = workdir / "config.json"
  new = _config_dict(config)
  if path.exists():
    old = json.loads(path.read_text())
    ignore = {"trainer.allow_config_change"}
    changes = [c for c in _diff(old, new) if c.split(":")[0] not in ignore]
    if changes and not config.trainer.allow_config_change:
      raise ConfigError(
        f"workdir {str(workdir)!r} holds a run with a different config:\n  "
        + "\n  ".join(changes)
        + "\nUse another --workdir, or pass --config.trainer.allow_config_change=True to resume "
        "this run with the new config."
      )
    if changes:
      log.warning("resuming %s with a changed config: %s", workdir, "; ".join(changes))
  if jax.process_index() == 0:
    text = json.dumps(new, indent=2, sort_keys=True) + "\n"
    if fs.is_remote(path):
      path.write_text(text)  # an object write is atomic
    else:
      tmp = path.with_suffix(".json.tmp")
      tmp.write_text(text)
      tmp.replace(path)


def evaluate(eval_step, state, dataset, num_batches: int, mesh, mesh_cfg) -> dict[str, float]:
  """Mean of ``eval_step``'s metrics over ``num_batches`` validation batches."""
  totals: dict[str, Any] = {}
  count = 0
  for batch in dataset.eval_batches(num_batches):
    metrics = eval_step(state, sharding.global_batch(batch, mesh, mesh_cfg))
    for key, value in metrics.items():
      totals[key] = totals.get(key, 0.0) + value
    count += 1
  return {k: float(v) / max(count, 1) for k, v in jax.device_get(totals).items()}


def _startup_report(config, state, mesh, abstract_model, main: bool) -> None:
  if not main:
    return
  from adamw_flax import masks
  from adamw_flax.config import _parse_rules

  o = config.optimizer
  lines = [
    f"model {config.model.name}: {train_state.param_count(state.params):,} trainable params, "
    f"{train_state.param_count(state.frozen):,} frozen",
    f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)",
    f"optimizer {o.name}: lr {o.learning_rate} ({o.schedule}, warmup {o.warmup_steps}), "
    f"b1 {o.b1}, b2 {o.b2}, eps {o.eps}, weight_decay {o.weight_decay} "
    f"(mode {o.weight_decay_mode!r}), mu_dtype {o.mu_dtype}, nu_dtype {o.nu_dtype}",
  ]
  per_device = sharding.per_device_bytes(state)
  lines.append(
    "per-device bytes: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in per_device.items())
  )
  print("\n".join(lines), flush=True)
  try:
    print(
      masks.report(
        abstract_model,
        decay_rules=_parse_rules(o.weight_decay_mask, "weight_decay_mask") or "none",
        lr_multipliers=_parse_rules(o.lr_multipliers, "lr_multipliers"),
        frozen=_parse_rules(o.freeze, "freeze"),
      ),
      flush=True,
    )
  except Exception as e:  # the report is informative only; never stop a run for it
    log.warning("could not print the parameter report: %s", e)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains the model and data that ``config`` names, in ``workdir``.

  Rerunning the same command resumes from the latest complete checkpoint.

  Args:
    config: a full config (validated here).
    workdir: the run's directory (created if missing).

  Returns:
    A summary: ``step`` reached, last ``train_loss`` and ``eval_loss``,
    ``wall_time`` and ``preempted``.

  Raises:
    ConfigError: invalid config, or a workdir of another run.
    TrainingDiverged: the loss stayed non-finite; the last good checkpoint is kept.
  """
  t_start = time.perf_counter()
  validate_config(config)
  workdir = fs.as_path(workdir)
  main = jax.process_index() == 0
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
  check_workdir_config(config, workdir)
  tc = config.trainer

  # --- the run: mesh, data, model
  mesh = sharding.mesh_from_config(config.mesh)
  # Processes that hold replicas of the same batch rows (a model axis across
  # processes) load the same slice: the mesh, not the process id, decides.
  data_index, data_count = sharding.data_shard_info(mesh, config.mesh)
  dataset = registry.DATASETS.get(config.data.name)(
    config.data, seed=int(tc.seed), process_index=data_index, process_count=data_count
  )
  model_entry = registry.MODELS.get(config.model.name)
  factory = train_state.model_factory(config, dataset.info)

  # --- state: restored from the latest checkpoint, else created (directly sharded)
  ckpts = checkpoint.Checkpoints(workdir / "checkpoints", config, data_info=dataset.info, mesh=mesh)
  if ckpts.latest_step() is not None:
    target = train_state.create_train_state(factory, config, mesh=mesh, abstract=True)
    state, _ = ckpts.restore(target)
    if main:
      print(f"resumed from step {int(state.step)} of {workdir / 'checkpoints'}", flush=True)
  else:
    state = train_state.create_train_state(factory, config, mesh=mesh)
  from flax import nnx

  abstract_model = nnx.eval_shape(lambda: factory(nnx.Rngs(int(tc.seed))))
  _startup_report(config, state, mesh, abstract_model, main)

  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = sharding.batch_sharding(mesh, config.mesh)
  train_step = train_state.make_train_step(
    model_entry.loss, state_sharding=state_sharding, batch_sharding=batch_sharding
  )
  eval_step = train_state.make_eval_step(
    model_entry.loss, state_sharding=state_sharding, batch_sharding=batch_sharding
  )

  # --- the loop
  writer = reporting.MetricsWriter(workdir) if main else None
  # Plotting takes ~0.3 s: a background thread draws while training goes on.
  plots = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plot")
  num_steps = int(tc.num_steps)
  start = int(state.step)
  progress = reporting.ProgressBar(num_steps, start=start, enabled=main and tc.progress)
  tokens_per_step = dataset.global_batch_size * getattr(dataset, "tokens_per_example", 1)
  unit = "tokens" if getattr(dataset, "tokens_per_example", 1) > 1 else "examples"
  eval_metrics: dict[str, float] = {}
  train_loss = float("nan")
  nonfinite = 0
  last_good_step = ckpts.latest_step()
  preempted = False
  pending = None  # (step, metrics) of the last dispatched step, read one step late
  t_log, step_log = time.perf_counter(), start
  loss_sum = 0.0

  def finish_step(step: int, metrics: dict[str, Any]) -> None:
    """Reads a finished step's metrics: divergence check, logging."""
    nonlocal nonfinite, train_loss, t_log, step_log, loss_sum
    loss = float(metrics["loss"])
    nonfinite = 0 if np.isfinite(loss) else nonfinite + 1
    if tc.max_nonfinite_steps and nonfinite >= tc.max_nonfinite_steps:
      where = (
        f"the last good checkpoint (step {last_good_step}) is kept in {workdir / 'checkpoints'}"
        if last_good_step is not None
        else "no checkpoint was written"
      )
      raise TrainingDiverged(
        f"loss was non-finite for {nonfinite} consecutive steps (up to step {step}); "
        f"stopped without saving; {where}. Lower optimizer.learning_rate, set "
        "optimizer.grad_clip_norm, or optimizer.skip_nonfinite=True."
      )
    train_loss = loss
    loss_sum += loss
    if step % tc.log_every == 0 or step == num_steps:
      now = time.perf_counter()
      rate = (step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
      row = {k: float(v) for k, v in jax.device_get(metrics).items()}
      # The mean over the steps since the last log line: one step's loss is
      # one batch's, too noisy to read a curve from.
      row["loss"] = loss_sum / max(step - step_log, 1)
      loss_sum = 0.0
      row[f"{unit}_per_sec"] = rate
      row["wall_time"] = now - t_start
      t_log, step_log = now, step
      if writer:
        writer.write(step, "train", row)
      progress.update(step, {"loss": row["loss"], "lr": row["lr"], f"{unit}/s": int(rate)})

  try:
    for step in range(start, num_steps):
      batch = sharding.global_batch(
        dataset.train_batch(step), mesh, config.mesh, global_batch_size=dataset.global_batch_size
      )
      state, metrics = train_step(state, batch)
      # Read the previous step's metrics only now, with this step already
      # dispatched, so the host never waits for the device in between.
      if pending is not None:
        finish_step(*pending)
      pending = (step + 1, metrics)
      done = step + 1
      is_eval = bool(tc.eval_every) and done % tc.eval_every == 0 and done < num_steps
      if is_eval:
        finish_step(*pending)
        pending = None
        t_eval = time.perf_counter()
        eval_metrics = evaluate(eval_step, state, dataset, tc.eval_batches, mesh, config.mesh)
        t_log += time.perf_counter() - t_eval  # throughput counts training time only
        if writer:
          writer.write(done, "eval", {**eval_metrics, "wall_time": time.perf_counter() - t_start})
          plots.submit(reporting.plot_losses, workdir)
        progress.update(done, {"eval_loss": eval_metrics["loss"]})
      if ckpts.should_save(done) and done < num_steps:
        if pending is not None:
          finish_step(*pending)  # never save a state whose loss was not checked
          pending = None
        ckpts.save(state, data_state={"step": done}, metrics=eval_metrics or None)
        last_good_step = done
      if ckpts.reached_preemption(done):
        if pending is not None:
          finish_step(*pending)
          pending = None
        ckpts.save(state, data_state={"step": done}, metrics=eval_metrics or None, force=True)
        ckpts.wait()
        preempted = True
        if main:
          print(f"\npreempted: saved step {done}; rerun the same command to resume", flush=True)
        break
    if pending is not None:
      finish_step(*pending)
    if not preempted:
      done = int(state.step)
      if tc.eval_batches:
        eval_metrics = evaluate(eval_step, state, dataset, tc.eval_batches, mesh, config.mesh)
        if writer:
          writer.write(done, "eval", {**eval_metrics, "wall_time": time.perf_counter() - t_start})
      if ckpts.latest_step() != done:
        ckpts.save(state, data_state={"step": done}, metrics=eval_metrics or None, force=True)
      ckpts.wait()
  finally:
    progress.close()
    ckpts.close()
    plots.shutdown(wait=True)
    if writer:
      writer.close()
      if reporting.read_metrics(workdir / "metrics.jsonl"):
        reporting.plot_losses(workdir)

  summary = {
    "step": int(state.step),
    "train_loss": train_loss,
    "eval_loss": eval_metrics.get("loss", float("nan")),
    "wall_time": time.perf_counter() - t_start,
    "preempted": preempted,
  }
  if main:
    print(
      f"\nstep {summary['step']}: train loss {train_loss:.4f}, eval loss "
      f"{summary['eval_loss']:.4f}, {summary['wall_time']:.1f} s",
      flush=True,
    )
  return summary
