"""Tests for adamw_flax.masks (path rules) and train.inspect (the report CLI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

from adamw_flax import masks, plan
from adamw_flax import train_state as ts
from adamw_flax.config import default_config

# nnx.as_pure (a State of plain arrays) is newer than the oldest flax supported.
_as_pure = getattr(nnx, "as_pure", None) or (
  lambda state: jax.tree.map(
    lambda v: v.get_value(), state, is_leaf=lambda v: isinstance(v, nnx.Variable)
  )
)

REPO = Path(__file__).resolve().parents[1]


class Net(nnx.Module):
  """Every layer family the default preset must tell apart."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(11, 4, rngs=rngs)
    self.dense = nnx.Linear(4, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.rms = nnx.RMSNorm(4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.conv = nnx.Conv(4, 4, kernel_size=(3,), rngs=rngs)
    self.proj = nnx.LinearGeneral(4, (2, 2), rngs=rngs)
    self.mix = nnx.Einsum("bi,io->bo", (4, 4), (4,), rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 4, use_bias=False, rngs=rngs) for _ in range(2)])
    self.gate = nnx.Param(jnp.ones((4,)))  # a custom parameter outside any layer

  def __call__(self, tokens):
    x = self.embed(tokens)  # (B, L, 4)
    x = self.conv(x)
    x = self.norm(self.dense(x))
    x = self.rms(x)
    x = self.bn(x, use_running_average=False)
    x = self.proj(x).reshape(x.shape)
    for block in self.blocks:
      x = block(x)
    x = self.mix(x.reshape(-1, 4))
    return jnp.sum((x * self.gate) ** 2)


DECAYED_BY_DEFAULT = {
  "dense/kernel",
  "conv/kernel",
  "proj/kernel",
  "mix/kernel",
  "blocks/0/kernel",
  "blocks/1/kernel",
}


