"""TrainState factory and compiled step: NNX, Linen, frozen params, non-trainable state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from adamw_flax import config as C
from adamw_flax import train_state as T


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, *, dropout: float = 0.0):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.dense = nnx.Linear(8, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids).mean(axis=1)
    x = self.drop(self.norm(self.bn(jax.nn.gelu(self.dense(x)))))
    return self.out(x)[:, 0]


def loss_fn(model, batch, *, train):
  if train:
    model.train()
  else:
    model.eval()
  pred = model(batch["ids"])
  return jnp.mean((pred - batch["y"]) ** 2), {"pred_mean": pred.mean()}


def _batches(n, b=8):
  rng = np.random.default_rng(0)
  return [
    {
      "ids": rng.integers(0, 10, (b, 5)).astype(np.int32),
      "y": rng.normal(size=b).astype(np.float32),
    }
    for _ in range(n)
  ]


def _config(**opt):
  cfg = C.default_config()
  cfg.trainer.num_steps = 20
  cfg.optimizer.weight_decay = 0.1
  for k, v in opt.items():
    cfg.optimizer[k] = v
  return C.validate_config(cfg)


def test_matches_nnx_optimizer():
  """Our factory + step give the same params as nnx.Optimizer(model, optax.adamw(...))."""
  cfg = _config(weight_decay_mask="all", learning_rate=1e-2)
  state = T.create_train_state(lambda rngs: Net(rngs), cfg)
  step = T.make_train_step(loss_fn)

  model = Net(nnx.Rngs(cfg.trainer.seed))
  opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)

  @nnx.jit
  def ref_step(model, opt, batch):
    def f(m):
      return loss_fn(m, batch, train=True)[0]

    loss, grads = nnx.value_and_grad(f)(model)
    opt.update(model, grads)
    return loss

  for batch in _batches(10):
    state, metrics = step(state, batch)
    ref_loss = ref_step(model, opt, batch)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6)
  # Same math, separately compiled programs: equal up to float rounding (one
  # step moves a param by ~lr = 1e-2; the tolerance is 2000x smaller).
  ref = nnx.state(model, nnx.Param).to_pure_dict()
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6), state.params, ref
  )
  # batch statistics (non-trainable state) followed too
  ref_rest = nnx.state(model, nnx.BatchStat).to_pure_dict()
  np.testing.assert_allclose(state.rest["bn"]["mean"], ref_rest["bn"]["mean"], rtol=1e-5, atol=1e-7)
  assert int(state.step) == 10


def test_metrics_and_no_recompilation():
  cfg = _config(schedule="warmup_linear", warmup_steps=4)
  state = T.create_train_state(lambda rngs: Net(rngs), cfg)
  step = T.make_train_step(loss_fn)
  lrs = []
  for batch in _batches(6):
    state, metrics = step(state, batch)
    lrs.append(float(metrics["lr"]))
  assert step._cache_size() == 1
  assert set(metrics) >= {"loss", "lr", "grad_norm", "update_norm", "skipped", "pred_mean"}
  np.testing.assert_allclose(lrs[:5], [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)
  assert float(metrics["grad_norm"]) > 0 and float(metrics["update_norm"]) > 0
  assert int(metrics["skipped"]) == 0


def test_default_mask_decays_kernels_only():
  cfg = _config(learning_rate=1e-2)  # weight_decay_mask="default"
  state = T.create_train_state(lambda rngs: Net(rngs), cfg)
  # With zero gradients, only decayed params move.
  zero = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = state.tx.update(zero, state.opt_state, state.params)
  moved = {k: {n: bool(jnp.any(u != 0)) for n, u in v.items()} for k, v in updates.items()}
  assert moved["dense"]["kernel"] and moved["out"]["kernel"]
  assert not moved["dense"]["bias"] and not moved["embed"]["embedding"]
  assert not moved["norm"]["scale"] and not moved["bn"]["scale"]


def test_frozen_params_get_no_state_and_no_updates():
  cfg = _config(freeze="embed/*=true, dense/*=true")
  state = T.create_train_state(lambda rngs: Net(rngs), cfg)
  assert set(state.frozen) == {"embed", "dense"}
  assert "embed" not in state.params and "dense" not in state.params
  mu = state.opt_state[0].mu
  assert "embed" not in mu and "dense" not in mu
  before = jax.tree.map(np.asarray, state.frozen)
  step = T.make_train_step(loss_fn)
  for batch in _batches(3):
    state, _ = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, state.frozen, before)
  with pytest.raises(ValueError, match="every parameter"):
    T.create_train_state(lambda rngs: Net(rngs), _config(freeze="*=true"))


def test_dropout_rng_state_advances_and_eval_is_deterministic():
  cfg = _config()
  state = T.create_train_state(lambda rngs: Net(rngs, dropout=0.5), cfg)
  step = T.make_train_step(loss_fn, donate=False)
  batch = _batches(1)[0]
  s1, m1 = step(state, batch)
  s2, m2 = step(s1, batch)
  assert float(m1["pred_mean"]) != float(m2["pred_mean"])  # fresh dropout masks
  counts = [x for x in jax.tree.leaves(s2.rest) if x.dtype == jnp.uint32]
  assert counts and all(int(c) > 0 for c in counts)
  ev = T.make_eval_step(loss_fn)
  assert float(ev(s2, batch)["loss"]) == float(ev(s2, batch)["loss"])


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(1)(nn.relu(x))[:, 0]


def linen_loss(model, batch, *, train):
  if train:
    pred = model(batch["x"], train=True, mutable=["batch_stats"])
  else:
    pred = model(batch["x"], train=False)
  return jnp.mean((pred - batch["y"]) ** 2), {}


def test_linen_module():
  cfg = _config(weight_decay_mask="*/kernel=true, *=false", learning_rate=1e-2)
  x = jnp.ones((8, 4))
  state = T.create_train_state(LinenNet(), cfg, example_inputs=(x,))
  assert set(state.params) == {"Dense_0", "Dense_1", "BatchNorm_0"}
  step = T.make_train_step(linen_loss)
  rng = np.random.default_rng(1)
  batch = {"x": rng.normal(size=(8, 4)).astype(np.float32), "y": np.zeros(8, np.float32)}
  losses = []
  for _ in range(20):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]
  assert float(jnp.abs(state.rest["BatchNorm_0"]["mean"]).sum()) > 0  # batch stats updated
  with pytest.raises(ValueError, match="example_inputs"):
    T.create_train_state(LinenNet(), cfg)


def test_bad_model_type():
  with pytest.raises(TypeError, match="nnx.Module"):
    T.create_train_state(object(), _config())


def test_abstract_state_allocates_nothing():
  cfg = _config(mu_dtype="bfloat16")
  abstract = T.create_train_state(lambda rngs: Net(rngs), cfg, abstract=True)
  leaves = jax.tree.leaves(abstract)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert abstract.opt_state[0].mu["dense"]["kernel"].dtype == jnp.bfloat16
