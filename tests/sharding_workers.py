"""Child processes of the sharding tests, and the harness that runs them.

Multi-device and multi-process checks run in fresh Python processes: the
host-platform device count (``XLA_FLAGS``) and ``jax.distributed`` must be
set before JAX starts, which the pytest process has already done.

``python -m tests.sharding_workers meshes --out=DIR``
  one process with 8 CPU devices: trains on several meshes, writes losses,
  params, shardings and per-device bytes to ``DIR/results.json``.
``python -m tests.sharding_workers train --coordinator_address=H:P ...``
  one process of a multi-process job (2 CPU devices each): joins the job,
  trains a few steps and (process 0) writes ``DIR/results.json``.

:func:`run_processes` starts N such processes, kills the rest as soon as one
fails or the time is up, and names the process that failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ harness


def free_port() -> int:
  """A TCP port that is free now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(num_cpu_devices: int, **extra: str) -> dict[str, str]:
  """Environment of a child JAX process with ``num_cpu_devices`` host devices."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_cpu_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  env.update(extra)
  return env


class ProcessFailure(AssertionError):
  """A child process failed or timed out; the message names it and shows its output."""


def _tail(path: Path, n: int = 4000) -> str:
  text = path.read_text(errors="replace") if path.exists() else ""
  return text[-n:]


def run_processes(
  commands: Sequence[Sequence[str]],
  *,
  env: dict[str, str],
  timeout: float,
  log_dir: Path,
) -> list[str]:
  """Runs the commands as concurrent processes; returns their outputs (stdout + stderr).

  Args:
    commands: one argv per process (process ``i`` is ``commands[i]``).
    env: their environment.
    timeout: seconds for all of them together.
    log_dir: where their output goes (``process_<i>.log``).

  Raises:
    ProcessFailure: as soon as one process exits non-zero (the others are
      killed, so a collective waiting on the dead one cannot hang the
      suite), or at the timeout; naming the process and showing its output.
  """
  log_dir.mkdir(parents=True, exist_ok=True)
  logs = [log_dir / f"process_{i}.log" for i in range(len(commands))]
  procs = []
  for cmd, log in zip(commands, logs, strict=True):
    with open(log, "wb") as f:
      # A new session per child: killing its process group also ends any
      # grandchildren it started.
      procs.append(
        subprocess.Popen(
          list(cmd), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
      )

  def kill_all() -> None:
    for p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    for p in procs:
      p.wait()

  deadline = time.monotonic() + timeout
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i = failed[0]
        kill_all()
        raise ProcessFailure(
          f"process {i} of {len(procs)} exited with code {codes[i]}; its output:\n{_tail(logs[i])}"
        )
      if all(c == 0 for c in codes):
        return [log.read_text(errors="replace") for log in logs]
      if time.monotonic() > deadline:
        running = [i for i, c in enumerate(codes) if c is None]
        kill_all()
        raise ProcessFailure(
          f"processes {running} of {len(procs)} still running after {timeout:.0f}s (killed); "
          f"output of process {running[0]}:\n{_tail(logs[running[0]])}"
        )
      time.sleep(0.1)
  finally:
    kill_all()


def worker_command(*args: str) -> list[str]:
  """``python -m tests.sharding_workers ARGS``."""
  return [sys.executable, "-m", "tests.sharding_workers", *args]


# ------------------------------------------------------------------ training


def mesh_config(axes: Sequence[str], shape: Sequence[int], **fields: Any):
  """``config.mesh`` with these axes and shape (and other fields)."""
  from tests import sharding_models

  cfg = sharding_models.base_config()
  cfg.mesh.axes = tuple(axes)
  cfg.mesh.shape = tuple(shape)
  for k, v in fields.items():
    cfg.mesh[k] = v
  return cfg


def train(
  cfg, mesh, num_steps: int, *, die_at: int = -1, snapshot_at: int | None = None
) -> dict[str, Any]:
  """Trains ``num_steps`` steps on ``mesh`` (None: one device, no sharding); returns what happened.

  Args:
    cfg: a full config.
    mesh: the mesh, or None.
    num_steps: steps to train.
    die_at: crash this process (exit code 3) before this step.
    snapshot_at: also return ``params``/``rest`` after this many steps as
      ``snapshot`` (instead of a second, shorter run).

  Returns:
    ``losses``, ``params`` (nested lists, gathered to every process),
    ``specs`` (path -> PartitionSpec string of params and optimizer-state
    leaves), ``bytes`` (:func:`adamw_flax.sharding.per_device_bytes`),
    ``data_shard`` (``(index, count)``).
  """
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from adamw_flax import registry, sharding
  from adamw_flax.train_state import make_train_step, state_from_config

  if mesh is None:
    shard = (0, 1)
  else:
    shard = sharding.data_shard_info(mesh, cfg.mesh)
  data = registry.DATASETS.get(cfg.data.name)(
    cfg.data, seed=cfg.trainer.seed, process_index=shard[0], process_count=shard[1]
  )
  loss_fn = registry.MODELS.get(cfg.model.name).loss
  state = state_from_config(cfg, data.info, mesh=mesh)
  if mesh is None:
    step_fn = make_train_step(loss_fn)
    to_batch = lambda b: b
  else:
    # Shardings of this very state: jax.jit compares the TrainState's static
    # spec by identity, so another (abstract) state's tree would not match.
    state_sharding = sharding.state_shardings(state, mesh, cfg.mesh)
    step_fn = make_train_step(
      loss_fn,
      batch_sharding=sharding.batch_sharding(mesh, cfg.mesh),
      state_sharding=state_sharding,
    )
    to_batch = lambda b: sharding.global_batch(b, mesh, cfg.mesh)
  specs = {
    jax.tree_util.keystr(kp): str(getattr(x.sharding, "spec", None))
    for kp, x in jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]
  }
  nbytes = sharding.per_device_bytes(state)
  as_lists = lambda t: jax.tree.map(
    lambda x: np.asarray(x).tolist(), multihost_utils.process_allgather(t, tiled=True)
  )
  losses, snapshot = [], None
  for step in range(num_steps):
    if step == die_at:
      # A crash, not an exception: an exiting process would first wait at
      # jax.distributed's shutdown barrier for the others.
      print(f"dying at step {step} on purpose (process {jax.process_index()})", flush=True)
      os._exit(3)
    state, metrics = step_fn(state, to_batch(data.train_batch(step)))
    losses.append(float(metrics["loss"]))
    if step + 1 == snapshot_at:
      snapshot = {"params": as_lists(state.params), "rest": as_lists(state.rest)}
  return {
    "losses": losses,
    "params": as_lists(state.params),
    "rest": as_lists(state.rest),
    "snapshot": snapshot,
    "specs": specs,
    "bytes": nbytes,
    "data_shard": list(shard),
  }


# A name -> (mesh fields, model fields) table of the single-process mesh runs.
MESH_RUNS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
  # FSDP-style rule on the data axis.
  "8": (
    {"axes": ("data",), "shape": (8,), "partition_rules": ((".*kernel", ("data", None)),)},
    {},
  ),
  # Pure data parallelism: everything replicated.
  "8-replicated": ({"axes": ("data",), "shape": (-1,)}, {}),
  # The same with ZeRO-1: optimizer state sharded over "data".
  "8-zero1": ({"axes": ("data",), "shape": (-1,), "shard_opt_state": "data"}, {}),
  # NNX annotations (Megatron-style) on "model", ZeRO-1 over "data".
  "2x4": (
    {"axes": ("data", "model"), "shape": (2, 4), "shard_opt_state": "data"},
    {"shard_axis": "model"},
  ),
  # Rules override annotations where they match.
  "4x2": (
    {
      "axes": ("data", "model"),
      "shape": (4, -1),
      "partition_rules": ((".*l1/kernel", ("model", None)), (".*bias", ("model",))),
    },
    {"shard_axis": "model"},
  ),
}


def _mesh_runs(out: Path, num_steps: int) -> None:
  import jax

  from adamw_flax import sharding

  assert jax.device_count() == 8, f"expected 8 host devices, got {jax.device_count()}"
  results = {}
  ref_cfg = mesh_config(("data",), (1,))
  ref_cfg.model.batch_norm = True
  results["reference"] = train(ref_cfg, None, num_steps)
  for name, (mesh_fields, model_fields) in MESH_RUNS.items():
    cfg = mesh_config(**mesh_fields)
    cfg.model.batch_norm = True
    cfg.model.update(model_fields)
    mesh = sharding.mesh_from_config(cfg.mesh)
    results[name] = train(cfg, mesh, num_steps)
    results[name]["mesh"] = {k: int(v) for k, v in mesh.shape.items()}
  (out / "results.json").write_text(json.dumps(results))


def _train_process(args: argparse.Namespace) -> None:
  from adamw_flax import distributed

  if args.via_env:  # what train/launch_gpu_multinode.sh exports
    os.environ["JAX_COORDINATOR_ADDRESS"] = args.coordinator_address
    os.environ["JAX_NUM_PROCESSES"] = str(args.num_processes)
    os.environ["JAX_PROCESS_ID"] = str(args.process_id)
    joined = distributed.initialize(initialization_timeout=args.timeout)
  else:
    joined = distributed.initialize(
      args.coordinator_address,
      args.num_processes,
      args.process_id,
      initialization_timeout=args.timeout,
    )
  import jax

  from adamw_flax import sharding

  assert joined and jax.process_count() == args.num_processes, (joined, jax.process_count())
  cfg = mesh_config(tuple(args.axes.split(",")), tuple(int(s) for s in args.shape.split(",")))
  cfg.mesh.shard_opt_state = args.shard_opt_state
  cfg.model.shard_axis = args.shard_axis
  cfg.model.batch_norm = True
  mesh = sharding.mesh_from_config(cfg.mesh)
  result = train(cfg, mesh, args.steps, die_at=args.die_at if args.process_id == 1 else -1)
  result["process_count"] = jax.process_count()
  result["device_count"] = jax.device_count()
  result["mesh"] = {k: int(v) for k, v in mesh.shape.items()}
  if distributed.is_main_process():
    (Path(args.out) / "results.json").write_text(json.dumps(result))
  (Path(args.out) / f"data_shard_{args.process_id}.json").write_text(
    json.dumps(result["data_shard"])
  )


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  sub = parser.add_subparsers(dest="what", required=True)
  meshes = sub.add_parser("meshes")
  meshes.add_argument("--out", required=True)
  meshes.add_argument("--steps", type=int, default=3)
  tr = sub.add_parser("train")
  tr.add_argument("--coordinator_address", required=True)
  tr.add_argument("--num_processes", type=int, required=True)
  tr.add_argument("--process_id", type=int, required=True)
  tr.add_argument("--out", required=True)
  tr.add_argument("--axes", default="data,model")
  tr.add_argument("--shape", default="-1,2")
  tr.add_argument("--shard_axis", default="model")
  tr.add_argument("--shard_opt_state", default="data")
  tr.add_argument("--steps", type=int, default=3)
  tr.add_argument("--die_at", type=int, default=-1, help="process 1 exits at this step")
  tr.add_argument("--timeout", type=int, default=60)
  tr.add_argument("--via_env", action="store_true", help="pass the settings as JAX_* variables")
  args = parser.parse_args(argv)
  if args.what == "meshes":
    _mesh_runs(Path(args.out), args.steps)
  else:
    _train_process(args)


if __name__ == "__main__":
  main()
