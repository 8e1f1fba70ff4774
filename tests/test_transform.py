"""adamw_flax.transform against optax 0.2.8, the oracle: numbers, state trees, wrappers."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_flax
from adamw_flax import transform

STEPS = 24
LR_SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 40, 1e-3)
WD_SCHEDULE = optax.linear_schedule(1e-2, 1e-3, 20)


def _params(dtype: Any = jnp.float32, seed: int = 0) -> dict[str, Any]:
  """A small tree: matrix, vector, 3-D, scalar leaves, nested."""
  k = jax.random.split(jax.random.key(seed), 4)
  tree = {
    "dense": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jax.random.normal(k[1], (3,))},
    "conv": jax.random.normal(k[2], (2, 2, 3)),
    "scale": jax.random.normal(k[3], ()),
  }
  return jax.tree.map(lambda x: x.astype(dtype), tree)


def _complex_params() -> dict[str, Any]:
  re, im = _params()["dense"], _params(seed=1)["dense"]
  return jax.tree.map(lambda a, b: (a + 1j * b).astype(jnp.complex64), re, im)


def _grads(params: Any, i: jax.Array) -> Any:
  """Gradients that depend on the params and the step, with some exact zeros."""
  t = jnp.asarray(i, jnp.float32)

  def leaf(p):
    g = jnp.sin(3.0 * p + t) * 0.1 + 0.01 * p
    g = jnp.where(jnp.abs(jnp.real(p)) < 0.15, jnp.zeros_like(g), g)
    return g.astype(p.dtype)

  return jax.tree.map(leaf, params)


@functools.cache
def _jitted_steps(txs: tuple[optax.GradientTransformation, ...]):
  """One compiled step running every transform of ``txs`` side by side.

  Compiling is most of this file's runtime, so transforms compared with each
  other run in one program, and a tuple of transforms compiles once.
  """

  def step(ps, ss, i):
    out = []
    for tx, p, s in zip(txs, ps, ss, strict=True):
      u, s = tx.update(_grads(p, i), s, p)
      out.append((optax.apply_updates(p, u), s, u))
    return out

  return jax.jit(step)


def _run_many(txs, params, steps: int = STEPS, states=None) -> list[tuple[Any, Any, list[Any]]]:
  """Runs each transform from its params (and state); returns [(params, state, [updates])]."""
  txs = tuple(txs)
  ps = list(params)
  ss = [tx.init(p) for tx, p in zip(txs, ps, strict=True)] if states is None else list(states)
  updates: list[list[Any]] = [[] for _ in txs]
  step = _jitted_steps(txs)
  for i in range(steps):
    out = step(ps, ss, i)
    ps, ss = [o[0] for o in out], [o[1] for o in out]
    for k, o in enumerate(out):
      updates[k].append(o[2])
  return [(p, s, u) for p, s, u in zip(ps, ss, updates, strict=True)]


def _run(tx: optax.GradientTransformation, params: Any, steps: int = STEPS, state: Any = None):
  """`steps` jitted steps of update + apply; returns (params, state, [updates])."""
  return _run_many([tx], [params], steps, None if state is None else [state])[0]


def _assert_pairs_equal(pairs: dict[str, tuple[Any, Any]], params: dict[str, Any] | None = None):
  """Runs each (ours, optax) pair in one program; all must be bitwise equal."""
  names = list(pairs)
  txs = [tx for name in names for tx in pairs[name]]
  inputs = [(params or {}).get(name, _params()) for name in names for _ in range(2)]
  results = _run_many(txs, inputs)
  for k, name in enumerate(names):
    try:
      _assert_trees_equal(results[2 * k], results[2 * k + 1])
    except AssertionError as e:
      raise AssertionError(f"{name}: adamw_flax differs from optax: {e}") from e


def _assert_trees_equal(a: Any, b: Any) -> None:
  """Same structure, same leaf dtypes and shapes, bitwise equal values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_same_layout(a: Any, b: Any) -> None:
  """Same structure and leaf dtypes/shapes (what a checkpoint restore needs)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert [(x.dtype, x.shape) for x in la] == [(y.dtype, y.shape) for y in lb]


def _max_rel_err(a: Any, ref: Any) -> float:
  errs = [
    float(np.max(np.abs(np.float64(x) - np.float64(r)) / (np.abs(np.float64(r)) + 1e-3)))
    for x, r in zip(jax.tree.leaves(a), jax.tree.leaves(ref), strict=True)
  ]
  return max(errs)


# -- Equivalence with optax ----------------------------------------------------------------

MASK_TREE = {"dense": {"kernel": True, "bias": False}, "conv": True, "scale": False}
MASK_PREFIX = {"dense": True, "conv": False, "scale": True}


def _mask_fn(p):
  return jax.tree.map(lambda x: x.ndim > 1, p)


OPTAX_SETTINGS = {
  "default": dict(learning_rate=1e-2),
  "lr_schedule": dict(learning_rate=LR_SCHEDULE),
  "nesterov": dict(learning_rate=1e-2, nesterov=True),
  "nesterov_schedules": dict(learning_rate=LR_SCHEDULE, weight_decay=WD_SCHEDULE, nesterov=True),
  "eps_root": dict(learning_rate=1e-2, eps_root=1e-8),
  "betas": dict(learning_rate=3e-3, b1=0.8, b2=0.95, eps=1e-6),
  "wd_schedule": dict(learning_rate=1e-2, weight_decay=WD_SCHEDULE),
  "wd_zero": dict(learning_rate=1e-2, weight_decay=0.0),
  "wd_large": dict(learning_rate=1e-2, weight_decay=0.1),
  "mask_tree": dict(learning_rate=1e-2, weight_decay=0.1, mask=MASK_TREE),
  "mask_prefix": dict(learning_rate=LR_SCHEDULE, weight_decay=0.1, mask=MASK_PREFIX),
  "mask_callable": dict(learning_rate=1e-2, weight_decay=WD_SCHEDULE, mask=_mask_fn),
  # 16-bit first moments with float32 params: optax's arithmetic (b1 * mu in
  # mu's dtype, the update from the unrounded float32 mu), so bitwise too.
  "mu_bf16": dict(learning_rate=1e-2, mu_dtype="bfloat16"),
  "mu_f16_schedules": dict(learning_rate=LR_SCHEDULE, weight_decay=WD_SCHEDULE, mu_dtype="float16"),
}


def _optax_with_nu_stored_as(nu_dtype: Any, **kwargs) -> optax.GradientTransformation:
  """optax.adamw keeping its second moment in ``nu_dtype`` between steps.

  The oracle for our ``nu_dtype`` (optax has none): optax's float32 arithmetic
  on the widened stored nu, with the new nu rounded to ``nu_dtype`` for storage.
  """
  inner = optax.adamw(**kwargs)

  def store(state):
    adam = state[0]
    return (adam._replace(nu=jax.tree.map(lambda v: v.astype(nu_dtype), adam.nu)), *state[1:])

  def update(grads, state, params):
    adam = state[0]
    widened = adam._replace(nu=jax.tree.map(lambda v, p: v.astype(p.dtype), adam.nu, params))
    updates, state = inner.update(grads, (widened, *state[1:]), params)
    return updates, store(state)

  return optax.GradientTransformation(lambda params: store(inner.init(params)), update)


def test_bitwise_equal_to_optax_float32_grid():
  pairs = {name: (adamw_flax.adamw(**kw), optax.adamw(**kw)) for name, kw in OPTAX_SETTINGS.items()}
  for name, lr in (("nadamw_const", 1e-2), ("nadamw_schedule", LR_SCHEDULE)):
    pairs[name] = (adamw_flax.nadamw(lr, weight_decay=0.05), optax.nadamw(lr, weight_decay=0.05))
  pairs["weight_decay_mask_alias"] = (
    adamw_flax.adamw(1e-2, weight_decay=0.1, weight_decay_mask=MASK_TREE),
    optax.adamw(1e-2, weight_decay=0.1, mask=MASK_TREE),
  )
  pairs["scale_by_adam"] = (
    adamw_flax.scale_by_adam(0.8, 0.99, 1e-7, 1e-9, nesterov=True),
    optax.scale_by_adam(0.8, 0.99, 1e-7, 1e-9, nesterov=True),
  )
  pairs["complex"] = (
    adamw_flax.adamw(1e-2, weight_decay=0.1),
    optax.adamw(1e-2, weight_decay=0.1),
  )
  # 16-bit nu (ours): optax's float32 arithmetic on the stored nu.
  pairs["nu_bf16"] = (
    adamw_flax.adamw(1e-2, nu_dtype=jnp.bfloat16),
    _optax_with_nu_stored_as(jnp.bfloat16, learning_rate=1e-2),
  )
  pairs["mu_bf16_nu_f16_nesterov"] = (
    adamw_flax.nadamw(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.float16),
    _optax_with_nu_stored_as(jnp.float16, learning_rate=1e-2, mu_dtype=jnp.bfloat16, nesterov=True),
  )
  # The opt-in changes nothing where the moments are stored in float32.
  pairs["mu_f32_update_from_stored_moments"] = (
    adamw_flax.adamw(1e-2, mu_dtype=jnp.float32, update_from_stored_moments=True),
    optax.adamw(1e-2, mu_dtype=jnp.float32),
  )
  _assert_pairs_equal(pairs, params={"complex": _complex_params()})
  assert isinstance(pairs["scale_by_adam"][0].init(_params()), optax.ScaleByAdamState)


def test_nadamw_signature_extends_optax():
  ours = inspect.signature(adamw_flax.nadamw).parameters
  for name, p in inspect.signature(optax.nadamw).parameters.items():
    assert name in ours and ours[name].default == p.default and ours[name].kind == p.kind, name
  ours = inspect.signature(adamw_flax.adamw).parameters
  for name, p in inspect.signature(optax.adamw).parameters.items():
    assert ours[name].default == p.default and ours[name].kind == p.kind, name
  assert ours["nu_dtype"].kind == inspect.Parameter.KEYWORD_ONLY
  for factory in (adamw_flax.adamw, adamw_flax.nadamw, adamw_flax.scale_by_adam):
    flag = inspect.signature(factory).parameters["update_from_stored_moments"]
    assert flag.kind == inspect.Parameter.KEYWORD_ONLY and flag.default is False


def test_vmap_matches_optax():
  batch = jax.tree.map(lambda *xs: jnp.stack(xs), _params(seed=0), _params(seed=1))

  def steps(tx, params):
    state = tx.init(params)
    for i in range(3):
      u, state = tx.update(_grads(params, i), state, params)
      params = optax.apply_updates(params, u)
    return params, state

  ours = jax.jit(jax.vmap(functools.partial(steps, adamw_flax.adamw(1e-2, weight_decay=0.1))))
  ref = jax.jit(jax.vmap(functools.partial(steps, optax.adamw(1e-2, weight_decay=0.1))))
  _assert_trees_equal(ours(batch), ref(batch))


# -- State trees: identical layout, interchangeable mid-run ---------------------------------

LAYOUT_SETTINGS = {
  "default": dict(learning_rate=1e-3),
  "schedules": dict(learning_rate=LR_SCHEDULE, weight_decay=WD_SCHEDULE),
  "mask_callable": dict(learning_rate=1e-3, mask=_mask_fn),
  "mask_prefix_schedule": dict(learning_rate=1e-3, weight_decay=WD_SCHEDULE, mask=MASK_PREFIX),
  "mu_bf16": dict(learning_rate=1e-3, mu_dtype=jnp.bfloat16),
  "mu_f16_nesterov": dict(learning_rate=1e-3, mu_dtype=jnp.float16, nesterov=True),
  "wd_zero": dict(learning_rate=1e-3, weight_decay=0.0),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_state_layout_identical_to_optax(dtype):
  params = _params(dtype)
  txs = {name: (adamw_flax.adamw(**kw), optax.adamw(**kw)) for name, kw in LAYOUT_SETTINGS.items()}
  runs = _run_many([ours for ours, _ in txs.values()], [params] * len(txs), steps=3)
  for (name, (ours, ref)), (_, state, _) in zip(txs.items(), runs, strict=True):
    try:
      _assert_trees_equal(ours.init(params), ref.init(params))  # zeros: values match too
      # ... and the layout does not drift over steps.
      _assert_same_layout(state, ref.init(params))
    except AssertionError as e:
      raise AssertionError(f"{name}: {e}") from e


def test_state_interchange_both_ways():
  names = ["default", "schedules", "mask_callable", "mu_bf16"]
  params = _params()
  txs = [
    tx
    for n in names
    for tx in (optax.adamw(**LAYOUT_SETTINGS[n]), adamw_flax.adamw(**LAYOUT_SETTINGS[n]))
  ]
  first = _run_many(txs, [params] * len(txs), steps=10)
  # Continue each run with the other implementation's state and params
  # (optax from ours, ours from optax), and each with its own, for reference.
  swapped = [first[k ^ 1] for k in range(len(txs))]
  cross = _run_many(txs, [r[0] for r in swapped], steps=10, states=[r[1] for r in swapped])
  own = _run_many(txs, [r[0] for r in first], steps=10, states=[r[1] for r in first])
  for k in range(len(txs)):
    name, who = names[k // 2], ("optax", "ours")[k % 2]
    _assert_same_layout(cross[k][1], own[k][1])
    # Bitwise the same optimizer (float32 params, bf16 mu included), so
    # continuing from the other's state is continuing from one's own.
    try:
      _assert_trees_equal(cross[k], own[k ^ 1])
    except AssertionError as e:
      raise AssertionError(f"{name}: {who} continuing the other's state: {e}") from e


def test_init_on_shape_dtype_struct():
  params = _params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  for kwargs in LAYOUT_SETTINGS.values():
    ours, ref = adamw_flax.adamw(**kwargs), optax.adamw(**kwargs)
    _assert_same_layout(ours.init(abstract), ref.init(params))
    _assert_same_layout(jax.eval_shape(ours.init, abstract), ref.init(params))


# -- Wrappers and Flax --------------------------------------------------------------------


def test_wrappers_bitwise_equal_to_optax():
  kw = dict(learning_rate=LR_SCHEDULE, weight_decay=0.1, mask=_mask_fn)
  inject = functools.partial(optax.inject_hyperparams, static_args=("mask",))
  clip = optax.clip_by_global_norm(0.05)
  labels = {"dense": {"kernel": "adam", "bias": "sgd"}, "conv": "adam", "scale": "sgd"}
  _assert_pairs_equal(
    {
      "inject_hyperparams(static mask)": (
        inject(adamw_flax.adamw)(**kw),
        inject(optax.adamw)(**kw),
      ),
      "chain(clip, adamw)": (
        optax.chain(clip, adamw_flax.adamw(1e-2)),
        optax.chain(clip, optax.adamw(1e-2)),
      ),
      "MultiSteps": (
        optax.MultiSteps(adamw_flax.adamw(1e-2, weight_decay=0.1), 3),
        optax.MultiSteps(optax.adamw(1e-2, weight_decay=0.1), 3),
      ),
      # MaskedNode leaves inside our scale_by_adam.
      "multi_transform": (
        optax.multi_transform({"adam": adamw_flax.adamw(1e-2), "sgd": optax.sgd(1e-2)}, labels),
        optax.multi_transform({"adam": optax.adamw(1e-2), "sgd": optax.sgd(1e-2)}, labels),
      ),
    }
  )


def test_inject_hyperparams_callable_mask_not_static_is_an_error():
  # Without static_args, inject_hyperparams calls the mask with the step count;
  # optax then silently decays nothing (mask_fn(count) is False). We refuse.
  tx = optax.inject_hyperparams(adamw_flax.adamw)(1e-3, mask=_mask_fn)
  with pytest.raises(ValueError, match=r"static_args=\('mask',\)"):
    tx.init(_params())


def test_inject_hyperparams_bf16_params_need_float32_hyperparams():
  params = _params(jnp.bfloat16)
  # Default inject_hyperparams rounds b2=0.999 to 1.0 in bf16 (optax#1414): optax
  # returns NaN; we refuse with the fix in the message.
  tx = optax.inject_hyperparams(adamw_flax.adamw)(1e-3)
  with pytest.raises(ValueError, match="hyperparam_dtype=jnp.float32"):
    tx.init(params)
  # Dtypes given as strings: inject_hyperparams takes jnp.float32 (a callable)
  # for a schedule.
  tx = optax.inject_hyperparams(adamw_flax.adamw, hyperparam_dtype=jnp.float32)(
    1e-3, nu_dtype="float32"
  )
  p, s, _ = _run(tx, params, steps=5)
  assert s.hyperparams["b2"].dtype == jnp.float32
  # The moments keep their dtypes (optax's first moment turns float32 here, so
  # its state drifts from what init and a checkpoint hold); params stay bf16.
  _assert_same_layout(s, tx.init(params))
  assert s.inner_state[0].mu["conv"].dtype == jnp.bfloat16
  assert s.inner_state[0].nu["conv"].dtype == jnp.float32
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


@pytest.mark.parametrize(
  "kwargs", [dict(), dict(mu_dtype=jnp.float32, nu_dtype=jnp.float32)], ids=["bf16", "f32_state"]
)
def test_multi_steps_bf16_params(kwargs):
  params = _params(jnp.bfloat16)
  tx = optax.MultiSteps(adamw_flax.adamw(1e-2, **kwargs), every_k_schedule=3)
  p, s, _ = _run(tx, params, steps=6)
  _assert_same_layout(s, tx.init(params))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
  assert int(s.gradient_step) == 2
  changed = [
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True)
  ]
  assert any(changed)


def test_apply_if_finite_skips_nonfinite_like_optax():
  txs = [
    optax.apply_if_finite(make(1e-2), max_consecutive_errors=3)
    for make in (adamw_flax.adamw, optax.adamw)
  ]

  @jax.jit
  def step(ps, ss, i):
    out = []
    for tx, p, s in zip(txs, ps, ss, strict=True):
      # Step 2's gradients are NaN: both must skip it and count it.
      g = jax.tree.map(lambda x: jnp.where(i == 2, jnp.nan, x), _grads(p, i))
      u, s = tx.update(g, s, p)
      out.append((optax.apply_updates(p, u), s))
    return out

  params = _params()
  out = [(params, tx.init(params)) for tx in txs]
  for i in range(5):
    out = step([o[0] for o in out], [o[1] for o in out], i)
  ours, ref = out
  _assert_trees_equal(ours, ref)
  assert int(ours[1].total_notfinite) == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(ours[0]))


def test_nnx_optimizer_matches_optax():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)
      self.l2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.norm(self.l1(x))))

  x = jax.random.normal(jax.random.key(1), (8, 3))
  y = jax.random.normal(jax.random.key(2), (8, 2))

  def train(make_tx):
    model = Model(nnx.Rngs(0))
    # A callable mask resolved against the nnx.State that tx.init receives.
    tx = make_tx(1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda v: v.ndim > 1, p))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
      optimizer.update(model, grads)

    for _ in range(5):
      step(model, optimizer)
    return nnx.state(model, nnx.Param), nnx.state(optimizer, nnx.OptState)

  ours, ref = train(adamw_flax.adamw), train(optax.adamw)
  _assert_trees_equal(ours, ref)


def test_linen_train_state_matches_optax():
  import flax.linen as nn
  from flax.training import train_state

  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(1), (4, 5))
  variables = model.init(jax.random.key(0), x)

  def train(tx):
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

    @jax.jit
    def step(state):
      grads = jax.grad(lambda p: jnp.sum(state.apply_fn({"params": p}, x) ** 2))(state.params)
      return state.apply_gradients(grads=grads)

    for _ in range(5):
      state = step(state)
    return state.params, state.opt_state

  _assert_trees_equal(
    train(adamw_flax.adamw(1e-2, weight_decay=0.1, mask={"kernel": True, "bias": False})),
    train(optax.adamw(1e-2, weight_decay=0.1, mask={"kernel": True, "bias": False})),
  )


def test_no_recompilation_on_second_call():
  traces = []
  tx = adamw_flax.adamw(LR_SCHEDULE, weight_decay=WD_SCHEDULE, mask=_mask_fn)

  @jax.jit
  def step(p, s, i):
    traces.append(1)
    u, s = tx.update(_grads(p, i), s, p)
    return optax.apply_updates(p, u), s

  p = _params()
  s = tx.init(p)
  for i in range(3):
    p, s = step(p, s, i)
  assert len(traces) == 1


# -- Options beyond the defaults ----------------------------------------------------------


@pytest.mark.parametrize(
  "lr, wd", [(1e-2, 0.05), (LR_SCHEDULE, WD_SCHEDULE)], ids=["constants", "schedules"]
)
def test_paper_weight_decay_follows_schedule_multiplier(lr, wd):
  peak = 1e-2
  params = _params()
  tx = adamw_flax.adamw(lr, weight_decay=wd, weight_decay_mode="paper", peak_learning_rate=peak)
  # State tree: optax's for the same kinds of lr and weight decay.
  _assert_trees_equal(tx.init(params), optax.adamw(lr, weight_decay=wd).init(params))
  # Reference by hand: theta - lr(t) * adam(t) - (lr(t) / peak) * wd(t) * theta.
  adam = optax.scale_by_adam()
  lr_fn = lr if callable(lr) else (lambda c: lr)
  wd_fn = wd if callable(wd) else (lambda c: wd)

  @jax.jit
  def step(p, s, p_ref, s_ref, i):
    a, s_ref = adam.update(_grads(p_ref, i), s_ref)
    decay = lr_fn(i) / peak * wd_fn(i)
    p_ref = jax.tree.map(lambda x, ai: x - lr_fn(i) * ai - decay * x, p_ref, a)
    u, s = tx.update(_grads(p, i), s, p)
    return optax.apply_updates(p, u), s, p_ref, s_ref

  carry = (params, tx.init(params), params, adam.init(params))
  for i in range(8):
    carry = step(*carry, i)
  for x, r in zip(jax.tree.leaves(carry[0]), jax.tree.leaves(carry[2]), strict=True):
    np.testing.assert_allclose(x, r, rtol=2e-6, atol=1e-7)


def test_paper_mode_with_constant_lr_decays_by_weight_decay_per_step():
  params = {"w": jnp.full((2,), 2.0)}
  tx = adamw_flax.adamw(1e-3, weight_decay=0.1, weight_decay_mode="paper")
  u, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
  np.testing.assert_allclose(u["w"], -0.1 * 2.0, rtol=1e-6)  # not lr * wd * p


def test_eps_root_gradient_through_update_matches_optax():
  params = _params()
  grads = _grads(params, 0)  # contains exact zeros

  def meta_loss(make_tx, g):
    tx = make_tx(1e-2, eps_root=1e-8)
    state = tx.init(params)
    u, state = tx.update(g, state, params)
    u, _ = tx.update(jax.tree.map(lambda x: 0.5 * x, g), state, params)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(u))

  ours = jax.jit(jax.grad(functools.partial(meta_loss, adamw_flax.adamw)))(grads)
  ref = jax.jit(jax.grad(functools.partial(meta_loss, optax.adamw)))(grads)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(ours))
  _assert_trees_equal(ours, ref)


def test_count_saturates_at_int32_max():
  params = _params()
  max_int = jnp.iinfo(jnp.int32).max
  for make in (adamw_flax.adamw, optax.adamw):
    tx = make(LR_SCHEDULE, weight_decay=WD_SCHEDULE)
    state = jax.tree.map(
      lambda x: jnp.full_like(x, max_int) if x.dtype == jnp.int32 else x, tx.init(params)
    )
    u, new_state = jax.jit(tx.update)(_grads(params, 0), state, params)
    counts = [x for x in jax.tree.leaves(new_state) if x.dtype == jnp.int32]
    assert counts and all(int(c) == max_int for c in counts)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  ours = jax.jit(adamw_flax.adamw(1e-2).update)
  ref = jax.jit(optax.adamw(1e-2).update)
  state = optax.adamw(1e-2).init(params)
  state = (state[0]._replace(count=jnp.asarray(max_int - 1, jnp.int32)), *state[1:])
  _assert_trees_equal(ours(_grads(params, 0), state, params), ref(_grads(params, 0), state, params))


# -- Precision: 16-bit params and moments -------------------------------------------------


def test_update_from_stored_moments_reads_rounded_mu():
  params = _params()
  grads = _grads(params, 3)
  exact = adamw_flax.adamw(1e-2, mu_dtype=jnp.bfloat16, weight_decay=0.0)
  fast = adamw_flax.adamw(
    1e-2, mu_dtype=jnp.bfloat16, weight_decay=0.0, update_from_stored_moments=True
  )

  @jax.jit
  def first_step(p):
    return [tx.update(grads, tx.init(p), p) for tx in (exact, fast)]

  (u_exact, _), (u_fast, s_fast) = first_step(params)
  for g, mu, a, b in zip(
    *map(jax.tree.leaves, (grads, s_fast[0].mu, u_exact, u_fast)), strict=True
  ):
    assert mu.dtype == jnp.bfloat16
    g, mu, a, b = (np.float64(x) for x in (g, mu, a, b))
    # Step 1 from zero moments: m = 0.1 g, v = 0.001 g^2, bias corrections
    # 0.1 and 0.001. Exact: -lr * m / 0.1 / (|g| + eps); fast: m rounded to bf16.
    denom = np.abs(g) + 1e-8
    np.testing.assert_allclose(a, -1e-2 * g / denom, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(b, -1e-2 * (mu / 0.1) / denom, rtol=2e-5, atol=1e-9)
  # The bf16 rounding of mu shows (up to 2^-9 relative), far above float32's.
  rel = [
    np.max(np.abs(a - b) / (np.abs(a) + 1e-9))
    for a, b in zip(jax.tree.leaves(u_exact), jax.tree.leaves(u_fast), strict=True)
  ]
  assert 1e-4 < max(rel) <= 2.0**-8


def test_update_from_stored_moments_needs_no_copy_of_donated_state():
  # The reason for the flag: the exact update reads the old bf16 mu after the
  # new one overwrote its (donated) buffer, so XLA copies every mu leaf first.
  params = _params()
  tx = adamw_flax.adamw(1e-2, mu_dtype=jnp.bfloat16, update_from_stored_moments=True)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = (
    jax.jit(step, donate_argnums=(0, 1))
    .lower(params, tx.init(params), _grads(params, 0))
    .compile()
    .as_text()
  )
  assert " copy(" not in hlo


def test_bf16_params_track_float32_better_than_optax():
  params32, params16 = _params(), _params(jnp.bfloat16)
  ref, theirs, ours, ours_f32_state = _run_many(
    [
      optax.adamw(1e-2),
      optax.adamw(1e-2),
      adamw_flax.adamw(1e-2),
      adamw_flax.adamw(1e-2, mu_dtype="float32", nu_dtype="float32"),
    ],
    [params32, params16, params16, params16],
  )
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((ours[0], ours[2])))
  assert ours_f32_state[1][0].nu["conv"].dtype == jnp.float32
  err_ours, err_theirs = _max_rel_err(ours[0], ref[0]), _max_rel_err(theirs[0], ref[0])
  assert err_ours <= err_theirs
  assert _max_rel_err(ours_f32_state[0], ref[0]) <= err_ours


def test_nu_dtype_float32_keeps_second_moment_moving_with_bf16_params():
  # b2 = 0.999: a bf16 nu cannot move by 0.1% of itself a step; a float32 nu can.
  params = {"w": jnp.ones((4,), jnp.bfloat16)}
  results = {}
  for nu_dtype in (None, jnp.float32):
    tx = adamw_flax.adamw(1e-3, nu_dtype=nu_dtype, weight_decay=0.0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(300):
      g = 1.0 if i < 100 else 0.25
      _, state = update({"w": jnp.full((4,), g, jnp.bfloat16)}, state, params)
    results[nu_dtype] = float(state[0].nu["w"][0])
  # Exact: 0.999^300 EMA of g^2 (1 for 100 steps, then 1/16).
  exact = (1 - 0.999**100) * 0.999**200 + (1 - 0.999**200) / 16
  assert abs(results[jnp.float32] - exact) < 1e-4
  assert abs(results[None] - exact) > 10 * abs(results[jnp.float32] - exact)


def test_float16_zero_gradient_gives_zero_update_not_nan():
  # optax 0.2.8 computes float16 moments in float16, where eps=1e-8 is 0, so a
  # zero gradient gives 0/0 = NaN (optax#1754). We compute in float32.
  params = _params(jnp.float16)
  tx = adamw_flax.adamw(1e-2, weight_decay=0.0)
  u, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for x in jax.tree.leaves(u):
    assert x.dtype == jnp.float16
    np.testing.assert_array_equal(x, np.zeros_like(x))
  p, s, _ = _run(adamw_flax.adamw(1e-2), params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, s)))


# -- Errors -------------------------------------------------------------------------------


def test_error_params_missing_with_weight_decay():
  params = _params()
  for kwargs in (dict(), dict(mask=_mask_fn), dict(weight_decay=WD_SCHEDULE)):
    tx = adamw_flax.adamw(1e-3, **kwargs)
    with pytest.raises(ValueError, match=r"tx.update\(grads, opt_state, params\)"):
      tx.update(_grads(params, 0), tx.init(params))
  tx = adamw_flax.adamw(1e-3, weight_decay=0.0)  # no decay, no params needed
  tx.update(_grads(params, 0), tx.init(params))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(mask=MASK_TREE, weight_decay_mask=MASK_TREE), "only one of them"),
    (dict(weight_decay_mode="pytorch"), r"weight_decay_mode='pytorch'.*'lr'.*'paper'"),
    (dict(learning_rate=LR_SCHEDULE, weight_decay_mode="paper"), "needs peak_learning_rate"),
    (dict(peak_learning_rate=1e-3), "only used with weight_decay_mode='paper'"),
    (dict(weight_decay_mode="paper", peak_learning_rate=0.0), "must be > 0"),
    (dict(mu_dtype="int32"), "mu_dtype='int32' is not a floating dtype"),
    (dict(nu_dtype="no_such_dtype"), "nu_dtype='no_such_dtype' is not a dtype"),
    (dict(b2=jnp.asarray(0.999, jnp.bfloat16)), "got b2 as a bfloat16 array"),
    (dict(eps=jnp.asarray(1e-8, jnp.float16)), "got eps as a float16 array"),
    (dict(mask=False), "single boolean"),
    (dict(update_from_stored_moments="false"), "must be True or False"),
  ],
)
def test_errors_name_the_argument(kwargs, match):
  kwargs = {"learning_rate": 1e-3} | kwargs
  with pytest.raises(ValueError, match=match):
    adamw_flax.adamw(**kwargs)


def test_transform_imports_no_flax():
  source = inspect.getsource(transform)
  assert "import flax" not in source and "from flax" not in source
