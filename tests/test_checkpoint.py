"""Checkpoints on disk: exact round trips, keep policies, mismatch errors, other meshes, crashes.

Every test writes real Orbax checkpoints under ``tmp_path``. The tests marked
``slow`` run child processes (tests/ckpt_worker.py): other device counts,
SIGKILL during asynchronous saves, SIGTERM, and two ``jax.distributed``
processes agreeing on a preemption step.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from adamw_flax import checkpoint, registry, train_state, transform, watchdog
from tests import ckpt_worker as worker
from tests.conftest import ROOT, subprocess_env

INFO = worker.DATA_INFO


def _trained(cfg, steps: int = 2):
  """The tiny model's state after ``steps`` jitted, donating train steps."""
  state = train_state.state_from_config(cfg, INFO)
  step_fn = train_state.make_train_step(registry.MODELS.get(cfg.model.name).loss)
  for step in range(steps):
    state, _ = step_fn(state, worker.batch(step))
  return state


@pytest.fixture(scope="module")
def trained():
  """The tiny model trained 2 steps (bfloat16 mu, RNG state): compiled once for the module.

  The checkpoint section of the config does not change the state, so tests
  that vary it share this state.
  """
  return _trained(worker.tiny_config())


def _leaves(state) -> list[tuple[str, Any]]:
  out = []
  for field in checkpoint.ARRAY_FIELDS:
    for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(state, field))[0]:
      out.append((field + jax.tree_util.keystr(path), leaf))
  return out


def _assert_bitwise_equal(a, b) -> None:
  la, lb = _leaves(a), _leaves(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb, strict=True):
    assert x.dtype == y.dtype, f"{path}: {x.dtype} != {y.dtype}"
    assert x.shape == y.shape, path
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(x) == jax.random.key_impl(y), path
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), f"{path} differs"


def _tree_snapshot(path: Path) -> dict[str, tuple[int, int]]:
  return {
    str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
  }


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize(
  "overrides",
  [
    {"checkpoint.async_save": True},
    {
      "checkpoint.async_save": False,
      "optimizer.schedule": "warmup_cosine",
      "optimizer.warmup_steps": 2,
      "optimizer.accumulate_steps": 2,
      "optimizer.skip_nonfinite": True,
      "optimizer.grad_clip_norm": 1.0,
      "optimizer.nu_dtype": "bfloat16",
      "optimizer.freeze": "inp/*=true",
    },
  ],
  ids=["async-bf16-mu", "sync-schedule-multisteps-frozen"],
)
def test_roundtrip_is_bitwise_with_dtypes(tmp_path, overrides, trained):
  cfg = worker.tiny_config(**overrides)
  state = trained if overrides.keys() == {"checkpoint.async_save"} else _trained(cfg, steps=1)
  dtypes = {str(x.dtype) for _, x in _leaves(state)}
  assert {"bfloat16", "int32", "uint32", "key<fry>"} <= dtypes
  with checkpoint.Checkpoints(tmp_path, cfg, data_info=INFO) as ckpts:
    assert ckpts.save(state, data_state={"step": 2, "epoch": 0})
    target = train_state.state_from_config(cfg, INFO, abstract=True)
    restored, data_state = ckpts.restore(target)
  assert data_state == {"step": 2, "epoch": 0}
  assert restored.spec is target.spec
  _assert_bitwise_equal(state, restored)


def test_meta_holds_config_versions_and_fingerprint(tmp_path, trained):
  cfg = worker.tiny_config()
  checkpoint.save_state(tmp_path, trained, cfg, data_info=INFO, step=7)
  with checkpoint.Checkpoints(tmp_path, cfg, data_info=INFO) as ckpts:
    meta = ckpts.meta()
  assert meta["step"] == 7
  assert meta["config"]["model"]["name"] == "tests.ckpt_models:ckpt_tiny"
  assert meta["data_info"] == INFO
  assert set(meta["versions"]) >= {"jax", "flax", "optax", "orbax-checkpoint", "adamw_flax"}
  fp = meta["fingerprint"]
  assert fp["optimizer"]["optimizer"] == "adamw"
  assert fp["optimizer"]["learning_rate"] == "scalar"
  assert fp["optimizer"]["weight_decay"] == "scalar"
  assert fp["optimizer"]["weight_decay_mask"] == "default"
  assert "ScaleByAdamState(count=int32, mu={" in fp["optimizer"]["opt_state"]
  assert ["opt_state/0/mu/inp/kernel", "bfloat16[8,16]"] in fp["entries"]
  assert ["rest/drop/rngs/key", "key<fry>[]"] in fp["entries"]


