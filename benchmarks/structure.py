"""Structure targets of the library, measured from its source.

* the longest functions of ``adamw_flax/`` in lines of code (docstrings,
  comments and blank lines not counted; a nested function counts in its own
  right and inside its parent): target at most 80;
* how many library modules read each config key (8+ characters): the module
  that declares it (``schema.py``) and every module whose code reads its value
  (``x.key`` loaded, ``x.get("key")``, ``getattr(x, "key")``): target at most
  2.5 on average. Also printed, the issue's first measure: modules naming the
  key as a whole word anywhere in code, strings included. That one counts
  error messages (which name the key for the user, as STYLE.md asks) and
  :func:`adamw_flax.adamw`'s own parameters (optax's signature, the drop-in
  contract), neither of which ties a module to the config;
* allowed values written once: a tuple of two or more of a key's allowed
  values appears only in its declaration (``choices=``) or as the module
  constant the declaration reads (``schedules.SCHEDULES``), nowhere else
  (target: none);
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


def key_spread() -> tuple[float, dict[str, list[str]]]:
  """The mean number of library modules naming each key as a whole word, and ``key -> modules``."""
  texts = {
    str(p.relative_to(LIBRARY)): _code_text(p.read_text()) for p in sorted(LIBRARY.rglob("*.py"))
  }
  where = {}
  for key in config_keys():
    pattern = re.compile(rf"\b{re.escape(key.split('.', 1)[1])}\b")
    where[key] = [m for m, text in texts.items() if pattern.search(text)]
  mean = sum(len(v) for v in where.values()) / max(len(where), 1)
  return mean, where


def _value_reads(tree: ast.AST, fields: set[str]) -> set[str]:
  """The fields whose value the code of ``tree`` reads (attribute loads, ``.get``, ``getattr``)."""
  seen = set()
  for n in ast.walk(tree):
    if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and n.attr in fields:
      seen.add(n.attr)
    elif isinstance(n, ast.Call) and n.args:
      func = n.func
      by_get = isinstance(func, ast.Attribute) and func.attr == "get"
      arg = n.args[0] if by_get else None
      if isinstance(func, ast.Name) and func.id == "getattr" and len(n.args) > 1:
        arg = n.args[1]
      if isinstance(arg, ast.Constant) and arg.value in fields:
        seen.add(arg.value)
  return seen


def key_reads() -> tuple[float, dict[str, list[str]]]:
  """The mean number of library modules reading each key (declaring module included), and ``key -> modules``."""
  keys = config_keys()
  by_field = {k.split(".", 1)[1]: k for k in keys}
  where: dict[str, list[str]] = {k: ["schema.py"] for k in keys}
  for path in sorted(LIBRARY.rglob("*.py")):
    module = str(path.relative_to(LIBRARY))
    if module == "schema.py":
      continue
    for field in _value_reads(ast.parse(path.read_text()), set(by_field)):
      where[by_field[field]].append(module)
  mean = sum(len(v) for v in where.values()) / max(len(where), 1)
  return mean, where


def repeated_choices() -> list[str]:
  """``module.py:line`` of each tuple of 2+ of a key's allowed values outside its declaration.

  A declaration's ``choices=`` and a module-level constant (or type alias)
  holding them are where they are written; any other literal repeats them.
  """
  from adamw_flax import schema  # noqa: PLC0415 (after sys.path)

  allowed = [set(k.choices) - {None} for k in schema.DECLARATIONS if k.choices]
  out = []
  for path in sorted(LIBRARY.rglob("*.py")):
    tree = ast.parse(path.read_text())
    written: set[int] = set()
    for node in tree.body:  # module constants: NAMES = (...), Alias = Literal[...]
      if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        written.update(id(n) for n in ast.walk(node.value))
    for node in ast.walk(tree):
      if isinstance(node, ast.keyword) and node.arg == "choices":
        written.update(id(n) for n in ast.walk(node.value))
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Tuple, ast.List, ast.Set)) or id(node) in written:
        continue
      values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
      if len(values) == len(node.elts) >= 2 and any(set(values) <= a for a in allowed):
        out.append(f"{path.relative_to(LIBRARY)}:{node.lineno}")
  return out


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
  reads, read_where = key_reads()
  imports = function_imports()
  repeated = repeated_choices()
  if args.json:
    figures = {"longest": lengths[:10], "key_reads": reads, "key_spread": mean, "imports": imports,
               "repeated_choices": repeated}  # fmt: skip
    print(json.dumps(figures, indent=1))
    return
  print("longest functions (lines of code):")
  for n, name in lengths[:10]:
    print(f"  {n:4d}  {name}")
  print(f"config keys (8+ characters) named in {mean:.2f} library modules on average")
  for key, modules in sorted(where.items(), key=lambda kv: -len(kv[1]))[:8]:
    print(f"  {len(modules)}  {key}: {', '.join(modules)}")
  print(f"config keys read in {reads:.2f} library modules on average (declaration included)")
  for key, modules in sorted(read_where.items(), key=lambda kv: -len(kv[1]))[:8]:
    print(f"  {len(modules)}  {key}: {', '.join(modules)}")
  print(f"allowed values repeated outside their declaration: {len(repeated)} {repeated}")
  print(f"function-level imports without a comment: {len(imports)} {imports}")


if __name__ == "__main__":
  main()
