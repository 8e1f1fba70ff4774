"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from adamw_flax import masks

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


def test_readme_linen_mask_example_runs():
  text = README.read_text()
  (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "linen_target(" in b]
  assert "adamw_flax.weight_decay_mask(" in block
  scope: dict = {}
  exec(compile(block, str(README), "exec"), scope)
  state = scope["state"]
  # With zero gradients the Adam step is 0: only the decay moves a parameter.
  new = state.apply_gradients(grads=jax.tree.map(jnp.zeros_like, state.params)).params
  pairs = zip(jax.tree.leaves(state.params), jax.tree.leaves(new), strict=True)
  moved = [not np.array_equal(old, now) for old, now in pairs]
  decayed = {p for p, m in zip(masks.tree_paths(state.params), moved, strict=True) if m}
  assert decayed == {"layers_0/kernel", "layers_2/kernel"}
