"""The block-wise 8-bit Adam step, stochastic rounding of its codes, and host offload of the state."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adamw_flax
from adamw_flax import checkpoint, config, offload, quantize, train_state
from tests.test_user_models import run_train

ROOT = Path(__file__).resolve().parents[1]
B = 256


def _leaf(shape, seed=0, block=B):
  rng = np.random.default_rng(seed)
  g = jnp.asarray(rng.standard_normal(shape) * np.exp(rng.uniform(-10, 0, shape)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  mu = quantize.quantize(0.1 * g + 0.01 * noise, "mu", block)
  nu = quantize.quantize(3 * g * g + 1e-9, "nu", block)
  return g, mu, nu


def _scalars(count=3, nesterov=False):
  return quantize.adam_scalars(
    0.9, 0.999, 1e-8, 0.0, 1 - 0.9**count, 1 - 0.999**count, 1 - 0.9 ** (count + 1)
  )


def _reference(g, mu, nu, s, nesterov, bits=(None, None)):
  """The step as separate array expressions: dequantize, update, quantize (the previous code)."""
  mu_new = s.one_minus_b1 * g + s.b1 * quantize.dequantize(mu)
  nu_new = s.one_minus_b2 * g**2 + s.b2 * quantize.dequantize(nu)
  mu_hat = mu_new / s.bc1
  if nesterov:
    mu_hat = s.b1 * (mu_new / s.bc1_next) + s.one_minus_b1 * (g / s.bc1)
  u = mu_hat / (jnp.sqrt(nu_new / s.bc2 + s.eps_root) + s.eps)
  return (
    u,
    quantize.quantize(mu_new, "mu", mu.block, bits[0]),
    quantize.quantize(nu_new, "nu", nu.block, bits[1]),
  )


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# 2-D, 3-D, several chunks of the CPU loop with a tail, a block of 96, one row;
# a leaf of one chunk that runs as two with a tail and blocks of 224 (the
# update reads its scales through selects), and 20 blocks of 240 per row.
SHAPES = [(96, 512), (3, 40, 512), (1100, 512), (700, 96), (4096,), (33, 448), (20, 4800)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["loop", "kernel", "xla"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_the_blockwise_step_gives_the_codes_of_quantize_bitwise(shape, impl, nesterov):
  block = quantize.block_size_for(shape, B)
  if impl == "kernel" and not quantize.kernel_supports(shape, block):
    pytest.skip("the TPU kernel takes whole 128-lane blocks")
  g, mu, nu = _leaf(shape, block=block)
  s = _scalars()  # traced, as the optimizer's bias corrections are
  ref = jax.jit(lambda *a: _reference(*a, nesterov))(g, mu, nu, s)
  fused = jax.jit(
    lambda g, mu, nu, s: quantize.adam_update(g, mu, nu, s, nesterov=nesterov, impl=impl)
  )
  out = fused(g, mu, nu, s)
  for a, b in zip(_leaves(ref)[1:], _leaves(out)[1:], strict=True):
    np.testing.assert_array_equal(a, b)  # codes and scales, bitwise
  # The update: the same expression, compiled in another program (XLA may reassociate
  # a division by a scalar): equal to a float32 ulp or two of its terms (Nesterov's two
  # terms nearly cancel in places, so there the error is relative to them).
  u, want = np.asarray(out[0]), np.asarray(ref[0])
  np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-6 * np.abs(want).max() * nesterov)
  if not nesterov and impl == "kernel":  # the kernel path's update is the plain fusion's
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]))


@pytest.mark.parametrize("impl", ["loop", "kernel", "xla"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_the_update_from_stored_moments_reads_the_new_codes(impl, nesterov):
  """``from_stored``: the same codes, and the update of the dequantized new moments."""
  g, mu, nu = _leaf((96, 512))
  s = _scalars()

  def run(from_stored):
    step = lambda g, mu, nu, s: quantize.adam_update(
      g, mu, nu, s, nesterov=nesterov, impl=impl, from_stored=from_stored
    )
    return jax.jit(step)(g, mu, nu, s)

  default, stored = run(False), run(True)
  for a, b in zip(_leaves(default)[1:], _leaves(stored)[1:], strict=True):
    np.testing.assert_array_equal(a, b)
  m, v = quantize.dequantize(stored[1]), quantize.dequantize(stored[2])
  mu_hat = s.b1 * (m / s.bc1_next) + s.one_minus_b1 * (g / s.bc1) if nesterov else m / s.bc1
  want = np.asarray(mu_hat / (jnp.sqrt(v / s.bc2 + s.eps_root) + s.eps))
  got = np.asarray(stored[0])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max() * nesterov)
  # ... which is not the default's update from the unrounded moments
  assert np.abs(got - np.asarray(default[0])).max() > 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("dtypes", [("int8", "int8"), ("int8", "float32"), ("float32", "int8")])
def test_adamw_updates_from_the_stored_8bit_moments_on_request(dtypes):
  """``adamw(..., update_from_stored_moments=True)``: the update reads the 8-bit moments as stored."""
  mu_dtype, nu_dtype = dtypes
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32)} for _ in range(3)]
  kw = dict(learning_rate=1.0, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0)
  tx = adamw_flax.adamw(**kw, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                        update_from_stored_moments=True, moments_rounding="nearest")  # fmt: skip
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
  count, adam = len(grads), state[0]
  m, v = (
    quantize.dequantize(x) if quantize.is_quantized(x) else x for x in (adam.mu["w"], adam.nu["w"])
  )
  want = -(m / (1 - 0.9**count)) / (jnp.sqrt(v / (1 - 0.99**count)) + 1e-8)
  np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(want), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(160, 1024), (33, 448)])
def test_every_path_rounds_stochastically_alike(shape):
  g, mu, nu = _leaf(shape, block=quantize.block_size_for(shape, B))
  s = _scalars()
  word = quantize.moment_word(jax.random.key(7))
  run = lambda impl: jax.jit(
    lambda g, mu, nu, s, w: quantize.adam_update(g, mu, nu, s, word=w, impl=impl)
  )(g, mu, nu, s, word)
  loop, kernel, xla = run("loop"), run("kernel"), run("xla")
  for a, b, c in zip(_leaves(loop)[1:], _leaves(kernel)[1:], _leaves(xla)[1:], strict=True):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  # ... and as quantize() with the leaf's bits: one definition of the bits.
  bits = quantize.leaf_bits(word, g.shape)
  ref = jax.jit(lambda *a: _reference(*a, False, bits))(g, mu, nu, s)  # compiled, as the step is
  for a, b in zip(_leaves(ref)[1:], _leaves(loop)[1:], strict=True):
    np.testing.assert_array_equal(a, b)
  nearest = jax.jit(lambda *a: quantize.adam_update(*a, impl="loop"))(g, mu, nu, s)
  assert not np.array_equal(np.asarray(nearest[1].codes), np.asarray(loop[1].codes))


@pytest.mark.parametrize("kind", ["mu", "nu"])
def test_stochastic_codes_are_unbiased_and_positive_nu_never_rounds_to_0(kind):
  # Values between codes, and for mu below the map's range (1e-6 of the block maximum).
  top = 1.0
  x = np.linspace(0.3, 0.31, 255, dtype=np.float32)
  if kind == "mu":
    x[:64] = 1e-6
  block = np.concatenate([[top], x]).astype(np.float32)[None]
  v = jnp.asarray(block if kind == "mu" else block**2)
  draws = []
  for i in range(400):
    bits = quantize.leaf_bits(quantize.moment_word(jax.random.key(i)), v.shape)
    draws.append(np.asarray(quantize.dequantize(quantize.quantize(v, kind, 256, bits[0]))))
  mean = np.mean(draws, axis=0)
  near = np.asarray(quantize.dequantize(quantize.quantize(v, kind, 256)))
  target = np.asarray(v)
  rel = lambda m: np.abs(m - target)[0, 1:] / target[0, 1:]
  # 400 draws: the mean's error is a few % of a code step (6.25% relative) at worst,
  # nearest's is up to half a step and the same sign for neighbours.
  assert rel(mean)[64:].max() < 0.01 < rel(near)[64:].max()
  if kind == "mu":  # below range: nearest flushes to 0, the stochastic mean is the value
    assert np.all(near[0, 1:65] == 0)
    # each draw is 0 or the smallest code (17x the value): the mean over 64 x 400 draws
    assert np.mean(mean[0, 1:65]) == pytest.approx(1e-6, rel=0.08)
  else:
    assert np.all(np.asarray(draws)[:, 0, 1:] > 0)


def _rise(rounding, rows=16, warm=1200, after=600):
  kw = {} if rounding is None else dict(mu_dtype="int8", nu_dtype="int8", quantize_min_size=0)
  if rounding is not None:
    kw["moments_rounding"] = rounding
  tx = adamw_flax.adamw(1e-3, weight_decay=0.0, **kw)

  @jax.jit
  def step(p, st, g):
    u, st = tx.update(g, st, p)
    return optax.apply_updates(p, u), st, u

  p = {"w": jnp.zeros((rows, 256))}
  st = tx.init(p)
  g = {"w": jnp.full((rows, 256), 0.1).at[:, 0].set(1.0)}
  for _ in range(warm):
    p, st, _ = step(p, st, g)
  g = {"w": g["w"].at[:, 1].set(0.5)}
  for _ in range(after):
    p, st, u = step(p, st, g)
  return float(jnp.mean(-u["w"][:, 1])) / 1e-3


@pytest.mark.slow
def test_stochastic_rounding_lets_nu_follow_a_rise_that_nearest_stalls():
  # A gradient that rises 5x within its block: nu must grow by 0.1% of the gap per step.
  f32, nearest, stochastic = _rise(None), _rise("nearest"), _rise("stochastic")
  assert f32 < 2.0  # relaxing towards 1 as nu catches up
  assert nearest > 3.5  # its nu code never moves: the update stays at the peak
  assert stochastic == pytest.approx(f32, rel=0.05)


def test_the_rounding_bits_depend_on_seed_count_and_leaf_only():
  params = {"a": jnp.ones((8, 256)), "b": jnp.ones((8, 256))}
  make = lambda seed: adamw_flax.adamw(
    1e-2, mu_dtype="int8", nu_dtype="int8", quantize_min_size=0,
    moments_rounding="stochastic", rounding_seed=seed,
  )  # fmt: skip
  g = {"a": jnp.linspace(0.1, 0.2, 8 * 256).reshape(8, 256), "b": jnp.full((8, 256), 0.15)}
  g["b"] = g["a"]  # the same values in both leaves

  def run(tx, steps):
    st = tx.init(params)
    for _ in range(steps):
      _, st = jax.jit(tx.update)(g, st, params)
    return st

  a, b = run(make(1), 3), run(make(1), 3)
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)  # deterministic
  mu = a[0].mu
  assert not np.array_equal(np.asarray(mu["a"].codes), np.asarray(mu["b"].codes))  # per leaf
  other = run(make(2), 3)[0].mu
  assert not np.array_equal(np.asarray(mu["a"].codes), np.asarray(other["a"].codes))  # per seed


def test_bad_moments_rounding_is_rejected():
  with pytest.raises(ValueError, match="moments_rounding must be one of"):
    adamw_flax.adamw(1e-3, mu_dtype="int8", moments_rounding="up")


SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {root!r})
from jax.sharding import NamedSharding, PartitionSpec as P
from adamw_flax import quantize as Q
from tests.test_int8_update import _leaf, _scalars
mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
g, mu, nu = _leaf((64, 2048))
s = _scalars()
word = Q.moment_word(jax.random.key(3))
out = []
for impl in ("loop", "kernel", "xla", None):
  for w in (None, word):
    f = lambda g, mu, nu, s, w: Q.adam_update(g, mu, nu, s, word=w, impl=impl)
    ref = jax.jit(f)(g, mu, nu, s, w)
    for codes, grads in [(P("a", "b"), P("a", "b")), (P("a", None), P()),
                         (P(None, ("a", "b")), P(None, ("a", "b"))), (P(("a", "b"), None), P("a"))]:
      sh, shg = NamedSharding(mesh, codes), NamedSharding(mesh, grads)
      args = (jax.device_put(g, shg), jax.device_put(mu, sh), jax.device_put(nu, sh), s, w)
      def under_mesh(*a, f=f):  # traced under the mesh, as the train step is
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
          return f(*a)
      fn = jax.jit(under_mesh if impl is None else f, out_shardings=(sh, sh, sh))
      got = fn(*args)
      text = fn.lower(*args).compile().as_text()
      same = all(np.array_equal(np.asarray(a), np.asarray(b))
                 for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
      out.append([str(impl), w is not None, str(codes), same, text.count("all-gather")])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_each_shard_steps_alone_with_the_bits_of_the_whole_leaf():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  code = SHARDED.format(root=str(ROOT))
  proc = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(rows) == 32
  for impl, stochastic, spec, same, gathers in rows:
    assert same, (impl, stochastic, spec)  # bitwise the unsharded leaf's
    assert gathers == 0, (impl, stochastic, spec)  # no shard gathered


# ------------------------------------------------------------ offload


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(16, 256, rngs=rngs)
    self.l2 = nnx.Linear(256, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.gelu(self.l1(x)))[:, 0]


def _loss(model, batch, *, train):
  del train
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


def _offload_config(names):
  cfg = config.default_config()
  cfg.optimizer.mu_dtype = cfg.optimizer.nu_dtype = "int8"
  cfg.optimizer.quantize_min_size = 1024
  cfg.optimizer.offload = names
  return cfg


def test_offload_parses_places_and_checks_names():
  assert offload.parse(" mu ,nu ") == ("mu", "nu") and offload.parse("") == ()
  with pytest.raises(ValueError, match="not a name"):
    offload.parse("mu nu")
  state = adamw_flax.create_train_state(_Net, _offload_config("mu"))
  mesh = jax.make_mesh((1,), ("data",))
  shardings = state.shardings(mesh, config.default_config().mesh)
  placed = offload.place(state.opt_state, shardings.opt_state, ("mu",))
  kinds = jax.tree_util.tree_flatten_with_path(placed)[0]
  host = {jax.tree_util.keystr(k) for k, s in kinds if s.memory_kind == offload.HOST}
  assert host and all(".mu" in k for k in host)  # the first moments, codes and scales
  assert any(".nu" in jax.tree_util.keystr(k) for k, s in kinds if s.memory_kind != offload.HOST)
  with pytest.raises(ValueError, match="'muu' names no field.*mu, nu"):
    offload.place(state.opt_state, shardings.opt_state, ("muu",))
  # On CPU the trainer's shardings keep the state in device memory (no effect).
  assert not offload.effective(jax.devices())
  assert {s.memory_kind for s in jax.tree.leaves(shardings.opt_state)} == {"device"}


def _train(names, steps, state=None, placed=True):
  cfg = _offload_config(names)
  x = jax.random.normal(jax.random.key(0), (40, 32, 16))
  y = jnp.sin(x.sum(-1))
  if state is None:
    state = adamw_flax.create_train_state(_Net, cfg)
  mesh = jax.make_mesh((1,), ("data",))
  shardings = state.shardings(mesh, cfg.mesh)
  if placed and state.spec.offload:  # what TPU and GPU get; host memory is real on CPU too
    shardings = shardings.replace(
      opt_state=offload.place(state.opt_state, shardings.opt_state, state.spec.offload)
    )
  state = jax.device_put(state, shardings)
  step = train_state.make_train_step(_loss, state_sharding=shardings)
  start = int(state.step)
  for i in range(start, start + steps):
    state, _ = step(state, {"x": x[i], "y": y[i]})
  return state, shardings


def _save(directory, state, names):
  with checkpoint.Checkpoints(directory, _offload_config(names), data_info={}) as ckpts:
    ckpts.save(state, data_state={"step": int(state.step)}, force=True)
    ckpts.wait()


def _restore(directory, names, target):
  with checkpoint.Checkpoints(directory, _offload_config(names), data_info={}) as ckpts:
    return ckpts.restore(target)[0]


@pytest.mark.parametrize("names", ["opt_state", "mu,nu"])
def test_an_offloaded_state_trains_checkpoints_and_resumes_bitwise(names, tmp_path):
  plain, _ = _train("", 12)
  state, shardings = _train(names, 6)
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
  assert offload.HOST in kinds  # between steps, in host memory
  _save(tmp_path / "ckpt", state, names)
  # Restored into host memory (the run's own shardings), then trained on: bitwise the
  # run without offload.
  abstract = train_state.with_shardings(jax.eval_shape(lambda: state), shardings)
  restored = _restore(tmp_path / "ckpt", names, abstract)
  assert offload.HOST in {x.sharding.memory_kind for x in jax.tree.leaves(restored.opt_state)}
  resumed, _ = _train(names, 6, state=restored)
  for a, b in zip(_leaves(plain), _leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  # The checkpoint is the one a run without offload writes, and restores without it.
  early, early_shardings = _train("", 6)
  _save(tmp_path / "plain", early, "")
  target = train_state.with_shardings(jax.eval_shape(lambda: early), early_shardings)
  a = _restore(tmp_path / "ckpt", "", target)
  b = _restore(tmp_path / "plain", "", target)
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_offload_through_the_cli_is_reported_as_no_effect_on_cpu(tmp_path):
  args = ("optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8", "trainer.num_steps=6")
  off = run_train("mlp", tmp_path / "off", *args, "optimizer.offload=opt_state", devices=2)
  assert off.returncode == 0, off.stderr
  assert off.stdout.count("optimizer.offload='opt_state' has no effect on cpu") == 1
  plain = run_train("mlp", tmp_path / "plain", *args, devices=2)
  assert plain.returncode == 0, plain.stderr
  a, b = (checkpoint.restore_state(tmp_path / d) for d in ("off", "plain"))
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  bad = run_train("mlp", tmp_path / "bad", *args, "optimizer.offload=mu+nu", devices=2)
  assert bad.returncode == 2 and "optimizer.offload" in bad.stderr
  assert len(bad.stderr.strip().splitlines()) <= 3


# ------------------------------------------------------------ XLA:TPU


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_the_cpu_step_holds_no_float32_buffer_of_a_whole_leaf(rounding):
  """The update fuses into ``optax.apply_updates``; the loop's temporaries are a chunk's.

  Before, the loop wrote the update into a leaf-sized buffer: 6 MiB of
  temporaries for this 4 MiB leaf, allocated afresh (page faults) each call.
  """
  shape = (2048, 512)
  p = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
  tx = adamw_flax.adamw(1e-3, mu_dtype="int8", nu_dtype="int8", moments_rounding=rounding)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  abstract = jax.eval_shape(tx.init, p)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, abstract, p).compile()
  temps = compiled.memory_analysis().temp_size_in_bytes
  leaf = 4 * shape[0] * shape[1]
  # Two float32 moments of one chunk (2 MiB) and copies of the old codes, which the
  # update reads while the loop rewrites them in place.
  assert temps <= 0.6 * leaf, temps


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (tpu extra)")
def test_the_tpu_compile_holds_no_float32_copy_of_the_moments():
  """benchmarks/int8_tpu.py's compile at a small size (4 leaves of 2048^2) for one v5p chip."""
  code = (
    "import json, sys; sys.path.insert(0, 'benchmarks'); import int8_tpu as b\n"
    "rows = {k + (', state offloaded' if off else ''): b.compile_update(f(), d, 4, 2048, off)\n"
    "        for k, d, f in b.FORMATS\n"
    "        for off in (False, True) if not off or k in b.OFFLOADED}\n"
    "rows['parts'] = b.compile_parts(2048)\n"
    "print(json.dumps({k: {x: v for x, v in r.items() if x != 'hlo'} for k, r in rows.items()}))"
  )
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(proc.stdout.strip().splitlines()[-1])
  f32 = rows["ours float32"]
  state = 2 * 4 * 2048 * 2048 * 4 / 2**20  # MiB of the float32 moments
  total = lambda r: r["args"] + r["temps"]
  q = rows["ours int8 mu + nu"]
  # Before: 1.33x float32's HBM, temporaries 141% of the float32 moments.
  assert total(q) <= 0.75 * total(f32)
  assert q["temps"] <= 0.25 * state
  assert total(rows["ours bf16 params + int8"]) <= 0.55 * total(f32)
  # The update from stored moments, its two passes apart: the kernel reads the gradient and
  # the codes and writes the codes (8 bytes per param, and the scales); the update with
  # optax.apply_updates reads the new codes and the params and writes the params (10).
  parts = rows["parts"]
  assert parts["kernel"]["bytes_per_param"] <= 9.5  # 9.1 at 2048^2 (8.6 at 4096^2)
  assert parts["update"]["bytes_per_param"] <= 10.5
  for name in ("ours float32", "ours int8 mu + nu"):
    off = rows[f"{name}, state offloaded"]
    held = rows[name]["args"] - off["args"]  # HBM between steps drops by the state ...
    assert off["host"] == pytest.approx(held, rel=0.01) and off["host"] > 0  # ... held on host
