"""Sharding: meshes, partition rules and NNX annotations, ZeRO-1, equivalence with one device.

The training checks run once in a child process with 8 host-platform CPU
devices (``tests.sharding_workers meshes``); spec logic and errors are
checked here on abstract meshes, which need no devices.
"""

from __future__ import annotations

import json
import re
import time

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from adamw_flax import config as C
from adamw_flax import distributed, sharding
from adamw_flax.train_state import state_from_config
from tests import sharding_models, sharding_workers

DATA_INFO = {"in_dim": 16, "out_dim": 4}


def abstract_state(cfg):
  return state_from_config(cfg, DATA_INFO, abstract=True)


def mesh_cfg(axes, shape, **fields):
  return sharding_workers.mesh_config(axes, shape, **fields)


# ------------------------------------------------------------------ meshes


def test_mesh_from_config_uses_all_devices():
  cfg = mesh_cfg(("data", "model"), (-1, 1)).mesh
  mesh = sharding.mesh_from_config(cfg)
  assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2


@pytest.mark.parametrize(
  "shape, message",
  [
    ((3, -1), "8 devices are not divisible by the fixed sizes' product 3"),
    ((2, 2), "has 4 devices but 8 are available"),
    ((-1, -1), "at most one -1"),
    ((8,), "needs one size per axis"),
  ],
)
def test_mesh_from_config_errors(shape, message):
  cfg = mesh_cfg(("data", "model"), (1, 1)).mesh
  cfg.shape = shape
  # Only the count matters before the mesh is built.
  with pytest.raises(ValueError, match=re.escape(message)):
    sharding.mesh_from_config(cfg, devices=jax.devices()[:1] * 8)


# -------------------------------------------------------------- param specs


def test_rules_first_match_wins_unmatched_replicated():
  cfg = mesh_cfg(("data", "model"), (2, 4)).mesh
  cfg.partition_rules = (
    ("l1/kernel", (None, "model")),
    (".*kernel", ("model",)),
    (".*/bias", (("data", "model"),)),
  )
  params = {
    "l1": {"kernel": np.zeros((16, 32)), "bias": np.zeros(32)},
    "l2": {"kernel": np.zeros((32, 4))},
    "scale": np.zeros(4),
  }
  specs = sharding.param_specs(params, cfg, mesh=AbstractMesh((2, 4), ("data", "model")))
  assert specs == {
    "l1": {"kernel": P(None, "model"), "bias": P(("data", "model"))},
    "l2": {"kernel": P("model")},
    "scale": P(),
  }


def state_specs(state, mesh_section, mesh):
  shardings = state.shardings(mesh, mesh_section)
  spec = lambda tree: jax.tree.map(lambda s: s.spec, tree)
  return {f: spec(getattr(shardings, f)) for f in ("params", "frozen", "rest")}


def test_nnx_annotations_read_from_train_state_and_overridden_by_rules():
  cfg = mesh_cfg(("data", "model"), (2, 4))
  cfg.model.shard_axis = "model"
  mesh = AbstractMesh((2, 4), ("data", "model"))
  specs = state_specs(abstract_state(cfg), cfg.mesh, mesh)
  assert specs["params"]["l1"]["kernel"] == P(None, "model")
  assert specs["params"]["l2"]["kernel"] == P("model", None)
  assert specs["params"]["l1"]["bias"] == P()
  assert specs["frozen"] == {} and specs["rest"] == {}

  cfg.mesh.partition_rules = ((".*l1/kernel", ("model", None)),)
  specs = state_specs(abstract_state(cfg), cfg.mesh, mesh)
  assert specs["params"]["l1"]["kernel"] == P("model", None)  # the rule
  assert specs["params"]["l2"]["kernel"] == P("model", None)  # the annotation


