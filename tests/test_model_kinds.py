"""One model of each kind the README's table lists, through the Python API and ``python -m train``.

The models (tests/user_models.py, configs tests/configs/model_kinds.py):

* ``cnn``: NNX with ``nnx.Rngs`` in the module, BatchNorm and Dropout;
* ``gemma``: NNX with its own fsdp + tensor shardings (``nnx.with_partitioning``
  on params, ``jax.lax.with_sharding_constraint(x, P('fsdp', None, 'tensor',
  None))`` on activations) on a 2x2 mesh;
* ``resnet``: Linen with ``batch_stats`` (BatchNorm), float image inputs
  given as ``jax.ShapeDtypeStruct``;
* ``vae``: Linen with an RNG passed to ``__call__`` (the step's key);
* ``lstm``: Linen ``nn.RNN`` over ``LSTMCell``, lengths by ``argmax``;
* ``wrapped``: a Linen encoder with BatchNorm that the builder wraps in
  ``nnx.bridge.ToNNX(...).lazy_init(x)`` itself, trained under the
  ``default`` mask.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import adamw_flax
from adamw_flax import masks, plan, registry, train_state
from adamw_flax.config import load_config
from tests import user_models
from tests.conftest import ROOT, subprocess_env

CONFIG = ROOT / "tests" / "configs" / "model_kinds.py"
KINDS = ["cnn", "gemma", "resnet", "vae", "lstm", "wrapped"]
DEVICES = {"gemma": 4}  # the others: 2 data-parallel devices


def _run(kind: str, *overrides: str):
  run = plan.make_plan(load_config(CONFIG, list(overrides), arg=kind))
  entry = registry.MODELS.get(run.model.name)
  data = registry.DATASETS.get(run.data.name)(
    run.data, seed=run.trainer.seed, process_index=0, process_count=1
  )
  return run, entry, data


def _train(kind: str, steps: int = 6, *overrides: str):
  """The Python API on one device: ``create_train_state`` of the builder, ``make_train_step``."""
  run, entry, data = _run(kind, "mesh.shape=(1,)", *overrides)
  inputs = entry.example_inputs(run.model, data.info) if entry.example_inputs else None
  state = adamw_flax.create_train_state(
    lambda rngs: entry.build(run.model, rngs=rngs, data_info=data.info),
    run,
    example_inputs=inputs,
  )
  step = adamw_flax.make_train_step(entry.loss, donate=False, seed=run.trainer.seed)
  first = state
  losses = []
  for i in range(steps):
    state, metrics = step(state, data.train_batch(i))
    losses.append(float(metrics["loss"]))
  return run, entry, data, first, state, losses


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "gemma"])
def test_kind_trains_through_the_python_api(kind):
  run, entry, data, first, state, losses = _train(kind, steps=8)
  assert np.all(np.isfinite(losses))
  evaluate = adamw_flax.make_eval_step(entry.loss, seed=run.trainer.seed)
  batch = data.eval_batches(1)[0]
  before, after = (float(evaluate(s, batch)["loss"]) for s in (first, state))
  assert after < before, (before, after)


def test_gemma_style_model_shards_params_and_activations_on_a_2x2_mesh(tmp_path):
  out = tmp_path / "gemma.json"
  proc = subprocess.run(
    [sys.executable, "-m", "tests.model_kinds_worker", str(out)],
    cwd=ROOT,
    env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())
  params = got["params"]
  assert params["embed/embedding"] == {"spec": "P('tensor', 'fsdp')", "device_shape": [8, 8]}
  assert params["layers/0/attn/q/kernel"]["spec"] == "P('fsdp', 'tensor', None)"
  assert params["layers/0/attn/q/kernel"]["device_shape"] == [8, 2, 4]
  assert params["layers/0/mlp/down/kernel"]["spec"] == "P('tensor', 'fsdp')"
  # The model's own activation constraints hold inside the compiled step: the
  # attention block's output over fsdp, q/k/v (B, T, N, H) over fsdp and tensor.
  assert got["activation_specs"] == ["P('fsdp',)"]
  assert got["hlo_has_sharded_bxtxnxh"] and not got["hlo_has_whole_bxtxnxh"]
  assert got["finite"] and got["losses"][-1] < got["losses"][0]


def test_type_partition_rules_resolve_against_the_model_from_the_config():
  # The README's rules, as a command line gives them (--config.mesh.partition_rules=...).
  run, _, data = _run(
    "resnet",
    "mesh.axes=('data', 'model')",
    "mesh.shape=(1, 2)",
    "mesh.partition_rules=(('type:Dense & kernel', (None, 'model')), ('type:Conv', (None, None, None, 'model')))",
  )
  factory = train_state.registered_state_factory(run, data.info)
  specs = jax.tree.map(
    lambda s: s.spec,
    factory.abstract().shardings(AbstractMesh((1, 2), ("data", "model")), run.mesh),
  ).params
  assert specs["Dense_0"]["kernel"] == P(None, "model")
  assert specs["Dense_0"]["bias"] == P()
  assert specs["conv_init"]["kernel"] == P(None, None, None, "model")
  assert specs["ResNetBlock_1"]["conv_proj"]["kernel"] == P(None, None, None, "model")
  assert specs["bn_init"]["scale"] == P()

  misspelled = _run(
    "resnet", "mesh.axes=('data', 'model')", "mesh.shape=(1, 2)",
    "mesh.partition_rules=(('type:Dens', (None, 'model')),)",
  )[0]  # fmt: skip
  factory = train_state.registered_state_factory(misspelled, data.info)
  with pytest.raises(ValueError, match=r"'type:Dens' matches no module .*did you mean 'Dense'"):
    factory.abstract().shardings(AbstractMesh((1, 2), ("data", "model")), misspelled.mesh)


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def test_linen_modules_take_shape_only_example_inputs():
  # A Linen module given directly, with jax.ShapeDtypeStruct inputs: float
  # into Conv/Dense (ResNet, VAE, with a key), int into an LSTM with argmax.
  cfg = load_config(CONFIG, arg="resnet")
  cases = [
    (user_models.ResNet((1, 1), 4, 4), (jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32),)),
    (user_models.VAE(4, 8), user_models.vae_inputs(None, {"features": 8})),
    (user_models.LSTMLM(16, 8), (jax.ShapeDtypeStruct((2, 8), jnp.int32),)),
  ]
  for module, inputs in cases:
    abstract = adamw_flax.create_train_state(module, cfg, example_inputs=inputs, abstract=True)
    state = adamw_flax.create_train_state(module, cfg, example_inputs=inputs)
    assert _shapes(state.params) == _shapes(abstract.params)
    assert train_state.param_count(state.params) > 0
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(state.params) if x.ndim >= 2)


def _batch_stats(rest):
  leaves = jax.tree_util.tree_flatten_with_path(rest)[0]
  return {masks.path_str(kp): np.asarray(x) for kp, x in leaves if "/mean" in masks.path_str(kp)}


@pytest.mark.parametrize("kind", ["resnet", "wrapped"])
def test_linen_batch_stats_update_in_training_and_are_used_in_eval(kind):
  # resnet: registered as Linen, nothing in its loss; wrapped: the builder's own
  # ToNNX, whose call passes mutable=["batch_stats"] in training (the README's line).
  run, entry, data, first, state, _ = _train(kind, steps=2)
  before, after = _batch_stats(first.rest), _batch_stats(state.rest)
  assert before and before.keys() == after.keys()
  assert all(not np.allclose(before[k], after[k]) for k in before), "running means moved"
  evaluate = adamw_flax.make_eval_step(entry.loss, seed=run.trainer.seed)
  batch = data.eval_batches(1)[0]
  # eval reads the running statistics: other statistics, another loss
  assert float(evaluate(first, batch)["loss"]) != float(evaluate(state, batch)["loss"])


def test_wrapped_linen_model_gets_its_linen_types_under_the_default_mask():
  run, _, data = _run("wrapped")
  factory = train_state.registered_state_factory(run, data.info)
  values = masks.path_values(factory.target, run.optimizer.decay_rules)
  assert values == {
    "encoder/BatchNorm_0/bias": False,
    "encoder/BatchNorm_0/scale": False,
    "encoder/Dense_0/bias": False,
    "encoder/Dense_0/kernel": True,  # a Linen Dense, inside the user's ToNNX
    "encoder/LayerNorm_0/bias": False,
    "encoder/LayerNorm_0/scale": False,
    "head/bias": False,
    "head/kernel": True,  # the NNX Linear beside it
  }
  rows = {r.path: r.module for r in masks.report_rows(factory.target)}
  assert rows["encoder/Dense_0/kernel"] == "Dense" and rows["head/kernel"] == "Linear"


def test_a_built_bridge_model_names_a_fix_for_type_rules():
  # Built outside the factory, its Linen init was not seen: the error says what to do.
  cfg = load_config(CONFIG, arg="wrapped")
  model = user_models.WrappedRegressor(cfg.model, rngs=nnx.Rngs(0), data_info={"features": 8})
  with pytest.raises(ValueError) as e:
    adamw_flax.create_train_state(model, cfg)
  message = str(e.value)
  assert "nnx.bridge.ToNNX" in message and "inside the model factory" in message
  assert "weight_decay_mask='*/kernel=true, *=false'" in message
  # The named fix works: the same model as a factory.
  state = adamw_flax.create_train_state(
    lambda rngs: user_models.WrappedRegressor(cfg.model, rngs=rngs, data_info={"features": 8}),
    cfg,
  )
  assert train_state.param_count(state.params) == 225


def test_a_bridge_without_lazy_init_is_an_error_naming_it():
  class Unwrapped(nnx.Module):
    def __init__(self, rngs):
      self.body = nnx.bridge.ToNNX(user_models.LinenEncoder(4), rngs=rngs)  # no lazy_init

  with pytest.raises(ValueError, match=r"no nnx.Param.*lazy_init\(x\)"):
    adamw_flax.create_train_state(Unwrapped, load_config(CONFIG, arg="wrapped"))


def test_inspect_shows_specs_and_per_device_shapes_and_checks_partition_rules():
  base = [sys.executable, "-m", "train.inspect", f"--config={CONFIG}:gemma", "--num_devices=4"]
  env = subprocess_env(JAX_PLATFORMS="cpu")
  ok = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert "mesh: {'fsdp': 2, 'tensor': 2} (4 devices)" in ok.stdout
  assert re.search(r"^embed/embedding\s+\(16, 16\)\s+P\('tensor', 'fsdp'\)\s+\(8, 8\)\s+256 B$",
                   ok.stdout, re.M)  # fmt: skip
  assert re.search(r"^final_norm/scale\s+\(16,\)\s+replicated\s+\(16,\)\s+64 B$", ok.stdout, re.M)
  bad = subprocess.run(
    [*base, "--config.mesh.partition_rules=(('*/kernl', (None, 'tensor')),)"],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert bad.returncode == 2, bad.stderr
  assert "'*/kernl' matches no parameter" in bad.stderr and "Traceback" not in bad.stderr
  assert len(bad.stderr.strip().splitlines()) <= 3


@pytest.mark.slow
def test_inspect_prints_no_backend_probe_line():
  # With the TPU runtime installed and no JAX_PLATFORMS, JAX probes for a TPU
  # and logs "Unable to initialize backend 'tpu'" at INFO; training hides it.
  # On a machine with no TPU the commands skip the probe and libtpu's warnings.
  env = subprocess_env()
  env.pop("JAX_PLATFORMS", None)
  proc = subprocess.run(
    [sys.executable, "-m", "train.inspect", f"--config={CONFIG}:cnn"],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert "Unable to initialize backend" not in proc.stdout + proc.stderr
  if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
    assert "TPU accelerator type" not in proc.stderr, proc.stderr


def _train_cli(kind: str, workdir, *overrides: str) -> subprocess.CompletedProcess:
  devices = DEVICES.get(kind, 2)
  return subprocess.run(
    [sys.executable, "-m", "train", f"--config={CONFIG}:{kind}", f"--workdir={workdir}"]
    + [f"--config.{o}" for o in overrides],
    cwd=ROOT,
    env=subprocess_env(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu"
    ),
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_kind_trains_through_python_m_train_and_resumes(kind, tmp_path):
  first = _train_cli(kind, tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "step 4:" in first.stdout
  if kind == "gemma":
    assert "mesh {'fsdp': 2, 'tensor': 2} over 4 devices" in first.stdout
  if kind == "wrapped":  # the Linen layers inside the user's ToNNX, in the start-up report
    assert re.search(
      r"^encoder/Dense_0/kernel\s+Dense\s+\(8, 16\)\s+float32\s+yes", first.stdout, re.M
    )
  more = _train_cli(kind, tmp_path, "trainer.num_steps=6", "trainer.allow_config_change=True")
  assert more.returncode == 0, more.stderr[-3000:]
  assert "resumed from step 4" in more.stdout and "step 6:" in more.stdout
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if r["split"] == "train"]
  assert len(losses) == 6 and np.all(np.isfinite(losses))


@pytest.mark.slow
def test_readme_type_partition_rules_train_the_smoke_config(tmp_path):
  # The README's example, on configs/smoke.py, from the command line.
  text = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

  def train(workdir, rules):
    return subprocess.run(
      [sys.executable, "-m", "train", "--config=configs/smoke.py", f"--workdir={workdir}",
       "--config.mesh.axes=('data', 'model')", "--config.mesh.shape=(1, 2)",
       f"--config.mesh.partition_rules={rules}", "--config.trainer.num_steps=6",
       "--config.optimizer.warmup_steps=2"]
      + ([f"--config.data.path={text}"] if text.exists() else []),
      cwd=ROOT,
      env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=600,
    )  # fmt: skip

  ok = train(tmp_path / "ok", "(('type:Embed', (None, 'model')), ('*/kernel', (None, 'model')))")
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "step 6:" in ok.stdout
  assert os.path.exists(tmp_path / "ok" / "checkpoints" / "6")
  # A rule its parameters cannot take is a short error naming it.
  bad = train(tmp_path / "bad", "(('type:LayerNorm', ('model', None)),)")
  assert bad.returncode == 2
  assert "mesh.partition_rules[0] ('type:LayerNorm')" in bad.stderr
  assert "for a 1-dimensional parameter" in bad.stderr
  assert not (tmp_path / "bad").exists()