def test_restore_state_and_params_need_only_the_directory(tmp_path, trained):
  cfg, state = worker.tiny_config(), trained
  checkpoint.save_state(tmp_path / "checkpoints", state, cfg, data_info=INFO)
  # a workdir holding checkpoints/ works as well as the checkpoint root
  restored = checkpoint.restore_state(tmp_path)
  _assert_bitwise_equal(state, restored)
  model = checkpoint.restore_params(tmp_path / "checkpoints", step=2)
  assert isinstance(model, nnx.Module)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  for (p, a), b in zip(
    jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(params), strict=True
  ):
    assert np.array_equal(a, b), jax.tree_util.keystr(p)


def test_save_state_refuses_an_existing_step(tmp_path, trained):
  cfg = worker.tiny_config()
  checkpoint.save_state(tmp_path, trained, cfg, data_info=INFO)
  with pytest.raises(FileExistsError, match="step 2 is already checkpointed"):
    checkpoint.save_state(tmp_path, trained, cfg, data_info=INFO)


# ------------------------------------------------------------------ policies


def _save_steps(directory, cfg, state, losses=None, n=5):
  with checkpoint.Checkpoints(directory, cfg, data_info=INFO) as ckpts:
    for step in range(1, n + 1):
      metrics = None if losses is None else {"loss": losses[step - 1], "accuracy": 0.5}
      assert ckpts.save(state, data_state={"step": step}, metrics=metrics, step=step)
    ckpts.wait()
    kept, best = ckpts.all_steps(), ckpts.best_step()
  on_disk = sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())
  assert on_disk == kept
  return kept, best


def test_keep_last_k(tmp_path, trained):
  cfg = worker.tiny_config(**{"checkpoint.keep": 2, "checkpoint.async_save": True})
  kept, _ = _save_steps(tmp_path, cfg, trained)
  assert kept == [4, 5]


@pytest.mark.parametrize("mode,best", [("min", 2), ("max", 1)])
def test_keep_best_by_metric_and_the_latest(tmp_path, mode, best, trained):
  cfg = worker.tiny_config(
    **{"checkpoint.keep": 1, "checkpoint.keep_best_by": "loss", "checkpoint.best_mode": mode}
  )
  kept, best_step = _save_steps(tmp_path, cfg, trained, losses=[5.0, 1.0, 4.0, 3.0, 2.0])
  assert kept == sorted({best, 5})  # the best one, and the latest for resuming
  assert best_step == best


def test_keep_best_needs_the_metric(tmp_path, trained):
  cfg = worker.tiny_config(**{"checkpoint.keep_best_by": "loss"})
  with checkpoint.Checkpoints(tmp_path, cfg, data_info=INFO) as ckpts:
    with pytest.raises(KeyError, match="metrics have no 'loss'"):
      ckpts.save(trained, data_state={}, metrics={"accuracy": 1.0}, force=True)


def test_keep_period(tmp_path, trained):
  cfg = worker.tiny_config(**{"checkpoint.keep": 1, "checkpoint.keep_period": 2})
  kept, _ = _save_steps(tmp_path, cfg, trained)
  assert kept == [2, 4, 5]


def test_should_save_every_steps_and_force(tmp_path, trained):
  cfg = worker.tiny_config(**{"checkpoint.every_steps": 3, "checkpoint.async_save": False})
  state = trained
  with checkpoint.Checkpoints(tmp_path, cfg, data_info=INFO) as ckpts:
    assert [s for s in range(1, 10) if ckpts.should_save(s)] == [3, 6, 9]
    assert not ckpts.save(state, data_state={}, step=4)  # not due
    assert ckpts.save(state, data_state={}, step=3)
    assert not ckpts.should_save(3)  # already saved
    assert not ckpts.save(state, data_state={}, step=3, force=True)  # never overwritten
    assert ckpts.save(state, data_state={}, step=4, force=True)
    assert ckpts.all_steps() == [3, 4]
  cfg.checkpoint.every_steps = 0
  with checkpoint.Checkpoints(tmp_path / "b", cfg, data_info=INFO) as ckpts:
    assert not any(ckpts.should_save(s) for s in range(1, 10))


