"""User code failing at the first step, for each kind of model: a short report, and nothing locked.

Each model kind of tests/user_models.py (NNX with Rngs, BatchNorm, Dropout;
NNX with activation sharding constraints; Linen with batch_stats; Linen with
an RNG passed to ``__call__``; a Linen module the user bridged) is broken as
users' code breaks (tests/failing_models.py): a loss or module that raises,
a batch key that is not there, a shape that does not fit, a constructor that
raises, no parameter the default weight-decay mask selects. Each runs
through ``python -m train`` and must end with status 1 and at most four
lines on stderr (``error: Type: message``, the user's file:line and code,
the batch's keys, dtypes and shapes, one line of advice; no traceback
unless ``--verbosity=1``), or, for the mask, status 2 and one line. The
fixed config then trains in the same workdir (once per way to fail).

Three cases are in the default suite with their reruns (a raising module, a
missing batch key, the mask) and one more without; the rest are slow tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from adamw_flax import errors, plan, registry
from adamw_flax import train_state as ts
from tests import failing_models as fm
from tests.conftest import ROOT
from tests.sharding_workers import child_env

IMAGES = "image float32[8, 8, 8, 1], label int32[8]"
TOKENS = "tokens int32[8, 9]"
REGRESSION = "x float32[8, 8], y float32[8]"
BATCHES = {"cnn": IMAGES, "gemma": TOKENS, "resnet": IMAGES, "vae": REGRESSION,
           "wrapped": REGRESSION}  # fmt: skip
TRAIN = "the train step (your model and loss)"
FAILING, USER = "tests/failing_models.py", "tests/user_models.py"

# (kind, failure) -> (first line after "error: ", what was running, file, its line of code).
# The batch line is BATCHES[kind] when something ran on a batch, absent otherwise.
EXPECTED = {
  ("cnn", "raises"): (
    "NotImplementedError: label smoothing is not written yet", TRAIN, FAILING,
    'raise NotImplementedError("label smoothing is not written yet")',
  ),
  ("cnn", "missing_key"): (
    "KeyError: 'labels'", TRAIN, FAILING,
    'return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])',
  ),
  ("cnn", "shape"): (
    "ValueError: conv_general_dilated lhs feature dimension", TRAIN, USER,
    "x = nnx.relu(self.bn1(self.conv1(x)))",
  ),
  ("cnn", "init"): (
    "KeyError: 'channels'", "model (tests.failing_models:cnn_init)", FAILING,
    'channels = data_info["channels"]',
  ),
  ("cnn", "data"): (
    "AxisError: axis 4 is out of bounds for array of dimension 4",
    "the train_batch of data (tests.failing_models:flipped_images)", FAILING,
    'return {**batch, "image": np.flip(batch["image"], axis=4)}',
  ),
  ("gemma", "raises"): (
    "ValueError: sequence of 8 tokens is longer than the window of 4", TRAIN, FAILING,
    'raise ValueError(f"sequence of {x_BTD.shape[1]} tokens',
  ),
  ("gemma", "missing_key"): (
    "KeyError: 'input_ids'", TRAIN, FAILING, 'logits = model(batch["input_ids"][:, :-1])',
  ),
  ("gemma", "shape"): (
    "TypeError: cannot reshape array of shape (8, 8) (size 64) into shape (16, 3)", TRAIN,
    FAILING, "chunks = tokens_BT.reshape(b * (t // 3), 3)",
  ),
  ("gemma", "init"): (
    "ValueError: width must be a multiple of heads, got dim=16, heads=3",
    "model (tests.failing_models:gemma_init)", FAILING,
    'raise ValueError(f"width must be a multiple of heads',
  ),
  ("resnet", "raises"): (
    "NotImplementedError: stochastic depth in training", TRAIN, FAILING,
    'raise NotImplementedError("stochastic depth in training")',
  ),
  ("resnet", "missing_key"): (
    "KeyError: 'images'", TRAIN, FAILING, 'logits = model(batch["images"], train=train)',
  ),
  ("resnet", "shape"): (
    'ScopeParamShapeError: For parameter "kernel" in "/conv_init", the given initializer is '
    "expected to generate shape (3, 3, 1, 4), but the existing parameter it received has shape "
    "(3, 3, 3, 4)", TRAIN, USER,
    'x = nn.Conv(self.filters, (3, 3), use_bias=False, name="conv_init")(x)',
  ),
  ("resnet", "init"): (
    "TypeError: ResNet.__init__() got an unexpected keyword argument 'stage_sizes'",
    "model (tests.failing_models:resnet_init)", FAILING, "return um.ResNet(stage_sizes=",
  ),
  ("vae", "raises"): (
    "NotImplementedError: the importance-weighted bound for evaluation is not written yet",
    "the eval step (your model and loss, train=False)", FAILING,
    'raise NotImplementedError("the importance-weighted bound',
  ),
  ("vae", "missing_key"): (
    "KeyError: 'inputs'", TRAIN, FAILING,
    'recon, mean, logvar = model(batch["inputs"], rngs.noise())',
  ),
  ("vae", "shape"): (
    "TypeError: sub got incompatible shapes for broadcasting: (8, 9), (8, 8)", TRAIN, USER,
    'mse = jnp.mean(jnp.sum((recon - batch["x"]) ** 2, -1))',
  ),
  ("vae", "init"): (
    "KeyError: 'deconv'", "model (tests.failing_models:vae_init)", FAILING,
    "self.decoder = DECODERS[self.kind](self.features)",
  ),
  ("wrapped", "raises"): (
    "ValueError: micro-batches of 4 rows are too small for BatchNorm", TRAIN, FAILING,
    'raise ValueError(f"micro-batches of {x.shape[0]} rows',
  ),
  ("wrapped", "missing_key"): (
    "KeyError: 'target'", TRAIN, FAILING,
    'return jnp.mean((model(batch["x"], train=train) - batch["target"]) ** 2), {}',
  ),
  ("wrapped", "shape"): (
    "TypeError: dot_general requires contracting dimensions to have the same shape, "
    "got (16,) and (8,)", TRAIN, USER, "return self.head(h)[:, 0]",
  ),
  ("wrapped", "init"): (
    "TypeError: LinenEncoder.__call__() missing 1 required keyword-only argument: 'train'",
    "model (tests.failing_models:wrapped_init)", FAILING,
    "self.encoder = nnx.bridge.ToNNX(um.LinenEncoder(cfg.hidden), rngs=rngs).lazy_init(x)",
  ),
}  # fmt: skip
NO_KERNEL = {
  "cnn": "the NNX model ProbeCNN",
  "gemma": "the NNX model FusedMLP",
  "resnet": "the model ScaledResNet (Linen, through nnx.bridge.ToNNX)",
  "vae": "the model ScaleVAE (Linen, through nnx.bridge.ToNNX)",
  "wrapped": "the model ScaleRegressor",
}
# One case of each way to fail with its rerun in the default suite (kinds that compile fast);
# each failure alone is cheap (it raises while tracing, before any compile): DEFAULT adds some.
FAST = [("wrapped", "raises"), ("vae", "missing_key"), ("cnn", "shape"), ("vae", "init"),
        ("gemma", "no_kernel")]  # fmt: skip
DEFAULT = [("resnet", "raises")]
ALL = [(kind, failure) for kind in fm.KINDS for failure in fm.FAILURES]


def _train(kind: str, failure: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
  config = tmp_path / f"{kind}_{failure}.py"
  config.write_text(
    "from tests.failing_models import config\n\n\n"
    f"def get_config():\n  return config({kind!r}, {failure!r})\n"
  )
  cmd = [sys.executable, "-m", "train", f"--config={config}", f"--workdir={tmp_path / 'run'}"]
  return subprocess.run(
    [*cmd, *args],
    cwd=ROOT,
    env=child_env(4 if kind == "gemma" else 2),
    capture_output=True,
    text=True,
    timeout=240,
  )


def _line_of(path: str, code: str) -> int:
  (number,) = [
    i for i, line in enumerate((ROOT / path).read_text().splitlines(), 1) if code in line
  ]
  return number


def _check_report(kind: str, failure: str, run: subprocess.CompletedProcess) -> None:
  """Status 1 and the short report, all of stderr: what, where, the batch, the advice."""
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback" not in run.stderr + run.stdout, run.stderr[-3000:]
  assert 3 <= len(lines) <= 4, lines
  what, where, path, code = EXPECTED[kind, failure]
  assert lines[0].startswith(f"error: {what}"), lines
  assert lines[1].startswith(f"  in {where} at {path}:{_line_of(path, code)} (in "), lines
  assert code in lines[1], lines
  ran_on_a_batch = where.startswith(("the train step", "the eval step"))
  if ran_on_a_batch:
    assert lines[2] == f"  batch: {BATCHES[kind]}", lines
  assert len(lines) == 3 + ran_on_a_batch, lines
  assert "--verbosity=1" in lines[-1], lines
  if failure == "missing_key":
    assert "the dataset does not give" in lines[-1], lines


def _check_config_error(kind: str, run: subprocess.CompletedProcess, workdir: Path) -> None:
  """Status 2, one line naming the key, the model and what to do; nothing written."""
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert run.returncode == 2, run.stderr[-3000:]
  assert "Traceback" not in run.stderr + run.stdout
  assert len(lines) == 1, lines
  assert lines[0].startswith("error: optimizer.weight_decay_mask: weight decay rule #1"), lines
  assert f"matches no parameter of {NO_KERNEL[kind]}" in lines[0]
  assert lines[0].endswith("or use 'all' or 'none'."), lines
  assert not workdir.exists() or not any(workdir.iterdir())


def _check(kind: str, failure: str, tmp_path: Path) -> None:
  run = _train(kind, failure, tmp_path)
  if failure == "no_kernel":
    _check_config_error(kind, run, tmp_path / "run")
  else:
    _check_report(kind, failure, run)


# The default suite reruns three of them (one per kind of report); CI all.
@pytest.mark.parametrize(
  ("kind", "failure"),
  [c if c in FAST[:2] + FAST[-1:] else pytest.param(*c, marks=pytest.mark.slow) for c in FAST],
)
def test_a_failure_is_short_and_the_fixed_rerun_trains_in_the_same_workdir(tmp_path, kind, failure):
  _check(kind, failure, tmp_path)
  fixed = [f"--config.{o}" for o in fm.FIXES[failure](kind)]
  rerun = _train(kind, failure, tmp_path, *fixed)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  workdir = tmp_path / "run"
  assert (workdir / "checkpoints" / "2").is_dir()
  saved = json.loads((workdir / "config.json").read_text())
  if failure == "no_kernel":
    assert saved["optimizer"]["weight_decay_mask"] == "all"
  else:
    assert saved["model"]["name"] == f"tests.user_models:{fm.WORKING[kind][0]}"
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]  # the rerun's own rows


@pytest.mark.parametrize(
  ("kind", "failure"),
  [c if c in DEFAULT else pytest.param(*c, marks=pytest.mark.slow) for c in ALL if c not in FAST],
)
def test_a_failure_of_each_kind_is_short(tmp_path, kind, failure):
  _check(kind, failure, tmp_path)


def test_a_dataset_that_raises_before_the_first_step_is_short(tmp_path):
  _check_report("cnn", "data", _train("cnn", "data", tmp_path))


def test_the_traceback_comes_with_verbosity_1(tmp_path):
  run = _train("cnn", "init", tmp_path, "--verbosity=1")
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback (most recent call last)" in run.stderr
  assert "KeyError: 'channels'" in run.stderr  # the user's exception, with its frames
  channels = 'channels = data_info["channels"]'
  assert f'File "{ROOT / FAILING}", line {_line_of(FAILING, channels)}' in run.stderr
  lines = run.stderr.splitlines()
  last = max(i for i, line in enumerate(lines) if line.startswith("error: "))
  assert lines[last] == "error: KeyError: 'channels'", lines[last:]  # the short report too
  assert lines[last + 1].startswith("  in model (tests.failing_models:cnn_init) at "), lines[last:]


def _report_of(fn, batch) -> list[str]:
  try:
    fn(batch)
  except KeyError as e:
    return errors.describe_user_exception(e, "the train step", batch=batch).splitlines()
  raise AssertionError("no KeyError")


def test_the_missing_key_advice_is_for_the_batch_s_keys_only():
  batch = {"image": np.zeros((2, 3), np.float32), "label": np.zeros((2,), np.int32)}

  def loss(batch):
    return batch["labels"]

  def metrics(batch):
    names = {"accuracy": 0}
    return batch["image"], names["labels"]  # a KeyError of another dict

  lines = _report_of(loss, batch)
  assert lines[0] == "error: KeyError: 'labels'"
  assert lines[1].endswith('(in loss): return batch["labels"]'), lines
  assert lines[2] == "  batch: image float32[2, 3], label int32[2]"
  assert lines[3].startswith("  your code reads batch['labels'], which the dataset does not give")
  assert _report_of(metrics, batch)[3].startswith("  (your code raised this: fix it"), lines


# ------------------------------------------------ the step's contract, broken


def _inspect(kind: str, failure: str, tmp_path: Path) -> subprocess.CompletedProcess:
  config = tmp_path / f"{kind}_{failure}.py"  # written by _train
  return subprocess.run(
    [sys.executable, "-m", "train.inspect", f"--config={config}"],
    cwd=ROOT,
    env=child_env(2),
    capture_output=True,
    text=True,
    timeout=240,
  )


def _short(run: subprocess.CompletedProcess) -> list[str]:
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback" not in run.stderr + run.stdout, run.stderr[-3000:]
  assert 3 <= len(lines) <= 4, lines
  return lines


def test_a_linen_call_that_needs_training_at_init_is_short_and_the_advice_trains(tmp_path):
  run = _train("resnet", "training_arg", tmp_path)
  lines = _short(run)
  code = "def __call__(self, x, training: bool):"
  assert lines == [
    "error: TypeError: DropoutCNN.__call__() missing 1 required positional argument: 'training'",
    f"  in the init of the Linen model DropoutCNN at {FAILING}:{_line_of(FAILING, code)} "
    f"(in DropoutCNN.__call__): {code}",
    "  it is initialised as DropoutCNN.init(key, *example_inputs): 1 example input(s) (x), no "
    "keywords; in the steps only your loss calls it, with the arguments the loss gives "
    "(model(x, train=train))",
    "  pass training at init: example_inputs (x, False), as Flax's model.init(key, x, "
    "training=False); or give it a default (training: bool = False) (the full traceback: "
    "--verbosity=1)",
  ]
  assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
  inspected = _inspect("resnet", "training_arg", tmp_path)
  assert _short(inspected) == lines  # train.inspect builds the model the same way
  # The advice, followed: `False` in example_inputs.
  fixed = _train(
    "resnet", "training_arg", tmp_path, "--config.model.name=tests.failing_models:"
    "resnet_training_arg_fixed",
  )  # fmt: skip
  assert fixed.returncode == 0, fixed.stderr[-3000:]
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def _check_value_report(lines: list[str], fn: str, problem: str, advice: str) -> None:
  """A report of a value the loss function ``fn`` returned: the problem, its def, the batch, advice."""
  code = f"def {fn}(model, batch, *, train):"
  assert lines[0] == f"error: the loss function {fn} returned {problem}", lines
  assert lines[1] == f"  in {TRAIN} at {FAILING}:{_line_of(FAILING, code)} (in {fn}): {code}", lines
  assert lines[2] == f"  batch: {IMAGES}", lines
  assert lines[3].startswith(f"  {advice}"), lines


def test_a_loss_that_is_not_a_scalar_is_short_and_names_the_loss_function(tmp_path):
  _check_value_report(
    _short(_train("cnn", "vector_loss", tmp_path)),
    "cnn_per_example_loss",
    "a loss of shape (8,) (float32); the loss must be a scalar",
    "reduce it to one number, the mean over the batch's rows: return loss.mean(), metrics",
  )


def test_a_metric_that_is_not_a_scalar_is_short_before_any_step_ran(tmp_path):
  _check_value_report(
    _short(_train("cnn", "vector_metric", tmp_path)),
    "cnn_correct_loss",
    "the metric 'correct' of shape (8,) (bool); a metric must be a scalar",
    "reduce it to one number per batch",
  )
  metrics = tmp_path / "run" / "metrics.jsonl"
  assert not metrics.exists() or not metrics.read_text().strip()  # found at trace, not at a log


def test_the_step_s_contract_is_checked_when_the_step_is_traced():
  batch = {
    "image": jax.ShapeDtypeStruct((8, 8, 8, 1), np.float32),
    "label": jax.ShapeDtypeStruct((8,), np.int32),
  }
  run = plan.make_plan(fm.config("cnn", "vector_metric"))
  abstract = ts.registered_state_factory(run, {"classes": 4}).abstract()
  metric_loss = registry.MODELS.get(run.model.name).loss
  steps = ts.make_run_steps(run, metric_loss)
  for step in (lambda s, b: steps.train(s, b)[1], steps.evals[""]):
    with pytest.raises(errors.UserCodeError, match=r"the metric 'correct' of shape \(8,\)"):
      jax.eval_shape(step, abstract, batch)  # traced only: nothing compiled, nothing ran
  # make_train_step alone (the Python API) leaves the metrics to its caller.
  _, metrics = jax.eval_shape(ts.make_train_step(metric_loss), abstract, batch)
  assert metrics["correct"].shape == (8,)
  with pytest.raises(errors.UserCodeError, match=r"a loss of shape \(8,\) \(float32\)"):
    jax.eval_shape(ts.make_eval_step(fm.cnn_per_example_loss), abstract, batch)
