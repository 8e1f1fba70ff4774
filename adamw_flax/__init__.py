"""adamw_flax: correct, fast, config-driven AdamW training with Flax NNX.

The public API is re-exported here. Attributes load their module on first use
(PEP 562), so ``import adamw_flax`` is cheap and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
  # transform
  "adamw": "transform",
  "nadamw": "transform",
  "scale_by_adam": "transform",
  "round_params": "transform",
  "transform": "",
  # memory-lean states
  "quantize": "",
  "migrate": "",
  "to_optax_state": "migrate",
  "from_optax_state": "migrate",
  # masks
  "masks": "",
  "weight_decay_mask": "masks",
  "lr_multiplier_fn": "masks",
  "frozen_fn": "masks",
  "linen_target": "masks",
  # schedules
  "schedule_from_config": "schedules",
  # registry
  "registry": "",
  "register_optimizer": "registry",
  "register_model": "registry",
  "register_dataset": "registry",
  # config, run plan, optimizer
  "config": "",
  "load_config": "config",
  "validate_config": "config",
  "default_config": "config",
  "ConfigError": "config",
  "plan": "",
  "make_plan": "plan",
  "optim": "",
  "optimizer_from_config": "optim",
  "errors": "",
  "UserError": "errors",
  # train state
  "TrainState": "train_state",
  "Extra": "train_state",
  "SpikeStats": "train_state",
  "create_train_state": "train_state",
  "make_train_step": "train_state",
  "make_eval_step": "train_state",
  "state_factory": "train_state",
  # checkpointing
  "checkpoint": "",
  "fingerprint": "",
  "Checkpoints": "checkpoint",
  "CheckpointReader": "checkpoint",
  "CheckpointMismatchError": "checkpoint",
  "save_state": "checkpoint",
  "restore_state": "checkpoint",
  "restore_params": "checkpoint",
  # sharding
  "sharding": "",
  "distributed": "",
  # data
  "grain_data": "",  # needs grain (the "grain" extra)
  # trainer
  "trainer": "",
  "train_and_evaluate": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  try:
    module = _EXPORTS[name]
  except KeyError:
    raise AttributeError(f"module 'adamw_flax' has no attribute {name!r}") from None
  if not module:  # a submodule itself
    return importlib.import_module(f"adamw_flax.{name}")
  value = getattr(importlib.import_module(f"adamw_flax.{module}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
