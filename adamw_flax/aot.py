"""A run's steps compiled ahead of time for a TPU topology, from abstract values only.

``python -m train.compile`` (see ``train/README.md``) is a thin command over
this module. For a config and a topology name (``v5p-128``, ``v5e-256``,
``v6e-64``, ``v4-32``), it:

* makes the slice's compile-only devices with libtpu
  (``jax.experimental.topologies``; no TPU needed, only the ``tpu`` extra),
  and the config's mesh over them (:func:`adamw_flax.sharding.mesh_from_config`,
  a hybrid ICI x DCN mesh for several slices);
* builds exactly what ``python -m train`` builds, abstractly: the registered
  state factory's ``abstract()`` state with its shardings, the batch's shape
  and sharding, and the steps of :func:`adamw_flax.train_state.make_run_steps`
  (ZeRO-1/FSDP, accumulation, state formats, donation all from the config),
  traced under the mesh; no parameter is allocated;
* compiles them with XLA:TPU's real compiler (``lower(...).compile()``) and
  reads the results: per-chip memory (``memory_analysis()``, its parts, the
  largest buffers from XLA's buffer assignment), the step estimate
  (``cost_analysis()``), the collectives in the optimized HLO;
* for a job that does not fit, compiles the changes that would save memory
  and reports what each saves (:func:`advise`); :func:`compare` tabulates
  state formats and sharding variants;
* saves the serialized executables with a fingerprint (:func:`save_steps`),
  which ``python -m train`` loads on the matching slice
  (:func:`use_saved_steps`) instead of compiling.

Nothing here needs a TPU, or libtpu, to import; only :func:`topology_devices`
needs libtpu.

Examples:
  >>> t = parse_topology("v5p-128")
  >>> t.chips, t.chip.device_kind, t.libtpu_name, t.hosts
  (64, 'TPU v5', 'v5p:4x4x4', 16)
  >>> parse_topology("v5litepod-256").name
  'v5e-256'
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jaxlib
import ml_collections
import numpy as np
from jax.experimental import serialize_executable, topologies

from adamw_flax import fs, masks, plan, registry, sharding, train_state
from adamw_flax.config import (
  ConfigError,
  apply_overrides,
  check_registered,
  config_diff,
  config_json,
  user_errors,
)
from adamw_flax.errors import UserError

GiB = 2**30
MiB = 2**20
INSTALL_HINT = (
  "compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' "
  f"(or pip install 'jax[tpu]=={jax.__version__}')"
)
SAVE_DIR = "compiled"  # WORKDIR/compiled: the serialized steps and their fingerprint
_FORMAT = 1


class TopologyError(UserError, ValueError):
  """A topology name that cannot be compiled for (unknown name or size, libtpu missing)."""


class DoesNotFit(UserError):
  """The job needs more HBM per chip than the topology has; the message says what would help."""


class TooBig(DoesNotFit):
  """XLA:TPU refused to compile a step as far too big for the chip: no memory analysis exists.

  Attributes:
    step: the step's name.
    needed: the bytes per chip XLA:TPU's out-of-memory message names (None: none named).
    usable: the chip's usable HBM in bytes.
  """

  def __init__(self, step: str, needed: int | None, usable: int | None, reason: str):
    self.step, self.needed, self.usable = step, needed, usable
    about = f"; needs about {gib(needed)} GiB per chip" if needed else ""
    super().__init__(f"XLA:TPU refused to compile the {step} step as too big{about} ({reason})")


# ---------------------------------------------------------------- topologies


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation, as Google's Cloud TPU documentation gives it.

  Attributes:
    generation: ``"v4"``, ``"v5e"``, ``"v5p"`` or ``"v6e"``.
    device_kind: the ``device_kind`` JAX reports for it.
    hbm_gb: HBM per chip as documented ("GB" in Google's tables; v5p's 95 is below
      the 95.74 GiB XLA:TPU can use).
    usable_hbm_gib: the HBM per chip XLA:TPU compiles against (its
      out-of-memory message, libtpu 0.0.42.1): the fits/does-not-fit line.
    peak_tflops: peak bfloat16 TFLOP/s per chip (documented).
    cores_per_chip: TensorCores per chip; v4 and v5p slice names count
      TensorCores (``v5p-128`` is 64 chips), v5e and v6e names count chips.
    dims: the slice's torus dimensions (3: v4, v5p; 2: v5e, v6e).
  """

  generation: str
  device_kind: str
  hbm_gb: float
  usable_hbm_gib: float
  peak_tflops: float
  cores_per_chip: int
  dims: int


CHIPS = {
  "v4": Chip("v4", "TPU v4", 32, 30.75, 275, 2, 3),
  "v5e": Chip("v5e", "TPU v5 lite", 16, 15.75, 197, 1, 2),
  "v5p": Chip("v5p", "TPU v5", 95, 95.74, 459, 2, 3),
  "v6e": Chip("v6e", "TPU v6 lite", 32, 31.25, 918, 1, 2),
}
_ALIASES = {"v5litepod": "v5e"}
# Slice shapes by chip count (Cloud TPU's documented slice shapes).
_SHAPES_2D = {
  1: (1, 1),
  4: (2, 2),
  8: (2, 4),
  16: (4, 4),
  32: (4, 8),
  64: (8, 8),
  128: (8, 16),
  256: (16, 16),
}
_SHAPES_3D = {
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
  1024: (8, 8, 16),
  2048: (8, 16, 16),
  4096: (16, 16, 16),
  6144: (16, 16, 24),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice (or several identical ones) to compile for.

  Attributes:
    name: the name users write, canonical (``"v5p-128"``).
    chip: its :class:`Chip`.
    shape: the slice's chip grid (``(4, 4, 4)``).
    num_slices: identical slices joined over the data-center network.
  """

  name: str
  chip: Chip
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips(self) -> int:
    """Chips per slice."""
    return math.prod(self.shape)

  @property
  def total_chips(self) -> int:
    """Chips of all slices."""
    return self.chips * self.num_slices

  @property
  def chips_per_host(self) -> int:
    """Chips per TPU VM (a JAX process): 4, or the whole slice when it is one host.

    Single-host v5e and v6e slices hold 8 chips; multi-host ones are VMs of 4.
    """
    if self.chip.generation in ("v5e", "v6e") and self.chips <= 8:
      return self.chips
    return min(self.chips, 4)

  @property
  def hosts(self) -> int:
    """TPU VMs (JAX processes) of all slices."""
    return self.total_chips // self.chips_per_host

  @property
  def libtpu_name(self) -> str:
    """The name libtpu's topology API takes (``"v5p:4x4x4"``)."""
    return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def usable_hbm_bytes(self) -> int:
    return int(round(self.chip.usable_hbm_gib * GiB))

  @property
  def peak_flops(self) -> float:
    return self.chip.peak_tflops * 1e12


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """The :class:`Topology` a name stands for, as users write it.

  Accepted: ``v4-N``, ``v5p-N`` (N TensorCores, two per chip), ``v5e-N`` or
  ``v5litepod-N``, ``v6e-N`` (N chips), for the documented slice sizes; or
  libtpu's own form ``v5p:4x4x4``.

  Args:
    name: the topology name.
    num_slices: identical slices (multi-slice), >= 1.

  Returns:
    The topology.

  Raises:
    TopologyError: an unknown generation or size, naming the valid ones.

  Examples:
    >>> parse_topology("v4-32").chips, parse_topology("v6e-64").shape
    (16, (8, 8))
    >>> parse_topology("v5p:2x4x4").name
    'v5p-64'
  """
  text = str(name).strip().lower()
  if num_slices < 1:
    raise TopologyError(f"--num_slices={num_slices}: must be >= 1")
  raw = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", text)
  named = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)-(\d+)", text)
  gens = ", ".join(sorted(CHIPS))
  if raw:
    chip = CHIPS[raw[1]]
    shape = tuple(int(d) for d in raw[2].split("x"))
    if len(shape) != chip.dims or math.prod(shape) < 1:
      raise TopologyError(f"--topology={name}: a {chip.generation} slice has {chip.dims} dims")
    count = math.prod(shape) * chip.cores_per_chip
    return Topology(f"{chip.generation}-{count}", chip, shape, num_slices)
  if not named:
    raise TopologyError(
      f"--topology={name}: not a TPU slice name; write it as Cloud TPU does: v5p-128, "
      f"v5e-256 (or v5litepod-256), v6e-64, v4-32 (generations {gens})"
    )
  chip = CHIPS[_ALIASES.get(named[1], named[1])]
  count = int(named[2])
  shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
  chips, rem = divmod(count, chip.cores_per_chip)
  if rem or chips not in shapes:
    sizes = ", ".join(str(c * chip.cores_per_chip) for c in shapes)
    unit = "TensorCores, two per chip" if chip.cores_per_chip == 2 else "chips"
    raise TopologyError(
      f"--topology={name}: {chip.generation} slices come in these sizes ({unit}): {sizes}"
    )
  return Topology(f"{chip.generation}-{count}", chip, shapes[chips], num_slices)