class SmallNet(nnx.Module):
  """Linear + LayerNorm + Embed + BatchNorm, small enough to step an optimizer quickly."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(11, 4, rngs=rngs)
    self.dense = nnx.Linear(4, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
    self.gate = nnx.Param(jnp.ones((4,)))

  def __call__(self, tokens):
    x = self.norm(self.dense(self.embed(tokens)))
    x = self.bn(x, use_running_average=False)
    for block in self.blocks:
      x = block(x)
    return jnp.sum((x * self.gate) ** 2)


SMALL_DECAYED_BY_DEFAULT = {"dense/kernel", "blocks/0/kernel", "blocks/1/kernel"}


@pytest.fixture(scope="module")
def model():
  # Shapes only: the rules need paths, shapes and module types, not values.
  return nnx.eval_shape(lambda: Net(nnx.Rngs(0)))


def test_paths_agree_across_tree_forms(model):
  state = nnx.state(model, nnx.Param)
  expected = masks.tree_paths(model)
  assert "blocks/1/kernel" in expected and "bn/scale" in expected and "gate" in expected
  assert not any("value" in p or "mean" in p for p in expected)  # no .value, no batch stats
  assert masks.tree_paths(state) == expected
  assert masks.tree_paths(_as_pure(state)) == expected
  assert masks.tree_paths(state.to_pure_dict()) == expected


def test_default_preset_decays_only_layer_kernels(model):
  values = masks.path_values(model, "default")
  assert {p for p, v in values.items() if v} == DECAYED_BY_DEFAULT
  # Biases, norm scales, batch-norm params, the embedding and the custom param: no decay.
  for path in ("dense/bias", "norm/scale", "rms/scale", "bn/scale", "embed/embedding", "gate"):
    assert values[path] is False


def test_presets_all_and_none(model):
  assert set(masks.path_values(model, "all").values()) == {True}
  assert set(masks.path_values(model, "none").values()) == {False}
  # Pure trees need no types for these two.
  assert set(masks.path_values(nnx.state(model, nnx.Param), "all").values()) == {True}


def test_default_preset_on_a_model_without_dense_layers_is_an_error():
  class OnlyNorm(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.LayerNorm(3, rngs=rngs)

  with pytest.raises(
    ValueError, match=r"rule #1 'type:Linear\|.*& kernel' matches no parameter.*'default' preset"
  ):
    masks.path_values(OnlyNorm(nnx.Rngs(0)), "default")


@pytest.mark.parametrize(
  "selector, expected",
  [
    ("bias", {"dense/bias", "norm/bias", "bn/bias", "conv/bias", "proj/bias", "mix/bias"}),
    ("*/bias", {"dense/bias", "norm/bias", "bn/bias", "conv/bias", "proj/bias", "mix/bias"}),
    ("blocks/*", {"blocks/0/kernel", "blocks/1/kernel"}),
    ("re:.*norm.*/scale", {"norm/scale"}),
    ("re:blocks/(0|1)/kernel", {"blocks/0/kernel", "blocks/1/kernel"}),
    ("type:LayerNorm|RMSNorm", {"norm/scale", "norm/bias", "rms/scale"}),
    ("type:Embed", {"embed/embedding"}),
    ("type:BatchNorm & scale", {"bn/scale"}),
    ("ndim>=3", {"conv/kernel", "proj/kernel"}),
    ("ndim==0", set()),
    ("type:Module & ndim<1", set()),
  ],
)
def test_selectors(model, selector, expected):
  if not expected:  # a rule that matches nothing is an error, not an empty selection
    with pytest.raises(ValueError, match="matches no parameter"):
      masks.path_values(model, [(selector, True), ("*", False)])
    return
  values = masks.path_values(model, [(selector, True), ("*", False)])
  assert {p for p, v in values.items() if v} == expected


def test_type_rule_matches_base_classes():
  class Adapter(nnx.Module):
    def __init__(self, rngs):
      self.lora = nnx.LoRALinear(3, 3, lora_rank=1, rngs=rngs)

  values = masks.path_values(Adapter(nnx.Rngs(0)), "default")
  # LoRALinear is a Linear: its kernel decays; the LoRA factors sit in a LoRA module.
  assert values["lora/kernel"] is True
  assert values["lora/lora/lora_a"] is False


def test_first_match_wins(model):
  values = masks.path_values(model, "dense/bias=true, bias=false, *=true")
  assert values["dense/bias"] is True and values["norm/bias"] is False
  assert values["norm/scale"] is True


def test_shadowed_rule_is_an_error(model):
  with pytest.raises(
    ValueError,
    match=r"rule #2 'dense/bias' matches 'dense/bias', but each is "
    r"taken by an earlier rule \(#1 'bias'\)",
  ):
    masks.path_values(model, "bias=false, dense/bias=true, *=true")


def test_rule_matching_nothing_names_rule_and_closest_match(model):
  with pytest.raises(ValueError) as e:
    masks.path_values(model, "*/biass=false, *=true")
  msg = str(e.value)
  assert "weight decay rule #1 '*/biass' matches no parameter" in msg
  assert "closest: 'bn/bias'" in msg or "closest: 'conv/bias'" in msg or "/bias'" in msg
  assert "Parameters: " in msg
  with pytest.raises(ValueError, match=r"did you mean 'LayerNorm'\?"):
    masks.path_values(model, "type:LayerNom=false, *=true")
  # The catch-all is exempt: it may find nothing left.
  values = masks.path_values({"w": np.ones((2, 2))}, "ndim>=2=true, *=false")
  assert values == {"w": True}


def test_unmatched_parameter_without_default_is_an_error(model):
  with pytest.raises(ValueError, match=r"weight decay: no rule matches 'bn/bias'.*catch-all"):
    masks.path_values(model, "type:Linear=true")
  with pytest.raises(ValueError, match="no rule matches"):
    masks.weight_decay_mask("bias=false", target=model)


def test_type_rules_need_the_model(model):
  state = nnx.state(model, nnx.Param)
  for target in (state, state.to_pure_dict(), {"params": {"Dense_0": {"kernel": np.ones(2)}}}):
    with pytest.raises(ValueError, match=r"selects by module type.*pass the model as `target`"):
      masks.path_values(target, "default")
  with pytest.raises(ValueError, match=r"rule #1 'type:LayerNorm' selects by module type"):
    masks.weight_decay_mask("type:LayerNorm=false, *=true")
  with pytest.raises(ValueError, match="selects by module type"):
    masks.weight_decay_mask()  # the default preset, no model


@pytest.mark.parametrize(
  "spec, expected",
  [
    ("*/bias=false, *=true", [("*/bias", False), ("*", True)]),
    ("  bias = No ,ndim>=2=TRUE,*=off, ", [("bias", False), ("ndim>=2", True), ("*", False)]),
    ("ndim==1=false", [("ndim==1", False)]),
    ("re:a{1,2}/b=true", [("re:a{1,2}/b", True)]),
    ("type:Linear & kernel=yes", [("type:Linear & kernel", True)]),
    ("", []),
    (None, []),
    ([("a", True), masks.Rule("b", "false")], [("a", True), ("b", False)]),
    ({"a": "true", "b": False}, [("a", True), ("b", False)]),
  ],
)
def test_parse_rules(spec, expected):
  rules = masks.parse_rules(spec)
  assert [(r.selector, r.value) for r in rules] == expected


def test_parse_float_rules():
  rules = masks.parse_rules("embed/*=0.1, type:LayerNorm=2, *=1e-1", value_type=float)
  assert [r.value for r in rules] == [0.1, 2.0, 0.1]
  assert all(isinstance(r.value, float) for r in rules)


@pytest.mark.parametrize(
  "spec, value_type, message",
  [
    ("*/bias=maybe", bool, r"rule '\*/bias': value 'maybe' is not a boolean"),
    ("*/bias=2", bool, r"rule '\*/bias': value '2' is not a boolean"),
    ([("*/bias", 1)], bool, "not a boolean"),
    ("embed/*=-1", float, r"rule 'embed/\*': value '-1' must be a finite number >= 0"),
    ("embed/*=nan", float, "finite"),
    ([("embed/*", True)], float, "not a number"),
    ("defualt", bool, r"not a preset .* Did you mean 'default'\?"),
    ("default", float, "preset 'default' holds booleans"),
    ("*/bias=true, oops", bool, "cannot read 'oops'"),
    ("re:(=true", bool, r"rule 're:\(': invalid regular expression"),
    ("typ:Linear=true", bool, r"unknown selector kind 'typ:'"),
    ("type:Layer Norm=true", bool, "is not a class name"),
    ("ndim=>2=true", bool, "cannot read 'ndim=>2' as an ndim selector"),
    ([("a", True, 3)], bool, "is not a .selector, value. pair"),
    (3, bool, "expected a preset name"),
  ],
)
def test_parse_rules_errors(spec, value_type, message):
  with pytest.raises(ValueError, match=message):
    masks.parse_rules(spec, value_type=value_type)


def _leaves_with_paths(tree):
  return dict(zip(masks.tree_paths(tree), jax.tree.leaves(tree), strict=True))


def test_callable_returns_tree_of_same_structure(model):
  mask = masks.weight_decay_mask("default", target=model)
  state = nnx.state(model, nnx.Param)
  for tree in (state, _as_pure(state), state.to_pure_dict()):
    out = mask(tree)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    decayed = {p for p, v in _leaves_with_paths(out).items() if v}
    assert decayed == DECAYED_BY_DEFAULT
  # A Variable leaf comes back as a Variable of the same type holding the value.
  assert isinstance(mask(state)["dense"]["kernel"], nnx.Param)
  # A subset of the target's parameters is fine.
  assert mask({"dense": {"kernel": np.ones((4, 4))}}) == {"dense": {"kernel": True}}


def test_callable_rejects_paths_the_target_lacks(model):
  mask = masks.weight_decay_mask("default", target=model)
  with pytest.raises(ValueError, match=r"has the path 'dense/kernal'.*closest: 'dense/kernel'"):
    mask({"dense": {"kernal": np.ones((4, 4))}})


def test_unbound_callable_resolves_each_tree():
  mask = masks.weight_decay_mask("bias=false, *=true")
  assert mask({"a": {"bias": 1.0, "w": 2.0}}) == {"a": {"bias": False, "w": True}}
  with pytest.raises(ValueError, match="rule #1 'bias' matches no parameter of the params tree"):
    mask([np.ones(2)])  # each tree is checked: 'bias' matches nothing here
  with pytest.raises(ValueError, match="matches no parameter"):
    masks.weight_decay_mask("xyz=false, *=true")({"a": 1.0})
  assert "bias=False" in repr(mask)


def test_lr_multipliers_and_frozen(model):
  lr = masks.lr_multiplier_fn("embed/*=0.1, type:LayerNorm=2", target=model)
  frozen = masks.frozen_fn("embed/*=true", target=model)
  state = _as_pure(nnx.state(model, nnx.Param))
  lr_values = _leaves_with_paths(lr(state))
  assert lr_values["embed/embedding"] == 0.1
  assert lr_values["norm/scale"] == lr_values["norm/bias"] == 2.0
  assert {v for p, v in lr_values.items() if not p.startswith(("embed", "norm"))} == {1.0}
  frozen_values = _leaves_with_paths(frozen(state))
  assert {p for p, v in frozen_values.items() if v} == {"embed/embedding"}
  assert set(masks.path_values(model, (), default=False).values()) == {False}


def test_adamw_mask_inside_nnx_optimizer_numerically():
  template = SmallNet(nnx.Rngs(0))
  # Fixed random gradients (an nnx.State of Params, as nnx.grad gives), so that every run
  # sees the same ones whatever its params.
  keys = iter(jax.random.split(jax.random.key(1), 100))
  grads = jax.tree.map(
    lambda p: jax.random.normal(next(keys), p.shape), nnx.state(template, nnx.Param)
  )
  mask = masks.weight_decay_mask("default", target=template)
  lr, wd = 0.05, 0.5
  txs = [
    optax.adamw(lr, weight_decay=wd, mask=mask),
    optax.adamw(lr, weight_decay=wd),
    optax.adamw(lr, weight_decay=0.0),
  ]
  models = [SmallNet(nnx.Rngs(0)) for _ in txs]
  optimizers = [nnx.Optimizer(m, tx, wrt=nnx.Param) for m, tx in zip(models, txs, strict=True)]

  @nnx.jit  # one compilation for the three runs
  def step(models, optimizers, grads):
    for model, optimizer in zip(models, optimizers, strict=True):
      optimizer.update(model, grads)

  for _ in range(2):
    step(models, optimizers, grads)
  masked, decay_all, decay_none = (_leaves_with_paths(nnx.state(m, nnx.Param)) for m in models)
  assert set(masked) == set(decay_all) == set(masks.tree_paths(template))
  for path, value in masked.items():
    reference = decay_all[path] if path in SMALL_DECAYED_BY_DEFAULT else decay_none[path]
    np.testing.assert_allclose(value, reference, rtol=1e-6, atol=1e-7, err_msg=path)
    assert not np.allclose(decay_all[path], decay_none[path]), path  # decay made a difference


def test_frozen_and_lr_multipliers_with_real_grads_in_nnx_optimizer():
  net = SmallNet(nnx.Rngs(0))
  tokens = jnp.arange(12).reshape(2, 6) % 11
  frozen = masks.frozen_fn("embed/*=true, type:LayerNorm=true", target=net)
  mult = masks.lr_multiplier_fn("gate=0", target=net)
  # optax.masked around a stateful transform: the mask also shapes the optimizer state.
  tx = optax.chain(
    optax.masked(optax.set_to_zero(), frozen),
    optax.masked(optax.adam(0.1), lambda t: jax.tree.map(lambda f: not f, frozen(t))),
    optax.stateless(lambda u, p: jax.tree.map(lambda m, x: m * x, mult(u), u)),
  )
  before = {p: np.asarray(v) for p, v in _leaves_with_paths(nnx.state(net, nnx.Param)).items()}
  optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)

  @nnx.jit
  def step(net, optimizer):
    optimizer.update(net, nnx.grad(lambda m: m(tokens))(net))

  for _ in range(2):
    step(net, optimizer)
  after = _leaves_with_paths(nnx.state(net, nnx.Param))
  for path in ("embed/embedding", "norm/scale", "norm/bias", "gate"):
    np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  for path in ("dense/kernel", "bn/scale", "blocks/1/bias"):
    assert not np.allclose(after[path], before[path]), path


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 4)(tokens)
    x = nn.LayerNorm()(nn.Dense(4)(x))
    x = nn.DenseGeneral((2, 2))(x).reshape(x.shape)
    return jnp.sum(nn.Dense(3)(x) ** 2)


def test_linen_target_and_train_state_numerically():
  tokens = jnp.arange(6).reshape(1, 6)
  target = masks.linen_target(LinenNet(), tokens)
  values = masks.path_values(target, "default")
  assert {p for p, v in values.items() if v} == {
    "Dense_0/kernel",
    "DenseGeneral_0/kernel",
    "Dense_1/kernel",
  }
  assert values["LayerNorm_0/scale"] is False and values["Embed_0/embedding"] is False
  mask = masks.weight_decay_mask("default", target=target)
  variables = LinenNet().init(jax.random.key(0), tokens)
  lr, wd = 0.05, 0.5
  zeros = jax.tree.map(jnp.zeros_like, variables["params"])
  for params in (variables["params"], variables):  # inner dict, and with the 'params' level
    state = train_state.TrainState.create(
      apply_fn=LinenNet().apply, params=params, tx=optax.adamw(lr, weight_decay=wd, mask=mask)
    )
    grads = zeros if params is variables["params"] else {"params": zeros}
    state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
    new = state.params.get("params", state.params)
    for path, (old, now) in zip(
      masks.tree_paths(variables["params"]),
      zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(new), strict=True),
      strict=True,
    ):
      # With zero gradients the Adam step is 0: only decoupled decay moves a parameter.
      expected = old * (1 - lr * wd) if values[path] else old
      np.testing.assert_allclose(now, expected, rtol=1e-6, err_msg=path)


def test_linen_through_nnx_bridge_uses_linen_target():
  tokens = jnp.arange(6).reshape(1, 6)
  wrapped = nnx.bridge.ToNNX(LinenNet(), rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(wrapped, tokens)
  with pytest.raises(ValueError, match=r"nnx.bridge.ToNNX.*pass linen_target\(linen_module"):
    masks.weight_decay_mask("default", target=wrapped)
  target = masks.linen_target(LinenNet(), tokens)
  assert masks.tree_paths(target) == masks.tree_paths(wrapped)
  mask = masks.weight_decay_mask("default", target=target)
  optimizer = nnx.Optimizer(wrapped, optax.adamw(0.1, weight_decay=0.5, mask=mask), wrt=nnx.Param)
  before = {p: np.asarray(v) for p, v in _leaves_with_paths(nnx.state(wrapped, nnx.Param)).items()}
  optimizer.update(wrapped, jax.tree.map(jnp.zeros_like, nnx.state(wrapped, nnx.Param)))
  after = _leaves_with_paths(nnx.state(wrapped, nnx.Param))
  for path, decay in masks.path_values(target, "default").items():
    expected = before[path] * (1 - 0.1 * 0.5) if decay else before[path]
    np.testing.assert_allclose(after[path], expected, rtol=1e-6, err_msg=path)


def test_linen_scanned_layers_keep_their_types():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.LayerNorm()(nn.Dense(4)(x)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(
        nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
      )
      return scan(name="stack")(x, None)[0]

  target = masks.linen_target(Stack(), jax.ShapeDtypeStruct((2, 4), jnp.float32))
  values = masks.path_values(target, "default")
  assert values == {
    "stack/Dense_0/bias": False,
    "stack/Dense_0/kernel": True,
    "stack/LayerNorm_0/bias": False,
    "stack/LayerNorm_0/scale": False,
  }
  # Why ndim rules are only explicit: a stacked bias has ndim 2.
  ndim = masks.path_values(target, "ndim>=2=true, *=false")
  assert ndim["stack/Dense_0/bias"] is True


class ScanLSTM(nn.Module):
  """An LSTM language model as Flax users write one: ``nn.scan`` over a cell, over time."""

  cell: type = nn.OptimizedLSTMCell

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8)(tokens)
    scan = nn.scan(
      self.cell,
      variable_broadcast="params",
      split_rngs={"params": False},
      in_axes=1,
      out_axes=1,
    )
    carry = self.cell(8, parent=None).initialize_carry(jax.random.key(0), x[:, 0].shape)
    _, ys = scan(8, name="lstm")(carry, x)
    return nn.Dense(11)(ys)


class RNNLSTM(nn.Module):
  """The same with ``nn.RNN`` (the seq2seq example's way)."""

  cell: type = nn.OptimizedLSTMCell

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8)(tokens)
    return nn.Dense(11)(nn.RNN(self.cell(8, name="lstm"))(x))


