"""Child processes for tests/test_checkpoint.py: real training runs that save, crash and resume.

Run as ``python -m tests.ckpt_worker MODE ...`` from the repository root (the
tests set ``XLA_FLAGS`` for the device count before the interpreter starts):

* ``train DIR NUM_STEPS [--sleep S]``: trains the tiny model with a jitted,
  donating step, saving (asynchronously) after every step into ``DIR``;
  resumes from its latest checkpoint. Prints ``RESUMED n``, ``STEP n HASH h``
  (the state after step ``n``), ``SAVING n`` (its asynchronous save started)
  and, on SIGTERM, ``PREEMPTED n`` after saving step ``n``; exits 0.
* ``mesh SAVE_DIR|- [RESTORE_DIR[@N] ...]``: builds the state on a mesh of
  all devices, trains 2 steps, saves it into ``SAVE_DIR`` (unless ``-``),
  then restores each ``RESTORE_DIR`` onto this mesh (or a mesh of the first
  ``N`` devices) and checks every leaf's dtype, shape and sharding. Prints
  ``SAVED h`` and ``RESTORED spec h``.
* ``multiproc DIR PORT PROCESS_ID``: one of two ``jax.distributed`` processes
  that step until JAX's preemption sync point, save there and exit; prints
  ``PREEMPTED n``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

DATA_INFO = {"in_dim": 8, "out_dim": 2}


def tiny_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The tiny model's config: bfloat16 first moment, ZeRO-1 over a "data" mesh axis."""
  from adamw_flax import config as config_lib

  cfg = config_lib.default_config()
  cfg.model.name = "tests.ckpt_models:ckpt_tiny"
  cfg.model.hidden = 16
  cfg.optimizer.mu_dtype = "bfloat16"
  cfg.optimizer.learning_rate = 1e-2
  cfg.trainer.num_steps = 100
  cfg.checkpoint.every_steps = 1
  cfg.checkpoint.keep = 2
  cfg.mesh.partition_rules = ((".*kernel", ("data",)),)
  cfg.mesh.shard_opt_state = "data"
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


def batch(step: int) -> dict[str, np.ndarray]:
  """Batch ``step``: a pure function of the step, so a resumed run sees the same data."""
  # NumPy, not jax.random: every eager JAX op compiles, seconds on 8 host devices.
  x = np.random.default_rng(step).normal(size=(8, DATA_INFO["in_dim"])).astype(np.float32)
  return {"x": x, "y": np.stack([x.sum(-1), x[:, 0]], axis=-1)}


def state_hash(state: Any) -> str:
  """sha256 of every array leaf (keys as their key data) with its dtype and shape."""
  h = hashlib.sha256()
  for field in ("step", "params", "frozen", "rest", "opt_state"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(state, field))[0]:
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
      value = np.asarray(jax.device_get(leaf))
      h.update(f"{field}{jax.tree_util.keystr(path)}:{value.dtype}{value.shape}".encode())
      h.update(value.tobytes())
  return h.hexdigest()[:16]


def _say(*parts: Any) -> None:
  print(*parts, flush=True)


def train(directory: str, num_steps: int, sleep: float = 0.0) -> None:
  from adamw_flax import checkpoint, registry, train_state, watchdog

  cfg = tiny_config()
  ckpts = checkpoint.Checkpoints(directory, cfg, data_info=DATA_INFO)
  if ckpts.latest_step() is not None:
    target = train_state.state_from_config(cfg, DATA_INFO, abstract=True)
    state, data_state = ckpts.restore(target)
    _say("RESUMED", data_state["step"], "HASH", state_hash(state))
  else:
    state = train_state.state_from_config(cfg, DATA_INFO)
  step_fn = train_state.make_train_step(registry.MODELS.get(cfg.model.name).loss)
  sigterm = watchdog.StopSignals()
  sigterm.install()
  for step in range(int(state.step), num_steps):
    state, _ = step_fn(state, batch(step))
    done = step + 1
    _say("STEP", done, "HASH", state_hash(state))
    if sigterm.is_set() or ckpts.reached_preemption(done):
      ckpts.save(state, data_state={"step": done}, force=True)
      ckpts.wait()
      _say("PREEMPTED", done)
      break
    ckpts.save(state, data_state={"step": done})
    _say("SAVING", done)  # save() returned: the write goes on in the background
    time.sleep(sleep)
  ckpts.close()
  _say("DONE")


