"""The command line of adamw_flax: ``python -m train --config=configs/X.py --workdir=DIR``."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os


def _tpu_probe_would_fail() -> bool:
  """True where libtpu is installed (the ``tpu`` extra) but the machine has no TPU.

  There jax's TPU probe prints five lines of libtpu warnings at every launch
  ("could not determine TPU accelerator type", ...), then runs on the CPU
  anyway. A TPU VM has /dev/accel* (v4, v5e) or /dev/vfio/N (v5p, v6e) or
  TPU_* variables; another PJRT plugin (CUDA, ROCm) is left to jax as well.
  """
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return False
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return False
  if any(k.startswith(("TPU_ACCELERATOR_TYPE", "TPU_WORKER")) for k in os.environ):
    return False
  plugins = importlib.metadata.entry_points(group="jax_plugins")
  return not plugins and importlib.util.find_spec("jax_plugins") is None


# Before any submodule imports jax: the commands launched on a machine without a
# TPU (with the tpu extra installed for train.compile) run on the CPU quietly.
if _tpu_probe_would_fail():
  os.environ["JAX_PLATFORMS"] = "cpu"