@pytest.mark.parametrize("cell", [nn.OptimizedLSTMCell, nn.LSTMCell])
@pytest.mark.parametrize("model", [ScanLSTM, RNNLSTM])
def test_default_preset_decays_linen_lstm_kernels_like_nnx_lstm_kernels(model, cell):
  tokens = jax.ShapeDtypeStruct((2, 5), jnp.int32)
  config = plan.make_plan(default_config())
  targets = {
    "linen_target": masks.linen_target(model(cell), tokens),
    # The trainer's: a registered Linen model, bridged, its classes recorded as it builds.
    "state_factory": ts.state_factory(
      lambda rngs: model(cell), config, example_inputs=(tokens,)
    ).target,
  }
  for name, target in targets.items():
    values = masks.path_values(target, "default")
    gates = {p: v for p, v in values.items() if p.startswith("lstm/")}
    # OptimizedLSTMCell: 8 DenseParams (ii..io, hi..ho); LSTMCell: 8 Dense.
    assert len([p for p in gates if p.endswith("/kernel")]) == 8, (name, gates)
    assert all(v == p.endswith("/kernel") for p, v in gates.items()), (name, gates)
    assert values["Dense_0/kernel"] and not values["Embed_0/embedding"], name
  # NNX's cell holds Linear layers: its gate kernels decay under the same preset.
  nnx_cell = nnx.OptimizedLSTMCell(8, 8, rngs=nnx.Rngs(0))
  nnx_values = masks.path_values(nnx_cell, "default")
  assert nnx_values and all(v == p.endswith("/kernel") for p, v in nnx_values.items())