# ------------------------------------------------------------------ mismatches


def _wd_schedule_adamw(cfg, *, learning_rate, weight_decay_mask):
  return transform.adamw(
    learning_rate,
    mu_dtype=cfg.mu_dtype,
    weight_decay=optax.constant_schedule(cfg.weight_decay),
    mask=weight_decay_mask,
  )


@pytest.mark.parametrize(
  "change,expected",
  [
    (
      {"optimizer.mu_dtype": "float32"},
      [
        "'opt_state/0/mu/bn/bias': the checkpoint has bfloat16[16], this run expects float32[16]",
        "mu_dtype: 'bfloat16' -> 'float32'",
      ],
    ),
    (
      {"model.hidden": 32},
      [
        "'params/bn/bias': the checkpoint has float32[16], this run expects float32[32]",
        "model.hidden 16 → 32",
      ],
    ),
    (
      {"optimizer.name": "ckpt_wd_schedule"},
      [
        "'opt_state/1/inner_state': the checkpoint has EmptyState, this run expects "
        "WeightDecaySchedule",
        "weight_decay: 'scalar' -> 'schedule'",
      ],
    ),
    (
      {"optimizer.schedule": "warmup_cosine", "optimizer.warmup_steps": 5},
      [
        "'opt_state/2': the checkpoint has EmptyState, this run expects ScaleByScheduleState",
        "learning_rate: 'scalar' -> 'schedule'",
      ],
    ),
  ],
  ids=["mu-dtype", "model-shape", "wd-scalar-to-schedule", "lr-scalar-to-schedule"],
)
def test_mismatch_names_first_path_and_change_and_writes_nothing(
  tmp_path, change, expected, trained
):
  cfg = worker.tiny_config()
  checkpoint.save_state(tmp_path, trained, cfg, data_info=INFO)
  before = _tree_snapshot(tmp_path)
  new_cfg = worker.tiny_config(**change)
  with registry.OPTIMIZERS.override("ckpt_wd_schedule", _wd_schedule_adamw):
    target = train_state.state_from_config(new_cfg, INFO, abstract=True)
    with checkpoint.Checkpoints(tmp_path, new_cfg, data_info=INFO) as ckpts:
      with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        ckpts.restore(target)
    with pytest.raises(checkpoint.CheckpointMismatchError):
      checkpoint.restore_state(tmp_path, config=new_cfg)
  message = str(err.value)
  assert f"checkpoint {tmp_path}/2 does not fit" in message and "\n" not in message  # one line
  message += " " + getattr(err.value, "details", "")  # the first difference: --verbosity=1
  for text in expected:
    assert text in message
  assert _tree_snapshot(tmp_path) == before


def test_missing_or_empty_directory(tmp_path, trained):
  missing = tmp_path / "nope"
  for fn in (checkpoint.restore_state, checkpoint.restore_params):
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory '{missing}' does not exist"):
      fn(missing)
  assert not missing.exists()  # a failed restore creates nothing
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=f"no complete checkpoint in '{empty}'"):
    checkpoint.restore_state(empty)
  cfg = worker.tiny_config()
  with checkpoint.Checkpoints(empty, cfg, data_info=INFO) as ckpts:
    assert ckpts.latest_step() is None
    with pytest.raises(FileNotFoundError, match=f"no complete checkpoint in '{empty}'"):
      ckpts.restore(train_state.state_from_config(cfg, INFO, abstract=True))
  checkpoint.save_state(empty, trained, cfg, data_info=INFO)
  with pytest.raises(FileNotFoundError, match=r"of step 5 .* complete steps: \[2\]"):
    checkpoint.restore_state(empty, step=5)


