"""Shared test setup: the repository root on sys.path (configs/, examples/, train/)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The tests run on CPU; with libtpu installed (the tpu extra), JAX would otherwise
# spend seconds at every start looking for a TPU. Children inherit it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Both xdist workers may load libtpu for XLA:TPU compiles (it allows one process otherwise),
# and on a machine that is not a TPU VM it must not query the metadata server.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

SHARED_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# Launch configs, not test modules: --doctest-modules would import them as
# top-level modules named after their files (a "grain.py" shadowing grain).
collect_ignore = ["configs"]


@pytest.fixture
def repo_root() -> Path:
  return ROOT


def subprocess_env(**extra: str) -> dict[str, str]:
  """Environment for child Python processes: repo on PYTHONPATH, quiet TF/XLA logs."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.update(extra)
  return env
