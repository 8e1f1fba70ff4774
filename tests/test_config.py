"""Config schema, validation errors, command-line overrides, optimizer_from_config."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import adamw_flax
from adamw_flax import config as C
from adamw_flax import optim, registry, schedules, schema
from train import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")


def _error(cfg) -> str:
  with pytest.raises(C.ConfigError) as e:
    C.validate_config(cfg)
  return str(e.value)


def test_default_config_is_valid_and_documented():
  cfg = C.default_config()
  C.validate_config(cfg)
  # every schema field is declared once, with a one-line doc (adamw_flax.schema)
  for section in C.CHECKED_SECTIONS:
    for key in cfg[section].keys():
      doc = schema.KEYS[f"{section}.{key}"].doc
      assert doc and "\n" not in doc, f"{section}.{key} has no one-line doc"
  assert set(schema.KEYS) >= {f"{s}.{k}" for s in C.CHECKED_SECTIONS for k in cfg[s].keys()}


@pytest.mark.parametrize(
  "key,value,expected",
  [
    ("optimizer.b1", 1.0, "optimizer.b1: must be in [0, 1)"),
    ("optimizer.b2", -0.1, "optimizer.b2: must be in [0, 1)"),
    ("optimizer.eps", -1e-8, "optimizer.eps: must be >= 0"),
    ("optimizer.eps_root", -1.0, "optimizer.eps_root: must be >= 0"),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate: must be > 0"),
    ("optimizer.weight_decay", -0.1, "optimizer.weight_decay: must be >= 0"),
    ("optimizer.warmup_steps", 5000, "optimizer.warmup_steps: (5000) must be <= the schedule"),
    ("optimizer.schedule", "cosine", "optimizer.schedule: must be one of"),
    ("optimizer.weight_decay_mode", "decoupled", "optimizer.weight_decay_mode: must be 'lr'"),
    ("optimizer.mu_dtype", "bf16", "optimizer.mu_dtype: must be None or one of"),
    ("optimizer.name", "adamww", "did you mean 'adamw'"),
    ("optimizer.accumulate_steps", 0, "optimizer.accumulate_steps: must be >= 1"),
    ("trainer.num_steps", 0, "trainer.num_steps: must be in (0, 2147483647]"),
    ("checkpoint.keep", 0, "checkpoint.keep: must be >= 1"),
    ("checkpoint.best_mode", "lowest", "checkpoint.best_mode: must be 'min' or 'max'"),
    ("mesh.shape", (-1, -1), "at most one size may be -1"),
    ("mesh.shard_opt_state", "zero", "mesh.shard_opt_state"),
  ],
)
def test_out_of_range_values_name_the_key(key, value, expected):
  cfg = C.default_config()
  section, name = key.split(".")
  cfg[section][name] = value
  assert expected in _error(cfg)


def test_unknown_key_suggests_close_match():
  cfg = C.default_config()
  cfg.optimizer.weight_decya = 0.1
  cfg.trainer.num_step = 3
  msg = _error(cfg)
  assert "optimizer.weight_decya: unknown key; did you mean 'optimizer.weight_decay'?" in msg
  assert "trainer.num_step: unknown key; did you mean 'trainer.num_steps'?" in msg


def test_unknown_section_and_missing_section():
  cfg = C.default_config()
  cfg.optimiser = ml_collections.ConfigDict({"name": "adamw"})
  assert "optimiser: unknown section; did you mean 'optimizer'?" in _error(cfg)
  cfg = C.default_config()
  del cfg["mesh"]
  assert "mesh: missing section" in _error(cfg)


def test_wrong_type_names_key():
  # A ConfigDict built from a plain dict (not from default_config) can hold any type.
  raw = C.default_config().to_dict()
  raw["trainer"]["num_steps"] = "10"
  cfg = ml_collections.ConfigDict(raw)
  assert "trainer.num_steps: expected int, got '10'" in _error(cfg)


def test_bad_mask_rule_is_reported():
  cfg = C.default_config()
  cfg.optimizer.weight_decay_mask = "*/bias=maybe"
  assert "optimizer.weight_decay_mask" in _error(cfg)


def test_overrides_and_load_config(tmp_path):
  cfg = C.load_config(
    ROOT / "configs" / "tiny_shakespeare.py",
    [
      "optimizer.learning_rate=3e-4",
      "--config.optimizer.mu_dtype=bfloat16",
      "trainer.num_steps=700",
    ],
  )
  assert cfg.optimizer.learning_rate == 3e-4
  assert cfg.optimizer.mu_dtype == "bfloat16"
  assert cfg.trainer.num_steps == 700
  with pytest.raises(C.ConfigError, match="optimizer.lerning_rate: unknown key"):
    C.load_config(ROOT / "configs" / "smoke.py", ["optimizer.lerning_rate=1.0"])
  with pytest.raises(C.ConfigError, match="does not exist"):
    C.load_config(tmp_path / "nope.py")


def _override_value(value):
  if isinstance(value, bool):
    return "False" if value else "True", (not value)
  if isinstance(value, int):
    return str(value + 1), value + 1
  if isinstance(value, float):
    return repr(value * 0.5), value * 0.5
  return None


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_field_overridable_from_command_line(path):
  """Each scalar field of each config file is overridden as the command line gives it."""
  base = C.load_config(path)
  fields = []
  for section in C.SECTIONS:
    for key, value in base[section].items():
      ov = _override_value(value)
      if ov is not None:
        fields.append((f"{section}.{key}", ov))
  for opt in ("mu_dtype", "nu_dtype"):
    fields.append((f"optimizer.{opt}", ("bfloat16", "bfloat16")))
  argv = ["prog", f"--config={path}"] + [f"--config.{k}={text}" for k, (text, _) in fields]
  rest, overrides = cli.split_config_overrides(argv)
  assert rest == ["prog", f"--config={path}"]
  cfg = C.load_config(path, overrides, validate=False)  # the values, not their consistency
  for key, (_, want) in fields:
    section, name = key.split(".")
    got = cfg[section][name]
    if isinstance(want, float):
      assert got == pytest.approx(want), key
    else:
      assert got == want, key


def test_schedules_shapes():
  cfg = C.default_config().optimizer
  cfg.learning_rate = 1.0
  cfg.warmup_steps = 10
  for name in schedules.SCHEDULES:
    cfg.schedule = name
    lr = schedules.schedule_from_config(cfg, num_steps=100)
    assert float(lr(0)) == pytest.approx(0.0 if name != "piecewise" else 1.0)
    assert float(lr(10)) == pytest.approx(1.0)
  cfg.schedule = "warmup_cosine"
  cfg.end_learning_rate = 0.1
  assert float(schedules.schedule_from_config(cfg, 100)(100)) == pytest.approx(0.1)
  cfg.schedule = "rsqrt"
  assert float(schedules.schedule_from_config(cfg, 100)(40)) == pytest.approx(0.5)
  cfg.schedule = "piecewise"
  cfg.piecewise_boundaries = (20, 50)
  cfg.piecewise_scales = (0.5, 0.1)
  lr = schedules.schedule_from_config(cfg, 100)
  assert [float(lr(s)) for s in (10, 30, 60)] == pytest.approx([1.0, 0.5, 0.05])


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {
    "dense": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jax.random.normal(k[1], (3,))},
    "norm": {"scale": jax.random.normal(k[2], (3,))},
  }


def _run(tx, params, steps=5):
  state = tx.init(params)
  for i in range(steps):
    grads = jax.tree.map(lambda p, k=i + 1: jnp.sin(p * k), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_optimizer_from_config_matches_optax_chain():
  cfg = C.default_config().optimizer
  cfg.weight_decay = 0.1
  cfg.weight_decay_mask = "*/kernel=true, *=false"
  cfg.grad_clip_norm = 1.0
  cfg.schedule = "warmup_cosine"
  cfg.warmup_steps = 2
  params = _params()
  ours, _ = _run(optim.optimizer_from_config(cfg, num_steps=10).tx, params)
  mask = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}
  ref_tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedules.schedule_from_config(cfg, 10), weight_decay=0.1, mask=mask),
  )
  ref, _ = _run(ref_tx, params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_optimizer_from_config_wrappers_and_multipliers():
  cfg = C.default_config().optimizer
  cfg.weight_decay_mask = "all"
  cfg.skip_nonfinite = True
  cfg.lr_multipliers = "norm/*=0.0, *=1.0"
  params = _params()
  tx = optim.optimizer_from_config(cfg).tx
  new, state = _run(tx, params, steps=4)
  np.testing.assert_array_equal(new["norm"]["scale"], params["norm"]["scale"])  # multiplier 0
  assert not np.allclose(new["dense"]["kernel"], params["dense"]["kernel"])
  assert isinstance(state, optax.ApplyIfFiniteState)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  updates, _ = tx.update(bad, tx.init(params), params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_registry_unknown_name_lists_registered():
  with pytest.raises(
    registry.RegistryError, match="unknown optimizer 'adam'.*Registered optimizers: .*adamw"
  ):
    registry.OPTIMIZERS.get("adam")
  with pytest.raises(registry.RegistryError, match="already registered"):
    adamw_flax.register_optimizer("adamw")(lambda cfg, **kw: None)


def test_user_registered_optimizer_from_config():
  def factory(cfg, *, learning_rate, weight_decay_mask):
    del weight_decay_mask
    return optax.sgd(learning_rate)

  with registry.OPTIMIZERS.override("test_sgd", factory):
    cfg = C.default_config().optimizer
    cfg.name = "test_sgd"
    cfg.learning_rate = 0.5
    cfg.weight_decay_mask = "all"  # "default" selects by module type: it needs the model
    params = {"w": jnp.ones(2)}
    tx = optim.optimizer_from_config(cfg).tx
    updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5)


def _jitted(tx):
  return optax.GradientTransformation(tx.init, jax.jit(tx.update))


@pytest.mark.parametrize("name,reference", [("adamw", optax.adamw), ("nadamw", optax.nadamw)])
def test_builtin_optimizers_are_optax_numbers(name, reference):
  cfg = C.default_config().optimizer
  cfg.name = name
  cfg.weight_decay_mask = "all"
  params = _params()
  ours, ours_state = _run(_jitted(optim.optimizer_from_config(cfg).tx), params)
  ref, ref_state = _run(_jitted(reference(1e-3, weight_decay=1e-4)), params)
  assert jax.tree.structure(ours_state) == jax.tree.structure(ref_state)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    np.testing.assert_array_equal(a, b)


def test_the_readme_lists_every_key_as_declared(repo_root):
  from train import keys  # noqa: PLC0415 (the command's module)

  text = (repo_root / "README.md").read_text()
  assert keys.readme_with_table(text) == text, (
    "README's key table is stale: python -m train.keys --readme"
  )
  for name in schema.KEYS:
    assert f"| `{name}` |" in text