def test_stale_tmp_dir_is_ignored_logged_and_cleaned(tmp_path, caplog, trained):
  cfg = worker.tiny_config(**{"checkpoint.async_save": False})
  checkpoint.save_state(tmp_path, trained, cfg, data_info=INFO, step=1)
  # What a crash in the middle of saving step 2 leaves behind: its items
  # under the temporary name, never renamed to "2".
  stale = tmp_path / "2.orbax-checkpoint-tmp"
  stale.mkdir()
  for item in (tmp_path / "1").iterdir():
    if item.is_dir():
      (stale / item.name).mkdir()
  restored = checkpoint.restore_state(tmp_path)  # reads, never cleans
  assert int(restored.step) == 2 and stale.exists()
  with pytest.raises(FileNotFoundError, match="1 incomplete save"):
    checkpoint.restore_state(tmp_path, step=2)
  with caplog.at_level(logging.WARNING, logger="adamw_flax"):
    ckpts = checkpoint.Checkpoints(tmp_path, cfg, data_info=INFO)
  assert "removing 1 incomplete checkpoint(s)" in caplog.text
  assert "2.orbax-checkpoint-tmp" in caplog.text
  assert ckpts.latest_step() == 1
  assert ckpts.save(restored.replace(step=restored.step + 1), data_state={"step": 2}, step=2)
  ckpts.close()
  assert not stale.exists()
  assert int(checkpoint.restore_state(tmp_path).step) == 3


@pytest.mark.parametrize("content", [b"", b'{"loss": 1.', b"[1.0]"], ids=["empty", "cut", "list"])
def test_an_unreadable_metrics_file_is_noted_and_its_step_refused(tmp_path, content, trained):
  cfg = worker.tiny_config(**{"checkpoint.keep_best_by": "loss", "checkpoint.async_save": False})
  _save_steps(tmp_path, cfg, trained, losses=[3.0, 2.0], n=2)
  (tmp_path / "2" / "metrics" / "metrics").write_bytes(content)
  with checkpoint.CheckpointReader(tmp_path) as reader:  # Orbax alone raised while opening
    assert reader.all_steps() == [1, 2] and reader.metrics(2) is None
    assert reader.best_step("loss") == 1
  checkpoint.restore_state(tmp_path, step=2)  # a reader still reads the state
  target = train_state.state_from_config(cfg, INFO, abstract=True)
  with checkpoint.Checkpoints(tmp_path, cfg, data_info=INFO) as ckpts:
    assert list(ckpts.unreadable_steps()) == [2]
    with pytest.raises(ValueError, match=f"{tmp_path / '2' / 'metrics'}: "):
      ckpts.restore(target)  # the trainer moves it aside, as any damaged step
    assert ckpts.restore(target, step=1)[1] == {"step": 1}


@pytest.mark.parametrize("async_save", [False, True])
def test_on_commit_hears_of_each_saved_step_once_it_is_complete(tmp_path, async_save, trained):
  cfg = worker.tiny_config(**{"checkpoint.async_save": async_save})
  heard = []
  with checkpoint.Checkpoints(tmp_path, cfg, data_info=INFO) as ckpts:
    ckpts.on_commit.append(lambda step: heard.append((step, (tmp_path / str(step)).is_dir())))
    for step in (1, 2):
      assert ckpts.save(trained, data_state={}, step=step, force=True)
    assert not ckpts.save(trained, data_state={}, step=2, force=True)  # already saved: no news
  assert heard == [(1, True), (2, True)]


def test_newest_config_is_the_newest_readable_steps(tmp_path, trained):
  assert checkpoint.newest_config(tmp_path / "none") is None
  for step, seed in ((1, 0), (2, 7)):
    cfg = worker.tiny_config(**{"trainer.seed": seed})
    checkpoint.save_state(tmp_path, trained, cfg, data_info=INFO, step=step)
  step, saved = checkpoint.newest_config(tmp_path)
  assert step == 2 and saved["trainer"]["seed"] == 7
  (tmp_path / "2" / "meta" / "metadata").write_bytes(b"")
  assert checkpoint.newest_config(tmp_path)[0] == 1


