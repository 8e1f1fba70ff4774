"""The structure targets benchmarks/structure.py measures, held: short functions, no hidden imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _figures() -> dict:
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "structure.py"), "--json"],
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  return json.loads(proc.stdout)


def test_no_library_function_is_longer_than_80_lines_nor_imports_inside_a_function():
  figures = _figures()
  too_long = [(n, where) for n, where in figures["longest"] if n > 80]
  assert not too_long, f"split these (at most 80 lines of code each): {too_long}"
  assert figures["imports"] == [], f"function-level imports without a comment: {figures['imports']}"