def libtpu_version() -> str | None:
  """The installed libtpu's version, or None when it is not installed."""
  if importlib.util.find_spec("libtpu") is None:
    return None
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def topology_devices(topology: Topology) -> list[Any]:
  """The compile-only devices of ``topology`` (``jax.experimental.topologies``), via libtpu.

  Args:
    topology: the slice(s).

  Returns:
    One device per chip of all slices (``slice_index`` set for several slices).

  Raises:
    TopologyError: libtpu is not installed (the message says how to install
      it), or it cannot make this topology.
  """
  version = libtpu_version()
  if version is None:
    raise TopologyError(INSTALL_HINT)
  kwargs: dict[str, Any] = {}
  if topology.num_slices > 1:
    kwargs["num_slices"] = topology.num_slices
  if topology.chip.generation == "v4":
    kwargs["chip_config_name"] = "megacore"  # one device per chip, as JAX runs a v4
  if topology.chips_per_host != 4:  # libtpu's default hosts are 2x2 chips
    kwargs["chips_per_host_bounds"] = (
      [1, 1, 1] if topology.chips_per_host == 1 else [2, topology.chips_per_host // 2, 1]
    )
  try:
    devices = topologies.get_topology_desc(
      topology_name=topology.libtpu_name, platform="tpu", **kwargs
    ).devices
  except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TopologyError(
      f"libtpu {version} cannot make topology {topology.name} ({topology.libtpu_name}): "
      f"{first[:300]}"
    ) from e
  if len(devices) != topology.total_chips:
    raise TopologyError(
      f"libtpu {version} gave {len(devices)} devices for {topology.name} x "
      f"{topology.num_slices}, expected {topology.total_chips}"
    )
  return list(devices)


# ------------------------------------------------------------------ the mesh


def _factorizations(n: int, k: int) -> Iterator[tuple[int, ...]]:
  if k == 1:
    yield (n,)
    return
  for d in range(1, n + 1):
    if n % d == 0:
      for rest in _factorizations(n // d, k - 1):
        yield (d, *rest)


def _mesh_shape_text(requested: Sequence[int], sizes: Sequence[int]) -> str:
  shown = [-1 if r == -1 else s for r, s in zip(requested, sizes, strict=True)]
  return f"({', '.join(map(str, shown))}{',' if len(shown) == 1 else ''})"


def propose_mesh_shape(
  mesh_cfg: plan.MeshSection, devices: Sequence[Any], tries: int = 64
) -> tuple[int, ...] | None:
  """The axis sizes nearest to ``mesh_cfg``'s that map onto the devices' physical topology.

  Args:
    mesh_cfg: the ``mesh`` section or its plan.
    devices: the slice's devices.
    tries: at most this many candidate shapes are tried (nearest first).

  Returns:
    The sizes, or None when no candidate maps.
  """
  mp = plan.as_mesh_plan(mesh_cfg)
  wanted = dict(sharding.abstract_mesh_from_config(mp, len(devices)).shape)
  want = [wanted[a] for a in mp.axes]

  def distance(c: tuple[int, ...]) -> float:
    return sum(abs(math.log2(a) - math.log2(b)) for a, b in zip(c, want, strict=True))

  candidates = sorted(_factorizations(len(devices), len(want)), key=distance)
  for c in candidates[:tries]:
    if c == tuple(want):
      continue
    trial = dataclasses.replace(mp, shape=c)
    try:
      sharding.mesh_from_config(trial, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      continue
    return c
  return None


def slice_mesh(
  mesh_cfg: plan.MeshSection, devices: Sequence[Any], topology: Topology | None = None
) -> Any:
  """The config's mesh over a slice's devices; one that does not map onto it proposes one.

  Args:
    mesh_cfg: the ``mesh`` section or its plan.
    devices: the devices (compile-only ones from :func:`topology_devices`, or real ones).
    topology: named in the error message.

  Returns:
    The ``jax.sharding.Mesh``.

  Raises:
    ConfigError: sizes that do not fit the device count, or a mesh XLA's
      device layout cannot map onto the physical slice (one line with a
      proposal: the nearest sizes that map).
  """
  mp = plan.as_mesh_plan(mesh_cfg)
  with user_errors("mesh"):  # sizes against the device count: the trainer's own errors
    sizes = dict(sharding.abstract_mesh_from_config(mp, len(devices)).shape)
  try:
    return sharding.mesh_from_config(mp, devices=devices)
  except (ValueError, NotImplementedError, AssertionError) as e:
    if str(e).startswith("mesh."):  # a multi-slice split the config cannot make
      raise ConfigError(str(e)) from e
    where = topology.name if topology is not None else f"{len(devices)} devices"
    if topology is not None:
      where += f" ({'x'.join(map(str, topology.shape))} chips"
      where += f" x {topology.num_slices} slices)" if topology.num_slices > 1 else ")"
    proposal = propose_mesh_shape(mp, devices)
    hint = (
      f"; try --config.mesh.shape='{_mesh_shape_text(mp.shape, proposal)}' "
      f"({dict(zip(mp.axes, proposal, strict=True))})"
      if proposal
      else "; choose sizes that are products of the slice's dimensions"
    )
    raise ConfigError(
      f"mesh.shape {_mesh_shape_text(mp.shape, [sizes[a] for a in mp.axes])} = {sizes} does "
      f"not map onto the physical {where}: each axis must be a product of whole torus "
      f"dimensions{hint}"
    ) from e


# ------------------------------------------------------------------ the job


@dataclasses.dataclass
class Job:
  """Everything ``python -m train`` would compile, in abstract form, on one mesh.

  Attributes:
    run: the run plan.
    mesh: the device mesh.
    state: the abstract train state, every leaf with its sharding.
    batch: a global train batch (``ShapeDtypeStruct`` with the batch sharding).
    eval_batch: a global validation batch, or None without one.
    steps: the steps of :func:`adamw_flax.train_state.make_run_steps`.
    param_count: trainable parameters.
    tokens_per_step: tokens (or examples) of one global batch.
    sequence_model: whether examples are token sequences (``tokens_per_example > 1``).
  """

  run: plan.RunPlan
  mesh: Any
  state: Any
  batch: dict[str, Any]
  eval_batch: dict[str, Any] | None
  steps: train_state.RunSteps
  param_count: int
  tokens_per_step: int
  sequence_model: bool


def _abstract(tree: Any, sharding_: Any, rows_scale: int = 1) -> dict[str, Any]:
  def one(x: Any) -> jax.ShapeDtypeStruct:
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(
      (x.shape[0] * rows_scale, *x.shape[1:]), x.dtype, sharding=sharding_
    )

  return {k: one(v) for k, v in dict(tree).items()}


def train_batch_spec(dataset: Any, batch_sharding: Any, process_count: int = 1) -> dict[str, Any]:
  """The abstract global train batch of a dataset (its batch 0 is read).

  Args:
    dataset: a registered dataset (``train_batch``).
    batch_sharding: the batch's sharding.
    process_count: the slices the dataset was built for (its batches are
      one process's rows).

  Returns:
    ``name -> jax.ShapeDtypeStruct``.
  """
  return _abstract(dataset.train_batch(0), batch_sharding, process_count)


def batch_specs(dataset: Any, batch_sharding: Any, process_count: int = 1) -> tuple[Any, Any]:
  """The abstract global train and validation batches of a dataset (one of each is read).

  Args:
    dataset: a registered dataset (``train_batch``, ``eval_batches``).
    batch_sharding: the batch's sharding.
    process_count: the slices the dataset was built for (its batches are
      one process's rows).

  Returns:
    ``(train batch, validation batch or None)`` of ``jax.ShapeDtypeStruct``.
  """
  train = train_batch_spec(dataset, batch_sharding, process_count)
  return train, eval_batch_spec(dataset, batch_sharding, process_count)


def eval_batch_spec(dataset: Any, batch_sharding: Any, process_count: int = 1) -> Any:
  """The abstract global validation batch of a dataset (its first is read), or None without one.

  Args:
    dataset: a registered dataset (``eval_batches``).
    batch_sharding: the batch's sharding.
    process_count: as for :func:`batch_specs`.

  Returns:
    A tree of ``jax.ShapeDtypeStruct``, or None.
  """
  evals = list(dataset.eval_batches(1)) if hasattr(dataset, "eval_batches") else []
  return _abstract(evals[0], batch_sharding, process_count) if evals else None


def build_job(
  config: plan.RunConfig, devices: Sequence[Any], topology: Topology | None = None
) -> Job:
  """The run's abstract state, batches and steps on a mesh over ``devices``.

  What the trainer builds before its first step, without data beyond one
  batch of shapes and without allocating the state.

  Args:
    config: a validated config or its run plan.
    devices: the devices of the mesh.
    topology: the topology the devices are of (for error messages).

  Returns:
    The :class:`Job`.

  Raises:
    ConfigError: the trainer's own start-up errors (data, mesh, model), as one line.
  """
  run = plan.make_plan(config)
  check_registered(run.config)
  # In the trainer's order: mesh, data, model.
  mesh = slice_mesh(run.mesh, devices, topology)
  with user_errors(f"data ({run.data.name})"):
    dataset = registry.DATASETS.get(run.data.name)(
      run.data, seed=run.trainer.seed, process_index=0, process_count=1
    )
  with user_errors("mesh"):  # the trainer's own check and message
    sharding.check_batch_size(
      int(dataset.global_batch_size), mesh, run.mesh, run.optimizer.accumulate_steps
    )
    batch_sharding = sharding.batch_sharding(mesh, run.mesh)
  batch, eval_batch = batch_specs(dataset, batch_sharding)
  rows = next(iter(batch.values())).shape[0]
  entry = registry.MODELS.get(run.model.name)
  with user_errors(f"model ({run.model.name})"):
    factory = train_state.registered_state_factory(run, dataset.info)
    abstract = factory.abstract()
    shardings = abstract.shardings(mesh, run.mesh)
  steps = train_state.make_run_steps(
    run, entry.loss, state_sharding=shardings, batch_sharding=batch_sharding
  )
  per_example = int(getattr(dataset, "tokens_per_example", 1))
  return Job(
    run=run,
    mesh=mesh,
    state=train_state.with_shardings(abstract, shardings),
    batch=batch,
    eval_batch=eval_batch,
    steps=steps,
    param_count=train_state.param_count(abstract.params),
    tokens_per_step=rows * per_example,
    sequence_model=per_example > 1,
  )


# ------------------------------------------------------------- compiling


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-chip HBM of one compiled step, in bytes; the totals are ``memory_analysis()``'s.

  ``params + opt_state + batch + other == argument`` (each argument's shard
  in the layout XLA chose, padding included), and
  ``peak == argument + output - alias + temps``: XLA:TPU's own total.

  Attributes:
    params: trainable and frozen parameters.
    opt_state: the optimizer state.
    batch: the batch.
    other: the rest of the state (step, model state, EMA, spike statistics).
    outputs: outputs not aliased to a donated argument (the metrics).
    temps: temporaries (activations, gradients, the update's intermediates).
    peak: the step's total.
    argument, output, alias, code: ``memory_analysis()``'s fields.
    usable: the chip's HBM for the program (None: not a TPU).
    unattributed: argument bytes no argument's layout accounts for (counted
      in ``other``; 0 in every program seen).
    buffers: the largest buffers, ``(bytes, part, description)``, largest first (part:
      ``params``, ``opt_state``, ``batch``, ``other`` or ``temps``).
    host: arguments in host memory (``optimizer.offload``), not in HBM.
  """

  params: int
  opt_state: int
  batch: int
  other: int
  outputs: int
  temps: int
  peak: int
  argument: int
  output: int
  alias: int
  code: int
  usable: int | None
  unattributed: int = 0
  buffers: tuple[tuple[int, str, str], ...] = ()
  host: int = 0

  @property
  def fits(self) -> bool:
    return self.usable is None or self.peak <= self.usable


@dataclasses.dataclass(frozen=True)
class CostReport:
  """``cost_analysis()`` of one compiled step (per chip).

  Attributes:
    flops: floating-point operations per chip and step (XLA's count).
    bytes_accessed: HBM bytes read and written.
    raw_seconds: XLA's ``optimal_seconds`` (None when absent).
  """

  flops: float
  bytes_accessed: float
  raw_seconds: float | None

  @property
  def seconds(self) -> float | None:
    """The step estimate; None when XLA gave none (absent, or negative: no estimate)."""
    if self.raw_seconds is None or self.raw_seconds <= 0:
      return None
    return self.raw_seconds


@dataclasses.dataclass
class StepResult:
  """One compiled step and what XLA says about it.

  Attributes:
    name: ``"train"``, ``"eval"`` or ``"ema_eval"``.
    lowered: the ``jax.stages.Lowered`` program.
    compiled: the ``jax.stages.Compiled`` executable.
    program: sha256 of the lowered StableHLO (what the fingerprint compares).
    seconds: compile time on this machine.
    memory: the per-chip memory.
    cost: the cost analysis.
    collectives: ``kind -> (count per step, result bytes per chip)`` (with HLO details).
  """

  name: str
  lowered: Any
  compiled: Any
  program: str
  seconds: float
  memory: MemoryReport
  cost: CostReport
  collectives: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunCompile:
  """A job's compiled steps.

  Attributes:
    job: the :class:`Job`.
    topology: the topology (None: the devices were real ones).
    train: the train step.
    evals: ``metric prefix -> eval step`` (``""``, ``"ema_"``), as :class:`RunSteps`.
  """

  job: Job
  topology: Topology | None
  train: StepResult
  evals: dict[str, StepResult]

  @property
  def fits(self) -> bool:
    return all(s.memory.fits for s in [self.train, *self.evals.values()])


def _eval_name(prefix: str) -> str:
  return f"{prefix}eval" if prefix else "eval"


def program_hash(lowered: Any) -> str:
  """sha256 of a lowered program's StableHLO text (without source locations).

  Args:
    lowered: a ``jax.stages.Lowered``.

  Returns:
    The hex digest.
  """
  return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def _tiled_bytes(shape: Sequence[int], layout: Any, dtype: Any) -> int:
  """Bytes of an array of ``shape`` in a device layout: its tiles padded (XLA's tiling rules)."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # laid out as its key data
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(tuple(shape), dtype))
    shape, dtype = data.shape, data.dtype
  dims = [int(shape[i]) for i in layout.major_to_minor]
  for tile in layout.tiling:
    k = len(tile)
    if len(dims) < k:
      dims = [1] * (k - len(dims)) + dims
    outer, inner = dims[:-k], dims[-k:]
    dims = outer + [-(-d // t) for d, t in zip(inner, tile, strict=True)] + list(tile)
  bits = layout.sub_byte_element_size_in_bits or np.dtype(dtype).itemsize * 8
  return math.prod(dims) * bits // 8


def _leaf_name(keypath: Sequence[Any]) -> str:
  return "/".join(masks.key_str(k) for k in keypath)


def _argument_parts(compiled: Any, args: tuple[Any, ...]) -> tuple[dict[str, int], list]:
  """Per-chip bytes of each kept argument, by part, and ``(bytes, name)`` per argument."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(args)
  # Up to the arguments' leaves: a format is None where the step drops the
  # argument, and a None node of the arguments (an unused Extra field) has none.
  formats = treedef.flatten_up_to(compiled.input_formats[0])
  parts = {"params": 0, "opt_state": 0, "batch": 0, "other": 0}
  named: list[tuple[int, str]] = []
  for fmt, (keypath, leaf) in zip(formats, leaves, strict=True):
    layout = getattr(fmt, "layout", None)
    if layout is None or not hasattr(layout, "tiling"):  # an argument the step does not use
      continue
    if getattr(leaf.sharding, "memory_kind", None) == "pinned_host":  # offloaded: not HBM
      continue
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    n = _tiled_bytes(shard, layout, leaf.dtype)
    if keypath[0].idx == 1:
      part, name = "batch", f"batch/{_leaf_name(keypath[1:])}"
    else:
      field = keypath[1].name
      part = {"params": "params", "frozen": "params", "opt_state": "opt_state"}.get(field, "other")
      name = _leaf_name(keypath[1:])
    parts[part] += n
    named.append((n, part, name))
  return parts, named


# ---- XLA's buffer assignment and the optimized HLO, read for names


_ALLOCATION = re.compile(r"^allocation \d+: size (\d+), (.*)$")
_VALUE = re.compile(r"^ value: <\d+ ([^ >]+)(?: @\d+)?> \(size=(\d+),offset=\d+\): (.*)$")


def _temp_values(text: str) -> list[tuple[int, str, str]]:
  """``(bytes, instruction, shape)`` of the values in the HBM temp allocation."""
  out, in_temp = [], False
  for line in text.splitlines():
    m = _ALLOCATION.match(line)
    if m:
      in_temp = m[2].startswith("preallocated-temp")  # HBM's; other colors say "color N"
      continue
    v = _VALUE.match(line) if in_temp else None
    if v:
      out.append((int(v[2]), re.sub(r"\{[\d,]*\}$", "", v[1]), v[3]))
  return out


def _op_names(hlo: str) -> dict[str, str]:
  """``instruction -> "op_name (function file:line)"`` of an HLO module's text."""
  sections: dict[str, dict[int, str]] = {}
  current = None
  for line in hlo.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = sections.setdefault(line, {})
      continue
    if current is not None:
      m = re.match(r"^(\d+) (.*)$", line)
      if not m:
        current = None if not line.strip() else current
        continue
      current[int(m[1])] = m[2]
  files = {k: v.strip('"') for k, v in sections.get("FileNames", {}).items()}
  funcs = {k: v.strip('"') for k, v in sections.get("FunctionNames", {}).items()}
  where: dict[int, str] = {}
  for k, v in sections.get("FileLocations", {}).items():
    f = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", v)
    if f:
      path = files.get(int(f[1]), "?")
      where[k] = f"{funcs.get(int(f[2]), '?')} {os.path.basename(path)}:{f[3]}"
  frames = {}
  for k, v in sections.get("StackFrames", {}).items():
    f = re.search(r"file_location_id=(\d+)", v)
    if f and int(f[1]) in where:
      frames[str(k)] = where[int(f[1])]
  ops = {}
  for m in re.finditer(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"(?:[^}]*?stack_frame_id=(\d+))?",
    hlo,
    re.M,
  ):
    op = re.sub(r"^jit\([^)]*\)/", "", m[2])
    ops[m[1]] = f"{op} ({frames[m[3]]})" if m[3] in frames else op
  return ops


def _largest_buffers(
  arguments: list[tuple[int, str, str]],
  temps: list[tuple[int, str, str]],
  ops: dict[str, str],
  n: int,
) -> tuple[tuple[int, str, str], ...]:
  rows = [(b, part, f"argument {name}") for b, part, name in arguments]
  seen: set[str] = set()
  for b, inst, shape in sorted(temps, reverse=True):
    if inst in seen:
      continue
    seen.add(inst)
    short = re.sub(r"\{[^}]*\}", "", shape)
    rows.append((b, "temps", f"temp {inst} {short}: {ops.get(inst, 'no op metadata')}"))
  return tuple(sorted(rows, key=lambda r: -r[0])[:n])


# ---- collectives


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]", text):
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _trip_count(while_line: str, condition: Sequence[str]) -> int:
  """A while loop's trip count: XLA's ``known_trip_count``, else the ``i < N`` of its condition.

  JAX's loops (``lax.scan``, ``fori_loop``) count from 0, so ``N`` is the trip
  count; a condition of another form counts as one trip.
  """
  known = re.search(r'known_trip_count":\{"n":"(\d+)"', while_line)
  if known:
    return int(known[1])
  constants = dict(re.findall(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(condition)))
  for line in condition:
    m = re.search(r"ROOT .* compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
    if m and m[1] in constants:
      return int(constants[m[1]])
  return 1


def count_collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """Collectives of an optimized HLO module executed per run of it, and their bytes per chip.

  Counted from the compiled program's text: each collective (an async pair
  counts once, at its ``-done``, whose result is the collective's) times
  the trip count of the while loops around it (a ``lax.scan`` over
  micro-batches runs its collectives once per micro-batch: XLA's
  ``known_trip_count``, else the ``N`` of the loop's ``i < N`` condition). Bytes are the
  collective's result per chip. ``collective-permute`` is counted too:
  XLA:TPU emits FSDP's reduce-scatters as collective-permutes.

  Args:
    hlo: ``compiled.as_text()``.

  Returns:
    ``kind -> (count, bytes)`` for every kind in :data:`COLLECTIVES`.
  """
  comps: dict[str, list[str]] = {}
  entry = None
  name = None
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) \(", line)
    if head and not line.startswith(" "):
      name = head[2]
      comps[name] = []
      if head[1]:
        entry = name
      continue
    if line.startswith("}"):
      name = None
      continue
    if name is not None:
      comps[name].append(line)
  calls: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
  for caller, lines in comps.items():
    for line in lines:
      body = re.search(r"\bbody=%?([\w.\-]+)", line)
      if body:
        cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
        calls[caller].append((body[1], _trip_count(line, comps.get(cond[1] if cond else "", []))))
      for callee in re.findall(
        r"\b(?:calls|to_apply|condition|true_computation|false_computation)=%?([\w.\-]+)", line
      ):
        calls[caller].append((callee, 1))
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      if branches:
        for callee in re.findall(r"%?([\w.\-]+)", branches[1]):
          calls[caller].append((callee, 1))
  times: dict[str, int] = {}

  def visit(comp: str, k: int) -> None:
    times[comp] = times.get(comp, 0) + k
    for callee, trip in calls.get(comp, ()):
      if callee in comps:
        visit(callee, k * trip)

  if entry is not None:
    visit(entry, 1)
  out = {kind: [0, 0] for kind in COLLECTIVES}
  op_re = re.compile(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-done)?\(")
  for comp, k in times.items():
    for line in comps[comp]:
      m = op_re.search(line)
      if not m or re.search(rf"{m[2]}-start\(", line):
        continue
      out[m[2]][0] += k
      out[m[2]][1] += k * _shape_bytes(m[1])
  return {kind: (c, b) for kind, (c, b) in out.items()}


# ---- one step


def _compile_options(platform: str, dump_dir: str | None) -> dict[str, Any]:
  options: dict[str, Any] = {}
  if platform == "tpu":
    # Compile a job that does not fit anyway, to report its memory (XLA:TPU
    # refuses it otherwise, with only the total).
    options["xla_tpu_no_crash_on_oom"] = True
  if dump_dir is not None:  # the buffer assignment, to name the largest buffers
    options["xla_dump_to"] = dump_dir
  return options


def _oom_message(error: Exception) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text[:400]


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _needed_bytes(lowered: Any, error: Exception) -> int | None:
  """The bytes per chip an XLA:TPU out-of-memory error names.

  A program far beyond the chip's HBM fails even with ``xla_tpu_no_crash_on_oom``
  ("Invalid TPU program"), naming no size; compiled again without it, XLA:TPU
  stops at its memory check with the total ("... (22.00G) exceeds available
  HBM (15.75G)", "Used 22.00G of 15.75G hbm").
  """
  for attempt in (error, None):
    if attempt is None:
      try:
        lowered.compile()
        return None
      except jax.errors.JaxRuntimeError as e:
        attempt = e
    m = re.search(
      r"\(([\d.]+)([KMGT])\) exceeds available HBM|Used ([\d.]+)([KMGT]) of", str(attempt)
    )
    if m:
      value, unit = (m[1], m[2]) if m[1] else (m[3], m[4])
      return int(float(value) * _UNITS[unit])
  return None


def compile_step(
  name: str,
  fn: Any,
  args: tuple[Any, ...],
  mesh: Any,
  *,
  usable_hbm: int | None = None,
  details: bool = True,
  num_buffers: int = 5,
) -> StepResult:
  """Lowers (under the mesh) and compiles one step; reads its memory, cost and collectives.

  Args:
    name: the step's name.
    fn: the ``jax.jit`` step.
    args: its abstract arguments.
    mesh: the mesh (the trace's current mesh).
    usable_hbm: the chip's HBM in bytes (None: no verdict).
    details: also name the largest buffers and count the collectives.
    num_buffers: how many buffers to name.

  Returns:
    The :class:`StepResult`.

  Raises:
    DoesNotFit: XLA:TPU refused the program as far too big for the chip.
  """
  with sharding.use_mesh(mesh):
    lowered = fn.lower(*args)
  platform = mesh.devices.flat[0].platform
  t = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="adamw_flax_aot_") as dump:
    try:
      compiled = lowered.compile(_compile_options(platform, dump if details else None))
    except jax.errors.JaxRuntimeError as e:
      if platform == "tpu" and ("RESOURCE_EXHAUSTED" in str(e) or "Invalid TPU program" in str(e)):
        raise TooBig(name, _needed_bytes(lowered, e), usable_hbm, _oom_message(e)) from e
      raise
    seconds = time.perf_counter() - t
    assignment = ""
    if details:
      found = sorted(glob.glob(os.path.join(dump, "*after_optimizations-buffer-assignment.txt")))
      if found:
        with open(found[-1]) as f:
          assignment = f.read()
  m = compiled.memory_analysis()
  parts, named = _argument_parts(compiled, args)
  # Whatever the per-argument layouts do not account for (none seen so far)
  # stays in "other", so the parts always add up to XLA's own argument total.
  unattributed = m.argument_size_in_bytes - sum(parts.values())
  parts["other"] += unattributed
  buffers: tuple[tuple[int, str, str], ...] = ()
  collectives: dict[str, tuple[int, int]] = {}
  if details:
    hlo = compiled.as_text()
    ops = _op_names(hlo)
    buffers = _largest_buffers(named, _temp_values(assignment), ops, num_buffers)
    collectives = count_collectives(hlo)
  peak = (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  memory = MemoryReport(
    params=parts["params"],
    opt_state=parts["opt_state"],
    batch=parts["batch"],
    other=parts["other"],
    outputs=m.output_size_in_bytes - m.alias_size_in_bytes,
    temps=m.temp_size_in_bytes,
    peak=peak,
    argument=m.argument_size_in_bytes,
    output=m.output_size_in_bytes,
    alias=m.alias_size_in_bytes,
    code=m.generated_code_size_in_bytes,
    usable=usable_hbm,
    unattributed=unattributed,
    buffers=buffers,
    host=m.host_argument_size_in_bytes,
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else (cost or {})
  seconds_est = cost.get("optimal_seconds")
  return StepResult(
    name=name,
    lowered=lowered,
    compiled=compiled,
    program=program_hash(lowered),
    seconds=seconds,
    memory=memory,
    cost=CostReport(
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      raw_seconds=None if seconds_est is None else float(seconds_est),
    ),
    collectives=collectives,
  )


@contextlib.contextmanager
def _heartbeat(say: Callable[[str], None], what: str, every: float = 30.0) -> Iterator[None]:
  """Calls ``say`` every ``every`` seconds while the block runs (a pod compile takes minutes)."""
  done = threading.Event()
  t0 = time.perf_counter()

  def beat() -> None:
    while not done.wait(every):
      say(f"{what} ({time.perf_counter() - t0:.0f} s)")

  thread = threading.Thread(target=beat, name="aot-heartbeat", daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


def compile_job(
  job: Job,
  topology: Topology | None = None,
  *,
  evals: bool = True,
  details: bool = True,
  progress: Callable[[str], None] | None = None,
) -> RunCompile:
  """Compiles a job's train step and (optionally) its eval steps.

  Args:
    job: from :func:`build_job`.
    topology: the topology the mesh's devices are of (its HBM gives the verdict).
    evals: compile the eval steps too.
    details: name the largest buffers and count the collectives.
    progress: called with a line before and after each compile.

  Returns:
    The :class:`RunCompile`.
  """
  say = progress or (lambda line: None)
  usable = topology.usable_hbm_bytes if topology is not None else None
  where = topology.name if topology is not None else f"{job.mesh.devices.size} devices"
  args = (job.state, job.batch)

  def one(name: str, fn: Any, step_args: tuple[Any, ...]) -> StepResult:
    say(f"compiling the {name} step for {where} (mesh {dict(job.mesh.shape)}) ...")
    with _heartbeat(say, f"still compiling the {name} step"):
      r = compile_step(name, fn, step_args, job.mesh, usable_hbm=usable, details=details)
    say(f"compiled the {name} step in {r.seconds:.1f} s")
    return r

  train = one("train", job.steps.train, args)
  results: dict[str, StepResult] = {}
  if evals and job.eval_batch is not None:
    for prefix, fn in job.steps.evals.items():
      results[prefix] = one(_eval_name(prefix), fn, (job.state, job.eval_batch))
  return RunCompile(job=job, topology=topology, train=train, evals=results)


def compile_run(
  config: Any,
  devices: Sequence[Any],
  topology: Topology | None = None,
  **kwargs: Any,
) -> RunCompile:
  """:func:`build_job` then :func:`compile_job`.

  Args:
    config: a validated config or its run plan.
    devices: the devices (:func:`topology_devices`, or real ones).
    topology: the topology of ``devices``, if they are a topology's.
    **kwargs: passed to :func:`compile_job`.

  Returns:
    The :class:`RunCompile`.
  """
  return compile_job(build_job(config, devices, topology), topology, **kwargs)


# ------------------------------------------------------------------ report


def _ms(seconds: float) -> str:
  ms = seconds * 1e3
  return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.3g} ms"


def gib(n: float) -> str:
  """Bytes as GiB: two decimals, or three significant digits below 0.01 GiB."""
  v = n / GiB
  if v == 0 or abs(v) >= 0.01:
    return f"{v:.2f}"
  return f"{v:.3g}"


def model_flops(result: RunCompile) -> tuple[float, str]:
  """The model's FLOPs per step, and where they come from.

  6·N·tokens (N trainable parameters) for a sequence model, as MFU is
  usually quoted for transformers; otherwise XLA's count over all chips.

  Args:
    result: the compiled run.

  Returns:
    ``(flops, "6·N·tokens" | "XLA's count")``.
  """
  job = result.job
  if job.sequence_model:
    return 6.0 * job.param_count * job.tokens_per_step, "6·N·tokens"
  return result.train.cost.flops * job.mesh.devices.size, "XLA's count"


def mfu(result: RunCompile, step: StepResult | None = None) -> float | None:
  """Model FLOPs utilisation of the train step's estimate: FLOPs / (S x chips x peak).

  Args:
    result: the compiled run (a topology is needed for the chip's peak).
    step: the step (default the train step).

  Returns:
    The fraction, or None without a time estimate or a topology.
  """
  step = step or result.train
  if result.topology is None or step.cost.seconds is None:
    return None
  flops, _ = model_flops(result)
  chips = result.job.mesh.devices.size
  return flops / (step.cost.seconds * chips * result.topology.peak_flops)


def _memory_line(mem: MemoryReport) -> str:
  verdict = ""
  if mem.usable is not None:
    verdict = f" of {gib(mem.usable)} GiB ({'fits' if mem.fits else 'DOES NOT FIT'})"
  return (
    f"per-chip HBM: params {gib(mem.params)} GiB, optimizer state {gib(mem.opt_state)} GiB, "
    f"batch {gib(mem.batch)} GiB, temps {gib(mem.temps)} GiB, peak {gib(mem.peak)} GiB{verdict}"
    + (f"; in host memory {gib(mem.host)} GiB (optimizer.offload)" if mem.host else "")
  )


def _estimate_line(result: RunCompile) -> str:
  step, chips = result.train, result.job.mesh.devices.size
  tflop = f"{step.cost.flops / 1e12:.3g} TFLOP per chip"
  if step.cost.seconds is None:
    if step.cost.raw_seconds is None:
      why = "XLA gave no time for this program"
    else:
      kind = result.job.mesh.devices.flat[0].device_kind
      why = (
        f"XLA's cost model gave {step.cost.raw_seconds:.4g} s, a negative time, so no "
        f"estimate (libtpu {libtpu_version()} on {kind})"
      )
    return f"step estimate: unavailable ({why}), {tflop}; no MFU without a time"
  flops, source = model_flops(result)
  xla_total = step.cost.flops * chips
  line = f"step estimate: {_ms(step.cost.seconds)}, {tflop}"
  util = mfu(result)
  if util is None:
    return line + " (XLA cost analysis)"
  line += f", MFU {util:.1%} (XLA cost analysis; model FLOPs by {source}: {flops / 1e12:.4g} TFLOP"
  if source != "XLA's count":
    share = xla_total / (step.cost.seconds * chips * result.topology.peak_flops)
    line += f"; XLA counts {xla_total / 1e12:.4g} TFLOP per step, {share:.1%} of peak"
  return line + ")"


def _collectives_line(collectives: Mapping[str, tuple[int, int]]) -> str:
  parts = []
  for kind in COLLECTIVES:
    count, nbytes = collectives.get(kind, (0, 0))
    parts.append(f"{kind} {count}" + (f" ({nbytes / MiB:.1f} MiB)" if count else ""))
  return "collectives per step: " + ", ".join(parts)


def _header_lines(job: Job, topo: Topology | None) -> list[str]:
  """The topology line (a contract with scripts), the hosts and chip figures, the model and state."""
  mesh = {str(k): int(v) for k, v in job.mesh.shape.items()}
  kind = job.mesh.devices.flat[0].device_kind
  if topo is None:
    lines = [f"devices: {job.mesh.devices.size} x {kind}, mesh {mesh}"]
  else:
    lines = [
      f"topology {topo.name}: {topo.chips} chips ({kind}), {topo.num_slices} slice(s), mesh {mesh}",
      f"  {topo.hosts} host{'s' if topo.hosts > 1 else ''} of {topo.chips_per_host} chips; HBM "
      f"{topo.chip.hbm_gb:g} GB per chip ({topo.chip.usable_hbm_gib:g} GiB usable by XLA:TPU), "
      f"peak {topo.chip.peak_tflops:g} TFLOP/s bf16 per chip",
    ]
  o = job.run.optimizer.section
  lines.append(
    f"  model {job.run.model.name}: {job.param_count:,} trainable params; "
    f"{job.tokens_per_step:,} {'tokens' if job.sequence_model else 'examples'} per step; "
    f"params {o.params_dtype or 'as built'}, mu {o.mu_dtype or 'like params'}, "
    f"nu {o.nu_dtype or 'like params'}, "
    + ("ZeRO-1" if job.run.mesh.shard_opt_state == "data" else "moments sharded like the params")
    + (f", accumulate_steps {o.accumulate_steps}" if o.accumulate_steps > 1 else "")
  )
  return lines


def report_lines(result: RunCompile) -> list[str]:
  """The command's report of a compiled run (the prefixes are a contract with scripts).

  Args:
    result: the compiled run.

  Returns:
    The lines: ``topology ...``, ``per-chip HBM: ...`` and the largest
    buffers under it, ``step estimate: ...``, ``collectives per step: ...``,
    and one line per eval step.
  """
  lines = _header_lines(result.job, result.topology)
  mem = result.train.memory
  lines.append(_memory_line(mem))
  lines.append(
    f"  also: other state {gib(mem.other)} GiB, outputs not aliased {gib(mem.outputs)} GiB; "
    f"arguments {gib(mem.argument)} GiB + outputs {gib(mem.output)} GiB - aliased "
    f"{gib(mem.alias)} GiB + temps {gib(mem.temps)} GiB = peak (memory_analysis)"
  )
  if mem.buffers:
    lines.append("  largest buffers:")
    lines += [f"    {gib(b):>8} GiB  {what}" for b, _, what in mem.buffers]
  lines.append(_estimate_line(result))
  lines.append(_collectives_line(result.train.collectives))
  for prefix, step in result.evals.items():
    m = step.memory
    est = f"{_ms(step.cost.seconds)} estimate" if step.cost.seconds else "no time estimate"
    verdict = (
      f" of {gib(m.usable)} GiB ({'fits' if m.fits else 'DOES NOT FIT'})" if m.usable else ""
    )
    lines.append(f"{_eval_name(prefix)} step: peak {gib(m.peak)} GiB per chip{verdict}, {est}")
  return lines


def too_big_lines(job: Job, topology: Topology, error: TooBig) -> list[str]:
  """The report of a job XLA:TPU would not compile at all (far beyond the chip's HBM).

  Args:
    job: the job.
    topology: its topology.
    error: the refusal.

  Returns:
    The header lines, then ``per-chip HBM: needs about P GiB of H GiB (DOES NOT FIT)``
    (or without a size when XLA:TPU named none) and why there is nothing more.
  """
  needs = f"needs about {gib(error.needed)} GiB" if error.needed else "needs more"
  return [
    *_header_lines(job, topology),
    f"per-chip HBM: {needs} of {gib(topology.usable_hbm_bytes)} GiB (DOES NOT FIT)",
    f"  XLA:TPU refused to compile the {error.step} step as too big for the chip (its "
    "out-of-memory check), so there is no breakdown, estimate or collective count",
  ]


# ------------------------------------------------------------------ variants


def variant(config: ml_collections.ConfigDict, overrides: Sequence[str] = (), **fields: Any) -> Any:
  """A copy of ``config`` with command-line overrides and ``"section.key"=value`` fields set.

  Args:
    config: the config.
    overrides: ``"section.key=value"`` strings.
    **fields: ``section__key=value`` (double underscore for the dot).

  Returns:
    The new config (validated).
  """
  cfg = copy.deepcopy(config)
  apply_overrides(cfg, overrides)
  for key, value in fields.items():
    section, name = key.split("__")
    cfg[section][name] = value
  return plan.make_plan(cfg).config


def fsdp_rules(job: Job) -> tuple[tuple[str, tuple[Any, ...]], ...] | None:
  """Partition rules that also shard every parameter over the data axes it does not use yet (FSDP).

  Each parameter keeps its spec and gains the free data axes (ZeRO-3 /
  FSDP; XLA gathers the params in the forward pass): on a dimension it is
  sharded on already when that dimension divides (so 8-bit moments, blocked
  along the last axis, keep whole blocks), else on the first unsharded one
  their size divides. One rule per parameter path.

  Args:
    job: the job (its state's shardings and mesh).

  Returns:
    The rules, or None when no parameter can be sharded further.
  """
  sizes = {str(k): int(v) for k, v in job.mesh.shape.items()}
  data_axes = [a for a in job.run.mesh.data_axes if sizes.get(a, 1) > 1]
  axes_of = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
  rules, changed = [], False
  for tree in (job.state.params, job.state.frozen):
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      spec = list(leaf.sharding.spec) + [None] * (len(leaf.shape) - len(leaf.sharding.spec))
      used = {a for e in spec for a in axes_of(e)}
      free = tuple(a for a in data_axes if a not in used)
      k = math.prod(sizes[a] for a in free)
      dims = sorted(range(len(spec)), key=lambda d: spec[d] is None)  # sharded dims first
      for dim in dims if k > 1 else ():
        axes = axes_of(spec[dim]) + free
        if leaf.shape[dim] % math.prod(sizes[a] for a in axes) == 0:
          spec[dim] = axes[0] if len(axes) == 1 else axes
          changed = True
          break
      path = _leaf_name(keypath)
      rules.append((re.sub(r"([*?\[\]])", r"[\1]", path), tuple(spec)))
  return tuple(rules) if changed else None


@dataclasses.dataclass(frozen=True)
class Trial:
  """One variant of a job, compiled (train step only).

  Attributes:
    label: what changed (``"int8 moments"``).
    peak: per-chip peak bytes (None: it did not compile).
    temps: per-chip temps.
    fits: whether it fits.
    seconds: the step estimate (None: none).
    mfu: model FLOPs utilisation (None: no estimate).
    error: why it did not compile, if it did not.
  """

  label: str
  peak: int | None
  temps: int | None
  fits: bool
  seconds: float | None = None
  mfu: float | None = None
  error: str = ""


def _short_error(e: BaseException) -> str:
  """An exception in one line: a user error's message, else its type and first line (or two)."""
  lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
  text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
  text = re.sub(r"^model \([^)]*\): ", "", text)
  return text if isinstance(e, UserError) else f"{type(e).__name__}: {text}"


def _trial(
  label: str, config: plan.RunConfig, devices: Sequence[Any], topology: Topology, say
) -> Trial:
  say(f"trying {label} ...")
  try:
    result = compile_run(config, devices, topology, evals=False, details=False, progress=say)
  except TooBig as e:  # its size, as XLA:TPU's out-of-memory check names it
    say(f"  {label}: too big to compile")
    return Trial(label, e.needed, None, False, error="too big to compile")
  except Exception as e:  # noqa: BLE001 (a variant that fails is one row, not the whole table)
    error = _short_error(e)
    say(f"  {label}: fails to compile ({error[:300]})")
    return Trial(label, None, None, False, error=error)
  m = result.train.memory
  say(f"  {label}: peak {gib(m.peak)} GiB ({'fits' if m.fits else 'does not fit'})")
  return Trial(label, m.peak, m.temps, m.fits, result.train.cost.seconds, mfu(result))


def _accumulation(job: Job) -> int | None:
  k = job.run.optimizer.accumulate_steps
  rows = next(iter(job.batch.values())).shape[0]
  ways = math.prod(int(job.mesh.shape[a]) for a in job.run.mesh.data_axes)
  for more in (4, 2):
    if rows % (ways * k * more) == 0:
      return k * more
  return None


def advise(
  config: Any,
  job: Job,
  topology: Topology,
  devices: Sequence[Any],
  base_peak: int | None = None,
  progress: Callable[[str], None] | None = None,
) -> list[tuple[str, Trial]]:
  """What would make a job that does not fit fit: each change compiled, not guessed.

  Tried (where the config does not have them yet): int8 moments, ZeRO-1
  over the data axes, 4x (or 2x) the accumulation steps; when no single one
  fits, all of those that saved memory together.

  Args:
    config: the job's config.
    job: the job (:func:`build_job`).
    topology: its topology.
    devices: the topology's devices.
    base_peak: the job's own per-chip peak (None: XLA:TPU would not compile it).
    progress: called with a line per compile.

  Returns:
    ``(suggestion text, trial)`` pairs, in the order tried.
  """
  say = progress or (lambda line: None)
  run = job.run
  o = run.optimizer.section
  tries: list[tuple[str, list[str]]] = []
  if not (o.mu_dtype == "int8" and o.nu_dtype == "int8"):
    tries.append(("int8 moments", ["optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8"]))
  data_ways = math.prod(int(job.mesh.shape[a]) for a in run.mesh.data_axes)
  if run.mesh.shard_opt_state != "data" and data_ways > 1:
    tries.append(("ZeRO-1 over data", ["mesh.shard_opt_state=data"]))
  k = _accumulation(job)
  if k is not None:
    tries.append((f"accumulate_steps={k}", [f"optimizer.accumulate_steps={k}"]))
  out: list[tuple[str, Trial]] = []
  helping: list[tuple[str, list[str]]] = []  # the changes that saved memory
  for label, overrides in tries:
    try:
      cfg = variant(run.config, overrides)
    except (UserError, ValueError) as e:
      reason = str(e).splitlines()[0]
      out.append(
        (f"{label}: not possible ({reason})", Trial(label, None, None, False, error=reason))
      )
      continue
    t = _trial(label, cfg, devices, topology, say)
    out.append((_suggestion(label, t, base_peak), t))
    if t.peak is not None and (base_peak is None or t.peak < base_peak):
      helping.append((label, overrides))
  if len(helping) > 1 and not any(t.fits for _, t in out):
    label = " + ".join(lbl for lbl, _ in helping)
    both = variant(run.config, [o for _, overrides in helping for o in overrides])
    t = _trial(label, both, devices, topology, say)
    out.append((_suggestion(f"together, {label}", t, base_peak), t))
  return out


def _suggestion(label: str, t: Trial, base_peak: int | None) -> str:
  if t.error == "too big to compile":
    about = f" about {gib(t.peak)} GiB" if t.peak else " more"
    return f"{label} still needs{about} (XLA:TPU would not compile it)"
  if t.peak is None:
    return f"{label} fails to compile ({t.error[:120]})"
  verdict = "fits" if t.fits else "still does not fit"
  if label.startswith("accumulate_steps"):
    return f"{label} cuts temps to about {gib(t.temps)} GiB (peak {gib(t.peak)} GiB, {verdict})"
  if base_peak is None:
    return f"{label} needs {gib(t.peak)} GiB ({verdict})"
  saved = base_peak - t.peak
  if saved <= 0:
    return f"{label} would not save memory (peak {gib(t.peak)} GiB)"
  return f"{label} would save {gib(saved)} GiB (peak {gib(t.peak)} GiB, {verdict})"


def _largest_consumer(mem: MemoryReport) -> str:
  parts = {"temps": mem.temps, "params": mem.params, "opt_state": mem.opt_state, "batch": mem.batch}
  name = max(parts, key=parts.get)
  label = {"opt_state": "optimizer state"}.get(name, name)
  text = f"largest consumer: {label} {gib(parts[name])} GiB"
  top = next((what for _, part, what in mem.buffers if part == name), None)
  return text + (f" (its biggest buffer: {top.split(' ', 1)[1]})" if top else "")


def does_not_fit_message(result: RunCompile, suggestions: Sequence[tuple[str, Trial]]) -> str:
  """The one-line verdict of a job that does not fit, with what was tried.

  Args:
    result: the compiled run.
    suggestions: from :func:`advise`.

  Returns:
    ``"does not fit: needs P GiB per chip, H GiB on a v5e chip; largest ...; ..."``.
  """
  worst = max([result.train, *result.evals.values()], key=lambda s: s.memory.peak)
  mem, topo = worst.memory, result.topology
  head = (
    f"does not fit: needs {gib(mem.peak)} GiB per chip, {gib(mem.usable)} GiB on a "
    f"{topo.chip.generation} chip"
  )
  if worst is not result.train:
    head += f" (the {worst.name} step)"
  tips = "; ".join(text for text, _ in suggestions) or "no change this command tries would help"
  return f"{head}; {_largest_consumer(mem)}; {tips}"


def too_big_message(
  error: TooBig, topology: Topology, suggestions: Sequence[tuple[str, Trial]]
) -> str:
  """:func:`does_not_fit_message` for a job XLA:TPU would not compile at all.

  Args:
    error: the refusal.
    topology: the topology.
    suggestions: from :func:`advise`.

  Returns:
    ``"does not fit: needs about P GiB per chip, H GiB on a v5e chip; ..."``.
  """
  needs = f"needs about {gib(error.needed)} GiB per chip" if error.needed else "needs more HBM"
  tips = "; ".join(text for text, _ in suggestions) or "no change this command tries would help"
  return (
    f"does not fit: {needs}, {gib(topology.usable_hbm_bytes)} GiB on a "
    f"{topology.chip.generation} chip; XLA:TPU would not compile the {error.step} step at all; {tips}"
  )


FORMATS = (
  ("float32", ["optimizer.params_dtype=None", "optimizer.mu_dtype=float32", "optimizer.nu_dtype=float32"]),
  ("bf16 mu", ["optimizer.params_dtype=None", "optimizer.mu_dtype=bfloat16", "optimizer.nu_dtype=float32"]),
  ("int8 moments", ["optimizer.params_dtype=None", "optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8"]),
  ("bf16 params + int8 moments", ["optimizer.params_dtype=bfloat16", "optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8"]),
)  # fmt: skip


def compare(
  config: Any,
  result: RunCompile,
  devices: Sequence[Any],
  progress: Callable[[str], None] | None = None,
) -> list[tuple[str, str, Trial]]:
  """The job compiled with each state format under each sharding variant.

  Formats: :data:`FORMATS`. Shardings: the config's (``config``); ZeRO-1
  (moments also over the data axes, ``mesh.shard_opt_state=data``) unless
  the config has it; FSDP (params, and so moments, also over the data axes,
  :func:`fsdp_rules`) where the model's shapes allow it.

  Args:
    config: the job's config.
    result: its compiled run (the config's own sharding).
    devices: the topology's devices.
    progress: called with a line per compile.

  Returns:
    ``(sharding, format, trial)`` rows.
  """
  say = progress or (lambda line: None)
  run = result.job.run
  own = "config (ZeRO-1)" if run.mesh.shard_opt_state == "data" else "config"
  shardings: list[tuple[str, list[str], dict[str, Any]]] = [(own, [], {})]
  if run.mesh.shard_opt_state != "data":
    shardings.append(("ZeRO-1", ["mesh.shard_opt_state=data"], {}))
  rules = fsdp_rules(result.job)
  if rules is not None:
    shardings.append(("FSDP", ["mesh.shard_opt_state=data"], {"mesh__partition_rules": rules}))
  rows = []
  for shard_label, shard_over, fields in shardings:
    for fmt, fmt_over in FORMATS:
      label = f"{shard_label}, {fmt}"
      try:
        cfg = variant(run.config, [*shard_over, *fmt_over], **fields)
      except (UserError, ValueError) as e:
        rows.append(
          (shard_label, fmt, Trial(label, None, None, False, error=str(e).splitlines()[0]))
        )
        continue
      if config_json(cfg) == config_json(run.config):  # the job itself: compiled already
        m = result.train.memory
        t = Trial(label, m.peak, m.temps, m.fits, result.train.cost.seconds, mfu(result))
      else:
        t = _trial(label, cfg, devices, result.topology, say)
      rows.append((shard_label, fmt, t))
  return rows


def compare_table(rows: Sequence[tuple[str, str, Trial]], usable: int | None) -> list[str]:
  """The :func:`compare` rows as a Markdown table.

  Args:
    rows: from :func:`compare`.
    usable: the chip's usable HBM (bytes), for the header.

  Returns:
    The table's lines.
  """
  of = f" (of {gib(usable)})" if usable else ""
  lines = [
    f"| sharding | state format | peak GiB per chip{of} | fits | step estimate | MFU |",
    "|---|---|---|---|---|---|",
  ]
  for shard, fmt, t in rows:
    if t.error == "too big to compile":
      about = f"about {gib(t.peak)}" if t.peak else "-"
      lines.append(f"| {shard} | {fmt} | {about} | no | too big to compile | - |")
      continue
    if t.peak is None:
      lines.append(f"| {shard} | {fmt} | - | no | fails: {t.error[:160]} | - |")
      continue
    est = _ms(t.seconds) if t.seconds else "none"
    util = f"{t.mfu:.1%}" if t.mfu is not None else "-"
    lines.append(
      f"| {shard} | {fmt} | {gib(t.peak)} | {'yes' if t.fits else 'no'} | {est} | {util} |"
    )
  return lines


# ------------------------------------------------------------ save and load


def versions() -> dict[str, str | None]:
  """The versions an executable depends on: jax, jaxlib and libtpu."""
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "libtpu": libtpu_version()}


def _devices_summary(mesh: Any) -> dict[str, Any]:
  devices = list(mesh.devices.flat)
  return {
    "platform": devices[0].platform,
    "device_kind": devices[0].device_kind,
    "count": len(devices),
    "slices": len({getattr(d, "slice_index", 0) for d in devices}),
    "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
  }


def _write(path: Any, data: bytes) -> None:
  if fs.is_remote(path):
    path.write_bytes(data)  # an object write is atomic
    return
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


def save_steps(result: RunCompile, workdir: Any) -> dict[str, Any]:
  """Writes the serialized steps and their fingerprint to ``WORKDIR/compiled/``.

  ``fingerprint.json`` records the topology and devices, the versions of
  jax, jaxlib and libtpu, the config, and per step the sha256 of its
  lowered program and of its file; ``fingerprint`` is the hash of what a
  loader must match (devices, versions, programs).

  Args:
    result: the compiled run.
    workdir: the run's workdir (created if missing).

  Returns:
    The fingerprint record.
  """
  directory = fs.as_path(workdir) / SAVE_DIR
  directory.mkdir(parents=True, exist_ok=True)
  steps = {}
  for step in [result.train, *result.evals.values()]:
    blob, _, _ = serialize_executable.serialize(step.compiled)
    name = f"{step.name}_step.xla"
    _write(directory / name, blob)
    steps[step.name] = {
      "file": name,
      "program": step.program,
      "sha256": hashlib.sha256(blob).hexdigest(),
      "bytes": len(blob),
    }
  record: dict[str, Any] = {
    "format": _FORMAT,
    "topology": None if result.topology is None else result.topology.name,
    "num_slices": 1 if result.topology is None else result.topology.num_slices,
    "devices": _devices_summary(result.job.mesh),
    "versions": versions(),
    "steps": steps,
  }
  record["fingerprint"] = _fingerprint(record)
  record["config"] = config_json(result.job.run.config)
  _write(directory / "fingerprint.json", (json.dumps(record, indent=1) + "\n").encode())
  return record


def _fingerprint(record: Mapping[str, Any]) -> str:
  keyed = {k: record[k] for k in ("format", "devices", "versions")}
  keyed["programs"] = {k: v["program"] for k, v in sorted(record["steps"].items())}
  return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def read_saved(workdir: Any) -> dict[str, Any] | None:
  """The fingerprint record in ``WORKDIR/compiled/``, or None if there is none.

  Args:
    workdir: the workdir.

  Returns:
    The record (``fingerprint.json``), with ``"directory"`` added.
  """
  directory = fs.as_path(workdir) / SAVE_DIR
  path = directory / "fingerprint.json"
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    return {"directory": str(directory), "unreadable": str(e)}
  record["directory"] = str(directory)
  return record


def _where(record: Mapping[str, Any]) -> str:
  d = record.get("devices", {})
  name = record.get("topology") or "devices"
  slices = f" x {record.get('num_slices')} slices" if record.get("num_slices", 1) > 1 else ""
  return f"{name}{slices} ({d.get('count')} x {d.get('device_kind')}, mesh {d.get('mesh')})"


def saved_mismatch(
  record: Mapping[str, Any], mesh: Any, programs: Mapping[str, str] | None = None
) -> str | None:
  """Why a saved record does not serve this mesh (and these programs); None when it does.

  Args:
    record: from :func:`read_saved`.
    mesh: the run's mesh.
    programs: ``step name -> program hash`` of this run's lowered steps
      (None: check devices and versions only).

  Returns:
    A short reason, or None.
  """
  if "unreadable" in record:
    return f"its fingerprint.json is unreadable ({record['unreadable'][:100]})"
  if record.get("format") != _FORMAT:
    return f"it was written in format {record.get('format')}, this version reads {_FORMAT}"
  here = _devices_summary(mesh)
  if record.get("devices") != here:
    return (
      f"they were compiled for {_where(record)}; this run has {here['count']} x "
      f"{here['device_kind']}, mesh {here['mesh']}"
    )
  now = versions()
  if record.get("versions") != now:
    diff = [
      f"{k} {record['versions'].get(k)} -> {v}"
      for k, v in now.items()
      if record["versions"].get(k) != v
    ]
    return f"they were compiled with other versions ({', '.join(diff)})"
  if programs is not None:
    for name, program in programs.items():
      saved = record.get("steps", {}).get(name)
      if saved is None:
        return f"there is no compiled {name} step"
      if saved.get("program") != program:
        return f"this run's {name} step is another program"
  return None


def use_saved_steps(
  steps: train_state.RunSteps,
  workdir: Any,
  run: Any,
  mesh: Any,
  state: Any,
  batch_sharding: Any,
  dataset: Any,
) -> tuple[train_state.RunSteps, str | None]:
  """The run's steps loaded from ``WORKDIR/compiled/`` when they match, else ``steps`` as given.

  What ``python -m train`` calls before its first step. The saved steps
  serve when they were compiled for this run's devices and mesh, with these
  versions of jax, jaxlib and libtpu, and when this run's steps, lowered
  here (a trace, no compile), are the same programs. Then the deserialized
  executables replace the jitted steps and no compilation happens.

  Args:
    steps: the run's jitted steps (:func:`adamw_flax.train_state.make_run_steps`).
    workdir: the workdir.
    run: the run plan.
    mesh: the run's mesh.
    state: the train state (its leaves' shapes, dtypes and shardings are read).
    batch_sharding: the batch's sharding.
    dataset: the run's dataset (one batch of each split gives the shapes).

  Returns:
    ``(steps, message)``: the message says what was loaded, or why nothing
    was; None when the workdir holds no compiled steps.
  """
  record = read_saved(workdir)
  if record is None:
    return steps, None
  directory = record["directory"]
  reason = saved_mismatch(record, mesh)
  if reason is None:
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    if any(getattr(x, "weak_type", False) for x in jax.tree.leaves(state)):
      reason = "the state has weakly typed leaves, which the saved steps were not compiled for"
  if reason is None:
    _, count = sharding.data_shard_info(mesh, run.mesh)  # the slices the dataset serves
    batch, eval_batch = batch_specs(dataset, batch_sharding, count)
    wanted: dict[str, tuple[Any, tuple[Any, ...]]] = {"train": (steps.train, (abstract, batch))}
    if eval_batch is not None:
      for prefix, fn in steps.evals.items():
        wanted[_eval_name(prefix)] = (fn, (abstract, eval_batch))
    lowered = {}
    with sharding.use_mesh(mesh):
      for name, (fn, args) in wanted.items():
        lowered[name] = fn.lower(*args)
    reason = saved_mismatch(record, mesh, {k: program_hash(v) for k, v in lowered.items()})
    if reason is not None and "program" in reason:
      changed = [
        c
        for c in config_diff(record.get("config", {}), config_json(plan.make_plan(run).config))
        if not c.startswith(("checkpoint.", "trainer.log_every", "trainer.eval_every", "trainer.allow_config_change",
                             "trainer.progress", "trainer.eval_batches"))
      ]  # fmt: skip
      if changed:
        reason += f" (config: {'; '.join(changed[:3])})"
  if reason is not None:
    return steps, f"{directory} holds compiled steps, not used: {reason}; compiling them here"
  loaded = {}
  try:
    for name, low in lowered.items():
      entry = record["steps"][name]
      blob = (fs.as_path(directory) / entry["file"]).read_bytes()
      if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise ValueError(f"{entry['file']} does not match its sha256")
      loaded[name] = serialize_executable.deserialize_and_load(blob, low.in_tree, low.out_tree)
  except Exception as e:  # noqa: BLE001 (any failure to load means: compile instead)
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return steps, f"{directory} holds compiled steps, not loadable ({first}); compiling them here"
  evals = {p: loaded.get(_eval_name(p), fn) for p, fn in steps.evals.items()}
  names = ", ".join(loaded)
  message = (
    f"loaded the compiled {names} step(s) from {directory} (fingerprint {record['fingerprint']}, "
    f"{_where(record)}): no compilation"
  )
  return train_state.RunSteps(train=loaded["train"], evals=evals), message


# ------------------------------------------------------------------ the command


def run_command(
  config: Any,
  topology_name: str,
  *,
  num_slices: int = 1,
  workdir: str | None = None,
  compare_variants: bool = False,
  out: Callable[[str], None] = print,
  progress: Callable[[str], None] | None = None,
  quiet: Callable[[], Any] = contextlib.nullcontext,
) -> RunCompile:
  """What ``python -m train.compile`` does after parsing its flags.

  Args:
    config: the validated config.
    topology_name: ``--topology``.
    num_slices: ``--num_slices``.
    workdir: ``--workdir``: save the compiled steps there.
    compare_variants: ``--compare``: also print the table of :func:`compare`.
    out: prints a report line.
    progress: prints a progress line.
    quiet: a context manager around libtpu's start-up (which writes
      warnings meant for TPU VMs to stderr).

  Returns:
    The compiled run.

  Raises:
    DoesNotFit: after the report, the one-line verdict with what was tried.
    UserError: a bad topology, config, mesh or a missing libtpu, as one line.
  """
  topology = parse_topology(topology_name, num_slices)
  with quiet():
    devices = topology_devices(topology)
  job = build_job(config, devices, topology)
  try:
    result = compile_job(job, topology, progress=progress)
  except TooBig as e:
    for line in too_big_lines(job, topology, e):
      out(line)
    tips = advise(config, job, topology, devices, None, progress)
    raise DoesNotFit(too_big_message(e, topology, tips)) from e
  for line in report_lines(result):
    out(line)
  if compare_variants:
    rows = compare(config, result, devices, progress)
    for line in compare_table(rows, topology.usable_hbm_bytes):
      out(line)
  if not result.fits:
    tips = advise(config, job, topology, devices, result.train.memory.peak, progress)
    raise DoesNotFit(does_not_fit_message(result, tips))
  if workdir:
    record = save_steps(result, workdir)
    out(
      f"saved the compiled steps to {fs.as_path(workdir) / SAVE_DIR} (fingerprint "
      f"{record['fingerprint']}); python -m train --workdir={workdir} on a {topology.name} "
      "slice loads them"
    )
  return result


__all__ = [
  "CHIPS",
  "COLLECTIVES",
  "Chip",
  "CostReport",
  "DoesNotFit",
  "FORMATS",
  "Job",
  "MemoryReport",
  "RunCompile",
  "StepResult",
  "Topology",
  "TooBig",
  "TopologyError",
  "Trial",
  "advise",
  "batch_specs",
  "build_job",
  "compare",
  "compare_table",
  "compile_job",
  "compile_run",
  "compile_step",
  "count_collectives",
  "does_not_fit_message",
  "too_big_lines",
  "too_big_message",
  "fsdp_rules",
  "libtpu_version",
  "model_flops",
  "mfu",
  "parse_topology",
  "program_hash",
  "propose_mesh_shape",
  "read_saved",
  "report_lines",
  "run_command",
  "save_steps",
  "saved_mismatch",
  "slice_mesh",
  "topology_devices",
  "use_saved_steps",
  "variant",
  "versions",
]
