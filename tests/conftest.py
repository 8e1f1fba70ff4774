"""Shared test setup: the repository root on sys.path (configs/, examples/, train/)."""

from __future__ import annotations

import os
import random
import sys
import tempfile
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
# Tiny Shakespeare's 65 characters: a stand-in text over them has the canonical vocabulary.
_VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _stand_in_text() -> Path:
  """A text file over the canonical vocabulary, for tests that need a local text, not its words.

  Written once per machine (atomically: test workers may race), so that tests run
  where the canonical text is not beside the checkout and without a download.
  """
  path = Path(tempfile.gettempdir()) / f"adamw_flax_tests_text_{len(_VOCAB)}.txt"
  if not path.is_file():
    rng = random.Random(0)
    words = ["".join(rng.choices(_VOCAB[13:], k=rng.randint(1, 9))) for _ in range(4000)]
    text = _VOCAB + "".join(rng.choice(words) + rng.choice(_VOCAB[:13]) for _ in range(40000))
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
  return path


# The canonical text where it is, else the stand-in: the TPU compiles need the vocabulary only.
TEXT = SHARED_TEXT if SHARED_TEXT.is_file() else _stand_in_text()

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
