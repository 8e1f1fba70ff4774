"""Structure targets of the library, measured from its source.

* the longest functions of ``adamw_flax/`` in lines of code (docstrings,
  comments and blank lines not counted; a nested function counts in its own
  right and inside its parent): target at most 80;
* how many library modules name each config key (its name, 8+ characters,
  as a whole word, outside docstrings and comments): target at most 2.5 on
  average;
* function-level imports in the library (target: only the commented cases).

  python benchmarks/structure.py [--json]

``tests/test_structure.py`` holds the library to these targets.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "adamw_flax"
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def _code_lines(source: str) -> set[int]:
  """Line numbers holding code: not blank, not only a comment, not inside a docstring."""
  tree = ast.parse(source)
  docstrings: set[int] = set()
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
      value = body[0].value
      if isinstance(value, ast.Constant) and isinstance(value.value, str):
        docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
  lines: set[int] = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                    tokenize.DEDENT, tokenize.ENDMARKER):  # fmt: skip
      continue
    for line in range(tok.start[0], tok.end[0] + 1):
      if line not in docstrings:
        lines.add(line)
  return lines


def function_lengths() -> list[tuple[int, str]]:
  """``(lines of code, "module.py:function")`` for every function of the library, longest first."""
  out = []
  for path in sorted(LIBRARY.rglob("*.py")):
    source = path.read_text()
    code = _code_lines(source)
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = sum(1 for line in range(node.lineno, node.end_lineno + 1) if line in code)
        out.append((n, f"{path.relative_to(LIBRARY)}:{node.name}"))
  return sorted(out, reverse=True)


def _code_text(source: str) -> str:
  """The source without docstrings and comments (strings in code stay: keys are named there)."""
  code = _code_lines(source)
  kept = []
  for i, line in enumerate(source.splitlines(), start=1):
    if i in code:
      kept.append(re.sub(r"#.*$", "", line))
  return "\n".join(kept)


def config_keys() -> list[str]:
  """The declared keys (``section.field``) whose field name has 8+ characters."""
  from adamw_flax import schema  # noqa: PLC0415 (after sys.path)

  return sorted(k.name for k in schema.DECLARATIONS if len(k.field) >= 8)


def key_spread(reads_only: bool = False) -> tuple[float, dict[str, list[str]]]:
  """The mean number of library modules naming each key, and ``key -> modules``.

  Args:
    reads_only: count a module only where it reads the key from a config or
      plan (``.key`` attribute access, or the text ``"section.key"``), not
      where the word is a function's parameter (``adamw(learning_rate=...)``,
      optax's own signature) or a local name.
  """
  texts = {
    str(p.relative_to(LIBRARY)): _code_text(p.read_text()) for p in sorted(LIBRARY.rglob("*.py"))
  }
  where = {}
  for key in config_keys():
    word = re.escape(key.split(".", 1)[1])
    pattern = (
      re.compile(rf"\.{word}\b(?!\s*=[^=])|{re.escape(key)}\b")
      if reads_only
      else re.compile(rf"\b{word}\b")
    )
    where[key] = [m for m, text in texts.items() if pattern.search(text)]
  mean = sum(len(v) for v in where.values()) / max(len(where), 1)
  return mean, where


def function_imports() -> list[str]:
  """``module.py:line`` of each import inside a function, without a ``noqa: PLC0415`` comment."""
  out = []
  for path in sorted(LIBRARY.rglob("*.py")):
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for inner in ast.walk(node):
          if isinstance(inner, (ast.Import, ast.ImportFrom)):
            if "PLC0415" not in lines[inner.lineno - 1]:
              out.append(f"{path.relative_to(LIBRARY)}:{inner.lineno}")
  return sorted(set(out))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print the figures as JSON")
  args = parser.parse_args()
  lengths = function_lengths()
  mean, where = key_spread()
  reads, read_where = key_spread(reads_only=True)
  imports = function_imports()
  if args.json:
    figures = {"longest": lengths[:10], "key_spread": mean, "key_reads": reads, "imports": imports}
    print(json.dumps(figures, indent=1))
    return
  print("longest functions (lines of code):")
  for n, name in lengths[:10]:
    print(f"  {n:4d}  {name}")
  print(f"config keys (8+ characters) named in {mean:.2f} library modules on average")
  for key, modules in sorted(where.items(), key=lambda kv: -len(kv[1]))[:8]:
    print(f"  {len(modules)}  {key}: {', '.join(modules)}")
  print(f"config keys read (.key or 'section.key') in {reads:.2f} library modules on average")
  for key, modules in sorted(read_where.items(), key=lambda kv: -len(kv[1]))[:8]:
    print(f"  {len(modules)}  {key}: {', '.join(modules)}")
  print(f"function-level imports without a comment: {len(imports)} {imports}")


if __name__ == "__main__":
  main()
