"""Memory-lean AdamW: 8-bit moments, bfloat16 params with stochastic/Kahan rounding, migration."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adamw_flax
from adamw_flax import checkpoint, migrate, quantize, reporting, train_state, trainer
from adamw_flax.checkpoint import CheckpointMismatchError
from tests.test_trainer import regression_config
from tests.test_user_models import run_train

# ------------------------------------------------------------ quantization


def _relative_errors(kind, x, block):
  q = quantize.quantize(x, kind, block)
  back = quantize.dequantize(q)
  # nu's bound is on sqrt(nu), the quantity its map stores
  orig = jnp.sqrt(x) if kind == "nu" else jnp.abs(x)
  got = jnp.sqrt(back) if kind == "nu" else jnp.abs(back)
  blocks = orig.reshape(*orig.shape[:-1], -1, block)
  top = jnp.max(blocks, axis=-1, keepdims=True)
  in_range = (blocks >= top * 2.0**-15) & (blocks > 0)
  err = jnp.abs(got.reshape(blocks.shape) - blocks) / jnp.where(blocks > 0, blocks, 1.0)
  return q, back, err, in_range, blocks, got.reshape(blocks.shape)


@pytest.mark.parametrize("kind", ["mu", "nu"])
def test_round_trip_is_within_the_maps_bound_for_every_block(kind):
  rng = np.random.default_rng(0)
  # Values spread over 8 decades, so every binade of the map is exercised.
  x = rng.standard_normal((32, 512)) * np.exp(rng.uniform(-18, 0, (32, 512)))
  x = jnp.asarray(x if kind == "mu" else x**2, jnp.float32)
  q, back, err, in_range, blocks, got = _relative_errors(kind, x, 256)
  assert q.codes.dtype == (jnp.int8 if kind == "mu" else jnp.uint8)
  assert q.codes.shape == x.shape and q.scale.shape == (32, 2) and q.scale.dtype == jnp.float32
  bound = quantize.max_relative_error(kind)
  assert float(jnp.max(jnp.where(in_range, err, 0.0))) <= bound * (1 + 1e-6)
  # The largest magnitude of a block is exact (up to float32 rounding of the scale).
  top = jnp.argmax(blocks, axis=-1)
  picked = lambda a: jnp.take_along_axis(a, top[..., None], -1)
  np.testing.assert_allclose(picked(got), picked(blocks), rtol=1e-6)
  if kind == "mu":  # signs kept
    assert bool(jnp.all((jnp.sign(back) == jnp.sign(x)) | (back == 0)))
    below = ~in_range & (blocks > 0)  # far below the block maximum: 0 or a tiny value
    assert float(jnp.max(jnp.where(below, got, 0.0) / picked(blocks))) < 2.0**-14
  else:  # a positive nu never dequantizes to 0 (no division by eps)
    assert bool(jnp.all(jnp.where(x > 0, back > 0, back == 0)))


@pytest.mark.parametrize("kind", ["mu", "nu"])
def test_edge_blocks_zeros_denormals_outlier_equal(kind):
  sign = -1.0 if kind == "mu" else 1.0
  rows = np.array(
    [
      [0.0] * 16,  # all zeros
      [sign * 2e-38 * (i + 1) for i in range(16)],  # at the bottom of the normal range
      [1e30] + [1e-3] * 15,  # one huge outlier
      [sign * 0.37] * 16,  # all equal
      [1e-40 * (i + 1) for i in range(16)],  # float32 denormals
    ],
    np.float32,
  )
  if kind == "nu":
    rows = np.abs(rows)
  q = quantize.quantize(jnp.asarray(rows), kind, 16)
  back = np.asarray(quantize.dequantize(q))
  assert np.all(back[0] == 0) and np.all(q.scale[0] == 0)  # zeros stay exact
  assert np.all(np.isfinite(back))
  # the smallest normal floats, relative to their own block maximum: within the bound
  bound = quantize.max_relative_error(kind)
  if kind == "mu":
    np.testing.assert_allclose(back[1], rows[1], rtol=bound)
  else:
    np.testing.assert_allclose(np.sqrt(back[1]), np.sqrt(rows[1]), rtol=bound)
  # a block of float32 denormals is 0 (documented: beside eps=1e-8, below 1.2e-38 is 0)
  assert np.all(back[4] == 0)
  assert back[2, 0] == pytest.approx(1e30, rel=1e-6)  # the outlier is exact
  if kind == "mu":
    assert np.all(back[2, 1:] == 0)  # 1e-33 of the maximum: below range, to 0
  else:
    assert np.all(back[2, 1:] > 0)  # never 0 for a positive second moment
  np.testing.assert_allclose(back[3], rows[3], rtol=1e-6)  # all equal: exact


@pytest.mark.parametrize("kind", ["mu", "nu"])
def test_nonfinite_inputs_poison_their_block_as_the_float_path(kind):
  x = np.ones((3, 16), np.float32)
  x[0, 3] = np.nan
  x[1, 5] = np.inf
  back = np.asarray(quantize.dequantize(quantize.quantize(jnp.asarray(x), kind, 16)))
  assert np.isnan(back[0]).all() and np.isnan(back[1]).all()
  np.testing.assert_allclose(back[2], 1.0, rtol=1e-6)  # other blocks untouched
  # The update is then non-finite, as the float32 update is: apply_if_finite skips it.
  params = {"w": jnp.ones((4, 256))}
  tx = adamw_flax.adamw(1e-3, mu_dtype="int8", nu_dtype="int8", quantize_min_size=0)
  grads = {"w": jnp.ones((4, 256)).at[0, 0].set(jnp.nan)}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert not bool(jnp.isfinite(updates["w"]).all())


# One piece, two chunks, several chunks with a tail (the CPU loop's cases).
@pytest.mark.parametrize("shape", [(8, 512), (40, 512), (1100, 512)])
@pytest.mark.parametrize("from_stored", [False, True])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_a_nan_gradient_poisons_its_block_in_the_8bit_step(shape, from_stored, rounding):
  """Also in the update from the stored codes, which does not read the gradient again.

  XLA:CPU's block maximum may skip a NaN (a vector max returns the other
  operand): a finite scale then left the update from the stored codes finite
  where the gradient was NaN, past ``apply_if_finite``.
  """
  params = {"w": jnp.ones(shape)}
  tx = adamw_flax.adamw(
    1e-3, mu_dtype="int8", nu_dtype="int8", quantize_min_size=0, moments_rounding=rounding,
    update_from_stored_moments=from_stored,
  )  # fmt: skip
  row = shape[0] - 3
  grads = {"w": jnp.full(shape, 1e-3).at[row, 300].set(jnp.nan)}
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  u = np.asarray(updates["w"])
  assert np.isnan(u[row, 300])  # apply_if_finite skips the step
  if from_stored:  # the update of the whole block reads its NaN scale
    assert np.isnan(u[row, 256:]).all()
  assert np.isfinite(np.delete(u, row, axis=0)).all() and np.isfinite(u[row, :256]).all()
  scale = np.asarray(state[0].mu["w"].scale)
  assert np.isnan(scale[row, 1]) and np.isfinite(np.delete(scale, row, axis=0)).all()


def test_block_size_and_exclusions_decide_the_format():
  params = {
    "big": jnp.ones((64, 256)),
    "odd": jnp.ones((100, 65)),  # block 65 (largest divisor <= 256)
    "prime": jnp.ones((100, 257)),  # no divisor >= 16 up to 256: float32
    "small": jnp.ones((64,)),
    "embed": jnp.ones((300, 64)),
  }
  mask = {k: k != "embed" for k in params}
  state = adamw_flax.adamw(1e-3, mu_dtype="int8", nu_dtype="int8", quantize_mask=mask).init(params)
  mu = state[0].mu
  assert isinstance(mu["big"], quantize.QuantizedMoment) and mu["big"].block == 256
  assert mu["odd"].block == 65
  for k in ("prime", "small", "embed"):
    assert mu[k].dtype == jnp.float32 and mu[k].shape == params[k].shape
  summary = quantize.moments_summary(state)
  assert summary["nu"]["int8_params"] == 64 * 256 + 100 * 65


# ------------------------------------------------------------ 8-bit AdamW tracks float32


def _run(tx, params, grad_fn, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    g = grad_fn(params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params


def test_8bit_adamw_tracks_float32_on_a_convex_problem():
  rng = np.random.default_rng(1)
  a = jnp.asarray(np.exp(rng.uniform(-3, 1, (64, 256))), jnp.float32)  # curvatures > 0
  target = jnp.asarray(rng.standard_normal((64, 256)), jnp.float32)
  loss = lambda p: 0.5 * jnp.sum(a * (p["w"] - target) ** 2)
  params = {"w": jnp.zeros((64, 256), jnp.float32)}
  ref = _run(optax.adamw(3e-2, weight_decay=0.0), params, jax.grad(loss), 300)
  ours = _run(
    adamw_flax.adamw(3e-2, weight_decay=0.0, mu_dtype="int8", nu_dtype="int8"),
    params,
    jax.grad(loss),
    300,
  )
  start = float(loss(params))
  assert float(loss(ref)) < 0.02 * start
  assert abs(float(loss(ours)) - float(loss(ref))) < 0.01 * start
  np.testing.assert_allclose(ours["w"], ref["w"], atol=0.1)


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(16, 256, rngs=rngs)
    self.l2 = nnx.Linear(256, 64, rngs=rngs)
    self.l3 = nnx.Linear(64, 1, rngs=rngs)

  def __call__(self, x):
    return self.l3(jax.nn.gelu(self.l2(jax.nn.gelu(self.l1(x)))))[:, 0]


def _net_losses(overrides, steps=150):
  x = jax.random.normal(jax.random.key(0), (steps, 64, 16))
  y = jnp.sin(x.sum(-1)) + 0.5 * x[..., 0] * x[..., 1]
  cfg = adamw_flax.config.default_config()
  cfg.optimizer.learning_rate = 3e-3
  cfg.optimizer.quantize_min_size = 1024
  adamw_flax.config.apply_overrides(cfg, overrides)

  def loss_fn(model, batch, *, train):
    del train
    return jnp.mean((model(batch["x"]).astype(jnp.float32) - batch["y"]) ** 2), {}

  state = train_state.create_train_state(_Net, cfg)
  step = train_state.make_train_step(loss_fn)
  losses = []
  for i in range(steps):
    state, m = step(state, {"x": x[i], "y": y[i]})
    losses.append(float(m["loss"]))
  return np.array(losses), state


def test_8bit_moments_and_bf16_params_track_float32_on_a_small_network():
  ref, _ = _net_losses([])
  int8, state = _net_losses(["optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8"])
  assert isinstance(state.opt_state[0].mu["l1"]["kernel"], quantize.QuantizedMoment)
  late = slice(100, None)
  assert ref[late].mean() < 0.75 * ref[:10].mean()  # it learns
  assert abs(int8[late].mean() - ref[late].mean()) < 0.05 * ref[late].mean()
  lean, lean_state = _net_losses(
    ["optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8", "optimizer.params_dtype=bfloat16"]
  )
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(lean_state.params))
  assert abs(lean[late].mean() - ref[late].mean()) < 0.1 * ref[late].mean()


# ------------------------------------------------------------ bf16 params rounding


def test_stochastic_rounding_is_unbiased_and_deterministic():
  x = jnp.asarray(np.random.default_rng(2).uniform(1, 2, 4096), jnp.float32)
  lo = x.astype(jnp.bfloat16)  # nearest; the exact value lies between two bfloat16s
  means = []
  for i in range(64):
    bits = quantize.random_bits16(jax.random.key(i), x.shape)
    means.append(quantize.round_to_bfloat16(x, "stochastic", bits).astype(jnp.float32))
  mean = jnp.mean(jnp.stack(means), axis=0)
  ulp = 2.0**-7  # bfloat16 ulp in [1, 2)
  # the mean of 64 unbiased roundings: within 4 standard errors (ulp/2/sqrt(64)) per element,
  # and the average bias over all elements within 1% of an ulp
  assert float(jnp.max(jnp.abs(mean - x))) < 4 * ulp / 2 / 8
  assert abs(float(jnp.mean(mean - x))) < 0.01 * ulp
  assert float(jnp.mean(jnp.abs(lo.astype(jnp.float32) - x))) > 0.2 * ulp  # nearest is biased
  # deterministic for a given seed and step, different across steps
  tx = adamw_flax.transform.round_params("stochastic", seed=5)
  params = {"w": jnp.ones(1024, jnp.bfloat16)}
  updates = {"w": jnp.full(1024, 1e-3, jnp.float32)}
  s0 = tx.init(params)
  u1, s1 = tx.update(updates, s0, params)
  u1b, _ = tx.update(updates, tx.init(params), params)
  u2, _ = tx.update(updates, s1, params)
  np.testing.assert_array_equal(u1["w"], u1b["w"])
  assert not np.array_equal(u1["w"], u2["w"])
  assert abs(float(jnp.mean(u1["w"])) - 1e-3) < 2e-4  # unbiased: 1e-3 on average


@pytest.mark.parametrize("mode", ["stochastic", "kahan", "nearest"])
def test_small_updates_accumulate_unless_rounded_to_nearest(mode):
  params = {"w": jnp.ones(512, jnp.bfloat16)}
  tx = optax.chain(optax.sgd(1.0), adamw_flax.transform.round_params(mode, seed=0))
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update({"w": jnp.full(512, -1e-4, jnp.bfloat16)}, s, p))
  for _ in range(200):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.bfloat16
  moved = float(jnp.mean(params["w"].astype(jnp.float32))) - 1.0  # should be 0.02
  if mode == "nearest":
    assert moved == 0.0  # every update is below half an ulp (2^-8): lost
  elif mode == "kahan":  # the nearest bfloat16 to 1.02 (the rest is in the compensation)
    assert abs(moved - 0.02) <= 2.0**-8
  else:  # unbiased: the mean over 512 elements
    assert moved == pytest.approx(0.02, rel=0.1)


# ------------------------------------------------------------ through the trainer


LEAN = (
  "optimizer.mu_dtype=int8",
  "optimizer.nu_dtype=int8",
  "optimizer.params_dtype=bfloat16",
  "optimizer.quantize_min_size=0",
  "optimizer.quantize_block_size=16",
  "model.hidden=64",
  "optimizer.lr_multipliers=*/bias=0.5",
  "optimizer.freeze=b_out=true",
  "optimizer.grad_clip_norm=1.0",
  "optimizer.accumulate_steps=2",
  "optimizer.skip_nonfinite=True",
)


@pytest.mark.slow
def test_lean_state_trains_resumes_bitwise_and_restores_8_4_1(tmp_path):
  """int8 moments + bf16 params with masks, multipliers, freezing, clipping, accumulation,
  skip_nonfinite, annotations on a (data, model) mesh with ZeRO-1, through python -m train."""
  whole = run_train("mlp", tmp_path / "whole", *LEAN, devices=8)
  assert whole.returncode == 0, whole.stderr
  assert "bytes per trained param: params 2.00 (bfloat16), mu 1." in whole.stdout
  split = tmp_path / "split"
  first = run_train("mlp", split, *LEAN, "trainer.num_steps=4", devices=8)
  assert first.returncode == 0, first.stderr
  resumed = run_train("mlp", split, *LEAN, "trainer.allow_config_change=True", devices=8)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step 4" in resumed.stdout
  a, b = (checkpoint.restore_state(d) for d in (tmp_path / "whole", split))
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise
  for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # codes, scales, key
  mu = a.opt_state
  assert any(
    isinstance(x, quantize.QuantizedMoment)
    for x in jax.tree.leaves(mu, is_leaf=quantize.is_quantized)
  )
  assert a.frozen  # b_out stays out of the trained tree
  # Onto 4 devices (2x2), then one.
  four = run_train(
    "mlp", split, *LEAN, "trainer.num_steps=10", "trainer.allow_config_change=True", devices=4
  )
  assert four.returncode == 0, four.stderr
  assert "resumed from step 8" in four.stdout and "step 10:" in four.stdout
  one = run_train(
    "mlp",
    split,
    *LEAN,
    "mesh.shape=(-1, 1)",
    "trainer.num_steps=12",
    "trainer.allow_config_change=True",
    devices=1,
  )
  assert one.returncode == 0, one.stderr
  assert "resumed from step 10" in one.stdout and "step 12:" in one.stdout
  rows = reporting.read_metrics(split / "metrics.jsonl")
  assert all(math.isfinite(r["loss"]) for r in rows)


def test_a_nonfinite_step_keeps_the_lean_state():
  cfg = regression_config(num_steps=4)
  lean = ("mu_dtype=int8", "nu_dtype=int8", "params_dtype=bfloat16", "quantize_min_size=0")
  adamw_flax.config.apply_overrides(cfg, [f"optimizer.{o}" for o in lean])
  cfg.optimizer.skip_nonfinite = True
  factory = train_state.model_factory(cfg, {"features": 4})
  state = train_state.create_train_state(factory, cfg)
  loss = adamw_flax.registry.MODELS.get("tests.trainer_models:regressor").loss
  step = train_state.make_train_step(loss, donate=False)
  x = jnp.ones((16, 4))
  good = {"x": x, "y": jnp.ones(16)}
  s1, _ = step(state, good)
  s2, m = step(s1, {"x": x.at[0, 0].set(jnp.nan), "y": jnp.ones(16)})
  assert int(m["applied"]) == 0 and int(m["skipped"]) == 1
  kept = lambda s: (s.step, s.params, s.rest, s.opt_state[1].inner_state)  # all but the tally
  for a, b in zip(jax.tree.leaves(kept(s1)), jax.tree.leaves(kept(s2)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert isinstance(s2.opt_state[1].inner_state[-1], adamw_flax.transform.ParamsRoundingState)


# ------------------------------------------------------------ migration


def _mig_config(steps, *overrides):
  cfg = regression_config(num_steps=steps)
  cfg.trainer.eval_every = 4
  cfg.checkpoint.every_steps = 4
  cfg.trainer.allow_config_change = True
  adamw_flax.config.apply_overrides(
    cfg, ["optimizer.quantize_min_size=0", "optimizer.quantize_block_size=16", *overrides]
  )
  return cfg


MIGRATIONS = {
  "float32 -> int8": ((), ("optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8")),
  "int8 -> bf16": (
    ("optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8"),
    ("optimizer.mu_dtype=bfloat16", "optimizer.nu_dtype=bfloat16"),
  ),
  "mask default -> all": ((), ("optimizer.weight_decay_mask=all",)),
  "mask all -> default": (("optimizer.weight_decay_mask=all",), ()),
  "constant -> warmup_cosine": (
    (),
    ("optimizer.schedule=warmup_cosine", "optimizer.warmup_steps=2", "optimizer.decay_steps=12"),
  ),
  "warmup_cosine -> constant": (
    ("optimizer.schedule=warmup_cosine", "optimizer.warmup_steps=2"),
    ("optimizer.schedule=constant",),
  ),
  "adamw -> nadamw, skip_nonfinite": (
    ("optimizer.mu_dtype=int8",),
    ("optimizer.name=nadamw", "optimizer.skip_nonfinite=True", "optimizer.mu_dtype=bfloat16"),
  ),
}


@pytest.mark.parametrize("name", list(MIGRATIONS))
def test_migration_restores_converts_and_trains_on(name, tmp_path, capsys):
  before, after = MIGRATIONS[name]
  trainer.train_and_evaluate(_mig_config(4, *before), tmp_path)
  cfg = _mig_config(8, *after)
  capsys.readouterr()
  with pytest.raises(CheckpointMismatchError) as e:  # without the opt-in: one line
    trainer.train_and_evaluate(cfg, tmp_path)
  message = str(e.value)
  assert "\n" not in message and "--config.checkpoint.migrate_opt_state=True" in message
  cfg.checkpoint.migrate_opt_state = True
  summary = trainer.train_and_evaluate(cfg, tmp_path)
  out = capsys.readouterr().out
  assert summary["step"] == 8
  assert "converted the optimizer state" in out and "update counters set to 4" in out
  state = checkpoint.restore_state(tmp_path)
  adam = [
    x
    for x in jax.tree.leaves(
      state.opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState)
    )
    if isinstance(x, optax.ScaleByAdamState)
  ]
  assert int(adam[0].count) == 8  # continued from the saved count
  rows = reporting.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows if r["split"] == "eval"] == [4, 8]
  assert all(math.isfinite(r["loss"]) for r in rows)
  # The moments were carried over, not reset: the first step after the restore
  # is not a fresh Adam step (whose update is lr * sign(g) in every element).
  train = [r for r in rows if r["split"] == "train" and r["step"] == 5]
  assert train and train[0]["update_norm"] < 0.99 * train[0]["lr"] * math.sqrt(
    sum(math.prod(np.shape(x)) for x in jax.tree.leaves(state.params))
  )


def test_to_and_from_optax_state_round_trip():
  params = {"w": jax.random.normal(jax.random.key(0), (8, 256)), "b": jnp.zeros(8)}
  ours = adamw_flax.adamw(
    1e-2, mu_dtype="int8", nu_dtype="int8", quantize_min_size=0, weight_decay=0.1
  )
  grads = {"w": jax.random.normal(jax.random.key(1), (8, 256)), "b": jnp.ones(8)}
  state = ours.init(params)
  for _ in range(3):
    _, state = ours.update(grads, state, params)
  plain = migrate.to_optax_state(state)
  ref_tx = optax.adamw(1e-2, weight_decay=0.1)
  assert jax.tree.structure(plain) == jax.tree.structure(ref_tx.init(params))
  updates, plain2 = ref_tx.update(grads, plain, params)  # optax continues from it
  assert int(plain2[0].count) == 4 and bool(jnp.isfinite(updates["w"]).all())
  back = migrate.from_optax_state(plain, ours, params)
  assert isinstance(back[0].mu["w"], quantize.QuantizedMoment)
  # int8 -> float32 -> int8 gives the same codes back (scales to float32 rounding).
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
    if a.dtype in (jnp.int8, jnp.uint8, jnp.int32):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  # and bf16 params with rounding state: dropped for optax, rebuilt on the way back
  lean = adamw_flax.adamw(1e-2, mu_dtype="int8", params_rounding="stochastic")
  bf = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  assert len(migrate.to_optax_state(lean.init(bf))) == 3


def test_blocks_never_straddle_a_shard_boundary():
  from jax.sharding import AbstractMesh
  from jax.sharding import PartitionSpec as P

  from adamw_flax import config, sharding

  params = {"w": jax.ShapeDtypeStruct((64, 512), jnp.float32)}
  mesh_cfg = config.default_config().mesh
  mesh_cfg.axes, mesh_cfg.shape = ("data", "model"), (1, 4)
  specs = {"w": P(None, "model")}  # 512 columns over 4 devices: 128 each
  mesh = AbstractMesh((1, 4), ("data", "model"))

  def shardings(block):
    tx = adamw_flax.adamw(
      1e-3, mu_dtype="int8", nu_dtype="int8", quantize_min_size=0, quantize_block_size=block
    )
    return sharding.opt_state_shardings(
      jax.eval_shape(tx.init, params), params, specs, mesh, mesh_cfg
    )

  ok = shardings(128)  # 4 blocks of 128 per row: one per device
  assert ok[0].mu["w"].codes.spec == ok[0].mu["w"].scale.spec == P(None, "model")
  with pytest.raises(ValueError, match="would straddle two devices"):
    shardings(256)  # 2 blocks of 256 cannot be split over 4 devices


def test_the_report_shows_the_trained_params_dtype():
  from adamw_flax import plan

  cfg = regression_config()
  cfg.optimizer.params_dtype = "bfloat16"
  cfg.optimizer.freeze = "out/bias=true"
  factory = train_state.registered_state_factory(cfg, {"features": 4})
  text = factory.report(plan.make_plan(cfg).optimizer)
  line = lambda path: next(x for x in text.splitlines() if x.startswith(path))
  assert "bfloat16" in line("hidden/kernel")
  assert "float32" in line("out/bias")  # frozen params keep the dtype they were built in


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "linen"])
def test_lean_state_with_batchnorm_dropout_and_linen_resumes_bitwise(name, tmp_path):
  """The CNN (BatchNorm, Dropout, nnx.Rngs) and the bridged Linen transformer, int8 moments and
  bf16 params, through python -m train: stopped at step 4 and resumed equals the whole run."""
  lean = [
    "optimizer.mu_dtype=int8",
    "optimizer.nu_dtype=int8",
    "optimizer.params_dtype=bfloat16",
    "optimizer.quantize_min_size=0",
    "optimizer.quantize_block_size=16",
    *(["model.width=16"] if name == "cnn" else []),  # channels a block of 16 divides
  ]
  whole = run_train(name, tmp_path / "whole", *lean)
  assert whole.returncode == 0, whole.stderr
  line = next(x for x in whole.stdout.splitlines() if x.startswith("bytes per trained param"))
  assert line.startswith("bytes per trained param: params 2.00 (bfloat16), mu ")
  assert "(int8 " in line  # some moments quantized (the Linen embeddings stay float32)
  split = tmp_path / "split"
  assert run_train(name, split, *lean, "trainer.num_steps=4").returncode == 0
  resumed = run_train(name, split, *lean, "trainer.allow_config_change=True")
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step 4" in resumed.stdout
  a, b = (checkpoint.restore_state(d) for d in (tmp_path / "whole", split))
  assert any(
    quantize.is_quantized(x) for x in jax.tree.leaves(a.opt_state, is_leaf=quantize.is_quantized)
  )
  for x, y in zip(jax.tree.leaves((a.params, a.rest, a.opt_state)),
                  jax.tree.leaves((b.params, b.rest, b.opt_state)), strict=True):  # fmt: skip
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_block_that_would_straddle_devices_is_a_user_error_through_the_cli(tmp_path):
  workdir = tmp_path / "run"
  out = run_train(
    "mlp",
    workdir,
    "optimizer.mu_dtype=int8",
    "optimizer.quantize_min_size=0",
    "optimizer.quantize_block_size=16",  # up/bias: one block of 16 over a model axis of 2
  )
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "would straddle two devices" in lines[0]
  assert "optimizer.quantize_block_size" in lines[0] and "Traceback" not in out.stderr
  assert not workdir.exists()


def test_8bit_moments_train_in_nnx_optimizer_as_in_plain_optax():
  """nnx.Optimizer keeps the state in Variables and refills them from nnx.state, which turns a
  QuantizedMoment into an nnx.State: the update takes that form and gives it back."""

  class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.fc1 = nnx.Linear(64, 256, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)
      self.fc2 = nnx.Linear(256, 64, rngs=rngs)

    def __call__(self, x):
      return self.fc2(self.drop(nnx.relu(self.fc1(x))))

  x = jax.random.normal(jax.random.key(1), (8, 64))
  tx = optax.apply_if_finite(
    adamw_flax.adamw(1e-2, weight_decay=0.1, mu_dtype="int8", nu_dtype="int8"), 3
  )
  model = Net(nnx.Rngs(0, dropout=1))
  model.eval()  # the same gradients for the plain-optax twin below
  params = nnx.state(model, nnx.Param)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  loss = lambda m: jnp.mean(m(x) ** 2)

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(loss)(model)
    opt.update(model, grads)

  graphdef = nnx.graphdef(model)
  pure = nnx.to_pure_dict(params)
  state = tx.init(pure)
  for _ in range(3):
    step(model, opt)
    grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, nnx.state(model, nnx.Not(nnx.Param)))))(
      pure
    )
    updates, state = tx.update(grads, state, pure)
    pure = optax.apply_updates(pure, updates)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(pure), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # nnx.Optimizer holds the kernels' 8-bit moments as mappings, and migrate reads them.
  kept = nnx.as_pure(opt.opt_state).inner_state[0].mu["fc1"]["kernel"]
  assert not quantize.is_quantized(kept) and kept["codes"].dtype == jnp.int8
  plain = migrate.to_optax_state(nnx.as_pure(opt.opt_state))
  moment = plain.inner_state[0].mu["fc1"]["kernel"]
  assert moment.dtype == jnp.float32 and moment.shape == (64, 256)
