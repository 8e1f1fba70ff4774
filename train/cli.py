"""What ``python -m train`` and ``python -m train.inspect`` share: config overrides, errors.

``--config.section.key=value`` arguments are taken out of the command line
before absl parses it and applied by :func:`adamw_flax.config.apply_overrides`
(the one override parser, also behind :func:`adamw_flax.config.load_config`),
so a typo is a one-line error with a "did you mean" instead of absl's usage
dump. A :class:`~adamw_flax.errors.UserError` exits with status 2 and its
message; ``--verbosity`` adds the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from adamw_flax import watchdog
from adamw_flax.errors import UserCodeError, UserError

# The config schema and the trainer (jax, flax, orbax: seconds) load where a
# command needs them, so `--help` and a bad flag answer without them.

USER_ERROR = 2


class _LibraryErrors(logging.Filter):
  """Drops Orbax's error logs and asyncio's "Task exception was never retrieved".

  A failed checkpoint write (a full disk) reaches the trainer as an exception,
  which it reports in one line; Orbax logs the same failure from its threads,
  with tracebacks, first. ``--verbosity`` keeps them.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.CRITICAL:
      return True
    return f"{os.sep}orbax{os.sep}" not in record.pathname and record.name != "asyncio"


def quiet_library_errors() -> None:
  """Installs :class:`_LibraryErrors` on the root logger's handlers (absl's among them)."""
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_LibraryErrors())


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits ``argv`` into (the other arguments, the ``section.key=value`` overrides).

  Both ``--config.a.b=v`` and ``--config.a.b v`` are overrides.

  Examples:
    >>> split_config_overrides(["prog", "--config=c.py", "--config.trainer.seed=3",
    ...                         "--config.trainer.num_steps", "6", "--workdir=w"])
    (['prog', '--config=c.py', '--workdir=w'], ['trainer.seed=3', 'trainer.num_steps=6'])
  """
  rest: list[str] = []
  overrides: list[str] = []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--config."):
      body = arg[len("--config.") :]
      if "=" not in body and i + 1 < len(args):
        body = f"{body}={args[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


_HELP = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def run_app(main: Callable[[list[str], list[str]], int], argv: Sequence[str]) -> None:
  """Runs ``main(args, overrides)`` under absl's ``app.run`` and exits with its code.

  A help request exits 0 and a bad flag 2 (absl exits 1 for both, which
  scripts read as a crash).
  """
  from absl import app, flags  # noqa: PLC0415 (the entry points import absl first)

  def parse(args: list[str]) -> list[str]:
    # absl exits 1 on a bad flag (a missing --config); bad input exits 2 here.
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      spec = getattr(sys.modules["__main__"], "__spec__", None)
      prog = f"python -m {spec.name.removesuffix('.__main__')}" if spec else args[0]
      print(f"error: {e}\n  see: {prog} --help", file=sys.stderr)
      sys.exit(2)

  rest, overrides = split_config_overrides(argv)
  try:
    app.run(lambda args: sys.exit(main(args, overrides)), argv=rest, flags_parser=parse)
  except SystemExit as done:
    flags_given = rest[1 : rest.index("--")] if "--" in rest else rest[1:]
    if done.code == 1 and any(a in _HELP for a in flags_given):
      sys.exit(0)
    raise


def train(config: str, workdir: str | None, overrides: Sequence[str], *, verbose: bool) -> int:
  """What ``python -m train`` runs after flags and ``jax.distributed``: returns the exit status.

  Args:
    config: the ``--config`` value (``path`` or ``path:arg``).
    workdir: the ``--workdir`` value.
    overrides: ``section.key=value`` strings.
    verbose: print tracebacks of user errors too.
  """
  loaded: list[Any] = []

  def load() -> None:
    if not workdir:
      raise UserError("--workdir: missing; pass --workdir=DIR (created if missing)")
    loaded.append(load_plan(config, overrides))

  # A bad config is reported before the trainer (Flax, Orbax, plotting) loads.
  code = run_reporting_errors(load, verbose=verbose)
  if code:
    return code
  from adamw_flax import trainer  # noqa: PLC0415 (see the imports)

  summary: dict[str, Any] = {}

  def run() -> None:
    summary.update(trainer.train_and_evaluate(loaded[0], workdir))

  code = run_reporting_errors(run, verbose=verbose, fatal=(trainer.TrainingDiverged,))
  if code == 0 and summary.get("interrupted"):
    return watchdog.INTERRUPT_EXIT_CODE  # Ctrl-C: saved, but the run did not finish
  return code


def load_config(path: str, overrides: Sequence[str]) -> Any:
  """``--config`` (``path`` or ``path:arg``) with the overrides applied, validated."""
  return load_plan(path, overrides).config


def load_plan(path: str, overrides: Sequence[str]) -> Any:
  """``--config`` with the overrides applied, as its run plan (the config validated once, here).

  The trainer and ``train.inspect`` take the plan as it is, so a launch
  validates its config once.
  """
  from adamw_flax import config as config_lib  # noqa: PLC0415 (see the imports)
  from adamw_flax import plan  # noqa: PLC0415

  if not path:
    raise config_lib.ConfigError("--config: missing; pass --config=configs/NAME.py")
  return plan.make_plan(config_lib.load_config(path, overrides, validate=False))


def _short(message: str, limit: int = 3) -> str:
  lines = [line for line in str(message).splitlines() if line.strip()]
  if lines and lines[0].strip() == "invalid config:" and len(lines) > 1:
    lines = lines[1:]  # the keys themselves are the message
  lines = [line.strip() for line in lines]
  if len(lines) > limit:
    lines = [*lines[: limit - 1], f"... and {len(lines) - limit + 1} more"]
  return "\n".join(lines)


def run_reporting_errors(
  fn: Callable[[], Any],
  *,
  verbose: bool,
  fatal: tuple[type[BaseException], ...] = (),
  reraise: bool = True,
) -> int:
  """Runs ``fn``; a user error prints one to three lines and gives status 2.

  Args:
    fn: the command's work.
    verbose: print the traceback of a user error too.
    fatal: exceptions printed as one line with status 1 (e.g. a diverged run).
    reraise: re-raise other exceptions (False: print them, status 1, for
      multi-process jobs that must not hang at shutdown).

  Returns:
    The exit status.
  """
  try:
    fn()
  except UserError as e:
    if verbose:
      traceback.print_exc()
      if getattr(e, "details", ""):
        print(e.details, file=sys.stderr)
    print(f"error: {_short(str(e))}", file=sys.stderr)
    return USER_ERROR
  except fatal as e:
    if verbose:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)
    return 1
  except UserCodeError as e:  # the user's own code raised: their frame, not JAX's internals
    if verbose:
      traceback.print_exc()
    print(e.report, file=sys.stderr)  # last, also after the traceback
    return 1
  except KeyboardInterrupt:  # Ctrl-C before training took the signal over (or after)
    if verbose:
      traceback.print_exc()
    print("interrupted before training started: nothing was saved", file=sys.stderr)
    return watchdog.INTERRUPT_EXIT_CODE
  except BaseException:
    if reraise:
      raise
    traceback.print_exc()
    return 1
  return 0
