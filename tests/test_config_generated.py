"""Every declared key's wrong cases, generated from its declaration: each one short, status 2, nothing touched.

For each key of :mod:`adamw_flax.schema` the cases a user writes by mistake
are made from what the key declares: a value of the wrong type, one out of
its range, a choice it does not offer, a typo of its name, and ``None`` where
it is not allowed. Each goes through the command line's path in this process
(:func:`train.cli.train`: the override parser, the validation, the workdir
left as it was) and must print at most 3 lines naming the key, with status
2. A sample of them goes through ``python -m train`` too.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from adamw_flax import schema
from tests.conftest import ROOT, subprocess_env

CONFIG = ROOT / "tests" / "configs" / "user.py"  # a registered model and dataset


def _typo(name: str) -> str:
  section, field = name.split(".", 1)
  i = max(1, len(field) // 2)
  swapped = field[: i - 1] + field[i] + field[i - 1] + field[i + 1 :]
  return f"{section}.{swapped if swapped != field else field + 'x'}"


def _cases() -> list[tuple[str, str, str]]:
  """``(case id, override, text the message must hold)`` for every declared key."""
  out = []
  for k in schema.DECLARATIONS:
    if k.section == "model" or (k.section == "data" and k.field == "name"):
      continue  # the registered model's and dataset's own (checked by registry.fields)
    name = k.name
    out.append((f"{name}:typo", f"{_typo(name)}=1", f"{_typo(name)}: unknown key"))
    if k.type in (int, float):
      out.append((f"{name}:type", f"{name}=abc", f"{name}: cannot read 'abc'"))
    elif k.type is bool:
      out.append((f"{name}:type", f"{name}=maybe", f"{name}: expected true or false"))
    elif k.type is tuple:
      out.append((f"{name}:type", f"{name}='oops'", name))
    if not k.optional and k.type is not str:
      out.append((f"{name}:None", f"{name}=None", f"{name}: expected"))
    if k.type in (int, float) and (k.low is not None or k.high is not None):
      bad = k.low - 1 if k.low is not None else k.high + 1
      bad = int(bad) if k.type is int else float(bad)
      out.append((f"{name}:range", f"{name}={bad}", f"{name}: must be"))
    if k.allowed() is not None:
      out.append((f"{name}:choice", f"{name}=not_a_choice", f"{name}: must be"))
  return out


CASES = _cases()


def test_every_checked_key_has_its_cases():
  keys = {c[0].split(":")[0] for c in CASES}
  assert len(CASES) >= 150, len(CASES)
  for k in schema.DECLARATIONS:
    if k.section in schema.CHECKED_SECTIONS:
      assert k.name in keys


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding a file of a run; no case may change it."""
  path = tmp_path_factory.mktemp("bad") / "run"
  path.mkdir()
  (path / "notes.txt").write_text("my run\n")
  return path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_generated_bad_value_is_short_and_touches_nothing(case, workdir, capsys):
  from train import cli  # noqa: PLC0415 (the command line's module)

  _, override, expected = case
  before = sorted(p.name for p in workdir.iterdir())
  code = cli.train(str(CONFIG), str(workdir), [override], verbose=False)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2, (override, err)
  assert 1 <= len(err) <= 3 and err[0].startswith("error: "), err
  assert expected in "\n".join(err), (override, err)
  assert sorted(p.name for p in workdir.iterdir()) == before


SAMPLE = [c for c in CASES if c[0].split(":")[1] in ("typo", "range", "choice", "None", "type")][
  ::40
]


@pytest.mark.parametrize("case", SAMPLE, ids=[c[0] for c in SAMPLE])
def test_a_sample_through_python_m_train(case, tmp_path):
  _, override, expected = case
  run = subprocess.run(
    [sys.executable, "-m", "train", f"--config={CONFIG}", f"--workdir={tmp_path / 'run'}",
     f"--config.{override}"],
    cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 2, run.stderr[-2000:]
  assert 1 <= len(lines) <= 3 and expected in run.stderr, lines
  assert not (tmp_path / "run").exists()
