"""Models written the way users write them, trained through ``python -m train``.

Each model of tests/user_models.py (an NNX CNN with BatchNorm, Dropout and
an ``nnx.Rngs`` in the module; an NNX MLP with sharding annotations on a 2x2
mesh with ZeRO-1; a Linen transformer with logical partitioning and dropout
through the bridge) is trained from a config on 4 forced CPU devices,
killed with SIGKILL after a checkpoint, resumed, compared bitwise with an
uninterrupted run, then restored onto a one-device mesh and trained on.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from adamw_flax import checkpoint, plan, reporting, train_state
from adamw_flax.config import load_config
from tests.conftest import ROOT, subprocess_env

CONFIG = ROOT / "tests" / "configs" / "user.py"


def _env(devices: int, **extra: str) -> dict[str, str]:
  return subprocess_env(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra
  )


def train_cmd(name: str, workdir: Path, *overrides: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "train",
    f"--config={CONFIG}:{name}",
    f"--workdir={workdir}",
    *(f"--config.{o}" for o in overrides),
  ]


def run_train(name, workdir, *overrides, devices=4, timeout=300, **env):
  return subprocess.run(
    train_cmd(name, workdir, *overrides),
    cwd=ROOT,
    env=_env(devices, **env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _params(workdir: Path) -> list[np.ndarray]:
  model = checkpoint.restore_params(workdir)
  from flax import nnx

  return [_host(x) for x in jax.tree.leaves(nnx.state(model))]


def _host(x) -> np.ndarray:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _kill_after_checkpoint(name: str, workdir: Path, step: int) -> None:
  """Starts a run that stalls at batch ``step + 2``, waits for checkpoint ``step``, SIGKILLs it."""
  proc = subprocess.Popen(
    train_cmd(name, workdir),
    cwd=ROOT,
    env=_env(4, USER_MODELS_SLEEP_AT=str(step + 2)),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    deadline = time.monotonic() + 240
    rows = workdir / "metrics.jsonl"
    while time.monotonic() < deadline:
      done = (workdir / "checkpoints" / str(step)).is_dir()
      logged = rows.exists() and any(
        r.get("step", 0) > step for r in reporting.read_metrics(rows) if r["split"] == "train"
      )
      if done and logged:
        break
      if proc.poll() is not None:
        pytest.fail(f"the run ended before it was killed:\n{proc.stdout.read()}")
      time.sleep(0.1)
    else:
      pytest.fail("no checkpoint to kill after")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  assert (workdir / ".lock").exists()  # left behind by the killed process


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "mlp", "linen"])
def test_user_model_trains_is_killed_resumes_exactly_and_reshards(name, tmp_path):
  whole = run_train(name, tmp_path / "whole")
  assert whole.returncode == 0, whole.stderr
  assert "step 8:" in whole.stdout

  split = tmp_path / "split"
  _kill_after_checkpoint(name, split, 4)
  resumed = run_train(name, split)
  assert resumed.returncode == 0, resumed.stderr
  assert "taking over the lock" in resumed.stdout
  assert "resumed from step 4" in resumed.stdout
  for a, b in zip(_params(tmp_path / "whole"), _params(split), strict=True):
    np.testing.assert_array_equal(a, b)  # bitwise, dropout and batch statistics included
  rows = reporting.read_metrics(split / "metrics.jsonl")
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))  # once each

  # Onto another mesh: one device, the model axis of size 1.
  shape = "mesh.shape=(-1, 1)" if name != "cnn" else "mesh.shape=(-1,)"
  more = run_train(
    name, split, shape, "trainer.num_steps=10", "trainer.allow_config_change=True", devices=1
  )
  assert more.returncode == 0, more.stderr
  assert "resumed from step 8" in more.stdout and "step 10:" in more.stdout
  assert json.loads((split / "config.json").read_text())["trainer"]["num_steps"] == 10


def _abstract(name: str, mesh: AbstractMesh):
  run = plan.make_plan(load_config(CONFIG, arg=name))
  info = {"cnn": {"classes": 4}, "mlp": {"features": 8}, "linen": {"vocab": 16, "length": 8}}
  factory = train_state.registered_state_factory(run, info[name])
  state = factory.abstract()
  return run, factory, state, state.shardings(mesh, run.mesh)


def test_annotations_map_to_the_mesh_and_zero1_shards_the_moments():
  mesh = AbstractMesh((2, 2), ("data", "model"))
  _, _, _, shardings = _abstract("mlp", mesh)
  specs = jax.tree.map(lambda s: s.spec, shardings.params)
  assert specs["up"]["kernel"] == P(None, "model")  # logical "mlp" -> "model"
  assert specs["up"]["bias"] == P("model")
  assert specs["w_out"] == P("model", None)  # out_sharding in mesh names
  assert specs["b_out"] == P()
  mu = shardings.opt_state[0].mu  # ZeRO-1: moments also over "data"
  assert mu["up"]["kernel"].spec == P("data", "model")
  assert mu["w_out"].spec == P("model", None)  # (1 column: "data" does not divide it)


def test_linen_model_types_reach_the_default_mask():
  run, factory, state, _ = _abstract("linen", AbstractMesh((4, 1), ("data", "model")))
  from adamw_flax import masks

  values = masks.path_values(factory.target, run.optimizer.decay_rules)
  decayed = sorted(p for p, v in values.items() if v)
  assert decayed and all(p.endswith("/kernel") for p in decayed)
  assert values["Embed_0/embedding"] is False
  assert all(v is False for p, v in values.items() if "LayerNorm" in p)
  # The bridge keeps its RNG streams as state; the report counts their bytes.
  assert state.device_bytes()["rest"] > 0


def test_module_rngs_advance_and_dropout_differs_between_steps():
  run, factory, _, _ = _abstract("cnn", AbstractMesh((1,), ("data",)))
  from tests import user_models

  state = factory.create()
  step = train_state.make_train_step(user_models.classification_loss, donate=False)
  data = user_models.Images(run.data, seed=0, process_index=0, process_count=1)
  batch = data.train_batch(0)
  counts = lambda s: [
    int(x) for x in map(_host, jax.tree.leaves(s.rest)) if x.dtype == np.uint32 and x.ndim == 0
  ]
  s1, m1 = step(state, batch)
  s2, m2 = step(s1.replace(params=state.params, opt_state=state.opt_state), batch)
  assert counts(s2) != counts(s1) != counts(state)  # the module's stream moved on
  assert float(m1["loss"]) != float(m2["loss"])  # same params and batch, other dropout masks


def test_ema_and_spike_state_shard_like_the_params_under_zero1():
  run = plan.make_plan(
    load_config(CONFIG, ["trainer.ema_decay=0.9", "optimizer.skip_spikes=True"], arg="mlp")
  )
  factory = train_state.registered_state_factory(run, {"features": 8})
  shardings = factory.abstract().shardings(AbstractMesh((2, 2), ("data", "model")), run.mesh)
  assert shardings.extra.ema["up"]["kernel"].spec == P("data", "model")
  assert shardings.extra.spikes.loss.spec == P()
