"""Times the Tiny Shakespeare CPU-config train step, outside the trainer.

A plain ``jax.jit`` step (value_and_grad + optax chain of clipping and
``optax.adamw``, donated state), so the trainer's own overhead can be judged
against it. Variants are compiled in one process and timed in interleaved
rounds, since the machine may be shared: compare figures from the same run.

  python -m examples.tiny_shakespeare.bench_step               # f32 vs bf16 ms/step
  python -m examples.tiny_shakespeare.bench_step --full=bfloat16  # 2000 steps + evals

``--full`` runs the whole CPU-config schedule (evals of 20 batches every 250
steps) on the real data and prints the wall time and final validation loss.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from examples.tiny_shakespeare import data, model

_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Variants to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per round.")
_FULL = flags.DEFINE_string("full", "", "Run the full 2000-step schedule in this dtype.")
_PATH = flags.DEFINE_string("path", "", "Data file ('' = cache/download/fallback).")

CPU = dict(num_layers=4, num_heads=4, embed_dim=128, max_len=64, batch_size=12, steps=2000)


def make_step(dtype: str, vocab_size: int):
  """Returns ``(jitted step, eval loss fn, params, opt_state)`` for the CPU config."""
  net = model.CharTransformer(
    vocab_size,
    num_layers=CPU["num_layers"],
    num_heads=CPU["num_heads"],
    embed_dim=CPU["embed_dim"],
    max_len=CPU["max_len"],
    dtype=dtype,
    rngs=nnx.Rngs(0),
  )
  graphdef, params = nnx.split(net)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, CPU["steps"], 1e-4)
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(
      schedule, b2=0.99, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    ),
  )

  def loss_fn(p, batch, train):
    return model.lm_loss(nnx.merge(graphdef, p), batch, train=train)[0]

  def step(p, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch, True)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  eval_loss = jax.jit(lambda p, batch: loss_fn(p, batch, False))
  return jax.jit(step, donate_argnums=(0, 1)), eval_loss, params, tx.init(params)


def main(argv):
  del argv
  cfg = ml_collections.ConfigDict(
    dict(
      path=_PATH.value,
      cache_dir="",
      url=data.CANONICAL_URL,
      sha256=data.CANONICAL_SHA256,
      allow_offline_fallback=True,
      batch_size=CPU["batch_size"],
      seq_len=CPU["max_len"],
    )
  )
  ds = data.build(cfg, seed=0, process_index=0, process_count=1)
  print(f"data: {ds.source}; jax {jax.__version__} on {jax.devices()[0].device_kind}")

  if _FULL.value:
    t0 = time.perf_counter()
    step, eval_loss, params, opt_state = make_step(_FULL.value, ds.info["vocab_size"])
    evals = ds.eval_batches(20)
    for i in range(CPU["steps"]):
      params, opt_state, loss = step(params, opt_state, ds.train_batch(i))
      if (i + 1) % 250 == 0:
        val = float(np.mean([eval_loss(params, b) for b in evals]))
        print(
          f"step {i + 1}: train {float(loss):.4f} val {val:.4f}  {time.perf_counter() - t0:.1f}s"
        )
    print(f"total {time.perf_counter() - t0:.1f}s (compile and evals included)")
    return

  batch = ds.train_batch(0)
  runs = {}
  for dtype in _DTYPES.value:
    step, _, params, opt_state = make_step(dtype, ds.info["vocab_size"])
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - t0
    state = compiled(params, opt_state, batch)
    jax.block_until_ready(state)
    runs[dtype] = dict(fn=compiled, state=state, compile_s=compile_s, wall=[], cpu=[])
  for _ in range(_ROUNDS.value):
    for run in runs.values():
      t0, c0 = time.perf_counter(), time.process_time()
      state = run["state"]
      for _ in range(_STEPS.value):
        state = run["fn"](state[0], state[1], batch)
      jax.block_until_ready(state)
      run["state"] = state
      run["wall"].append((time.perf_counter() - t0) / _STEPS.value * 1e3)
      run["cpu"].append((time.process_time() - c0) / _STEPS.value * 1e3)
  for dtype, run in runs.items():
    print(
      f"{dtype:9s} compile {run['compile_s']:5.2f} s   step min {min(run['wall']):6.2f} ms  "
      f"median {np.median(run['wall']):6.2f} ms   process CPU min {min(run['cpu']):6.2f} ms"
    )


if __name__ == "__main__":
  app.run(main)
