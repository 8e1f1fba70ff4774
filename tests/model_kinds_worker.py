"""A child process of tests/test_model_kinds.py: the gemma-style model through the Python API.

``python -m tests.model_kinds_worker OUT.json`` (with 4 CPU devices: the
host device count must be set before JAX starts) builds the model of
``tests/user_models.py:GemmaLike`` with ``adamw_flax.create_train_state`` on
a 2x2 (fsdp, tensor) mesh, trains it a few steps with
``adamw_flax.make_train_step`` (called outside any mesh context, as a script
would), and writes what the test checks: the params' specs and per-device
shapes, the sharding of an attention block's output (seen inside the compiled
step with ``jax.debug.inspect_array_sharding``), the compiled step's HLO
shapes and the losses.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adamw_flax
from adamw_flax import sharding
from adamw_flax.config import load_config
from tests import user_models
from tests.conftest import ROOT


def main(out: str) -> None:
  config = load_config(ROOT / "tests" / "configs" / "model_kinds.py", arg="gemma")
  data = user_models.Tokens(config.data, seed=0, process_index=0, process_count=1)
  mesh = sharding.mesh_from_config(config.mesh)
  state = adamw_flax.create_train_state(
    lambda rngs: user_models.GemmaLike(config.model, rngs=rngs, data_info=data.info),
    config,
    mesh=mesh,
  )
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = NamedSharding(mesh, P("fsdp"))

  seen: list[str] = []

  def probe(model, batch, *, train):
    # The loss also looks at the first attention block's output, which the
    # model constrains itself (act_btd), as the step runs.
    out = model.layers[0]["attn"](model.embed(batch["tokens"][:, :-1]))
    jax.debug.inspect_array_sharding(out, callback=lambda s: seen.append(str(s.spec)))
    return user_models.next_token_loss(model, batch, train=train)

  step = adamw_flax.make_train_step(
    probe, state_sharding=state_sharding, batch_sharding=batch_sharding
  )
  batches = [jax.device_put(data.train_batch(i), batch_sharding) for i in range(6)]
  compiled = step.lower(state, batches[0]).compile().as_text()
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  params = {
    adamw_flax.masks.path_str(kp): {
      "spec": str(x.sharding.spec),
      "device_shape": list(x.sharding.shard_shape(x.shape)),
    }
    for kp, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
  }
  result = {
    "params": params,
    "activation_specs": sorted(set(seen)),
    # q of the first layer, (B, T, N, H) = (8, 8, 4, 4): one (4, 8, 2, 4) shard a device.
    "hlo_has_sharded_bxtxnxh": "f32[4,8,2,4]" in compiled,
    "hlo_has_whole_bxtxnxh": "f32[8,8,4,4]" in compiled,
    "losses": losses,
    "finite": bool(np.all(np.isfinite(losses))),
  }
  with open(out, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1])
