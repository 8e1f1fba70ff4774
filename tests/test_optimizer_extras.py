"""Beyond optax: WSD schedules and cooldowns, per-group decay strengths, AdamC, decay to init."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamw_flax import checkpoint, optim, reporting, schedules, trainer, transform
from adamw_flax import config as C
from tests.test_core import resumed_and_whole
from tests.test_trainer import regression_config


def _wsd_cfg(**kw):
  cfg = C.default_config().optimizer
  cfg.schedule = "wsd"
  cfg.learning_rate = 2.0
  cfg.warmup_steps = 10
  cfg.end_learning_rate = 0.5
  cfg.wsd_decay_fraction = 0.25
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_matches_its_formula_at_every_phase_boundary(shape):
  lr = schedules.schedule_from_config(_wsd_cfg(wsd_decay_shape=shape), 100)
  start, length, peak, end = 75, 25, 2.0, 0.5
  f = {
    "linear": lambda x: 1 - x,
    "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1 - math.sqrt(x),
  }[shape]
  expected = {0: 0.0, 5: 1.0, 9: 1.8, 10: peak, 11: peak, 74: peak, 75: peak, 100: end, 150: end}
  for step in (80, 87, 99):
    expected[step] = end + (peak - end) * f((step - start) / length)
  for step, want in expected.items():
    assert float(lr(step)) == pytest.approx(want, rel=1e-6, abs=1e-7), (shape, step)


def test_wsd_validation_names_the_key():
  full = C.default_config()
  full.optimizer.update(dict(_wsd_cfg(warmup_steps=90)))
  full.trainer.num_steps = 100
  with pytest.raises(C.ConfigError, match="optimizer.wsd_decay_fraction: the decay"):
    C.validate_config(full)
  full.optimizer.warmup_steps = 10
  full.optimizer.wsd_decay_shape = "exp"
  with pytest.raises(C.ConfigError, match="optimizer.wsd_decay_shape: must be one of"):
    C.validate_config(full)


def test_wsd_cooldown_from_a_stable_phase_checkpoint(tmp_path):
  """A 40-step stable run resumed at 20 with a 10-step decay: the schedule up to 20 is the same."""
  cfg = regression_config(num_steps=40)
  cfg.optimizer.schedule = "wsd"
  cfg.optimizer.warmup_steps = 5
  cfg.optimizer.end_learning_rate = 0.0
  cfg.optimizer.wsd_decay_fraction = 0.25  # decays over 30..40
  cfg.checkpoint.every_steps = 10
  cfg.trainer.log_every = 1
  cfg.trainer.num_steps = 20  # stop in the stable phase...
  cfg.optimizer.decay_steps = 40
  trainer.train_and_evaluate(cfg, tmp_path)
  # ...then cool down over 10 steps: num_steps 30, the last third decays.
  cfg.trainer.num_steps = 30
  cfg.optimizer.decay_steps = 0
  cfg.optimizer.wsd_decay_fraction = 10 / 30
  cfg.trainer.allow_config_change = True
  trainer.train_and_evaluate(cfg, tmp_path)
  rows = [r for r in reporting.read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  lrs = {r["step"]: r["lr"] for r in rows}
  assert [lrs[s] for s in (6, 15, 20, 21)] == pytest.approx([1e-2] * 4)  # stable
  assert lrs[25] == pytest.approx(1e-2 * (1 - 4 / 10), rel=1e-5)  # the cooldown (update 24)
  assert lrs[30] == pytest.approx(1e-2 * (1 - 9 / 10), rel=1e-5)
  assert int(checkpoint.restore_state(tmp_path).step) == 30


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
    "embed": {"embedding": jax.random.normal(k1, (5, 3))},
    "dense": {"kernel": jax.random.normal(k2, (3, 3)), "bias": jnp.ones(3)},
  }


def _grads(params, i):
  return jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)


def _run(tx, params, steps=5):
  state = tx.init(params)
  for i in range(steps):
    updates, state = tx.update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_numeric_decay_rules_give_each_group_its_strength():
  cfg = C.default_config().optimizer
  cfg.weight_decay = 0.2
  cfg.learning_rate = 0.1
  cfg.weight_decay_mask = "embed/*=0.1, */bias=false, *=1"
  params = _params()
  ours = _run(optim.optimizer_from_config(cfg).tx, params)
  # The reference: optax's own chain with one add_decayed_weights per group.
  group = lambda name: (
    lambda p: (
      jax.tree.map(lambda _: False, p)
      | {k: jax.tree.map(lambda _: True, v) for k, v in p.items() if k == name}
    )
  )
  kernel_only = lambda p: {
    "embed": {"embedding": False},
    "dense": {"kernel": True, "bias": False},
  }
  ref_tx = optax.chain(
    optax.scale_by_adam(),
    optax.add_decayed_weights(0.2 * 0.1, group("embed")),
    optax.add_decayed_weights(0.2, kernel_only),
    optax.scale_by_learning_rate(0.1),
  )
  ref = _run(ref_tx, params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # eager Adam: within an ulp a step


def test_boolean_rules_keep_optax_state_and_numbers():
  cfg = C.default_config().optimizer
  cfg.weight_decay_mask = "*/bias=0, *=1"  # numbers 0 and 1 are on/off: optax's mask
  state = optim.optimizer_from_config(cfg).tx.init(_params())
  assert isinstance(state[1], optax.MaskedState)


def test_adamc_decays_by_lr_squared_over_peak():
  sched = optax.linear_schedule(1.0, 0.25, 4)
  params = {"w": jnp.full(3, 2.0)}
  zero = {"w": jnp.zeros(3)}
  tx = transform.adamw(
    sched, weight_decay=0.1, weight_decay_mode="adamc", peak_learning_rate=1.0, b1=0.0
  )
  state = tx.init(params)
  p = params
  for t in range(4):
    updates, state = tx.update(zero, state, p)  # zero grads: only the decay moves the weights
    lr = float(sched(t))
    np.testing.assert_allclose(updates["w"], -lr * (0.1 * lr / 1.0) * p["w"], rtol=1e-6)
    p = optax.apply_updates(p, updates)
  with pytest.raises(ValueError, match="needs peak_learning_rate"):
    transform.adamw(sched, weight_decay=0.1, weight_decay_mode="adamc")


def test_decay_to_init_pulls_towards_the_initial_params():
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
  tx = transform.adamw(0.1, weight_decay=0.5, decay_to_init=True, mask={"w": True, "b": False})
  state = tx.init(params)
  moved = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, state = tx.update(zero, state, moved)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * (moved["w"] - params["w"]), rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], 0.0)
  init_params = state[1].init_params
  assert init_params["w"].dtype == params["w"].dtype
  np.testing.assert_array_equal(init_params["w"], params["w"])


def test_decay_to_init_and_numeric_rules_through_the_trainer_resume(tmp_path):
  cfg = regression_config(num_steps=20)
  cfg.optimizer.decay_to_init = True
  cfg.optimizer.weight_decay = 0.5
  cfg.optimizer.weight_decay_mask = "norm/*=0, */bias=0.5, *=1"
  cfg.optimizer.weight_decay_mode = "adamc"
  cfg.optimizer.schedule = "wsd"
  a, b = resumed_and_whole(cfg, tmp_path, stop_at=10)
  assert int(a.step) == int(b.step) == 20
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(x, y)
  assert isinstance(a.opt_state[1], transform.DecayedWeightsState)