def test_annotations_of_module_and_state():
  from flax import nnx

  cfg = mesh_cfg(("data", "model"), (2, 4))
  cfg.model.shard_axis = "model"
  model = sharding_models.build_mlp(cfg.model, rngs=nnx.Rngs(0), data_info=DATA_INFO)
  mesh = AbstractMesh((2, 4), ("data", "model"))
  from_module = sharding.param_specs(model, cfg.mesh, mesh=mesh)
  from_state = sharding.param_specs(nnx.state(model, nnx.Param), cfg.mesh, mesh=mesh)
  assert from_module == from_state
  assert from_module["l1"]["kernel"] == P(None, "model")


@pytest.mark.parametrize(
  "rules, shard_axis, message",
  [
    (
      ((".*l1/kernel", (None, "model")), ("encoder/.*", ("data",))),
      "",
      "mesh.partition_rules rule #2 're:encoder/.*' matches no parameter",
    ),
    (
      ((".*l1/kernel", ("tensor", None)),),
      "",
      "mesh.partition_rules[0] ('.*l1/kernel'): axis 'tensor' is not in mesh.axes ('data', 'model')",
    ),
    (
      ((".*l2/kernel", (None, "model")),),
      "",
      "l2/kernel (shape (32, 4)): mesh.partition_rules[0] ('re:.*l2/kernel') P(None, 'model') "
      "shards dimension 1 (size 4) over 'model' of size 8",
    ),
    (
      ((".*l2/bias", (None, "data")),),
      "",
      "l2/bias (shape (4,)): mesh.partition_rules[0] ('re:.*l2/bias') P(None, 'data') has 2 "
      "entries for a 1-dimensional parameter",
    ),
  ],
)
def test_spec_errors_name_rule_path_and_shape(rules, shard_axis, message):
  cfg = mesh_cfg(("data", "model"), (1, 8), partition_rules=rules)
  cfg.model.shard_axis = shard_axis
  mesh = AbstractMesh((1, 8), ("data", "model"))
  with pytest.raises(ValueError, match=re.escape(message)):
    state_specs(abstract_state(cfg), cfg.mesh, mesh)


def test_logical_names_map_through_rules_and_unmapped_ones_replicate():
  cfg = mesh_cfg(("data", "model"), (2, 4))
  cfg.model.shard_axis = "hidden"  # a logical name, not a mesh axis
  mesh = AbstractMesh((2, 4), ("data", "model"))
  state = abstract_state(cfg)
  assert state_specs(state, cfg.mesh, mesh)["params"]["l1"]["kernel"] == P(None, None)
  templates, trees = state.spec.templates, [state.params, state.frozen, state.rest]
  assert sharding.unmapped_logical_axes(templates, trees, cfg.mesh, mesh=mesh) == ["hidden"]
  cfg.mesh.logical_axis_rules = (("hidden", "model"),)
  assert state_specs(state, cfg.mesh, mesh)["params"]["l1"]["kernel"] == P(None, "model")
  assert sharding.unmapped_logical_axes(templates, trees, cfg.mesh, mesh=mesh) == []


def test_partition_rules_take_mask_selectors():
  from flax import nnx

  cfg = mesh_cfg(("data", "model"), (2, 4))
  cfg.mesh.partition_rules = (("type:Linear & kernel", (None, "model")), ("ndim>=1", ()))
  model = sharding_models.build_mlp(cfg.model, rngs=nnx.Rngs(0), data_info=DATA_INFO)
  specs = sharding.param_specs(model, cfg.mesh, mesh=AbstractMesh((2, 4), ("data", "model")))
  assert specs["l1"]["kernel"] == P(None, "model") and specs["l1"]["bias"] == P()


def test_rules_see_plain_paths_of_an_nnx_state():
  from flax import nnx

  cfg = mesh_cfg(("data", "model"), (2, 4), partition_rules=(("l1/kernel", (None, "model")),))
  model = sharding_models.build_mlp(cfg.model, rngs=nnx.Rngs(0), data_info=DATA_INFO)
  mesh = AbstractMesh((2, 4), ("data", "model"))
  specs = sharding.param_specs(nnx.state(model, nnx.Param), cfg.mesh, mesh=mesh)
  assert specs["l1"]["kernel"] == P(None, "model")  # no ".value" or Variable level in the path


