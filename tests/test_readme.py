"""The README's drop-in example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_drop_in_example_runs():
  text = README.read_text()
  block = re.search(r"## The drop-in\n\n```python\n(.*?)```", text, re.S).group(1)
  scope: dict = {}
  exec(compile(block, str(README), "exec"), scope)
  assert scope["state"][0].mu["w"].dtype.name == "bfloat16"
  assert scope["state"][0].nu["w"].dtype.name == "float32"


def test_readme_starts_with_the_two_commands():
  lines = README.read_text().splitlines()
  commands = [ln for ln in lines[:20] if ln.startswith("python3 -m pip install")]
  assert len(commands) == 2
  assert "python3 -m train --config=configs/tiny_shakespeare.py" in commands[0]
  ci = (README.parent / ".ci" / "run").read_text()
  test_cmd = commands[1].split("&&", 1)[1].strip()
  assert test_cmd in ci


def test_every_adamw_flax_name_the_readme_uses_exists():
  import adamw_flax

  text = README.read_text() + (README.parent / "train" / "README.md").read_text()
  names = set(re.findall(r"adamw_flax\.([A-Za-z_][A-Za-z0-9_]*)", text))
  assert names >= {"weight_decay_mask", "save_state", "restore_state", "restore_params"}
  for name in sorted(names):
    assert hasattr(adamw_flax, name), name
