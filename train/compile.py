"""Compiles a run's train and eval steps for a TPU topology, on any machine: memory, time, advice.

Usage::

  python -m train.compile --config=configs/X.py --topology=v5p-128 [--num_slices=N]
      [--workdir=DIR] [--compare] [--config.section.key=value ...]

The steps are exactly those ``python -m train`` would run on that slice
(same config, overrides and errors), built from abstract values only and
compiled by XLA:TPU's own compiler through libtpu (``pip install -e '.[tpu]'``):
no TPU and no parameter memory needed. The report gives the per-chip HBM
(and whether it fits), the step estimate and MFU, and the collectives; a
job that does not fit exits with status 2 and a last line saying what
would make it fit, each suggestion compiled. ``--compare`` tabulates state
formats and sharding variants; ``--workdir`` saves the compiled steps,
which ``python -m train --workdir=DIR`` loads on a matching slice. See
:mod:`adamw_flax.aot` and train/README.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

# Before jax is imported: the runtime stays on the CPU (the TPU devices are
# compile-only ones from libtpu; without this, jax with libtpu installed
# spends seconds looking for a TPU), libtpu skips the TPU VM metadata server,
# and it lets this process load it beside another (a trainer, a second
# compile): nothing here runs on a chip.
for _key, _value in (
  ("JAX_PLATFORMS", "cpu"),
  ("TPU_SKIP_MDS_QUERY", "1"),
  ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
):
  os.environ.setdefault(_key, _value)

from absl import app, flags, logging  # noqa: E402

from adamw_flax import aot  # noqa: E402
from train import cli  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "Config file (get_config()); path or path:arg.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5p-128, v5e-256, v6e-64, v4-32, ...")
_NUM_SLICES = flags.DEFINE_integer(
  "num_slices", 1, "Identical slices over the data-center network."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Save the compiled steps in DIR/compiled.")
_COMPARE = flags.DEFINE_bool(
  "compare", False, "Also compile and tabulate state formats x shardings."
)


@contextlib.contextmanager
def _libtpu_quiet():
  """Holds back what libtpu writes to stderr at start-up (TPU VM warnings), unless it fails."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      held.seek(0)
      sys.stderr.write(held.read().decode(errors="replace"))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def main(argv: list[str], overrides: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  verbose = flags.FLAGS["verbosity"].present
  if not verbose:
    logging.set_verbosity(logging.WARNING)

  def run() -> None:
    if not _TOPOLOGY.value:
      raise aot.TopologyError("--topology: missing; pass e.g. --topology=v5p-128")
    aot.run_command(
      cli.load_config(_CONFIG.value, overrides),
      _TOPOLOGY.value,
      num_slices=_NUM_SLICES.value,
      workdir=_WORKDIR.value,
      compare_variants=_COMPARE.value,
      out=lambda line: print(line, flush=True),
      progress=lambda line: print(line, file=sys.stderr, flush=True),
      quiet=_libtpu_quiet,
    )

  return cli.run_reporting_errors(run, verbose=verbose)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run_app(main, sys.argv)
