"""Multi-process training on localhost: jax.distributed with gloo CPU collectives.

The slow tests start real processes (2 CPU devices each) coordinated by
``jax.distributed.initialize``; the harness kills the others as soon as one
fails, and names it. The oracle is the same training on one device, in
this process. The launch scripts are checked by dry runs.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import sharding_workers
from tests.sharding_workers import ProcessFailure, free_port, run_processes, worker_command

STEPS = 6  # of the command-line run; the workers train 3


def _config():
  cfg = sharding_workers.mesh_config(("data", "model"), (-1, 2), shard_opt_state="data")
  cfg.model.batch_norm = True
  cfg.model.shard_axis = "model"
  return cfg


@pytest.fixture(scope="module")
def reference():
  """A one-device run of STEPS steps, with params and state after 3 (the workers' length)."""
  return sharding_workers.train(_config(), None, STEPS, snapshot_at=3)


def _close(a, b, rtol=1e-4, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _train_commands(n: int, out: Path, *args: str) -> list[list[str]]:
  address = f"127.0.0.1:{free_port()}"
  return [
    worker_command(
      "train",
      f"--coordinator_address={address}",
      f"--num_processes={n}",
      f"--process_id={i}",
      f"--out={out}",
      *args,
    )
    for i in range(n)
  ]


@pytest.mark.slow
@pytest.mark.parametrize(
  "num_processes, shape, mesh, shards, via_env",
  [
    # Data across processes, model within each.
    (2, "-1,2", {"data": 2, "model": 2}, [[0, 2], [1, 2]], False),
    (4, "-1,2", {"data": 4, "model": 2}, [[0, 4], [1, 4], [2, 4], [3, 4]], False),
    # The model axis spans both processes: each loads the whole batch. Settings
    # from JAX_COORDINATOR_ADDRESS etc., as train/launch_gpu_multinode.sh gives them.
    (2, "1,-1", {"data": 1, "model": 4}, [[0, 1], [0, 1]], True),
  ],
  ids=["2proc-data2xmodel2", "4proc-data4xmodel2", "2proc-model4-env"],
)
def test_processes_train_like_one_device(
  tmp_path, reference, num_processes, shape, mesh, shards, via_env
):
  flags = [f"--shape={shape}", "--steps=3"] + (["--via_env"] if via_env else [])
  cmds = _train_commands(num_processes, tmp_path, *flags)
  run_processes(cmds, env=sharding_workers.child_env(2), timeout=150, log_dir=tmp_path / "logs")
  result = json.loads((tmp_path / "results.json").read_text())
  assert result["process_count"] == num_processes
  assert result["device_count"] == 2 * num_processes
  assert result["mesh"] == mesh
  got = [json.loads((tmp_path / f"data_shard_{i}.json").read_text()) for i in range(num_processes)]
  assert got == shards
  np.testing.assert_allclose(result["losses"], reference["losses"][:3], rtol=1e-5)
  _close(result["params"], reference["snapshot"]["params"])
  _close(result["rest"], reference["snapshot"]["rest"])  # BatchNorm statistics


@pytest.mark.slow
def test_a_dying_process_is_reported_and_the_others_killed(tmp_path):
  cmds = _train_commands(2, tmp_path, "--die_at=1", "--steps=3")
  start = time.monotonic()
  with pytest.raises(ProcessFailure, match=r"process 1 of 2 exited with code 3") as e:
    run_processes(cmds, env=sharding_workers.child_env(2), timeout=120, log_dir=tmp_path)
  assert "dying at step 1 on purpose" in str(e.value)
  assert time.monotonic() - start < 100  # not the timeout: process 0 was killed at once


CLI_CONFIG = """
from tests import sharding_workers


def get_config():
  cfg = sharding_workers.mesh_config(("data", "model"), (-1, 2), shard_opt_state="data")
  cfg.model.batch_norm = True
  cfg.model.shard_axis = "model"
  return cfg
"""


def _train_cli(workdir: Path, config: Path, num_processes: int, log_dir: Path, *overrides: str):
  address = f"127.0.0.1:{free_port()}"
  cmds = []
  for i in range(num_processes):
    cmd = [sys.executable, "-m", "train", f"--config={config}", f"--workdir={workdir}"]
    if num_processes > 1:
      cmd += [
        f"--coordinator_address={address}",
        f"--num_processes={num_processes}",
        f"--process_id={i}",
      ]
    cmds.append(cmd + list(overrides))
  return run_processes(cmds, env=sharding_workers.child_env(2), timeout=200, log_dir=log_dir)


@pytest.mark.slow
def test_train_cli_two_processes_checkpoint_then_resume_on_one(tmp_path, reference):
  config = tmp_path / "mlp_config.py"
  config.write_text(CLI_CONFIG)
  workdir = tmp_path / "run"
  # 2 processes (mesh data 2 x model 2) train 4 steps, checkpointing at 2 and 4.
  _train_cli(workdir, config, 2, tmp_path / "logs2")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    "2",
    "4",
  ]
  # 1 process (mesh data 1 x model 2) resumes from step 4 and trains to 6.
  out = _train_cli(
    workdir,
    config,
    1,
    tmp_path / "logs1",
    f"--config.trainer.num_steps={STEPS}",
    "--config.trainer.allow_config_change=True",
  )[0]
  assert re.search(r"resumed from step 4\b", out), out[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
  assert sorted(train) == list(range(1, STEPS + 1))
  # Logged step s is the loss of batch s - 1: the same as one device throughout,
  # so the restored state (params, moments, BatchNorm statistics) was exact.
  np.testing.assert_allclose(
    [train[s] for s in range(1, STEPS + 1)], reference["losses"], rtol=1e-5
  )


# ------------------------------------------------------------ launch scripts


def _script(repo_root: Path, name: str, *args: str, **env: str):
  import os
  import subprocess

  full_env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
  return subprocess.run(
    ["bash", str(repo_root / "train" / name), *args],
    env={**full_env, **env},
    capture_output=True,
    text=True,
    timeout=30,
  )


def test_gpu_launch_script_exports_the_settings(repo_root):
  ok = _script(
    repo_root,
    "launch_gpu_multinode.sh",
    "--config=configs/pod_lm.py",
    "--workdir=/shared/run",
    COORDINATOR="10.0.0.1:8476",
    NUM_PROCESSES="4",
    PROCESS_ID="3",
    INIT_TIMEOUT="900",
    DRY_RUN="1",
  )
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.splitlines()[:3] == [
    "JAX_COORDINATOR_ADDRESS=10.0.0.1:8476",
    "JAX_NUM_PROCESSES=4",
    "JAX_PROCESS_ID=3",
  ]
  assert "-m train --initialization_timeout=900 --config=configs/pod_lm.py" in ok.stdout
  bad = _script(repo_root, "launch_gpu_multinode.sh", COORDINATOR="h:1", NUM_PROCESSES="2")
  assert bad.returncode == 2 and "go together" in bad.stderr
  bad = _script(
    repo_root, "launch_gpu_multinode.sh", COORDINATOR="h", NUM_PROCESSES="2", PROCESS_ID="0"
  )
  assert bad.returncode == 2 and "must be HOST:PORT" in bad.stderr


def test_tpu_launch_script_runs_one_command_on_all_workers(repo_root):
  base = ["--tpu=my-tpu", "--zone=us-central2-b", "--dry_run"]
  ok = _script(repo_root, "launch_tpu_pod.sh", *base, "--workdir=gs://b/run", "--", "--x=1")
  assert ok.returncode == 0, ok.stderr
  (line,) = ok.stdout.splitlines()
  assert line.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all")
  assert r"python3\ -m\ train\ --config=configs/pod_lm.py\ --workdir=gs://b/run\ --x=1" in line
  bad = _script(repo_root, "launch_tpu_pod.sh", *base, "--workdir=/tmp/run")
  assert bad.returncode == 2 and "must be a gs:// path" in bad.stderr
