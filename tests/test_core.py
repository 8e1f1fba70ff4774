"""The core contract: one step counter, accumulation inside the step, the data position resumed."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from adamw_flax import checkpoint, reporting, schedules, train_state, trainer
from adamw_flax.registry import MODELS
from tests import trainer_models
from tests.test_trainer import regression_config


def _batches(n, batch_size=16):
  data = trainer_models.RegressionData(
    regression_config().data, seed=0, process_index=0, process_count=1
  )
  data.global_batch_size = batch_size
  data.rows = slice(0, batch_size)
  return [data.train_batch(i) for i in range(n)]


def _cosine_config(accumulate_steps: int, num_steps: int = 12):
  cfg = regression_config(num_steps=num_steps)
  cfg.optimizer.schedule = "warmup_cosine"
  cfg.optimizer.decay_steps = 12
  cfg.optimizer.warmup_steps = 3
  cfg.optimizer.end_learning_rate = 1e-4
  cfg.optimizer.accumulate_steps = accumulate_steps
  return cfg


def resumed_and_whole(cfg, root, stop_at: int):
  """Trains ``cfg`` whole in ``root/whole``, and in ``root/split`` stopped at ``stop_at`` then resumed.

  The schedule's length is pinned to the full run, so both runs see the same
  rates. Returns the two restored final states (whole, split).
  """
  total = cfg.trainer.num_steps
  trainer.train_and_evaluate(cfg, root / "whole")
  cfg.trainer.num_steps, cfg.optimizer.decay_steps = stop_at, total
  trainer.train_and_evaluate(cfg, root / "split")
  cfg.trainer.num_steps, cfg.optimizer.decay_steps = total, 0
  cfg.trainer.allow_config_change = True
  trainer.train_and_evaluate(cfg, root / "split")
  return tuple(checkpoint.restore_state(root / d) for d in ("whole", "split"))


def test_accumulation_splits_the_batch_and_keeps_the_schedule():
  steps = 12
  loss = MODELS.get("tests.trainer_models:regressor").loss
  runs = {}
  for k in (1, 4):
    cfg = _cosine_config(k, steps)
    factory = train_state.model_factory(cfg, {"features": 4})
    state = train_state.create_train_state(factory, cfg)
    step = train_state.make_train_step(loss, accumulate_steps=k)
    lrs, losses = [], []
    for batch in _batches(steps):
      state, metrics = step(state, batch)
      lrs.append(float(metrics["lr"]))
      losses.append(float(metrics["loss"]))
    runs[k] = (state, lrs, losses)
  (s1, lr1, loss1), (s4, lr4, loss4) = runs[1], runs[4]
  assert int(s1.step) == int(s4.step) == steps  # one update per step, whatever k
  assert lr1 == lr4  # the same rate at every step
  schedule = schedules.schedule_from_config(_cosine_config(1, steps).optimizer, steps)
  assert lr1 == pytest.approx([float(schedule(i)) for i in range(steps)], rel=1e-6)
  assert float(schedule(steps)) == pytest.approx(1e-4)  # the end of the schedule is reached
  np.testing.assert_allclose(loss1, loss4, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  # The optimizer state holds no accumulation buffers: the same tree as k=1.
  assert jax.tree.structure(s1.opt_state) == jax.tree.structure(s4.opt_state)


def test_accumulation_refuses_a_batch_it_cannot_split():
  loss = MODELS.get("tests.trainer_models:regressor").loss
  cfg = _cosine_config(1)  # (a config would refuse 16 rows for 3 micro-batches)
  state = train_state.create_train_state(train_state.model_factory(cfg, {"features": 4}), cfg)
  step = train_state.make_train_step(loss, accumulate_steps=3)
  with pytest.raises(ValueError, match="multiple of it"):
    step(state, _batches(1)[0])


def test_trainer_accumulation_matches_k1_through_the_loop(tmp_path):
  summaries = {}
  for k in (1, 4):
    summaries[k] = trainer.train_and_evaluate(_cosine_config(k), tmp_path / f"k{k}")
  rows = {
    k: [
      r
      for r in reporting.read_metrics(tmp_path / f"k{k}" / "metrics.jsonl")
      if r["split"] == "train"
    ]  # fmt: skip
    for k in (1, 4)
  }
  assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[4]]
  assert [r["lr"] for r in rows[1]] == [r["lr"] for r in rows[4]]
  assert summaries[1]["step"] == summaries[4]["step"] == 12
  assert summaries[4]["train_loss"] == pytest.approx(summaries[1]["train_loss"], rel=1e-4)


def _count(opt_state):
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  counts = [int(s.count) for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  assert counts
  return counts[0]


def test_skipped_nonfinite_updates_move_no_counter(tmp_path):
  cfg = _cosine_config(1, num_steps=10)
  cfg.optimizer.skip_nonfinite = True
  cfg.data.nan_at = (2, 3, 7)
  cfg.trainer.log_every = 1
  cfg.checkpoint.every_steps = 4
  summary = trainer.train_and_evaluate(cfg, tmp_path)
  assert summary["step"] == 10 and summary["skipped"] == 3
  rows = reporting.read_metrics(tmp_path / "metrics.jsonl")
  skipped = [r for r in rows if r["split"] == "skipped"]
  assert [r["position"] for r in skipped] == [2, 3, 7]  # the batches with NaN
  assert [r["step"] for r in skipped] == [2, 2, 5]  # updates applied before each
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 11))  # every update once
  schedule = schedules.schedule_from_config(cfg.optimizer, 10)
  for r in train:  # the logged lr is the one applied at that update
    assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)
    assert r["applied"] == 1
  state = checkpoint.restore_state(tmp_path)
  assert int(state.step) == _count(state.opt_state) == 10
  with checkpoint.CheckpointReader(tmp_path) as reader:
    assert reader.data_state() == {"step": 10, "position": 13}


def test_resume_restores_the_data_position(tmp_path):
  cfg = _cosine_config(1, num_steps=12)
  cfg.optimizer.skip_nonfinite = True
  cfg.data.nan_at = (1, 5)  # position runs ahead of step: a resume must not replay by step
  cfg.checkpoint.every_steps = 3
  whole = trainer.train_and_evaluate(cfg, tmp_path / "whole")
  half = _cosine_config(1, num_steps=12)
  half.optimizer.skip_nonfinite = True
  half.data.nan_at = (1, 5)
  half.checkpoint.every_steps = 3
  half.trainer.num_steps = 6
  half.trainer.allow_config_change = True
  trainer.train_and_evaluate(half, tmp_path / "split")
  with checkpoint.CheckpointReader(tmp_path / "split") as reader:
    assert reader.data_state() == {"step": 6, "position": 8}
  half.trainer.num_steps = 12
  resumed = trainer.train_and_evaluate(half, tmp_path / "split")
  assert resumed["step"] == whole["step"] == 12
  a = checkpoint.restore_state(tmp_path / "whole")
  b = checkpoint.restore_state(tmp_path / "split")
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(x, y)  # bitwise: same batches in the same order
  rows = reporting.read_metrics(tmp_path / "split" / "metrics.jsonl")
  train_steps = [r["step"] for r in rows if r["split"] == "train"]
  assert train_steps == sorted(set(train_steps))  # no row of a replayed step twice


def test_an_old_config_json_still_resumes(tmp_path):
  import json

  cfg = regression_config(num_steps=10)
  trainer.train_and_evaluate(cfg, tmp_path)
  path = tmp_path / "config.json"
  old = json.loads(path.read_text())
  del old["mesh"]["logical_axis_rules"]  # written before the schema had the field
  path.write_text(json.dumps(old))
  assert trainer.check_workdir_config(cfg, tmp_path) == []  # the same run, not "another config"
  assert trainer.train_and_evaluate(cfg, tmp_path)["step"] == 10  # the same command: no refusal
  cfg.trainer.num_steps = 20
  cfg.trainer.allow_config_change = True
  assert trainer.train_and_evaluate(cfg, tmp_path)["step"] == 20
  assert checkpoint.restore_state(tmp_path).step == 20