def test_nnx_stacked_layers_by_type():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(4, 4, rngs=nnx.Rngs(key))

  class Model(nnx.Module):
    def __init__(self):
      self.layers = make(jax.random.split(jax.random.key(0), 3))

  model = nnx.eval_shape(Model)
  assert model.layers.kernel.get_value().shape == (3, 4, 4)
  values = masks.path_values(model, "default")
  assert values == {"layers/bias": False, "layers/kernel": True}


def test_report_rows_and_totals(model):
  rows = masks.report_rows(model, lr_multipliers="embed/*=0.1", frozen="type:BatchNorm=true")
  by_path = {r.path: r for r in rows}
  assert [r.path for r in rows] == masks.tree_paths(model)
  kernel = by_path["dense/kernel"]
  assert (kernel.module, kernel.shape, kernel.dtype, kernel.size, kernel.bytes) == (
    "Linear",
    (4, 4),
    "float32",
    16,
    64,
  )
  assert kernel.decay and not kernel.frozen and kernel.lr_multiplier == 1.0
  assert by_path["embed/embedding"].lr_multiplier == 0.1
  assert by_path["bn/scale"].frozen and by_path["bn/scale"].module == "BatchNorm"
  assert by_path["gate"].module == "Net"

  text = masks.report(model, lr_multipliers="embed/*=0.1", frozen="type:BatchNorm=true")
  assert re.search(r"^dense/kernel\s+Linear\s+\(4, 4\)\s+float32\s+yes\s+1\s+no$", text, re.M)
  assert re.search(r"^embed/embedding\s+Embed\s+\(11, 4\)\s+float32\s+no\s+0\.1\s+no$", text, re.M)
  assert re.search(r"^bn/scale\s+BatchNorm\s+\(4,\)\s+float32\s+no\s+1\s+yes$", text, re.M)

  def totals(label):
    m = re.search(rf"^{label}\s+(\d+) tensors\s+([\d,]+) params", text, re.M)
    return int(m.group(1)), int(m.group(2).replace(",", ""))

  n_total = sum(r.size for r in rows)
  assert totals("total") == (len(rows), n_total)
  decayed = [r for r in rows if r.decay and not r.frozen]
  assert totals("decayed") == (len(decayed), sum(r.size for r in decayed))
  assert totals("frozen") == (2, 8)  # bn/scale, bn/bias
  assert sum(totals(g)[1] for g in ("decayed", "not decayed", "frozen")) == n_total