@pytest.mark.parametrize(
  "fields, errors",
  [
    ({}, []),
    (
      {"partition_rules": ((".*kernel", ("fsdp", None)), ("(", ("data",)))},
      ["mesh.partition_rules[1]: rule 're:(': invalid regular expression"],
    ),
    (
      {"partition_rules": ((".*kernel", ("fsdp", ("data", "fsdp"))),)},
      [
        "mesh.partition_rules[0] ('.*kernel'): axis 'fsdp' is not in mesh.axes ('data', 'model')",
        "mesh.partition_rules[0] ('.*kernel'): P('fsdp', ('data', 'fsdp')) uses a mesh axis twice",
      ],
    ),
    ({"partition_rules": (("kernel",),)}, ["mesh.partition_rules[0]: must be a (selector, spec)"]),
    ({"axes": ("data", "data"), "shape": (2, 2)}, ["mesh.axes: ('data', 'data') names an axis"]),
  ],
)
def test_mesh_config_errors(fields, errors):
  cfg = mesh_cfg(("data", "model"), (-1, 1)).mesh
  cfg.update(fields)
  got = C.mesh_config_errors(cfg)
  assert len(got) == len(errors) and all(g.startswith(e) for g, e in zip(got, errors, strict=True))


def test_global_batch_checks_the_global_batch_size():
  cfg = mesh_cfg(("data",), (-1,)).mesh
  mesh = sharding.mesh_from_config(cfg)
  local = {"x": np.zeros((4, 3), np.float32)}
  assert sharding.global_batch(local, mesh, cfg, global_batch_size=4)["x"].shape == (4, 3)
  with pytest.raises(ValueError, match=r"needs 8 per process.*data_shard_info\(mesh, mesh_cfg\)"):
    sharding.global_batch(local, mesh, cfg, global_batch_size=8)


# ----------------------------------------------------------- state shardings


def _by_suffix(tree, suffix: str):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  hits = [x for kp, x in flat if jax.tree_util.keystr(kp).endswith(suffix)]
  assert hits, f"no leaf ends with {suffix}"
  return hits


@pytest.mark.parametrize("accumulate_steps", [1, 2])
def test_zero1_shards_opt_state_over_data_axes(accumulate_steps):
  # Accumulation lives in the step (micro-batches), so the state is the same for both.
  cfg = mesh_cfg(("data", "model"), (2, 4), shard_opt_state="data")
  cfg.model.shard_axis = "model"
  cfg.model.batch_norm = True
  cfg.optimizer.accumulate_steps = accumulate_steps
  mesh = AbstractMesh((2, 4), ("data", "model"))
  state = abstract_state(cfg)
  s = sharding.state_shardings(state, mesh, cfg.mesh)
  assert jax.tree.structure(s) == jax.tree.structure(state)
  # Params keep their own specs.
  assert s.params["l1"]["kernel"].spec == P(None, "model")
  assert s.params["l2"]["kernel"].spec == P("model", None)
  assert s.params["l2"]["bias"].spec == P()
  assert s.step.spec == P()
  assert all(x.spec == P() for x in jax.tree.leaves(s.rest))  # batch statistics
  # Moments (and accumulated gradients) add "data" on the first free dimension it divides.
  for field in ("mu", "nu"):
    assert [x.spec for x in _by_suffix(s.opt_state, f"{field}['l1']['kernel']")] == [
      P("data", "model")
    ]
    assert [x.spec for x in _by_suffix(s.opt_state, f"{field}['l2']['kernel']")] == [
      P("model", "data")
    ]
    assert [x.spec for x in _by_suffix(s.opt_state, f"{field}['bn']['scale']")] == [P("data")]
  for count in _by_suffix(s.opt_state, "count"):
    assert count.spec == P()

  cfg.mesh.shard_opt_state = "params"
  s = sharding.state_shardings(state, mesh, cfg.mesh)
  assert [x.spec for x in _by_suffix(s.opt_state, "mu['l1']['kernel']")] == [P(None, "model")]
  assert [x.spec for x in _by_suffix(s.opt_state, "mu['bn']['bias']")] == [P()]