def test_wait_raises_the_error_of_a_background_save(tmp_path, trained):
  cfg = worker.tiny_config(**{"checkpoint.async_save": True})
  heard = []
  with checkpoint.Checkpoints(tmp_path, cfg, data_info=INFO) as ckpts:
    ckpts.on_commit.append(heard.append)
    for step in (5, 6, 7):
      assert ckpts.save(trained, data_state={}, step=step, force=True)
      # While the step is written under its temporary name, occupy its final
      # name: the commit (a rename) fails in Orbax's background thread.
      (tmp_path / str(step) / "blocker").mkdir(parents=True)
      try:
        ckpts.wait()
      except FileExistsError as e:
        assert f"{tmp_path / str(step)} already exists" in str(e)
        ckpts.wait()
        assert step not in heard  # a failed save is never told as complete
        break
      # (the commit won the race against mkdir: try the next step)
    else:
      pytest.fail("no background save failed")


def test_sigterm_sets_the_trainers_flag_in_one_process(tmp_path):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers can only be installed from the main thread")
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.Checkpoints(tmp_path, worker.tiny_config(), data_info=INFO) as ckpts:
    assert signal.getsignal(signal.SIGTERM) == before  # checkpoints install no handler
    flag = watchdog.StopSignals(announce=False)
    flag.install()
    assert not flag.is_set() and not ckpts.reached_preemption(1)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not flag.is_set() and time.monotonic() < deadline:
      time.sleep(0.01)  # the listener thread reads the signal from the wakeup fd
    assert flag.is_set()
    flag.uninstall()
  assert signal.getsignal(signal.SIGTERM) == before  # uninstall() hands SIGTERM back