def test_report_per_device_bytes():
  mesh = jax.sharding.AbstractMesh((4,), ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32), "b": jnp.zeros((4,), jnp.bfloat16)}
  rows = masks.report_rows(
    params, decay_rules="b=false, *=true", shardings={"w": shard, "b": replicated}
  )
  assert {r.path: (r.bytes, r.per_device_bytes) for r in rows} == {"w": (128, 32), "b": (8, 8)}
  text = masks.report(params, decay_rules="all", shardings={"w": shard, "b": replicated})
  assert "per device" in text and "32 B" in text
  with pytest.raises(ValueError, match="shardings: no sharding for 'b'"):
    masks.report_rows(params, decay_rules="all", shardings={"w": shard})


TINY_MODULE = """
import numpy as np
from flax import nnx
from adamw_flax import registry


class Tiny(nnx.Module):
  def __init__(self, vocab, rngs):
    self.embed = nnx.Embed(vocab, 8, rngs=rngs)
    self.dense = nnx.Linear(8, vocab, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)


class Data:
  info = {"vocab_size": 13}


def tinyds(cfg, *, seed, process_index, process_count):
  return Data()


def tiny(cfg, *, rngs, data_info):
  return Tiny(data_info["vocab_size"], rngs)


# Tests may import this module afresh from several temporary directories.
if "tiny" not in registry.MODELS.names():
  registry.register_dataset("tinyds")(tinyds)
  registry.register_model("tiny", loss=lambda model, batch, *, train: (0.0, {}))(tiny)
"""

