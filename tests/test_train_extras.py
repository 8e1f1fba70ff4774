"""What the train step keeps beside the optimizer: spike skipping, EMA weights; update-RMS clipping."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamw_flax import checkpoint, optim, plan, reporting, train_state, trainer
from adamw_flax.registry import MODELS
from tests import trainer_models
from tests.conftest import subprocess_env
from tests.test_core import resumed_and_whole
from tests.test_trainer import regression_config

LOSS = MODELS.get("tests.trainer_models:regressor").loss


def _data(cfg):
  return trainer_models.RegressionData(cfg.data, seed=0, process_index=0, process_count=1)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.step, state.params, state.opt_state))]


def _schedule_counts(opt_state):
  is_node = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return [int(x.count) for x in jax.tree.leaves(opt_state, is_leaf=is_node) if is_node(x)]


def test_spikes_are_skipped_and_normal_steps_match_the_plain_optimizer():
  cfg = regression_config(num_steps=30)
  cfg.optimizer.skip_spikes = True
  cfg.optimizer.spike_window = 8
  cfg.optimizer.spike_warmup = 8
  cfg.data.spike_at = (12, 24)  # 12 leaves the window (8) before 24
  cfg.optimizer.schedule, cfg.optimizer.warmup_steps = "warmup_cosine", 4
  run = plan.make_plan(cfg)
  state = train_state.state_from_config(run, {"features": 4})
  guarded = train_state.make_train_step(LOSS, donate=False)  # the rule comes with the state
  plain = train_state.make_train_step(LOSS, donate=False)
  data = _data(cfg)
  skipped = []
  for position in range(28):
    batch = data.train_batch(position)
    new, metrics = guarded(state, batch)
    if position in (12, 24):
      assert int(metrics["spike"]) == 1 and int(metrics["applied"]) == 0
      # Params, moments, Adam's count and the model state are kept; the step and
      # the schedules advance (the skipped step consumed its batch).
      kept = (state.params, state.rest, train_state.advance_schedules(state.opt_state))
      for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves((new.params, new.rest, new.opt_state)),
                      strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
      assert int(new.step) == int(state.step) + 1
      skipped.append(position)
    else:
      reference, _ = plain(state.replace(extra={}), batch)
      for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(reference.params), strict=True):
        # The plain optimizer's update to one float32 ulp (not bitwise: XLA:CPU
        # compiles the program with the spike test, a larger one, differently).
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
      assert int(metrics["spike"]) == 0
    # The logged lr is the applied one: the schedule's count is the state's step.
    assert _schedule_counts(new.opt_state) == [int(new.step)]
    state = new
  assert skipped == [12, 24]
  assert int(state.step) == 28 and int(state.extra.spikes.skipped) == 2
  assert int(state.extra.spikes.count) == 28  # every step entered the window


def test_a_lasting_loss_rise_becomes_the_baseline_and_the_run_ends(tmp_path):
  cfg = regression_config(num_steps=60)
  cfg.optimizer.skip_spikes = True
  cfg.optimizer.spike_window = 8
  cfg.optimizer.spike_warmup = 4
  cfg.data.rise_from = 30  # the targets grow 30x from batch 30 on, for good
  summary = trainer.train_and_evaluate(cfg, tmp_path)
  assert summary["step"] == 60  # skipped steps count: the run ends on time
  rows = reporting.read_metrics(tmp_path / "metrics.jsonl")
  skipped = [r["position"] for r in rows if r["split"] == "skipped"]
  # The first steps after the rise are spikes; once the window holds the new
  # losses, they are the baseline and training goes on.
  assert skipped and skipped[0] == 30 and max(skipped) < 40, skipped
  assert max(r["position"] for r in rows if r["split"] == "skipped") < 59


def test_too_many_spikes_in_a_row_stop_the_run_with_one_line(tmp_path):
  config = tmp_path / "rise.py"
  config.write_text(
    "from tests.test_trainer import regression_config\n\n\n"
    "def get_config():\n"
    "  cfg = regression_config(num_steps=60)\n"
    "  cfg.optimizer.skip_spikes = True\n"
    "  cfg.optimizer.spike_window = 8\n"
    "  cfg.optimizer.spike_warmup = 4\n"
    "  cfg.optimizer.skip_spikes_max_consecutive = 1\n"
    "  cfg.data.rise_from = 30\n"
    "  return cfg\n"
  )
  run = subprocess.run(
    [sys.executable, "-m", "train", f"--config={config}", f"--workdir={tmp_path / 'run'}"],
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert run.returncode == 1, run.stderr[-2000:]
  assert "step 31: skipped as a loss spike" in run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: 1 steps in a row were skipped as loss spikes (to step 31)"), last
  assert "skip_spikes_max_consecutive" in last


def test_ema_is_the_hand_computed_ema_and_is_evaluated():
  cfg = regression_config(num_steps=5)
  cfg.trainer.ema_decay = 0.9
  run = plan.make_plan(cfg)
  state = train_state.state_from_config(run, {"features": 4})
  step = train_state.make_train_step(LOSS, donate=False)
  data = _data(cfg)
  ema = [np.asarray(x, np.float32) for x in jax.tree.leaves(state.params)]
  for position in range(5):
    state, _ = step(state, data.train_batch(position))
    params = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    ema = [np.float32(0.9) * e + np.float32(1 - 0.9) * p for e, p in zip(ema, params, strict=True)]
  for got, want in zip(jax.tree.leaves(state.extra.ema), ema, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  evaluate = train_state.make_eval_step(LOSS, ema=True)
  batch = data.eval_batches(1)[0]
  on_ema = float(evaluate(state, batch)["loss"])
  by_hand = state.replace(params=state.extra.ema)
  assert on_ema == pytest.approx(float(train_state.make_eval_step(LOSS)(by_hand, batch)["loss"]))


def test_the_state_carries_its_ema_so_a_default_step_updates_it():
  cfg = regression_config(num_steps=3)
  cfg.trainer.ema_decay = 0.9
  state = train_state.state_from_config(cfg, {"features": 4})
  step = train_state.make_train_step(LOSS, donate=False)  # no ema_decay: the state's own
  new, _ = step(state, _data(cfg).train_batch(0))
  for e0, e1, p in zip(*(jax.tree.leaves(t) for t in (state.extra.ema, new.extra.ema,
                                                      new.params)), strict=True):  # fmt: skip
    np.testing.assert_allclose(e1, 0.9 * np.asarray(e0) + 0.1 * np.asarray(p), rtol=1e-6)
  with pytest.raises(ValueError, match="disagrees with the state's EMA decay"):
    train_state.make_train_step(LOSS, donate=False, ema_decay=0.5)(state, _data(cfg).train_batch(0))


def _drift(ema_dtype: str, steps: int = 2000, warmup: bool = False):
  """The EMA (decay 0.999) of params drifting linearly from 1.0 to 3.0, and its exact value."""
  rule = plan.EmaRule(0.999, ema_dtype, warmup)
  path = np.linspace(1.0, 3.0, steps + 1)

  @jax.jit
  def run(ema):
    def body(t, ema):
      p = jnp.full((256,), 1.0 + 2.0 * t / steps, jnp.float32)
      return train_state.update_ema(rule, ema, p, t, seed=0)

    return jax.lax.fori_loop(1, steps + 1, body, ema)

  got = run(jnp.ones((256,), jnp.dtype(ema_dtype)))
  exact = 1.0
  for t in range(1, steps + 1):
    d = min(0.999, (1 + t) / (10 + t)) if warmup else 0.999
    exact = d * exact + (1 - d) * path[t]
  return np.asarray(got, np.float64), exact


def test_a_bfloat16_ema_moves_like_the_float32_one():
  # Rounding d*e + (1-d)*p to nearest bfloat16 each step kept this EMA at 1.0
  # (the increment is below half an ulp); stochastic rounding follows it.
  got, exact = _drift("bfloat16")
  assert exact == pytest.approx(2.136, abs=2e-3)
  assert abs(got.mean() - exact) < 0.01, (got.mean(), exact)
  f32, _ = _drift("float32")
  assert abs(f32.mean() - exact) < 1e-4


def test_ema_warmup_ramps_the_decay_like_kauldron():
  got, exact = _drift("float32", steps=300, warmup=True)
  assert abs(got.mean() - exact) < 1e-4
  plain, exact_plain = _drift("float32", steps=300)
  # Without warmup, 0.999 still holds 74% of the initial weights after 300 steps.
  assert exact - exact_plain > 0.5 and abs(plain.mean() - exact_plain) < 1e-4


def test_ema_through_the_trainer_keep_best_and_restore(tmp_path):
  cfg = regression_config(num_steps=20)
  cfg.trainer.ema_decay = 0.8
  cfg.trainer.ema_dtype = "bfloat16"
  cfg.checkpoint.keep_best_by = "ema_loss"
  summary = trainer.train_and_evaluate(cfg, tmp_path)
  evals = [r for r in reporting.read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "eval"]
  assert evals and all("ema_loss" in r and "loss" in r for r in evals)
  assert summary["eval_loss"] == evals[-1]["loss"]
  state = checkpoint.restore_state(tmp_path)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.extra.ema))
  model = checkpoint.restore_params(tmp_path, ema=True)
  from flax import nnx

  got = jax.tree.leaves(nnx.state(model, nnx.Param))
  want = [e.astype(p.dtype) for e, p in zip(jax.tree.leaves(state.extra.ema),
                                            jax.tree.leaves(state.params), strict=True)]  # fmt: skip
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(a, b)
  with checkpoint.CheckpointReader(tmp_path) as reader:
    best = reader.best_step("ema_loss")
  assert best is not None


def test_restore_params_ema_without_ema_is_an_error(tmp_path):
  trainer.train_and_evaluate(regression_config(num_steps=10), tmp_path)
  with pytest.raises(ValueError, match="holds no EMA weights"):
    checkpoint.restore_params(tmp_path, ema=True)


def test_update_rms_clip_bounds_each_tensor():
  schedule = optax.constant_schedule(0.5)
  tx = optim.clip_update_rms(2.0, schedule)
  updates = {"big": jnp.full((4,), 10.0), "small": jnp.full((4,), 0.1)}
  out, _ = tx.update(updates, tx.init(updates))
  rms = lambda x: float(jnp.sqrt(jnp.mean(x**2)))
  assert rms(out["big"]) == pytest.approx(1.0, rel=1e-6)  # 2.0 x lr 0.5
  np.testing.assert_array_equal(out["small"], updates["small"])
  cfg = regression_config().optimizer
  cfg.update_rms_clip = 1.0
  cfg.weight_decay_mask = "all"
  tx, _ = optim.optimizer_from_config(cfg)
  assert isinstance(tx.init({"w": jnp.ones(3)})[1], optim.ClipUpdateRmsState)


def test_ema_resumes_exactly(tmp_path):
  cfg = regression_config(num_steps=20)
  cfg.trainer.ema_decay = 0.9
  a, b = resumed_and_whole(cfg, tmp_path, stop_at=10)
  for x, y in zip(jax.tree.leaves(a.extra), jax.tree.leaves(b.extra), strict=True):
    np.testing.assert_array_equal(x, y)


def test_extra_is_typed_and_checkpoints_hold_the_first_builds_dict_form(tmp_path):
  cfg = regression_config(num_steps=6)
  cfg.trainer.ema_decay = 0.9
  cfg.optimizer.skip_spikes = True
  trainer.train_and_evaluate(cfg, tmp_path)
  state = checkpoint.restore_state(tmp_path)
  assert isinstance(state.extra, train_state.Extra)
  assert isinstance(state.extra.spikes, train_state.SpikeStats)
  assert int(state.extra.spikes.count) == 6 and state.extra.keys() == ["ema", "spikes"]
  # Read by key as before: users' code written against the dict keeps working.
  np.testing.assert_array_equal(state.extra["spikes"]["skipped"], state.extra.spikes.skipped)
  # On disk the tree is the dict the first builds wrote (sorted keys), so their checkpoints restore.
  entries = dict(map(tuple, checkpoint.CheckpointReader(tmp_path).meta()["fingerprint"]["entries"]))
  assert entries["extra"] == "dict" and entries["extra/spikes"] == "dict"
  assert (
    entries["extra/spikes/count"] == "int32[]" and entries["extra/spikes/loss"] == "float32[128]"
  )
  # A state without them holds an empty Extra; {} (the old form) still replaces it.
  plain = state.replace(extra={})
  assert isinstance(plain.extra, train_state.Extra) and not plain.extra and "ema" not in plain.extra
  with pytest.raises(ValueError, match="'ema' and 'spikes'"):
    state.replace(extra={"emma": 1})
