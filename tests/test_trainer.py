"""The trainer and the command line, end to end on small configs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adamw_flax import config as C
from adamw_flax import reporting, trainer
from tests.conftest import SHARED_TEXT, subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def regression_config(**trainer_kw) -> ml_collections.ConfigDict:
  cfg = C.default_config()
  cfg.model.name = "tests.trainer_models:regressor"
  cfg.model.width = 16
  cfg.data.name = "tests.trainer_models:trainer_regression"
  cfg.data.batch_size = 16
  cfg.data.features = 4
  cfg.data.nan_from_step = -1
  cfg.optimizer.learning_rate = 1e-2
  cfg.optimizer.weight_decay = 0.01
  cfg.trainer.num_steps = 30
  cfg.trainer.log_every = 5
  cfg.trainer.eval_every = 10
  cfg.trainer.eval_batches = 2
  cfg.trainer.progress = False
  cfg.checkpoint.every_steps = 10
  cfg.checkpoint.async_save = False
  for k, v in trainer_kw.items():
    cfg.trainer[k] = v
  return cfg


def test_train_and_evaluate_writes_workdir(tmp_path):
  summary = trainer.train_and_evaluate(regression_config(), tmp_path)
  assert summary["step"] == 30 and not summary["preempted"]
  rows = reporting.read_metrics(tmp_path / "metrics.jsonl")
  train = [r for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
  assert [r["step"] for r in evals] == [10, 20, 30]
  for r in train:
    assert {
      "loss",
      "lr",
      "grad_norm",
      "update_norm",
      "skipped",
      "examples_per_sec",
      "wall_time",
    } <= set(r)
  assert train[-1]["loss"] < train[0]["loss"]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["optimizer"]["learning_rate"] == 1e-2
  assert (tmp_path / "loss.png").stat().st_size > 5000
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "checkpoints").is_dir()


def test_refuses_workdir_of_another_config(tmp_path):
  cfg = regression_config(num_steps=10)
  trainer.train_and_evaluate(cfg, tmp_path)
  other = regression_config(num_steps=10)
  other.optimizer.learning_rate = 5e-3
  with pytest.raises(C.ConfigError, match=r"optimizer.learning_rate: 0.01 -> 0.005"):
    trainer.train_and_evaluate(other, tmp_path)
  other.trainer.allow_config_change = True
  other.trainer.num_steps = 12
  assert trainer.train_and_evaluate(other, tmp_path)["step"] == 12


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = regression_config(num_steps=40, max_nonfinite_steps=3)
  cfg.data.nan_from_step = 15
  with pytest.raises(trainer.TrainingDiverged, match=r"last good checkpoint \(step 10\)"):
    trainer.train_and_evaluate(cfg, tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [10]


def test_unknown_model_dataset_optimizer(tmp_path):
  cfg = regression_config()
  cfg.model.name = "tests.trainer_models:regresor"
  with pytest.raises(C.ConfigError, match="model.name: .*Did you mean 'regressor'"):
    trainer.train_and_evaluate(cfg, tmp_path / "a")
  cfg = regression_config()
  cfg.data.name = "nope"
  with pytest.raises(C.ConfigError, match="data.name: unknown dataset 'nope'"):
    trainer.train_and_evaluate(cfg, tmp_path / "b")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing created
  cfg = regression_config()
  cfg.optimizer.name = "adamv"
  with pytest.raises(C.ConfigError, match="did you mean 'adamw'"):
    trainer.train_and_evaluate(cfg, tmp_path / "c")


def _run_cli(*args, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "train", *args],
    cwd=ROOT,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_cli_smoke_config_end_to_end(tmp_path):
  """`python -m train` on the smoke config: files exist and hold sane values."""
  args = [f"--config={ROOT / 'configs/smoke.py'}", f"--workdir={tmp_path}"]
  if SHARED_TEXT.exists():
    args.append(f"--config.data.path={SHARED_TEXT}")
  proc = _run_cli(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = reporting.read_metrics(tmp_path / "metrics.jsonl")
  train = [r for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  assert train and evals
  assert np.isfinite(train[-1]["loss"]) and train[-1]["loss"] < np.log(65)
  assert train[-1]["tokens_per_sec"] > 0
  assert (tmp_path / "loss.png").exists() and (tmp_path / "config.json").exists()
  assert "trainable params" in proc.stdout


def test_cli_reports_bad_override_cleanly(tmp_path):
  proc = _run_cli(
    f"--config={ROOT / 'configs/smoke.py'}",
    f"--workdir={tmp_path}",
    "--config.optimizer.b2=1.5",
  )
  assert proc.returncode == 2
  assert "optimizer.b2: must be in [0, 1)" in proc.stderr


def _final_state(workdir):
  from adamw_flax import checkpoint

  return checkpoint.restore_state(workdir / "checkpoints")


@pytest.mark.parametrize("mu_dtype", [None, "bfloat16"])
def test_resume_is_bitwise_exact(tmp_path, mu_dtype):
  """2N steps in one go == N steps, stop, resume for N more (params and optimizer state)."""

  def cfg(num_steps):
    c = regression_config(num_steps=num_steps, eval_every=0, eval_batches=1)
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 3
    c.optimizer.decay_steps = 20  # the schedule must not depend on where the run stops
    c.optimizer.mu_dtype = mu_dtype
    c.optimizer.grad_clip_norm = 1.0
    c.checkpoint.every_steps = 0
    c.checkpoint.async_save = True
    return c

  trainer.train_and_evaluate(cfg(20), tmp_path / "once")
  assert trainer.train_and_evaluate(cfg(10), tmp_path / "twice")["step"] == 10
  resumed = cfg(20)
  resumed.trainer.allow_config_change = True
  assert trainer.train_and_evaluate(resumed, tmp_path / "twice")["step"] == 20

  once, twice = _final_state(tmp_path / "once"), _final_state(tmp_path / "twice")
  assert int(once.step) == int(twice.step) == 20
  a = jax.tree_util.tree_leaves_with_path((once.params, once.opt_state, once.rest))
  b = jax.tree.leaves((twice.params, twice.opt_state, twice.rest))
  assert len(a) == len(b)
  for (path, x), y in zip(a, b, strict=True):
    assert x.dtype == y.dtype, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  if mu_dtype:
    assert once.opt_state[1][0].mu["hidden"]["kernel"].dtype == jnp.bfloat16


CLI_CONFIG = """
from tests.test_trainer import regression_config

