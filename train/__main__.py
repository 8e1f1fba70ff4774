"""Trains the model a config names: ``python -m train --config=configs/X.py --workdir=DIR``.

Overrides: ``--config.optimizer.learning_rate=3e-4`` (any config field).
Multi-process jobs: JAX detects Cloud TPU, Slurm and Open MPI by itself;
elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). Rerunning the same command resumes the run.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

# glibc returns every freed block above 128 KiB to the OS, so each XLA:CPU step
# maps its buffers afresh: ~12k page faults a step, 25% of a small model's
# step time (measured on the Tiny Shakespeare CPU config). Keeping freed memory
# in the process needs these set before the process starts, hence the re-exec.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if (
  __name__ == "__main__"
  and sys.platform == "linux"
  and not any(k in os.environ for k in _MALLOC_ENV)
):
  os.environ.update(_MALLOC_ENV)
  os.execv(sys.executable, [sys.executable, "-m", "train", *sys.argv[1:]])

# A Ctrl-C during the imports raises KeyboardInterrupt as Python's handler does
# and is remembered (watchdog.remember_interrupts says why); it ends them in
# one line, as the trainer ends a start-up it interrupts.
_INTERRUPTED: list[int] = []


def _remember(signum, frame) -> None:
  _INTERRUPTED.append(signum)
  signal.default_int_handler(signum, frame)


def _interrupted() -> int:
  print("interrupted before training started: nothing was saved", file=sys.stderr)
  return 130  # watchdog.INTERRUPT_EXIT_CODE, which may not be importable yet


def _drop_interrupts(unraisable) -> None:
  # "Exception ignored in: <function _xla_gc_callback> ... KeyboardInterrupt":
  # the interrupt is remembered and ends the start-up in one line instead.
  if not issubclass(unraisable.exc_type, KeyboardInterrupt):
    sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
  signal.signal(signal.SIGINT, _remember)
  sys.unraisablehook = _drop_interrupts
try:
  from absl import app, flags, logging

  from train import cli
except BaseException:  # an interrupted import may raise ImportError("initialization failed")
  if not _INTERRUPTED:
    raise
  sys.exit(_interrupted())

_CONFIG = flags.DEFINE_string("config", None, "Config file (get_config()); path or path:arg.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, metrics).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer(
  "initialization_timeout",
  None,
  "Seconds to wait for all processes to join (default: JAX_INITIALIZATION_TIMEOUT or 300).",
)
flags.mark_flags_as_required(["config"])  # a missing --workdir is a one-line error


def main(argv: list[str], overrides: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  verbose = flags.FLAGS["verbosity"].present
  if not verbose:
    # Orbax logs every save step at INFO; the trainer prints what users need.
    logging.set_verbosity(logging.WARNING)
    cli.quiet_library_errors()
  try:
    from adamw_flax import distributed, watchdog  # noqa: PLC0415 (after absl parsed the flags)

    watchdog.remember_interrupts(seen=bool(_INTERRUPTED))
    multi = distributed.initialize(
      _COORDINATOR.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      initialization_timeout=_INIT_TIMEOUT.value,
    )
  except BaseException as e:  # an interrupted import may raise ImportError, as above
    if not (_INTERRUPTED or isinstance(e, KeyboardInterrupt)):
      raise
    return _interrupted()
  try:
    code = cli.train(_CONFIG.value, _WORKDIR.value, overrides, verbose=verbose)
  except KeyboardInterrupt:  # one between the phases the trainer reports itself
    code = _interrupted()
  except BaseException:
    if not multi:
      raise
    traceback.print_exc()
    code = 1
  if multi and code:
    sys.stdout.flush()
    sys.stderr.flush()
    distributed.leave(timeout_s=15.0)  # the others may still be in the collective that agreed
    os._exit(code)
  return code


if __name__ == "__main__":
  cli.run_app(main, sys.argv)