def test_zero1_leaves_dims_the_data_axes_do_not_divide():
  cfg = mesh_cfg(("data",), (8,), shard_opt_state="data")
  s = sharding.state_shardings(abstract_state(cfg), AbstractMesh((8,), ("data",)), cfg.mesh)
  assert [x.spec for x in _by_suffix(s.opt_state, "mu['l2']['bias']")] == [P()]  # shape (4,)
  assert [x.spec for x in _by_suffix(s.opt_state, "mu['l2']['kernel']")] == [P("data", None)]


def test_abstract_state_on_a_mesh_and_its_bytes():
  cfg = mesh_cfg(("data",), (-1,), shard_opt_state="data")
  mesh = sharding.mesh_from_config(cfg.mesh)
  state = state_from_config(cfg, DATA_INFO, mesh=mesh, abstract=True)
  params = 16 * 32 + 32 + 32 * 4 + 4  # no BatchNorm
  assert sharding.per_device_bytes(state) == {
    "params": 4 * params,
    "frozen": 0,
    "rest": 0,
    "opt_state": 4 * 2 * params + 4,  # mu, nu and the int32 count on one device
    "total": 4 * 3 * params + 4 + 4,  # and the int32 step
  }


# -------------------------------------------------- 8 devices, one process


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("meshes")
  sharding_workers.run_processes(
    [sharding_workers.worker_command("meshes", f"--out={out}")],
    env=sharding_workers.child_env(8),
    timeout=300,
    log_dir=out,
  )
  return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", list(sharding_workers.MESH_RUNS))
def test_sharded_training_matches_one_device(mesh_runs, name):
  run, ref = mesh_runs[name], mesh_runs["reference"]
  np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5)
  for field in ("params", "rest"):  # rest: BatchNorm statistics
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      run[field],
      ref[field],
    )


def _spec(run, suffix: str) -> str:
  hits = [s for k, s in run["specs"].items() if k.endswith(suffix)]
  assert len(hits) == 1, f"{suffix}: {hits}"
  return hits[0]


# run -> (leaf path suffix -> spec); "[0]" prefixes are the params.
EXPECTED_SPECS = {
  "8": {
    "[0]['l1']['kernel']": "P('data', None)",
    "[0]['l2']['kernel']": "P('data', None)",
    "[0]['l2']['bias']": "P()",
    "mu['l1']['kernel']": "P('data', None)",
  },
  "8-replicated": {"[0]['l1']['kernel']": "P()", "mu['l1']['kernel']": "P()"},
  "8-zero1": {
    "[0]['l1']['kernel']": "P()",
    "mu['l1']['kernel']": "P('data', None)",
    "nu['bn']['bias']": "P('data',)",
    "mu['l2']['bias']": "P()",
  },
  "2x4": {
    "[0]['l1']['kernel']": "P(None, 'model')",
    "[0]['l2']['kernel']": "P('model', None)",
    "mu['l1']['kernel']": "P('data', 'model')",
    "nu['l2']['kernel']": "P('model', 'data')",
  },
  "4x2": {
    "[0]['l1']['kernel']": "P('model', None)",
    "[0]['l2']['kernel']": "P('model', None)",
    "[0]['bn']['bias']": "P('model',)",
    "[0]['bn']['scale']": "P()",
    "mu['l2']['bias']": "P('model',)",
  },
}


@pytest.mark.parametrize("name", list(EXPECTED_SPECS))
def test_sharded_training_uses_the_specs(mesh_runs, name):
  run = mesh_runs[name]
  assert {k: _spec(run, k) for k in EXPECTED_SPECS[name]} == EXPECTED_SPECS[name]


