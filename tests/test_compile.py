"""``python -m train.compile``: the run's steps compiled by XLA:TPU for a topology, on this CPU.

Real compiles through libtpu (the ``tpu`` extra) on compile-only TPU devices,
with small configs (the smoke config, a one-block pod_lm) so that each
compile takes seconds; the full-size figures are benchmarks/pod_compile.py's.
Tests that compile skip when libtpu is not installed. The saved executables
are loaded for real on this machine's CPU devices (a compile-only TPU device
cannot load an executable): the same save, fingerprint and load code that a
TPU slice runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

# Before libtpu loads in this process: no TPU VM metadata lookups, and the two
# xdist workers may both load it (libtpu allows one process otherwise).
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from adamw_flax import aot, plan, registry, sharding, train_state  # noqa: E402
from adamw_flax import config as C  # noqa: E402
from tests.conftest import ROOT, TEXT, subprocess_env  # noqa: E402

needs_libtpu = pytest.mark.skipif(
  aot.libtpu_version() is None, reason="libtpu is not installed (pip install -e '.[tpu]')"
)
DATA = f"--config.data.path={TEXT}"
# pod_lm at one block of width 128: its mesh, rules and FSDP, compiled in seconds.
TINY_POD = [
  "--config.model.num_layers=1",
  "--config.model.embed_dim=128",
  "--config.model.num_heads=2",
  "--config.model.max_len=64",
  "--config.data.seq_len=64",
  "--config.data.batch_size=64",
]
# The smoke model with a 2^26-row position embedding: 2.1B parameters whose
# optimizer state (16 GiB, float32 moments) cannot fit a 16 GiB v5e chip,
# compiled in seconds (a gather and an update, no big matmul). Its moments
# may be int8 (float_moments off), which fits.
TOO_BIG = [
  "--config.model.max_len=67108864",
  "--config.optimizer.float_moments=",
  "--config.data.batch_size=4",
]


def overrides(args):
  return [a[len("--config.") :] for a in args]


def smoke_config(*extra):
  cfg = C.load_config(ROOT / "configs" / "smoke.py", overrides([DATA, *extra]))
  C.check_registered(cfg)
  return cfg


def run_cli(module, *args, env=None, timeout=600):
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    env=env or subprocess_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def run_clis(*commands, timeout=300):
  """Runs ``(module, *args)`` commands side by side; their CompletedProcess-like results."""
  procs = [
    subprocess.Popen([sys.executable, "-m", *c], cwd=ROOT, env=subprocess_env(),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for c in commands
  ]  # fmt: skip
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=timeout)
    finally:
      p.kill()
    out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  return out


def lines_with(stdout, prefix):
  return [line for line in stdout.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def smoke_v5e4():
  """The smoke config compiled for v5e-4 (train and eval steps), once for the tests below."""
  if aot.libtpu_version() is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
  topology = aot.parse_topology("v5e-4")
  devices = aot.topology_devices(topology)
  cfg = smoke_config()
  return cfg, topology, devices, aot.compile_run(cfg, devices, topology)


# ------------------------------------------------------------------ topologies


@pytest.mark.parametrize(
  "name, chips, kind, shape, hbm, peak, hosts",
  [
    ("v4-32", 16, "TPU v4", (2, 2, 4), 32, 275, 4),
    ("v5e-256", 256, "TPU v5 lite", (16, 16), 16, 197, 64),
    ("v5litepod-256", 256, "TPU v5 lite", (16, 16), 16, 197, 64),
    ("v5e-8", 8, "TPU v5 lite", (2, 4), 16, 197, 1),
    ("v5p-128", 64, "TPU v5", (4, 4, 4), 95, 459, 16),
    ("v5p-32", 16, "TPU v5", (2, 2, 4), 95, 459, 4),
    ("v6e-64", 64, "TPU v6 lite", (8, 8), 32, 918, 16),
  ],
)
def test_topology_names_as_users_write_them(name, chips, kind, shape, hbm, peak, hosts):
  t = aot.parse_topology(name)
  assert (t.chips, t.chip.device_kind, t.shape) == (chips, kind, shape)
  assert (t.chip.hbm_gb, t.chip.peak_tflops, t.hosts) == (hbm, peak, hosts)
  assert t.usable_hbm_bytes == pytest.approx(hbm * 2**30, rel=0.05)  # what XLA:TPU compiles against
  assert aot.parse_topology(name, num_slices=2).total_chips == 2 * chips


@pytest.mark.parametrize(
  "name, message",
  [
    ("v5p-100", "v5p slices come in these sizes (TensorCores, two per chip): 8, 16, 32"),
    ("v5e-3", "v5e slices come in these sizes (chips): 1, 4, 8, 16"),
    ("v7-8", "not a TPU slice name; write it as Cloud TPU does: v5p-128"),
    ("tpu", "not a TPU slice name"),
  ],
)
def test_unknown_topology_names_say_what_exists(name, message):
  with pytest.raises(aot.TopologyError, match=re.escape(message)):
    aot.parse_topology(name)


@needs_libtpu
def test_compile_only_devices_match_the_topology():
  for name, kind in (("v4-32", "TPU v4"), ("v5e-8", "TPU v5 lite"), ("v6e-4", "TPU v6 lite")):
    t = aot.parse_topology(name)
    devices = aot.topology_devices(t)
    assert len(devices) == t.chips and {d.device_kind for d in devices} == {kind}
    per_host = {d.process_index for d in devices}
    assert len(per_host) == t.hosts
  two = aot.topology_devices(aot.parse_topology("v5e-4", num_slices=2))
  assert sorted({d.slice_index for d in two}) == [0, 1]


# ------------------------------------------------------------------ the report


@needs_libtpu
def test_cli_reports_smoke_on_v5e_and_saves_the_steps(tmp_path):
  workdir = tmp_path / "run"
  out = run_cli("train.compile", "--config=configs/smoke.py", "--topology=v5e-4", DATA,
                f"--workdir={workdir}")  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  stdout = out.stdout
  assert lines_with(stdout, "topology v5e-4: 4 chips (TPU v5 lite), 1 slice(s), mesh {'data': 4}")
  (memory,) = lines_with(stdout, "per-chip HBM: params ")
  assert re.fullmatch(
    r"per-chip HBM: params \S+ GiB, optimizer state \S+ GiB, batch \S+ GiB, temps \S+ GiB, "
    r"peak \S+ GiB of 15.75 GiB \(fits\)",
    memory,
  )
  assert "largest buffers:" in stdout and "argument params/" in stdout
  (estimate,) = lines_with(stdout, "step estimate: ")
  assert re.match(
    r"step estimate: [\d.e-]+ ms, \S+ TFLOP per chip, MFU [\d.]+% \(XLA cost", estimate
  )
  assert "model FLOPs by 6·N·tokens" in estimate
  (coll,) = lines_with(stdout, "collectives per step: ")
  assert re.match(r"collectives per step: all-reduce [1-9]\d* \(", coll)  # the data-parallel grads
  assert lines_with(stdout, "eval step: peak ")
  assert "compiling the train step for v5e-4" in out.stderr  # progress while it compiles
  record = json.loads((workdir / "compiled" / "fingerprint.json").read_text())
  assert record["topology"] == "v5e-4" and set(record["steps"]) == {"train", "eval"}
  assert record["devices"]["device_kind"] == "TPU v5 lite" and record["devices"]["count"] == 4
  assert record["versions"]["libtpu"] == aot.libtpu_version()
  for entry in record["steps"].values():
    assert (workdir / "compiled" / entry["file"]).stat().st_size == entry["bytes"]
  assert f"(fingerprint {record['fingerprint']})" in stdout
  assert not (workdir / "config.json").exists()  # the workdir is not claimed as a run


@needs_libtpu
def test_report_bytes_are_memory_analysis_bytes(smoke_v5e4):
  _, topology, _, result = smoke_v5e4
  for step in [result.train, *result.evals.values()]:
    m, mem = step.compiled.memory_analysis(), step.memory
    assert mem.argument == m.argument_size_in_bytes and mem.temps == m.temp_size_in_bytes
    assert mem.output == m.output_size_in_bytes and mem.alias == m.alias_size_in_bytes
    assert mem.peak == (
      m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
      + m.temp_size_in_bytes
    )  # fmt: skip
    # Every argument byte is some leaf's shard in its layout: nothing left over.
    assert mem.unattributed == 0
    assert mem.params + mem.opt_state + mem.batch + mem.other == m.argument_size_in_bytes
    assert mem.outputs == m.output_size_in_bytes - m.alias_size_in_bytes
    assert mem.usable == topology.usable_hbm_bytes
  line = next(x for x in aot.report_lines(result) if x.startswith("per-chip HBM:"))
  shown = dict(re.findall(r"(params|optimizer state|batch|temps|peak) (\S+) GiB", line))
  mem = result.train.memory
  want = {"params": mem.params, "optimizer state": mem.opt_state, "batch": mem.batch,
          "temps": mem.temps, "peak": mem.peak}  # fmt: skip
  for key, value in want.items():
    assert float(shown[key]) == pytest.approx(value / 2**30, rel=5e-3, abs=5e-3), key
  # The params part is the params' own shards: every chip holds them whole here (data parallel).
  params_bytes = sum(np.prod(x.shape) * 4 for x in jax.tree.leaves(result.job.state.params))
  assert mem.params >= params_bytes and mem.opt_state >= 2 * params_bytes


@needs_libtpu
@pytest.mark.parametrize(
  "name, mesh",
  [
    ("cnn", {"data": 4}),  # NNX: BatchNorm, Dropout, nnx.Rngs (PRNG keys in the state)
    pytest.param("mlp", {"data": 2, "model": 2}, marks=pytest.mark.slow),  # annotations, ZeRO-1
    pytest.param("linen", {"data": 4, "model": 1}, marks=pytest.mark.slow),  # bridged Linen
  ],
)
def test_users_models_compile_and_every_argument_byte_is_attributed(repo_root, name, mesh):
  cfg = C.load_config(repo_root / "tests" / "configs" / "user.py", arg=name)
  topology = aot.parse_topology("v5e-4")
  result = aot.compile_run(cfg, aot.topology_devices(topology), topology)
  assert dict(result.job.mesh.shape) == mesh
  for step in [result.train, *result.evals.values()]:
    mem = step.memory
    assert mem.unattributed == 0 and mem.fits
    assert mem.params + mem.opt_state + mem.batch + mem.other == mem.argument
  if name == "cnn":  # batch statistics and the dropout's RNG key: the state beyond params
    assert result.train.memory.other > 0


@needs_libtpu
def test_collectives_are_counted_per_step_with_loop_trip_counts():
  devices = aot.topology_devices(aot.parse_topology("v5e-4"))
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  col = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))

  def step(a, b):
    def body(c, _):  # a contraction over the sharded dimension: one all-reduce per iteration
      return c + (a * c[0, 0]) @ b, None  # (the carry in it: not hoisted out of the loop)

    return jax.lax.scan(body, jax.numpy.zeros((256, 256)), None, length=6)[0]

  a = jax.ShapeDtypeStruct((256, 1024), np.float32, sharding=col)
  b = jax.ShapeDtypeStruct((1024, 256), np.float32, sharding=row)
  compiled = jax.jit(step).lower(a, b).compile()
  counts = aot.count_collectives(compiled.as_text())
  assert counts["all-reduce"][0] % 6 == 0 and counts["all-reduce"][0] >= 6
  assert counts["all-reduce"][1] == counts["all-reduce"][0] * 256 * 256 * 4
  assert set(counts) == set(aot.COLLECTIVES)


@needs_libtpu
def test_negative_cost_estimate_is_no_estimate(smoke_v5e4):
  _, _, _, result = smoke_v5e4
  broken = aot.CostReport(flops=1e9, bytes_accessed=1e6, raw_seconds=-0.99993)
  assert broken.seconds is None
  result.train.cost, saved = broken, result.train.cost
  try:
    (line,) = [x for x in aot.report_lines(result) if x.startswith("step estimate:")]
    assert aot.mfu(result) is None
  finally:
    result.train.cost = saved
  assert line.startswith("step estimate: unavailable (XLA's cost model gave -0.9999 s, a negative")
  assert "MFU" not in line.replace("no MFU", "") and " ms" not in line


# ------------------------------------------------------------------ errors


@pytest.mark.slow
@needs_libtpu
def test_job_that_does_not_fit_exits_2_with_checked_advice_last(tmp_path):
  workdir = tmp_path / "run"
  out = run_cli("train.compile", "--config=configs/smoke.py", "--topology=v5e-4", DATA,
                *TOO_BIG, f"--workdir={workdir}")  # fmt: skip
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: does not fit: needs 24.00 GiB per chip, 15.75 GiB on a v5e chip;")
  assert "largest consumer: optimizer state 16.00 GiB" in last
  assert re.search(r"int8 moments would save \S+ GiB \(peak \S+ GiB, fits\)", last), last
  assert "ZeRO-1 over data would save" in last
  assert "trying int8 moments" in out.stderr  # each suggestion was compiled
  assert "(DOES NOT FIT)" in out.stdout and lines_with(out.stdout, "step estimate: ")
  assert not workdir.exists()  # nothing saved for a job that does not fit


@needs_libtpu
@pytest.mark.slow
def test_a_job_xla_will_not_compile_at_all_still_gets_its_size_and_advice():
  # 8.6B parameters (the 2^28-row position embedding): 96 GiB a chip, 6x a v5e's HBM.
  big = [a.replace("67108864", "268435456") for a in TOO_BIG]
  out = run_cli("train.compile", "--config=configs/smoke.py", "--topology=v5e-4", DATA, *big)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "per-chip HBM: needs about 96.00 GiB of 15.75 GiB (DOES NOT FIT)" in out.stdout
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(
    "error: does not fit: needs about 96.00 GiB per chip, 15.75 GiB on a v5e chip; XLA:TPU "
    "would not compile the train step at all; int8 moments "
  )
  assert "ZeRO-1 over data still needs about 80.00 GiB (XLA:TPU would not compile it)" in last


@needs_libtpu
def test_a_mesh_that_does_not_map_onto_the_slice_proposes_one(repo_root):
  cfg = C.load_config(repo_root / "configs" / "pod_lm.py", overrides([DATA, *TINY_POD]))
  topology = aot.parse_topology("v6e-64")
  devices = aot.topology_devices(topology)
  with pytest.raises(C.ConfigError) as e:
    aot.build_job(cfg, devices, topology)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(
    "mesh.shape (-1, 16) = {'data': 4, 'fsdp': 16} does not map onto the physical v6e-64 "
    "(8x8 chips): each axis must be a product of whole torus dimensions; try "
    "--config.mesh.shape='(-1, 8)'"
  )
  fixed = aot.variant(cfg, ["mesh.shape=(-1, 8)"])
  assert dict(aot.slice_mesh(fixed.mesh, devices, topology).shape) == {"data": 8, "fsdp": 8}


def test_same_override_errors_as_python_m_train(tmp_path):
  bad = "--config.optimizer.lerning_rate=1e-3"
  compiled, trained, unknown = run_clis(
    ("train.compile", "--config=configs/smoke.py", "--topology=v5e-4", bad),
    ("train", "--config=configs/smoke.py", f"--workdir={tmp_path / 'w'}", bad),
    ("train.compile", "--config=configs/smoke.py", "--topology=v5p-100"),
  )
  assert compiled.returncode == trained.returncode == 2
  last = compiled.stderr.strip().splitlines()[-1]
  assert last == trained.stderr.strip().splitlines()[-1]
  assert (
    last == "error: optimizer.lerning_rate: unknown key; did you mean 'optimizer.learning_rate'?"
  )
  assert unknown.returncode == 2
  assert unknown.stderr.strip().splitlines()[-1].startswith("error: --topology=v5p-100: v5p slices")


def test_without_libtpu_one_line_says_how_to_install_it():
  # This machine's libtpu made invisible to the child, as on a machine without the tpu extra.
  code = (
    "import sys; sys.modules['libtpu'] = None; import runpy; "
    "sys.argv = ['train.compile', '--config=configs/smoke.py', '--topology=v5e-4', "
    f"'{DATA}']; runpy.run_module('train.compile', run_name='__main__')"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
    "error: compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' "
    f"(or pip install 'jax[tpu]=={jax.__version__}')"
  ]


# ------------------------------------------------------------ save and load


@needs_libtpu
def test_saved_steps_fingerprint_matches_the_same_topology_only(smoke_v5e4, tmp_path):
  cfg, topology, devices, result = smoke_v5e4
  record = aot.save_steps(result, tmp_path)
  saved = aot.read_saved(tmp_path)
  assert saved["fingerprint"] == record["fingerprint"]
  files = {n: (tmp_path / "compiled" / e["file"]).read_bytes() for n, e in saved["steps"].items()}
  # The saved bytes are the executables' serialization.
  blob, _, _ = jax.experimental.serialize_executable.serialize(result.train.compiled)
  assert files["train"] == blob
  # Against the same abstract topology, rebuilt from scratch: devices, versions and programs match.
  again = aot.build_job(cfg, aot.topology_devices(topology), topology)
  with sharding.use_mesh(again.mesh):
    programs = {
      "train": aot.program_hash(again.steps.train.lower(again.state, again.batch)),
      "eval": aot.program_hash(again.steps.evals[""].lower(again.state, again.eval_batch)),
    }
  assert aot.saved_mismatch(saved, again.mesh, programs) is None
  # Another config, another program; another topology, other devices.
  other = aot.build_job(smoke_config("--config.optimizer.mu_dtype=bfloat16"), devices, topology)
  with sharding.use_mesh(other.mesh):
    low = other.steps.train.lower(other.state, other.batch)
  reason = aot.saved_mismatch(saved, other.mesh, {"train": aot.program_hash(low)})
  assert reason == "this run's train step is another program"
  v6e = aot.build_job(cfg, aot.topology_devices(aot.parse_topology("v6e-4")))
  assert aot.saved_mismatch(saved, v6e.mesh).startswith(
    "they were compiled for v5e-4 (4 x TPU v5 lite, mesh {'data': 4}); this run has 4 x TPU v6 lite"
  )


def _cpu_state(cfg):
  run = plan.make_plan(cfg)
  dataset = registry.DATASETS.get(run.data.name)(
    run.data, seed=run.trainer.seed, process_index=0, process_count=1
  )
  mesh = sharding.mesh_from_config(run.mesh)
  factory = train_state.registered_state_factory(run, dataset.info)
  shardings = factory.abstract().shardings(mesh, run.mesh)
  batch_sharding = sharding.batch_sharding(mesh, run.mesh)
  steps = train_state.make_run_steps(
    run, registry.MODELS.get(run.model.name).loss, state_sharding=shardings,
    batch_sharding=batch_sharding,
  )  # fmt: skip
  return run, dataset, mesh, factory, shardings, batch_sharding, steps


def test_saved_steps_load_and_run_on_matching_devices(tmp_path):
  # On this machine's CPU devices the executables really load: one step of the
  # loaded train step is the jitted step's, bit for bit.
  cfg = smoke_config()
  aot.save_steps(aot.compile_run(cfg, jax.devices(), details=False), tmp_path)
  run, dataset, mesh, factory, shardings, batch_sharding, steps = _cpu_state(cfg)
  state = factory.create(shardings)
  loaded, message = aot.use_saved_steps(steps, tmp_path, run, mesh, state, batch_sharding, dataset)
  assert message.startswith(f"loaded the compiled train, eval step(s) from {tmp_path / 'compiled'}")
  assert isinstance(loaded.train, jax.stages.Compiled) and loaded.train is not steps.train
  batch = sharding.global_batch(dataset.train_batch(0), mesh, run.mesh)
  ours, metrics = loaded.train(state, batch)
  theirs, expected = steps.train(factory.create(shardings), batch)
  for a, b in zip(
    jax.tree.leaves((ours, metrics)), jax.tree.leaves((theirs, expected)), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  evaluated = loaded.evals[""](
    ours, sharding.global_batch(dataset.eval_batches(1)[0], mesh, run.mesh)
  )
  assert np.isfinite(float(evaluated["loss"]))


@pytest.mark.slow
def test_python_m_train_loads_the_compiled_steps_and_trains_the_same(tmp_path):
  args = ["--config=configs/smoke.py", DATA, "--config.trainer.num_steps=20"]
  cfg = smoke_config(*args[1:])
  compiled_dir = tmp_path / "with"
  aot.save_steps(aot.compile_run(cfg, jax.devices(), details=False), compiled_dir)
  with_compiled = run_cli("train", *args, f"--workdir={compiled_dir}")
  plain = run_cli("train", *args, f"--workdir={tmp_path / 'without'}")
  assert with_compiled.returncode == plain.returncode == 0, with_compiled.stderr[-2000:]
  assert "loaded the compiled train, eval step(s) from" in with_compiled.stdout
  assert "no compilation" in with_compiled.stdout and "loaded the compiled" not in plain.stdout

  def losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in rows]

  assert losses(compiled_dir) == losses(tmp_path / "without")
  # The same workdir with a changed config compiles, saying why.
  again = run_cli("train", *args, "--config.trainer.num_steps=30",
                  "--config.trainer.allow_config_change=True", f"--workdir={compiled_dir}")  # fmt: skip
  assert again.returncode == 0, again.stderr[-2000:]
  assert "holds compiled steps, not used: this run's train step is another program" in again.stdout


# ------------------------------------------------------------ pod_lm, slices, compare


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize(
  "topology, slices, chips, mesh",
  [
    ("v5p-32", 1, 16, {"data": 1, "fsdp": 16}),
    ("v5e-16", 1, 16, {"data": 1, "fsdp": 16}),
    ("v5e-16", 2, 16, {"data": 2, "fsdp": 16}),
  ],
)
def test_cli_pod_lm_on_topologies_and_slices(topology, slices, chips, mesh):
  kind = "TPU v5" if topology.startswith("v5p") else "TPU v5 lite"
  out = run_cli("train.compile", "--config=configs/pod_lm.py", f"--topology={topology}",
                f"--num_slices={slices}", DATA, *TINY_POD)  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  assert lines_with(
    out.stdout, f"topology {topology}: {chips} chips ({kind}), {slices} slice(s), mesh {mesh}"
  )
  assert re.search(r"^per-chip HBM: .* \(fits\)$", out.stdout, re.M)
  (coll,) = lines_with(out.stdout, "collectives per step: ")
  counts = dict(re.findall(r"(all-reduce|all-gather|collective-permute) (\d+)", coll))
  # FSDP gathers the params (all-gather, or collective-permute on TPU) every step.
  assert int(counts["all-gather"]) + int(counts["collective-permute"]) > 0


@needs_libtpu
@pytest.mark.slow
def test_two_slices_put_the_data_axis_across_slices(repo_root):
  cfg = C.load_config(repo_root / "configs" / "pod_lm.py", overrides([DATA, *TINY_POD]))
  topology = aot.parse_topology("v5e-16", num_slices=2)
  job = aot.build_job(cfg, aot.topology_devices(topology), topology)
  grid = job.mesh.devices  # (data, fsdp)
  assert grid.shape == (2, 16)
  assert [{d.slice_index for d in row} for row in grid] == [{0}, {1}]
  result = aot.compile_job(job, topology, evals=False)
  assert result.train.memory.fits


@needs_libtpu
@pytest.mark.slow
def test_compare_tabulates_formats_and_shardings(smoke_v5e4):
  cfg, topology, devices, result = smoke_v5e4
  rows = aot.compare(cfg, result, devices)
  assert [(s, f) for s, f, _ in rows] == [
    (s, f) for s in ("config", "ZeRO-1", "FSDP") for f, _ in aot.FORMATS
  ]
  table = aot.compare_table(rows, topology.usable_hbm_bytes)
  assert table[0].startswith("| sharding | state format | peak GiB per chip (of 15.75) | fits |")
  assert len(table) == 2 + len(rows)
  peak = {(s, f): t.peak for s, f, t in rows}
  assert all(t.fits and t.peak for _, _, t in rows)
  for s in ("config", "ZeRO-1"):  # smaller state formats, smaller peaks
    assert peak[(s, "bf16 params + int8 moments")] < peak[(s, "bf16 mu")] < peak[(s, "float32")]
  assert peak[("ZeRO-1", "float32")] < peak[("config", "float32")]
  # (FSDP's all-gathered params outweigh a model this small: its rows only have to compile.)


@needs_libtpu
@pytest.mark.slow
def test_cli_compare_prints_one_table():
  out = run_cli("train.compile", "--config=configs/smoke.py", "--topology=v5e-4", DATA, "--compare")
  assert out.returncode == 0, out.stderr[-2000:]
  table = [line for line in out.stdout.splitlines() if line.startswith("|")]
  assert len(table) == 2 + 12 and "| FSDP | bf16 params + int8 moments |" in out.stdout
