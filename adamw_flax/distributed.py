"""Multi-process start-up: ``jax.distributed`` initialisation with clear failures.

Call :func:`initialize` once per process, first thing (from ``train/``,
before any JAX computation); importing this module changes nothing.

* One process (nothing given, no cluster detected, or ``num_processes=1``):
  nothing to do.
* Cloud TPU pods, Slurm, Open MPI: JAX reads the job's layout from the
  environment; :func:`initialize` calls ``jax.distributed.initialize()``
  without arguments (the coordinator's port: ``JAX_COORDINATOR_PORT``).
* Elsewhere: the coordinator ``HOST:PORT`` (process 0's host), the process
  count and this process's id, as arguments or as the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.

When the processes do not all join in time, JAX aborts the process from C++
with a bare ``DEADLINE_EXCEEDED`` (jax#35905 is such a report: a changed
default port, a silent hang, then that). Here a process other than 0 first
waits for the coordinator's port to open and raises a :class:`TimeoutError`
naming the address if it never does; and every process prints what to check
to stderr shortly before JAX's deadline. Restarts of large jobs can take
long to gather (marin PR 7232): raise ``initialization_timeout`` (or set
``JAX_INITIALIZATION_TIMEOUT``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from adamw_flax.errors import UserCodeError, UserError

__all__ = ["agree", "exchange_text", "initialize", "is_main_process", "leave"]

T = TypeVar("T")

_ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"
_ENV_TIMEOUT = "JAX_INITIALIZATION_TIMEOUT"

_log = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
  raw = os.environ.get(name)
  if raw in (None, ""):
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def _detected_cluster() -> tuple[str, int] | None:
  """The cluster JAX would detect by itself and its process count, if any."""
  # jax.distributed.initialize() detects clusters on its own but offers no
  # public way to ask whether it would, and with no cluster it raises rather
  # than treating the run as single-process; this asks JAX's own detectors.
  try:
    from jax._src.clusters import ClusterEnv  # noqa: PLC0415, PLC2701 (no public API; see above)
  except ImportError:  # a JAX without this module: only explicit settings work
    return None
  for env in ClusterEnv._cluster_types:
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      with warnings.catch_warnings():  # e.g. Kubernetes without its client package
        warnings.simplefilter("ignore")
        if not env.is_env_present():
          continue
        count = int(env.get_process_count())
    except Exception:  # a detector's probe failing means "not this cluster"
      continue
    return env.__name__, count
  return None


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(
      f"coordinator_address {address!r} must be HOST:PORT (process 0's host and a free port "
      "every process can reach), e.g. '10.0.0.1:8476'"
    )
  return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, timeout: float, process_id: int) -> None:
  """Blocks until the coordinator accepts TCP connections; a clear error if it never does."""
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout
  last: OSError | None = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host, port), timeout=min(5.0, timeout)):
        return
    except OSError as e:
      last = e
      time.sleep(0.2)
  raise TimeoutError(
    f"process {process_id}: the coordinator at {address} did not accept connections within "
    f"{timeout:.0f}s (last error: {last}). Check that process 0 is running with the same "
    f"coordinator address, that HOST is process 0's host as seen from here and PORT is free "
    f"there and not blocked, and, for slow starts, raise initialization_timeout "
    f"(--initialization_timeout or {_ENV_TIMEOUT})."
  )


def _warn_before_deadline(seconds: float, what: str) -> threading.Timer:
  # JAX aborts the whole process from C++ at its deadline, so a Python
  # exception handler never runs: say what to check just before it does.
  def warn() -> None:
    print(
      f"adamw_flax.distributed: {what} has not completed after {seconds:.0f}s and JAX will "
      f"abort this process at its deadline (DEADLINE_EXCEEDED). Check that all processes "
      f"were started with the same coordinator address and process count and distinct "
      f"process ids, that none of them died (see their logs), that the coordinator's port "
      f"is reachable from every host, and for slow starts raise initialization_timeout "
      f"(--initialization_timeout or {_ENV_TIMEOUT}).",
      file=sys.stderr,
      flush=True,
    )

  timer = threading.Timer(seconds, warn)
  timer.daemon = True
  timer.start()
  return timer


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_device_ids: Sequence[int] | None = None,
  initialization_timeout: int | None = 300,
  cpu_collectives: str | None = "gloo",
  heartbeat_timeout_seconds: int = 100,
  shutdown_timeout_seconds: int = 300,
) -> bool:
  """Joins this process to a multi-process JAX job (a no-op for a single process).

  Args:
    coordinator_address: ``HOST:PORT`` of process 0 (default
      ``$JAX_COORDINATOR_ADDRESS``; on Cloud TPU, Slurm and Open MPI found by
      JAX, with ``$JAX_COORDINATOR_PORT`` choosing the port).
    num_processes: processes in the job (default ``$JAX_NUM_PROCESSES``).
    process_id: this process's index in ``[0, num_processes)`` (default
      ``$JAX_PROCESS_ID``).
    local_device_ids: restrict this process to these local accelerators
      (one process per GPU); default all.
    initialization_timeout: seconds to wait for all processes to join;
      ``None`` reads ``$JAX_INITIALIZATION_TIMEOUT``, else 300.
    cpu_collectives: cross-process collectives of the CPU backend ("gloo" or
      "mpi"), set before the backend starts; ``None`` leaves JAX's setting.
    heartbeat_timeout_seconds: a process silent this long counts as dead and
      the job is stopped (JAX's default).
    shutdown_timeout_seconds: how long an exiting process waits for the
      others at JAX's shutdown barrier (JAX's default).

  Returns:
    True if a multi-process job was joined (or had been already), False for
    a single-process run.

  Raises:
    ValueError: settings that are only partly given or inconsistent, naming
      the missing ones and their environment variables.
    TimeoutError: the coordinator never accepted connections (processes
      other than 0).
    RuntimeError: JAX's backend already started in this process.

  Examples:
    >>> initialize(num_processes=1)  # a single process: nothing to join
    False
  """
  if jax.distributed.is_initialized():
    return True
  address = coordinator_address or os.environ.get(_ENV_ADDRESS) or None
  count = num_processes if num_processes is not None else _env_int(_ENV_NUM_PROCESSES)
  pid = process_id if process_id is not None else _env_int(_ENV_PROCESS_ID)
  timeout = initialization_timeout
  if timeout is None:
    timeout = _env_int(_ENV_TIMEOUT) or 300
  if timeout <= 0:
    raise ValueError(f"initialization_timeout must be > 0 seconds, got {timeout}")

  if count == 1:
    return False  # a single process: nothing to coordinate
  given = {"coordinator_address": address, "num_processes": count, "process_id": pid}
  explicit = all(v is not None for v in given.values())
  cluster = None if explicit else _detected_cluster()
  if cluster is not None and cluster[1] == 1 and count is None:
    return False  # e.g. a one-task Slurm job
  if cluster is None and not explicit:
    if all(v is None for v in given.values()):
      return False
    env_names = {
      "coordinator_address": _ENV_ADDRESS,
      "num_processes": _ENV_NUM_PROCESSES,
      "process_id": _ENV_PROCESS_ID,
    }
    missing = [f"{k} (or ${env_names[k]})" for k, v in given.items() if v is None]
    raise ValueError(
      f"multi-process settings are incomplete: got "
      f"{ {k: v for k, v in given.items() if v is not None} }, missing {', '.join(missing)}. "
      "Outside Cloud TPU, Slurm and Open MPI (which JAX detects) give all three."
    )
  if explicit:
    _split_address(address)
    if count < 1 or not 0 <= pid < count:
      raise ValueError(
        f"process_id={pid} must be in [0, num_processes={count}); ids are 0..{count - 1}"
      )

  started = time.monotonic()
  if explicit and pid != 0:
    _wait_for_coordinator(address, timeout, pid)
  if cpu_collectives is not None:
    # Read when the CPU backend starts, so it must be set before any JAX call.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  remaining = max(1, int(timeout - (time.monotonic() - started)))
  who = f"process {pid} of {count}" if explicit else f"this process ({cluster[0]})"
  _log.info("joining the JAX job: %s, coordinator %s, timeout %ss", who, address, remaining)
  timer = _warn_before_deadline(
    max(0.5, remaining - min(5.0, 0.1 * remaining)),
    f"joining the JAX job as {who} (coordinator {address or 'auto-detected'})",
  )
  try:
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=count,
      process_id=pid,
      local_device_ids=local_device_ids,
      initialization_timeout=remaining,
      heartbeat_timeout_seconds=heartbeat_timeout_seconds,
      shutdown_timeout_seconds=shutdown_timeout_seconds,
    )
  finally:
    timer.cancel()
  return True


def is_main_process() -> bool:
  """True on process 0, the one that logs and writes shared files.

  Examples:
    >>> is_main_process()
    True

  Returns:
    Whether this is process 0 (True without ``jax.distributed``).
  """
  return jax.process_index() == 0


def exchange_text(text: str) -> list[str]:
  """Every process's ``text``, in process order (a collective: call it on every process).

  Start-up uses it to agree: on an error (one process's workdir lock, data
  path or checkpoint), on the config. Two small all-gathers
  (``multihost_utils.process_allgather``) of the lengths and the UTF-8 bytes.

  Args:
    text: this process's text.

  Returns:
    ``[text of process 0, text of process 1, ...]``; ``[text]`` for one process.
  """
  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32)).reshape(-1)
  buffer = np.zeros(max(int(lengths.max()), 1), np.uint8)
  buffer[: data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  return [bytes(gathered[i, : int(n)]).decode() for i, n in enumerate(lengths)]


# What an agreed failure becomes on every process: the kinds of error a start-up
# phase can end with, by the exit status they give.
_KINDS = {"user": UserError, "code": UserCodeError}


def agree(fn: Callable[[], T], what: str) -> T:
  """Runs ``fn`` on every process; if it fails on any, every process raises the same error.

  Without this, a process whose start-up fails (the workdir lock it did not
  get, a data path only it cannot read, a checkpoint it cannot restore) exits
  while the others wait for it in the next collective until JAX aborts them
  from C++. Here they all end with the failing process's message (the lowest
  such process's) and the same exit status.

  Args:
    fn: the phase to run.
    what: the phase's name, for a failure that is not a user error.

  Returns:
    ``fn()``'s result.

  Raises:
    UserError, UserCodeError: the failing process's, on every process.
    RuntimeError: another exception on some process (re-raised as is where it happened).
  """
  if jax.process_count() == 1:
    return fn()
  result, failure, status = None, None, "ok:"
  try:
    result = fn()
  except UserError as e:
    failure, status = e, f"user:{e}"
  except UserCodeError as e:
    failure, status = e, f"code:{e.report}"
  except Exception as e:  # noqa: BLE001 (reported to the others, re-raised here)
    failure, status = e, f"bug:{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  statuses = exchange_text(status)
  for i, s in enumerate(statuses):
    kind, _, message = s.partition(":")
    if kind == "ok":
      continue
    if failure is not None and i == jax.process_index() and kind == "bug":
      raise failure
    if kind in _KINDS:
      raise _KINDS[kind](message)
    raise RuntimeError(f"{what} failed on process {i}: {message}")
  return result


def leave(timeout_s: float = 15.0) -> None:
  """Leaves a failed multi-process job: JAX's shutdown barrier, for at most ``timeout_s``.

  After an agreed error (:func:`agree`) every process is alive and exiting:
  the barrier keeps one from exiting while another is still finishing the
  collective that agreed (its peer's socket would close under it: "Gloo
  AllGather failed: Connection reset by peer"). After an error only one
  process saw, the others never arrive, so the wait is bounded; the caller
  exits either way.

  Args:
    timeout_s: seconds to wait at the barrier.
  """
  if not jax.distributed.is_initialized():
    return
  done = threading.Event()

  def shutdown() -> None:
    with contextlib.suppress(Exception):
      jax.distributed.shutdown()
    done.set()

  threading.Thread(target=shutdown, name="leave-job", daemon=True).start()
  done.wait(timeout_s)