def _checked_leaves(restored: Any, target: Any) -> None:
  for (path, r), t in zip(
    jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(target), strict=True
  ):
    name = jax.tree_util.keystr(path)
    if r.dtype != t.dtype or r.shape != t.shape:
      raise AssertionError(f"{name}: restored {r.dtype}{r.shape}, wanted {t.dtype}{t.shape}")
    if not r.sharding.is_equivalent_to(t.sharding, r.ndim):
      raise AssertionError(f"{name}: restored with {r.sharding}, wanted {t.sharding}")


def mesh(save_dir: str | None, restores: list[str], n_devices: int | None = None) -> dict:
  """Saves a trained state of a mesh over ``n_devices`` (default all), restores others.

  Args:
    save_dir: where to save (None: save nothing).
    restores: checkpoint directories to restore, each onto this mesh, or
      ``"DIR@N"``: onto a mesh of the first N devices.
    n_devices: devices of the saving mesh.

  Returns:
    ``{"saved": hash or None, "restored": {restore: hash}}``.
  """
  from adamw_flax import checkpoint, registry, sharding, train_state

  cfg = tiny_config()
  out: dict[str, Any] = {"saved": None, "restored": {}}
  if save_dir is not None:
    devices = jax.devices()[:n_devices] if n_devices else None
    the_mesh = sharding.mesh_from_config(cfg.mesh, devices=devices)
    state = train_state.state_from_config(cfg, DATA_INFO, mesh=the_mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = train_state.make_train_step(
      registry.MODELS.get(cfg.model.name).loss, state_sharding=shardings
    )
    for step in range(2):
      state, _ = step_fn(state, batch(step))
    checkpoint.save_state(save_dir, state, cfg, data_info=DATA_INFO)
    out["saved"] = state_hash(state)
  for spec in restores:
    directory, _, n = spec.partition("@")
    devices = jax.devices()[: int(n or n_devices or jax.device_count())]
    the_mesh = sharding.mesh_from_config(cfg.mesh, devices=devices)
    target = train_state.state_from_config(cfg, DATA_INFO, mesh=the_mesh, abstract=True)
    restored = checkpoint.restore_state(directory, mesh=the_mesh)
    _checked_leaves(restored, target)
    if {d for x in jax.tree.leaves(restored) for d in x.sharding.device_set} != set(devices):
      raise AssertionError(f"{spec}: restored onto other devices than {devices}")
    out["restored"][spec] = state_hash(restored)
  return out


def multiproc(directory: str, port: str, process_id: int) -> None:
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  from adamw_flax import checkpoint, sharding, train_state

  cfg = tiny_config()
  the_mesh = sharding.mesh_from_config(cfg.mesh)  # one device in each process
  state = train_state.state_from_config(cfg, DATA_INFO, mesh=the_mesh)
  ckpts = checkpoint.Checkpoints(directory, cfg, data_info=DATA_INFO, mesh=the_mesh)
  _say("READY", process_id)
  for step in range(1, 3000):
    time.sleep(0.02)
    if ckpts.reached_preemption(step):
      ckpts.save(state, data_state={"step": step}, force=True, step=step)
      ckpts.wait()
      _say("PREEMPTED", step)
      break
  ckpts.close()


def main(argv: list[str]) -> None:
  mode, args = argv[0], argv[1:]
  if mode == "train":
    sleep = float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0.0
    train(args[0], int(args[1]), sleep)
  elif mode == "mesh":
    out = mesh(None if args[0] == "-" else args[0], args[1:])
    _say("SAVED", out["saved"])
    for directory, h in out["restored"].items():
      _say("RESTORED", directory, h)
  elif mode == "multiproc":
    multiproc(args[0], args[1], int(args[2]))
  else:
    raise SystemExit(f"unknown mode {mode!r}: train, mesh or multiproc")


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  main(sys.argv[1:])