def test_zero1_same_params_as_replicated_and_fewer_bytes(mesh_runs):
  zero1, replicated = mesh_runs["8-zero1"], mesh_runs["8-replicated"]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    zero1["params"],
    replicated["params"],
  )
  # 708 float32 params: l1 kernel 16x32, bn 32+32, l2 32x4+4.
  assert replicated["bytes"]["params"] == zero1["bytes"]["params"] == 4 * 708
  assert replicated["bytes"]["opt_state"] == 4 * 2 * 708 + 4  # mu, nu, count
  # Per device, each moment holds 1/8 of every tensor with a dimension 8 divides:
  # l1 kernel 64, bn 4 + 4, l2 kernel 16; the l2 bias (4,) stays whole.
  assert zero1["bytes"]["opt_state"] == 4 * 2 * (64 + 4 + 4 + 16 + 4) + 4


# -------------------------------------------------------------- distributed


def test_single_process_needs_no_initialization():
  assert distributed.initialize(num_processes=1) is False
  assert distributed.is_main_process()


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (
      {"coordinator_address": "localhost", "num_processes": 2, "process_id": 0},
      "coordinator_address 'localhost' must be HOST:PORT",
    ),
    (
      {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 2},
      "process_id=2 must be in [0, num_processes=2)",
    ),
  ],
)
def test_initialize_rejects_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    distributed.initialize(**kwargs)


def test_initialize_names_missing_settings(monkeypatch):
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(key, raising=False)
  if distributed._detected_cluster() is not None:
    pytest.skip("running inside a cluster JAX detects; partial settings are completed by it")
  with pytest.raises(ValueError, match=r"missing coordinator_address \(or \$JAX_COORDINATOR"):
    distributed.initialize(num_processes=2, process_id=1)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  with pytest.raises(ValueError, match=r"missing process_id \(or \$JAX_PROCESS_ID\)"):
    distributed.initialize(num_processes=2)


def test_unreachable_coordinator_times_out_with_a_clear_error():
  address = f"127.0.0.1:{sharding_workers.free_port()}"  # nobody listens there
  start = time.monotonic()
  with pytest.raises(TimeoutError, match=re.escape(f"coordinator at {address} did not accept")):
    distributed.initialize(address, 2, 1, initialization_timeout=1)
  assert time.monotonic() - start < 10
  assert not jax.distributed.is_initialized()


# ------------------------------------------------------------ the pod config

POD_PARAMS = 303_155_200  # 24 x 12,584,960 in blocks + embeddings 1,115,136 + ln_f 1,024
POD_REPLICATED = 49 * 1024  # LayerNorm scales: 2 per block and the final one


@pytest.mark.parametrize("variant", ["fsdp", "zero1"])
def test_pod_config_validates_builds_abstractly_and_fits(repo_root, variant):
  from adamw_flax import config as config_lib
  from adamw_flax import registry
  from adamw_flax.train_state import param_count

  cfg = config_lib.load_config(repo_root / "configs" / "pod_lm.py", arg=variant)  # validates
  registry.MODELS.get(cfg.model.name)
  registry.DATASETS.get(cfg.data.name)
  state = state_from_config(cfg, {"vocab_size": 65}, abstract=True)  # jax.eval_shape only
  assert param_count(state.params) == POD_PARAMS

  chips = 32
  mesh = sharding.abstract_mesh_from_config(cfg.mesh, chips)
  assert cfg.data.batch_size % chips == 0
  planned = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    state,
    sharding.state_shardings(state, mesh, cfg.mesh),
  )
  got = sharding.per_device_bytes(planned)
  # Step counters (Adam's, the schedule's), replicated.
  counters = sum(x.dtype.itemsize for x in jax.tree.leaves(state.opt_state) if x.shape == ())
  assert counters == 8
  if variant == "fsdp":
    assert dict(mesh.shape) == {"data": 2, "fsdp": 16}
    params = 4 * ((POD_PARAMS - POD_REPLICATED) // 16 + POD_REPLICATED)
    assert got["params"] == params  # 72.5 MiB
    assert got["opt_state"] == 2 * params + counters  # mu, nu like the params
  else:
    assert dict(mesh.shape) == {"data": 32}
    assert got["params"] == 4 * POD_PARAMS  # replicated: 1156 MiB
    assert got["opt_state"] == 2 * 4 * POD_PARAMS // chips + counters  # ZeRO-1: 72.3 MiB
