"""The workdir survives bad input and crashes: short errors (status 2), nothing lost or overwritten.

A table of bad configs and command-line overrides runs through the command
line's own entry (``train.cli.train``, what ``python -m train`` calls after
parsing flags) against a workdir holding a finished run: each exits with 2,
prints at most three lines naming the key, and leaves every file as it was.
The faults of a workdir (a failed start, a second trainer, corrupt
checkpoints, a read-only or file workdir) run through ``python -m train`` or
the trainer itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adamw_flax import checkpoint, reporting
from tests.conftest import ROOT, subprocess_env
from train import cli

CONFIG = ROOT / "tests" / "configs" / "user.py"
CNN = f"{CONFIG}:cnn"


def snapshot(root: Path) -> dict[str, str]:
  """Every file under ``root`` with its content hash (mtimes change on a rewrite of equal bytes)."""
  out = {}
  for path in sorted(root.rglob("*")):
    if path.is_file():
      out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("finished") / "run"
  assert cli.train(CNN, str(workdir), [], verbose=False) == 0
  return workdir


# (overrides, text the message must hold: the key it names)
BAD = [
  (["optimizer.lerning_rate=1e-3"], "optimizer.lerning_rate: unknown key; did you mean"),
  (["optimizerr.b1=0.9"], "optimizerr: unknown section; did you mean 'optimizer'"),
  (["optimizer.b1=1.5"], "optimizer.b1: must be in [0, 1)"),
  (["optimizer.b2=-0.1"], "optimizer.b2: must be in [0, 1)"),
  (["optimizer.learning_rate=0"], "optimizer.learning_rate: must be > 0"),
  (["optimizer.learning_rate=fast"], "optimizer.learning_rate: cannot read 'fast' as float"),
  (["optimizer.schedule=cosine"], "optimizer.schedule: must be one of"),
  (
    ["optimizer.schedule=warmup_cosine", "optimizer.warmup_steps=8"],
    "optimizer.warmup_steps: (8) must be < the schedule's length",
  ),
  (["optimizer.mu_dtype=float8"], "optimizer.mu_dtype: must be None or one of"),
  (["optimizer.weight_decay_mode=decoupled"], "optimizer.weight_decay_mode: must be"),
  (["optimizer.nu_dtype=int4"], "optimizer.nu_dtype: must be None or one of"),
  (["optimizer.params_dtype=float16"], "optimizer.params_dtype: must be None"),
  (["optimizer.params_rounding=up"], "optimizer.params_rounding: must be one of"),
  (["optimizer.quantize_block_size=8"], "optimizer.quantize_block_size: must be >= 16"),
  (["optimizer.float_moments=*/kernel=maybe"], "optimizer.float_moments: float_moments rule"),
  (
    [
      "optimizer.mu_dtype=int8",
      "optimizer.float_moments=type:Embedd=true",
      "trainer.allow_config_change=True",
    ],
    "optimizer.float_moments: float_moments rule #1 'type:Embedd' matches no parameter",
  ),
  (["trainer.final_eval_batches=-1"], "trainer.final_eval_batches: must be >= 0"),
  (
    ["optimizer.weight_decay_mask=*/bais=false, *=true", "trainer.allow_config_change=True"],
    "optimizer.weight_decay_mask: weight",
  ),
  (["optimizer.weight_decay_mask=*/bias=maybe"], "optimizer.weight_decay_mask: weight decay rule"),
  (["optimizer.lr_multipliers=head/*=-1"], "optimizer.lr_multipliers: learning-rate multiplier"),
  (
    ["optimizer.lr_multipliers=haed/*=0.5", "trainer.allow_config_change=True"],
    "optimizer.lr_multipliers: learning-rate multiplier",
  ),
  (
    ["optimizer.freeze=*=true", "trainer.allow_config_change=True"],
    "optimizer.freeze: selects every parameter",
  ),
  (
    ["optimizer.freeze=conv9/*=true", "trainer.allow_config_change=True"],
    "optimizer.freeze: freeze rule #1 'conv9/*'",
  ),
  (["optimizer.accumulate_steps=0"], "optimizer.accumulate_steps: must be >= 1"),
  (["optimizer.accumulate_steps=3"], "data.batch_size: (8) must be a multiple of"),
  (["optimizer.name=adamv"], "optimizer.name: unknown optimizer 'adamv'; did you mean 'adamw'"),
  (["optimizer.grad_clip_norm=-1.0"], "optimizer.grad_clip_norm: must be >= 0"),
  (["trainer.num_steps=0"], "trainer.num_steps: must be in (0, 2147483647]"),
  (["trainer.num_steps=1.5"], "trainer.num_steps: cannot set 1.5"),
  (["trainer.log_every=0"], "trainer.log_every: must be > 0"),
  (["trainer.eval_every=-1"], "trainer.eval_every: must be >= 0"),
  (["trainer.seed=x"], "trainer.seed: cannot read 'x' as int"),
  (["trainer.allow_config_change=maybe"], "trainer.allow_config_change: expected true or false"),
  (["checkpoint.keep=0"], "checkpoint.keep: must be >= 1"),
  (["checkpoint.best_mode=median"], "checkpoint.best_mode: must be 'min' or 'max'"),
  (["checkpoint.every_steps=-5"], "checkpoint.every_steps: must be >= 0"),
  (
    ["mesh.shape=(4,)", "trainer.allow_config_change=True"],
    "mesh.shape (4,) over axes ('data',) has 4 devices but 1",
  ),
  (["mesh.axes=('data', 'model')"], "mesh.shape: needs one size per axis"),
  (["mesh.partition_rules=(('*/kernel', ('model',)),)"], "mesh.partition_rules[0] ('*/kernel')"),
  (["mesh.data_axes=('batch',)"], "mesh.data_axes: axis 'batch' is not in mesh.axes"),
  (["mesh.shard_opt_state=all"], "mesh.shard_opt_state: must be 'params'"),
  (["mesh.logical_axis_rules=(('mlp', 'tensor'),)"], "mesh.logical_axis_rules[0] ('mlp')"),
  (["model.name=nosuch"], "model.name: unknown model 'nosuch'"),
  (["model.widht=8"], "model.widht: unknown key; did you mean 'model.width'"),
  (["data.name=tests.nosuch:images"], "data.name: dataset 'tests.nosuch:images': cannot import"),
  (["data.batch_size=0"], "data.batch_size: must be >= 1"),
  (["optimizer.mu_dtype=bfloat16"], "holds a run with another config (optimizer.mu_dtype"),
  (["optimizer.freeze=conv9/*=true"], "holds a run with another config (optimizer.freeze"),
  (
    ["optimizer.mu_dtype=bfloat16", "trainer.allow_config_change=True"],
    "does not fit the state this run builds: its optimizer state has another format or tree "
    "(first difference at 'opt_state/0/mu/",
  ),
  (["model.width=16", "trainer.allow_config_change=True"], "which changed model.width 8 → 16"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_exits_2_with_a_short_message_and_an_untouched_workdir(
  overrides, message, finished_run, capsys
):
  before = snapshot(finished_run)
  code = cli.train(CNN, str(finished_run), overrides, verbose=False)
  err = capsys.readouterr().err
  assert code == 2, err
  lines = err.strip().splitlines()
  assert 1 <= len(lines) <= 3, err
  assert message in err, err
  assert "Traceback" not in err
  assert snapshot(finished_run) == before


def test_bad_config_on_a_new_workdir_creates_nothing(tmp_path, capsys):
  for overrides, _ in BAD[:10]:
    assert cli.train(CNN, str(tmp_path / "new"), overrides, verbose=False) == 2
  assert not (tmp_path / "new").exists()
  assert cli.train(str(tmp_path / "none.py"), str(tmp_path / "w"), [], verbose=False) == 2
  assert "--config: file" in capsys.readouterr().err


def test_none_is_accepted_for_optional_fields(tmp_path):
  cfg = cli.load_config(CNN, ["optimizer.mu_dtype=bfloat16", "optimizer.mu_dtype=None"])
  assert cfg.optimizer.mu_dtype is None


def test_verbosity_adds_the_traceback(tmp_path, capsys):
  assert cli.train(CNN, str(tmp_path), ["optimizer.b1=2.0"], verbose=True) == 2
  assert "Traceback" in capsys.readouterr().err


def test_workdir_that_is_a_file_or_read_only(tmp_path, capsys):
  afile = tmp_path / "afile"
  afile.write_text("keep me")
  assert cli.train(CNN, str(afile), [], verbose=False) == 2
  assert "is a file" in capsys.readouterr().err and afile.read_text() == "keep me"
  assert cli.train(CNN, str(afile / "sub"), [], verbose=False) == 2
  assert "cannot be created" in capsys.readouterr().err

  ro = tmp_path / "ro"
  ro.mkdir()
  mounted = (
    subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
      check=False,
      capture_output=True,
    ).returncode
    == 0  # fmt: skip
  )
  if not mounted:
    if os.geteuid() == 0:
      pytest.skip("root ignores file modes and cannot mount a read-only tmpfs here")
    ro.chmod(0o555)
  try:
    assert cli.train(CNN, str(ro), [], verbose=False) == 2
    assert "is not writable" in capsys.readouterr().err
  finally:
    if mounted:
      subprocess.run(["umount", str(ro)], check=False)
    else:
      ro.chmod(0o755)


def _cli(*args, env=None, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "train", *args],
    cwd=ROOT,
    env=env or subprocess_env(JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.slow
def test_failed_starts_then_the_corrected_and_the_original_command(tmp_path):
  workdir = tmp_path / "run"
  args = [f"--config={CNN}", f"--workdir={workdir}", "--config.trainer.num_steps=4"]
  typo = _cli(*args, "--config.model.name=nosuch")
  assert typo.returncode == 2 and "model.name: unknown model 'nosuch'" in typo.stderr
  assert not workdir.exists()  # nothing written: the corrected command is not refused
  first = _cli(*args)
  assert first.returncode == 0, first.stderr
  config_json = (workdir / "config.json").read_bytes()
  refused = _cli(*args, "--config.optimizer.mu_dtype=bfloat16",
                 "--config.trainer.allow_config_change=True")  # fmt: skip
  assert refused.returncode == 2 and "does not fit" in refused.stderr
  assert len(refused.stderr.strip().splitlines()) <= 3
  assert (workdir / "config.json").read_bytes() == config_json  # not overwritten
  again = _cli(*args[:2], "--config.trainer.num_steps=6")
  assert again.returncode == 2 and "trainer.num_steps: 4 -> 6" in again.stderr
  original = _cli(
    *args[:2], "--config.trainer.num_steps=6", "--config.trainer.allow_config_change=True"
  )
  assert original.returncode == 0, original.stderr
  assert "resumed from step 4" in original.stdout


@pytest.mark.slow
def test_a_second_trainer_on_the_same_workdir_is_refused(tmp_path):
  workdir = tmp_path / "run"
  args = [f"--config={CNN}", f"--workdir={workdir}"]
  env = subprocess_env(JAX_PLATFORMS="cpu", USER_MODELS_SLEEP_AT="2")
  first = subprocess.Popen(
    [sys.executable, "-m", "train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT, text=True,
  )  # fmt: skip
  try:
    deadline = time.monotonic() + 120
    while not (workdir / "config.json").exists() and time.monotonic() < deadline:
      assert first.poll() is None, first.stdout.read()
      time.sleep(0.1)
    second = _cli(*args)
    assert second.returncode == 2
    assert f"is in use by another trainer (pid {first.pid})" in second.stderr
  finally:
    first.send_signal(signal.SIGTERM)  # saves at the next step boundary... after the stall
    with contextlib.suppress(subprocess.TimeoutExpired):
      first.wait(timeout=5)
    first.kill()
    first.wait()
  third = _cli(*args)
  assert third.returncode == 0, third.stderr
  assert f"left by process {first.pid}" in third.stdout


def _corrupt(step_dir: Path, how: str) -> None:
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0]
  assert files
  for path in files:
    if how == "truncate":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
      path.write_bytes(bytes(path.stat().st_size))


@pytest.mark.parametrize("how", ["truncate", pytest.param("zero", marks=pytest.mark.slow)])
def test_a_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(
  tmp_path, how, capsys
):
  workdir = tmp_path / "run"
  assert cli.train(CNN, str(workdir), [], verbose=False) == 0  # checkpoints 4 and 8
  _corrupt(workdir / "checkpoints" / "8", how)
  more = ["trainer.num_steps=12", "trainer.allow_config_change=True"]
  capsys.readouterr()
  assert cli.train(CNN, str(workdir), more, verbose=False) == 0
  out = capsys.readouterr().out
  assert "checkpoint 8 is unreadable" in out and "resumed from step 4" in out
  kept = list((workdir / "checkpoints.corrupt").iterdir())
  assert len(kept) == 1 and kept[0].name.startswith("8.")  # kept, never deleted
  with checkpoint.CheckpointReader(workdir) as reader:
    assert reader.latest_step() == 12
  rows = reporting.read_metrics(workdir / "metrics.jsonl")
  steps = [r["step"] for r in rows if r["split"] == "train"]
  assert steps == list(range(1, 13))  # the steps after 4 once, from the resumed run


def test_no_readable_checkpoint_stops_with_one_line_until_they_are_removed(tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.train(CNN, str(workdir), [], verbose=False) == 0
  for step in ("4", "8"):
    _corrupt(workdir / "checkpoints" / step, "zero")
  capsys.readouterr()
  assert cli.train(CNN, str(workdir), [], verbose=False) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no checkpoint in" in err[0] and "restores" in err[0]
  assert sorted(p.name.split(".")[0] for p in (workdir / "checkpoints.corrupt").iterdir()) == [
    "4",
    "8",
  ]
  # The same command again refuses the same way: it never starts over beside them.
  before = snapshot(workdir)
  assert cli.train(CNN, str(workdir), [], verbose=False) == 2
  again = capsys.readouterr().err.strip().splitlines()
  assert len(again) == 1 and "remove checkpoints.corrupt/ and config.json to start over" in again[0]
  assert snapshot(workdir) == before  # metrics.jsonl of the old run kept
  shutil.rmtree(workdir / "checkpoints.corrupt")
  (workdir / "config.json").unlink()
  assert cli.train(CNN, str(workdir), [], verbose=False) == 0  # as the message said
  assert "resumed" not in capsys.readouterr().out


BEST = ["checkpoint.keep_best_by=loss"]  # Orbax then writes a metrics file with each step


def test_an_unreadable_metrics_file_is_a_damaged_step(tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.train(CNN, str(workdir), BEST, verbose=False) == 0  # checkpoints 4 and 8
  (workdir / "checkpoints" / "8" / "metrics" / "metrics").write_bytes(b"")
  capsys.readouterr()
  assert cli.train(CNN, str(workdir), BEST, verbose=False) == 0
  out = capsys.readouterr().out
  assert "checkpoint 8 is unreadable" in out and "resumed from step 4" in out
  assert [p.name.split(".")[0] for p in (workdir / "checkpoints.corrupt").iterdir()] == ["8"]
  with checkpoint.CheckpointReader(workdir) as reader:
    assert reader.all_steps() == [4, 8] and reader.metrics(8) is not None  # trained again
  for step, content in (("4", b"{"), ("8", b"")):
    (workdir / "checkpoints" / step / "metrics" / "metrics").write_bytes(content)
  assert cli.train(CNN, str(workdir), BEST, verbose=False) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no checkpoint in" in err[0] and "unreadable: 8, 4" in err[0]


def test_a_step_whose_metrics_lack_keep_best_by_ranks_worst(tmp_path, capsys):
  # Metrics of another name ({} here; or saved before keep_best_by changed): Orbax's keep rule
  # raised a KeyError at the next save, every rerun alike.
  workdir = tmp_path / "run"
  assert cli.train(CNN, str(workdir), BEST, verbose=False) == 0  # checkpoints 4 and 8
  (workdir / "checkpoints" / "8" / "metrics" / "metrics").write_text("{}")
  more = [*BEST, "trainer.num_steps=16", "trainer.allow_config_change=True"]
  assert cli.train(CNN, str(workdir), more, verbose=False) == 0, capsys.readouterr().err
  with checkpoint.CheckpointReader(workdir) as reader:
    assert 16 in reader.all_steps() and reader.best_step() != 8


def _saved_config(workdir: Path) -> dict:
  return json.loads((workdir / "config.json").read_text())


def test_config_json_changes_only_with_a_checkpoint_of_the_new_config(
  finished_run, tmp_path, capsys
):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  original = (workdir / "config.json").read_bytes()
  changed = ["data.batch_size=16", "trainer.allow_config_change=True"]
  assert cli.train(CNN, str(workdir), changed, verbose=False) == 0  # finished: saves nothing
  assert (workdir / "config.json").read_bytes() == original
  assert cli.train(CNN, str(workdir), [], verbose=False) == 0  # the original command resumes
  more = ["trainer.num_steps=12", "trainer.allow_config_change=True"]
  assert cli.train(CNN, str(workdir), more, verbose=False) == 0  # checkpoint 12 of this config
  assert _saved_config(workdir)["trainer"]["num_steps"] == 12
  capsys.readouterr()
  assert cli.train(CNN, str(workdir), [], verbose=False) == 2
  assert "(trainer.num_steps: 12 -> 8)" in capsys.readouterr().err


def test_a_missing_config_json_is_written_from_the_checkpoint_and_the_guard_holds(
  finished_run, tmp_path, capsys
):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  (workdir / "config.json").write_text('{"model": ')
  before = snapshot(workdir)
  assert cli.train(CNN, str(workdir), [], verbose=False) == 2
  err = capsys.readouterr().err
  assert "config.json is unreadable; remove it to have it written again from checkpoint 8" in err
  assert snapshot(workdir) == before
  (workdir / "config.json").unlink()
  assert cli.train(CNN, str(workdir), ["data.batch_size=16"], verbose=False) == 2
  assert "holds a run with another config (data.batch_size: 8 -> 16)" in capsys.readouterr().err
  assert cli.train(CNN, str(workdir), [], verbose=False) == 0
  assert "wrote config.json from checkpoint 8 (it was missing)" in capsys.readouterr().out
  assert (workdir / "config.json").read_bytes() == (finished_run / "config.json").read_bytes()


@pytest.mark.slow
def test_a_resume_killed_before_its_first_checkpoint_leaves_the_recorded_config(
  finished_run, tmp_path
):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  original = (workdir / "config.json").read_bytes()
  args = [f"--config={CNN}", f"--workdir={workdir}"]
  env = subprocess_env(JAX_PLATFORMS="cpu", USER_MODELS_SLEEP_AT="10")
  more = ["--config.trainer.num_steps=12", "--config.trainer.allow_config_change=True"]
  run = subprocess.Popen(
    [sys.executable, "-m", "train", *args, *more], cwd=ROOT, env=env, stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT, text=True,
  )  # fmt: skip
  try:
    lines = []
    while not any("resumed from step 8" in line for line in lines):
      line = run.stdout.readline()
      assert line, "".join(lines)
      lines.append(line)
    time.sleep(2)  # at batch 10, asleep (USER_MODELS_SLEEP_AT)
  finally:
    run.kill()
    run.wait()
  assert (workdir / "config.json").read_bytes() == original
  again = _cli(*args)
  assert again.returncode == 0, again.stderr
