"""Prints every config key: ``python -m train.keys [--readme]``.

The table comes from the keys' declarations (:mod:`adamw_flax.schema`): name,
default, allowed values or range, and what it does. ``--readme`` rewrites
the table in README.md between its ``keys:start`` / ``keys:end`` markers
(the test suite checks that it is current).
"""

from __future__ import annotations

import sys
from pathlib import Path

from adamw_flax import schema

START, END = "<!-- keys:start -->", "<!-- keys:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_with_table(text: str) -> str:
  """``text`` (README.md) with the table between the markers replaced by the current one."""
  head, rest = text.split(START, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{START}\n{schema.markdown_table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
  if argv[1:] == ["--readme"]:
    README.write_text(readme_with_table(README.read_text()))
    return 0
  if argv[1:]:
    print("usage: python -m train.keys [--readme]", file=sys.stderr)
    return 2
  print(schema.markdown_table())
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