TINY_CONFIG = """
from adamw_flax.config import default_config


def get_config():
  c = default_config()
  c.model.name = "mymod:tiny"
  c.data.name = "mymod:tinyds"
  c.optimizer.weight_decay = 0.1
  c.optimizer.lr_multipliers = "embed/*=0.5"
  return c
"""


@pytest.fixture
def tiny_config(tmp_path, monkeypatch):
  (tmp_path / "mymod.py").write_text(textwrap.dedent(TINY_MODULE))
  (tmp_path / "cfg.py").write_text(textwrap.dedent(TINY_CONFIG))
  monkeypatch.syspath_prepend(str(tmp_path))
  return tmp_path


def test_inspect_cli(tiny_config):
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join([str(tiny_config), str(REPO)]), JAX_PLATFORMS="cpu"
  )
  cmd = [
    sys.executable,
    "-m",
    "train.inspect",
    f"--config={tiny_config / 'cfg.py'}",
    "--config.optimizer.weight_decay_mask=bias=false, type:LayerNorm=false, *=true",
    "--config.optimizer.freeze=norm/*=true",
  ]
  result = subprocess.run(
    cmd, cwd=tiny_config, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "model: mymod:tiny (Tiny)" in out
  assert re.search(r"^embed/embedding\s+Embed\s+\(13, 8\)\s+float32\s+yes\s+0\.5\s+no$", out, re.M)
  assert re.search(r"^dense/bias\s+Linear\s+\(13,\)\s+float32\s+no\s+1\s+no$", out, re.M)
  assert re.search(r"^norm/scale\s+LayerNorm\s+\(8,\)\s+float32\s+no\s+1\s+yes$", out, re.M)
  # embed 13*8 + dense 8*13 decayed; dense bias 13 not; norm 16 frozen.
  assert re.search(r"^decayed\s+2 tensors\s+208 params", out, re.M)
  assert re.search(r"^not decayed\s+1 tensors\s+13 params", out, re.M)
  assert re.search(r"^frozen\s+2 tensors\s+16 params", out, re.M)

  bad = subprocess.run(
    cmd[:4] + ["--config.optimizer.weight_decay_mask=*/bais=false, *=true"],
    cwd=tiny_config,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode == 2
  assert "rule #1 '*/bais' matches no parameter" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_inspect_config_report_in_process(tiny_config):
  import importlib.util

  from train import inspect as inspect_cli

  spec = importlib.util.spec_from_file_location("cfg", tiny_config / "cfg.py")
  cfg_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_module)
  config = cfg_module.get_config()
  run = plan.make_plan(config)
  model = ts.registered_state_factory(run, inspect_cli.data_info(run)).target
  assert isinstance(model.dense.kernel.get_value(), jax.ShapeDtypeStruct)  # nothing allocated
  text = inspect_cli.config_report(config)
  assert re.search(r"^dense/kernel\s+Linear\s+\(8, 13\)\s+float32\s+yes\s+1\s+no$", text, re.M)
  assert "weight_decay_mask: 'default'" in text