# ------------------------------------------------------------------ processes


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory) -> dict[str, str]:
  """Child-process environment; a shared JAX compilation cache spares recompiling each run."""
  return subprocess_env(
    JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def _run_worker(env: dict[str, str], *args: str, devices: int = 1, timeout: float = 120) -> str:
  env = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  proc = subprocess.run(
    [sys.executable, "-m", "tests.ckpt_worker", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _parse(stdout: str, tag: str) -> list[list[str]]:
  return [line.split()[1:] for line in stdout.splitlines() if line.startswith(tag + " ")]


@pytest.mark.slow
def test_restore_onto_other_device_counts(tmp_path, worker_env):
  """Checkpoints written on 1, 4 and 8 devices restore onto each other's meshes.

  Each saving run is its own process with that many (host) devices; the
  8-device process restores its own checkpoint onto a mesh of 4 of its
  devices (a process with 4 devices would read the same shards).
  """
  c1, c4, c8 = (str(tmp_path / f"c{n}") for n in (1, 4, 8))
  saved = {c1: worker.mesh(c1, [], n_devices=1)["saved"]}
  out = _run_worker(worker_env, "mesh", c4, c1, devices=4)  # 1 -> 4
  saved[c4] = _parse(out, "SAVED")[0][0]
  restored = _parse(out, "RESTORED")
  out = _run_worker(worker_env, "mesh", c8, c4, c1, c8 + "@4", devices=8)  # 4 -> 8, 1 -> 8, 8 -> 4
  saved[c8] = _parse(out, "SAVED")[0][0]
  restored += _parse(out, "RESTORED")
  local = worker.mesh(None, [c8, c4], n_devices=1)["restored"]  # 8 -> 1, 4 -> 1
  restored += [list(r) for r in local.items()]
  assert [spec for spec, _ in restored] == [c1, c4, c1, c8 + "@4", c8, c4]
  for spec, h in restored:
    assert h == saved[spec.split("@")[0]], f"{spec} restored other values"
  # The runs trained on different meshes and their states differ: the hashes
  # above tell which checkpoint each restore read.
  assert len(set(saved.values())) == 3


class _Worker:
  """A ``train`` child process whose stdout is read line by line."""

  def __init__(self, env: dict[str, str], directory: Path, num_steps: int, sleep: float = 0.0):
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "tests.ckpt_worker", "train", str(directory), str(num_steps)]
      + (["--sleep", str(sleep)] if sleep else []),
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.lines: list[str] = []

  def read_until(self, tag: str, step: int | None = None) -> list[str]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      line = self.proc.stdout.readline()
      if not line:
        raise AssertionError(f"worker ended before {tag} {step}: {self.proc.stderr.read()[-3000:]}")
      self.lines.append(line)
      parts = line.split()
      if parts and parts[0] == tag and (step is None or int(parts[1]) >= step):
        return parts
    raise AssertionError(f"no {tag} {step} within 120 s")

  def hashes(self) -> dict[int, str]:
    return {int(p[1]): p[3] for p in (line.split() for line in self.lines) if p[0] == "STEP"}


@pytest.mark.slow
def test_sigkill_during_async_saves_then_sigterm(tmp_path, worker_env):
  """Kills a run saving every step asynchronously, twice; resumes each time; then SIGTERMs it."""
  directory = tmp_path / "ckpt"
  hashes: dict[int, str] = {}
  resumed_at = 0
  interrupted = []
  for kill_at, delay in ((3, 0.0), (3, 0.05)):
    run = _Worker(worker_env, directory, num_steps=1000)
    if resumed_at:
      _, step, _, h = run.read_until("RESUMED")
      assert int(step) == resumed_at and h == hashes[resumed_at]
    saving = int(run.read_until("SAVING", resumed_at + kill_at)[1])
    time.sleep(delay)
    run.proc.kill()
    run.proc.wait()
    run.lines += run.proc.stdout.readlines()
    for step, h in run.hashes().items():  # a resumed run repeats the same states exactly
      assert hashes.setdefault(step, h) == h, f"step {step} differs after resuming"
    tmp_dirs = list(directory.glob("*.orbax-checkpoint-tmp*"))
    # The last complete step is what restores, exactly as it was trained.
    restored = checkpoint.restore_state(directory)
    resumed_at = int(restored.step)
    assert 1 <= resumed_at <= max(run.hashes())
    assert worker.state_hash(restored) == hashes[resumed_at]
    interrupted.append(bool(tmp_dirs) or resumed_at < saving)
  # Saves run back to back, so a kill nearly always lands in one (leaving its
  # temporary directory, or nothing, and an older step complete); between
  # two saves (after one's commit, before the next starts) is a short window.
  assert any(interrupted)

  run = _Worker(worker_env, directory, num_steps=1000, sleep=0.05)
  _, step, _, h = run.read_until("RESUMED")
  assert int(step) == resumed_at and h == hashes[resumed_at]
  run.read_until("STEP", resumed_at + 2)
  run.proc.send_signal(signal.SIGTERM)
  preempted_at = int(run.read_until("PREEMPTED")[1])
  assert run.proc.wait(timeout=60) == 0
  assert preempted_at >= resumed_at + 2
  for step, h in run.hashes().items():
    assert hashes.setdefault(step, h) == h
  assert not list(directory.glob("*.orbax-checkpoint-tmp*"))
  restored = checkpoint.restore_state(directory)
  assert int(restored.step) == preempted_at
  assert worker.state_hash(restored) == hashes[preempted_at]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_on_the_preemption_step(tmp_path, worker_env):
  directory, port = tmp_path / "ckpt", str(_free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.ckpt_worker", "multiproc", str(directory), port, str(i)],
      cwd=ROOT,
      env=worker_env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in (0, 1)
  ]
  try:
    for proc in procs:
      for line in proc.stdout:
        if line.startswith("READY"):
          break
      else:
        raise AssertionError(proc.stderr.read()[-3000:])
    time.sleep(0.2)
    os.kill(procs[1].pid, signal.SIGTERM)  # only one process is told
    outs = [proc.communicate(timeout=60) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert [proc.returncode for proc in procs] == [0, 0], [err[-3000:] for _, err in outs]
  steps = [_parse(out, "PREEMPTED")[0][0] for out, _ in outs]
  assert steps[0] == steps[1]
  assert sorted(p.name for p in directory.iterdir()) == [steps[0]]
  restored = checkpoint.restore_state(directory)
  expected = train_state.state_from_config(worker.tiny_config(), INFO)
  _assert_bitwise_equal(expected, restored)
