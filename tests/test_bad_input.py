"""The files users hand us, each wrong in the ways they are: one clear line, status 2, nothing lost.

Every case runs ``python -m train`` as a user would. Config files that do
not exist, do not parse, raise, lack ``get_config`` or return another type;
data paths that are a directory, empty, unreadable or not text; a workdir
holding a run of another model; a workdir that is a file, on a read-only
filesystem or on a full disk (a small tmpfs: we run as root).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHARED_TEXT, subprocess_env

SMOKE = ROOT / "configs" / "smoke.py"


def _data() -> list[str]:
  return [f"--config.data.path={SHARED_TEXT}"] if SHARED_TEXT.exists() else []


def _train(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "train", *args],
    cwd=ROOT,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _error_lines(run: subprocess.CompletedProcess) -> list[str]:
  """The error report: the lines from the last ``error:`` line on."""
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
  assert starts, run.stderr[-3000:]
  return lines[starts[-1] :]


def _snapshot(root: Path) -> dict[str, bytes]:
  return {
    str(p.relative_to(root)): p.read_bytes()
    for p in sorted(root.rglob("*"))
    if p.is_file() and p.name != ".lock"
  }


CONFIG_FILES = {
  "syntax": ("def get_config(:\n  pass\n", "syntax error in {path}, line 1"),
  "raises": ("def get_config():\n  cfg = {}\n  return cfg['model']\n", "raised KeyError: 'model'"),
  "no_get_config": ("x = 1\n", "defines no get_config()"),
  "not_a_configdict": ("def get_config():\n  return {'model': {}}\n", "returned a dict, not an"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_a_config_file_that_cannot_give_a_config(tmp_path, case):
  text, expected = CONFIG_FILES[case]
  path = tmp_path / f"{case}.py"
  path.write_text(text)
  run = _train(f"--config={path}", f"--workdir={tmp_path / 'run'}")
  lines = _error_lines(run)
  assert run.returncode == 2, run.stderr[-3000:]
  assert expected.format(path=path) in lines[0], lines
  assert "Traceback" not in run.stderr
  assert len(lines) == (3 if case == "syntax" else 1), lines
  if case == "syntax":  # the file, the line and a caret under the fault
    assert lines[1] == "| def get_config(:" and lines[2] == "|                ^", lines
  if case == "raises":
    assert "at line 3: return cfg['model']" in lines[0]
  assert not (tmp_path / "run").exists()


def test_a_config_file_that_does_not_exist(tmp_path):
  run = _train(f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path / 'run'}")
  assert run.returncode == 2 and _error_lines(run) == [
    f"error: --config: file '{tmp_path / 'nope.py'}' does not exist; pass a configs/*.py file"
  ]


def _binary(path: Path) -> Path:
  path.write_bytes(bytes(range(256)) * 8)
  return path


DATA_PATHS = {
  "directory": (lambda d: d, "is a directory"),
  "empty": (lambda d: (d / "empty.txt", (d / "empty.txt").write_text(""))[0], "is empty"),
  "unreadable": (lambda d: Path("/proc/self/mem"), "cannot be read"),
  "not_text": (lambda d: _binary(d / "blob.bin"), "is not UTF-8 text"),
  "missing": (lambda d: d / "nope.txt", "is not a file"),
}


@pytest.mark.parametrize("case", sorted(DATA_PATHS))
def test_a_data_path_that_is_not_a_text(tmp_path, case):
  make, expected = DATA_PATHS[case]
  path = make(tmp_path)
  run = _train(f"--config={SMOKE}", f"--workdir={tmp_path / 'run'}", f"--config.data.path={path}")
  lines = _error_lines(run)
  assert run.returncode == 2, run.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith(f"error: data.path='{path}' {expected}"), lines
  assert "Traceback" not in run.stderr
  assert not (tmp_path / "run").exists()


def test_a_workdir_of_another_model_says_what_differs_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  first = _train(f"--config={SMOKE}", f"--workdir={workdir}", "--config.trainer.num_steps=6",
                 *_data())  # fmt: skip
  assert first.returncode == 0, first.stderr[-3000:]
  before = _snapshot(workdir)
  args = [f"--config={SMOKE}", f"--workdir={workdir}", "--config.trainer.num_steps=6", *_data(),
          "--config.model.embed_dim=64", "--config.trainer.allow_config_change=True"]  # fmt: skip
  run = _train(*args)
  lines = _error_lines(run)
  assert run.returncode == 2 and len(lines) == 1, lines
  assert "does not fit this run, which changed model.embed_dim 32 → 64" in lines[0]
  assert _snapshot(workdir) == before  # nothing lost or overwritten
  verbose = _train(*args, "--verbosity=1")
  assert "first difference at 'params/" in verbose.stderr  # the details, on request


def test_a_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "run"
  path.write_text("my notes\n")
  run = _train(f"--config={SMOKE}", f"--workdir={path}")
  assert run.returncode == 2 and _error_lines(run) == [
    f"error: workdir '{path}' is a file; pass a directory as --workdir"
  ]
  assert path.read_text() == "my notes\n"


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
  path.mkdir(parents=True, exist_ok=True)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)  # fmt: skip
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_a_workdir_on_a_read_only_filesystem(tmp_path):
  with _tmpfs(tmp_path / "disk", "4m") as disk:
    old = disk / "old"
    run = _train(f"--config={SMOKE}", f"--workdir={old}", "--config.trainer.num_steps=6", *_data())
    assert run.returncode == 0, run.stderr[-3000:]
    before = _snapshot(old)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    again = _train(f"--config={SMOKE}", f"--workdir={old}", "--config.trainer.num_steps=8",
                   "--config.trainer.allow_config_change=True", *_data())  # fmt: skip
    assert again.returncode == 2 and _error_lines(again) == [
      f"error: workdir '{old}' is not writable; pick a writable --workdir"
    ]
    new = _train(f"--config={SMOKE}", f"--workdir={disk / 'new'}")
    assert new.returncode == 2 and _error_lines(new) == [
      f"error: workdir '{disk / 'new'}' cannot be created (Read-only file system); pick a "
      "writable --workdir"
    ]
    assert _snapshot(old) == before


def test_a_workdir_on_a_full_disk_keeps_its_checkpoints(tmp_path):
  # Room for two checkpoints of the smoke model (about 290 KiB each), not three.
  with _tmpfs(tmp_path / "disk", "900k") as disk:
    workdir = disk / "run"
    run = _train(f"--config={SMOKE}", f"--workdir={workdir}", "--config.trainer.num_steps=40",
                 "--config.checkpoint.every_steps=10", "--config.checkpoint.keep=10",
                 "--config.trainer.progress=False", *_data())  # fmt: skip
    lines = _error_lines(run)
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) == 1 and "the disk is full" in lines[0], lines
    assert "free space or pick another --workdir" in lines[0]
    assert "Traceback" not in run.stderr
    kept = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert kept and all(name.isdigit() for name in kept), kept  # complete ones, none half-written
    assert f"the checkpoint of step {kept[-1]} is kept" in lines[0]


# Starts python -m train with a file-size limit (what a quota looks like to the
# process): writes beyond it fail with EFBIG, SIGXFSZ ignored (both survive exec).
_LIMITED = (
  "import os, resource, signal, sys\n"
  "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
  "resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))\n"
  "os.execv(sys.executable, [sys.executable, '-m', 'train', *sys.argv[1:]])\n"
)


def test_an_unwritable_disk_mid_run_is_one_line_too(tmp_path):
  workdir = tmp_path / "run"
  run = subprocess.run(
    [sys.executable, "-c", _LIMITED, f"--config={SMOKE}", f"--workdir={workdir}", *_data(),
     "--config.trainer.num_steps=20", "--config.checkpoint.every_steps=10",
     "--config.checkpoint.async_save=False", "--config.trainer.progress=False"],
    cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240,
  )  # fmt: skip
  lines = _error_lines(run)
  assert run.returncode == 2, run.stderr[-3000:]
  assert len(lines) == 1 and "a file would exceed the size limit" in lines[0], lines
  assert os.path.isdir(workdir)


@pytest.mark.parametrize("module", ["train", "train.compile", "train.inspect"])
def test_help_exits_0_and_a_bad_flag_exits_2(module, tmp_path):
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  helped = run("--help")
  assert helped.returncode == 0, helped.stderr[-2000:]
  assert "--config" in helped.stdout + helped.stderr
  missing = run()  # no --config
  assert missing.returncode == 2, missing.stderr[-2000:]
  assert _error_lines(missing) == [
    "error: flag --config=None: Flag --config must have a value other than None.",
    f"  see: python -m {module} --help",
  ]
  unknown = run("--config=configs/tiny_shakespeare.py", f"--no_such_flag={tmp_path / 'run'}")
  assert unknown.returncode == 2, unknown.stderr[-2000:]
  assert "no_such_flag" in _error_lines(unknown)[0]
  assert not (tmp_path / "run").exists()