def get_config():
  c = regression_config(num_steps=100000, log_every=10, eval_every=0, eval_batches=1)
  c.checkpoint.every_steps = 0
  return c
"""


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_resumes(tmp_path):
  """SIGTERM (what schedulers send): save at the next step, exit 0; the rerun resumes."""
  config = tmp_path / "cfg.py"
  config.write_text(CLI_CONFIG)
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "train", f"--config={config}", f"--workdir={workdir}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until training is under way
      rows = reporting.read_metrics(workdir / "metrics.jsonl")
      if any(r["split"] == "train" and r["step"] >= 20 for r in rows):
        break
      time.sleep(0.2)
    else:
      pytest.fail("training did not start")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, out[-2000:]
  assert "preempted: saved step" in out
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 20 <= steps[0] < 100000
  state = _final_state(workdir)
  assert int(state.step) == steps[0]
  # the same command resumes from that step
  with open(tmp_path / "cfg2.py", "w") as f:
    f.write(CLI_CONFIG.replace("num_steps=100000", f"num_steps={steps[0] + 5}"))
  resumed = subprocess.run(
    [*cmd[:3], f"--config={tmp_path / 'cfg2.py'}", f"--workdir={workdir}"]
    + ["--config.trainer.allow_config_change=True"],
    cwd=ROOT,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from step {steps[0]}" in resumed.stdout
  assert int(_final_state(workdir).step) == steps[0] + 5


def test_profile_steps_write_a_trace(tmp_path):
  cfg = regression_config(num_steps=6)
  cfg.trainer.profile_steps = (2, 4)
  trainer.train_and_evaluate(cfg, tmp_path)
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0  # what TensorBoard's profile plugin opens


def test_wandb_writer_logs_offline_and_resumes_the_same_run(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = regression_config(num_steps=10)
  cfg.trainer.wandb_project = "adamw_flax_tests"
  cfg.trainer.wandb_mode = "offline"
  trainer.train_and_evaluate(cfg, tmp_path)
  run_id = (tmp_path / "wandb_id").read_text().strip()
  runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
  assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
  cfg.trainer.num_steps = 20
  cfg.trainer.allow_config_change = True
  trainer.train_and_evaluate(cfg, tmp_path)
  assert (tmp_path / "wandb_id").read_text().strip() == run_id  # the same W&B run, resumed
  assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_wandb_setting_without_the_package_changes_nothing(tmp_path, monkeypatch, capsys):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
  )
  cfg = regression_config(num_steps=5)
  cfg.trainer.wandb_project = "p"
  assert trainer.train_and_evaluate(cfg, tmp_path)["step"] == 5
  assert "wandb is not installed" in capsys.readouterr().err
  assert not (tmp_path / "wandb").exists()


def test_final_eval_batches_sets_the_last_evaluation(tmp_path, monkeypatch):
  seen = []
  original = trainer.actions.evaluate_all

  def spy(eval_steps, state, dataset, num_batches, mesh, mesh_cfg, **kwargs):
    seen.append(num_batches)
    return original(eval_steps, state, dataset, num_batches, mesh, mesh_cfg, **kwargs)

  monkeypatch.setattr(trainer.actions, "evaluate_all", spy)
  cfg = regression_config(num_steps=20)
  cfg.trainer.final_eval_batches = 7
  trainer.train_and_evaluate(cfg, tmp_path)
  assert seen == [2, 7]  # the periodic one at step 10, then the final one


def test_train_step_compiles_once_beside_the_state_init(tmp_path):
  """Start-up compiles the train step from abstract values while the state's init compiles.

  The first step's call then finds that program in JAX's caches: one compile
  of the step, made on the other thread, overlapping the init's in time.
  """
  spans: list[tuple[str, str, float, float]] = []
  event = "/jax/core/compile/backend_compile_duration"

  def listener(name, start, end, **kw):
    if name == event:
      spans.append((kw.get("fun_name", ""), threading.current_thread().name, start, end))

  jax.monitoring.register_event_time_span_listener(listener)
  try:
    trainer.train_and_evaluate(regression_config(num_steps=3, eval_every=0), tmp_path)
  finally:
    jax.monitoring.unregister_event_time_span_listener(listener)
  steps = [s for s in spans if s[0] == "jit(step)"]
  inits = [s for s in spans if s[0] == "jit(init)"]
  assert len(steps) == 1 and steps[0][1] == "precompile", spans
  assert len(inits) == 1 and inits[0][1] != "precompile", spans
  (_, _, s0, s1), (_, _, i0, i1) = steps[0], inits[0]
  assert s0 < i1 and i0 < s1, "the two compiles overlap in time"
