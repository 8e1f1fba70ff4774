"""A tiny NNX model registered as ``"tests.ckpt_models:ckpt_tiny"`` for checkpoint tests.

It holds every kind of state a checkpoint must carry: float32 params (a
``Linear`` and a ``LayerNorm``), module state beside the params (``BatchNorm``
statistics) and ``nnx.Rngs`` state (a typed PRNG key and a uint32 counter,
from ``Dropout``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from adamw_flax import registry

NAME = "ckpt_tiny"


class Tiny(nnx.Module):
  """in_dim -> hidden -> out_dim MLP with BatchNorm, LayerNorm and Dropout."""

  def __init__(self, in_dim: int, hidden: int, out_dim: int, *, rngs: nnx.Rngs):
    self.inp = nnx.Linear(in_dim, hidden, rngs=rngs)
    self.bn = nnx.BatchNorm(hidden, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, out_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu(self.bn(self.inp(x)))
    return self.out(self.norm(self.drop(h)))


def loss(model: Tiny, batch: dict[str, jax.Array], *, train: bool):
  """Mean squared error; switches BatchNorm and Dropout to eval mode when not training."""
  if train:
    model.train()
  else:
    model.eval()
  err = model(batch["x"]) - batch["y"]
  return jnp.mean(err**2), {}


def build(cfg: Any, *, rngs: nnx.Rngs, data_info: dict[str, Any]) -> Tiny:
  return Tiny(int(data_info["in_dim"]), int(cfg.hidden), int(data_info["out_dim"]), rngs=rngs)


# Guarded: this module may be imported under two names (a test's import and
# the registry's "tests.ckpt_models:" import), and a second registration fails.
if NAME not in registry.MODELS.names():
  registry.register_model(NAME, loss=loss)(build)
