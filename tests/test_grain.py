"""grain pipelines: ArrayRecord through python -m train, killed and resumed bitwise; any process count."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from adamw_flax import checkpoint, grain_data, reporting
from tests.conftest import ROOT, subprocess_env

CONFIG = ROOT / "tests" / "configs" / "grain_records.py"


def _cmd(workdir, data_dir):
  return [sys.executable, "-m", "train", f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.data.path={data_dir}"]  # fmt: skip


def _params(workdir):
  from flax import nnx

  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(checkpoint.restore_params(workdir)))]


@pytest.mark.slow
def test_grain_arrayrecord_trains_is_killed_and_resumes_bitwise(tmp_path):
  env = subprocess_env(JAX_PLATFORMS="cpu")
  data_dir = tmp_path / "records"
  whole = subprocess.run(_cmd(tmp_path / "whole", data_dir), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
  assert whole.returncode == 0, whole.stderr
  assert (data_dir / "train.array_record").exists()
  split = tmp_path / "split"
  proc = subprocess.Popen(_cmd(split, data_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)  # fmt: skip
  try:
    deadline = time.monotonic() + 240
    while not (split / "checkpoints" / "30").is_dir():
      assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint to kill after"
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  resumed = subprocess.run(_cmd(split, data_dir), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step" in resumed.stdout
  for a, b in zip(_params(tmp_path / "whole"), _params(split), strict=True):
    np.testing.assert_array_equal(a, b)  # the same batches, in the same order
  rows = reporting.read_metrics(split / "metrics.jsonl")
  steps = [r["step"] for r in rows if r["split"] == "train"]
  assert steps == sorted(set(steps)) and steps[-1] == 120
  losses = lambda d: {r["step"]: r["loss"] for r in reporting.read_metrics(d / "metrics.jsonl")
                      if r["split"] == "train"}  # fmt: skip
  assert losses(split) == losses(tmp_path / "whole")  # bitwise losses, every logged step


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
  cfg = ml_collections.ConfigDict(
    dict(
      source="examples.grain_arrayrecord.data:make", path=str(tmp_path), batch_size=8, shuffle=True
    )  # fmt: skip
  )
  one = grain_data.GrainDataset(cfg, seed=3, process_index=0, process_count=1)
  halves = [grain_data.GrainDataset(cfg, seed=3, process_index=i, process_count=2) for i in (0, 1)]
  seen = []
  for position in (0, 1, 63, 64, 65):  # 512 examples: positions 64+ are the second epoch
    whole = one.train_batch(position)
    joined = {k: np.concatenate([h.train_batch(position)[k] for h in halves]) for k in whole}
    for k in whole:
      np.testing.assert_array_equal(whole[k], joined[k])
    seen.append(whole["x"][0].tolist())
  assert seen[3] != seen[0]  # the second epoch is reshuffled
  other = grain_data.GrainDataset(cfg, seed=4, process_index=0, process_count=1)
  assert not np.array_equal(other.train_batch(0)["x"], one.train_batch(0)["x"])  # by the seed
  evals = one.eval_batches(2)
  assert [b["x"].shape for b in evals] == [(8, 8), (8, 8)]


def test_a_bad_source_is_a_config_error(tmp_path, capsys):
  from train import cli

  code = cli.train(str(CONFIG), str(tmp_path / "w"), ["data.source=nosuch.module:make"],
                   verbose=False)  # fmt: skip
  assert code == 2
  assert "data.source: cannot load 'nosuch.module:make'" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_tiny_shakespeare_grain_variant_gives_the_numpy_batches(tmp_path):
  from adamw_flax.config import load_config
  from examples.tiny_shakespeare import data

  text = tmp_path / "text.txt"
  text.write_text("ROMEO:\nO, she doth teach the torches to burn bright!\n\n" * 300)
  cfg = load_config(ROOT / "configs" / "tiny_shakespeare.py", [f"data.path={text}"], arg="grain")
  numpy_cfg = load_config(ROOT / "configs" / "tiny_shakespeare.py", [f"data.path={text}"])
  for count in (1, 2):
    for index in range(count):
      ours = grain_data.GrainDataset(cfg.data, seed=1337, process_index=index, process_count=count)
      ref = data.build(numpy_cfg.data, seed=1337, process_index=index, process_count=count)
      for position in (0, 1, 7):
        a, b = ours.train_batch(position), ref.train_batch(position)
        assert a.keys() == b.keys()
        for k in a:
          np.testing.assert_array_equal(a[k], b[k])
      for a, b in zip(ours.eval_batches(3), ref.eval_batches(3), strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert ours.info == ref.info
