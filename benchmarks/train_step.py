"""Per-step time of adamw_flax's compiled train step vs plain JAX and nnx.jit.

A small model (8 residual MLP blocks of width 64, batch 32), where per-call
overhead dominates. Three loops, interleaved in one run:

* ``adamw_flax``: ``create_train_state`` + ``make_train_step`` (state donated,
  all metrics: loss, lr, grad/update norms, skipped steps);
* ``jax.jit``: a hand-written ``jax.jit`` step over ``(params, opt_state)``
  with plain ``optax.adamw`` (loss only), the floor;
* ``nnx.jit``: ``nnx.jit`` + ``nnx.Optimizer(model, tx, wrt=nnx.Param)``;
* its fast modes: the same step through ``nnx.cached_partial`` (the graph
  traversal cached), and ``nnx.jit(graph=False, graph_updates=False)``
  (modules as plain pytrees).

Targets: adamw_flax within 1.1x of ``jax.jit``, and at least 3x faster than
``nnx.jit``. Run: ``python benchmarks/train_step.py`` (writes the "Train step"
section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, write_section  # noqa: E402

from adamw_flax import config as C  # noqa: E402
from adamw_flax import train_state as T  # noqa: E402


class Block(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, width, rngs=rngs)
    self.down = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class ResMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, width: int = 64, depth: int = 8):
    self.blocks = nnx.List([Block(width, rngs) for _ in range(depth)])
    self.head = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)[:, 0]


def loss_fn(model, batch, *, train):
  del train
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--iters", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()

  cfg = C.default_config()
  cfg.optimizer.learning_rate = 1e-3
  cfg.optimizer.weight_decay_mask = "all"  # the same decay as plain optax.adamw
  rng = np.random.default_rng(0)
  batch = {
    "x": jnp.asarray(rng.normal(size=(32, 64)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=32), jnp.float32),
  }
  tx = optax.adamw(1e-3)

  # adamw_flax
  state = T.create_train_state(lambda rngs: ResMLP(rngs), cfg)
  step = T.make_train_step(loss_fn)

  # hand-written jax.jit over (params, opt_state); params as a plain dict of
  # arrays (the cheapest pytree to pass: an nnx.State of Variables costs more)
  graphdef, params_state = nnx.split(ResMLP(nnx.Rngs(0)), nnx.Param)
  treedef = jax.tree.structure(params_state)
  params = params_state.to_pure_dict()
  opt_state = tx.init(params)

  def plain_step(params, opt_state, batch):
    def f(p):
      model = nnx.merge(graphdef, jax.tree.unflatten(treedef, jax.tree.leaves(p)))
      return loss_fn(model, batch, train=True)[0]

    loss, grads = jax.value_and_grad(f)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  plain_step = jax.jit(plain_step, donate_argnums=(0, 1))

  # nnx.jit + nnx.Optimizer
  model = ResMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m, batch, train=True)[0])(model)
    optimizer.update(model, grads)
    return loss

  # nnx.jit's fast modes in flax 0.12: the same step with the graph traversal
  # cached (nnx.cached_partial), and graph-free (graph=False: modules are
  # treated as pytrees, no graph bookkeeping per call).
  model_c = ResMLP(nnx.Rngs(0))
  optimizer_c = nnx.Optimizer(model_c, tx, wrt=nnx.Param)
  cached_step = nnx.cached_partial(nnx_step, model_c, optimizer_c)

  model_t = ResMLP(nnx.Rngs(0))
  optimizer_t = nnx.Optimizer(model_t, tx, wrt=nnx.Param)

  @nnx.jit(graph=False, graph_updates=False)
  def tree_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m, batch, train=True)[0])(model)
    optimizer.update(model, grads)
    return loss

  holder = {"state": state, "plain": (params, opt_state)}

  def run_ours(n):
    s = holder["state"]
    for _ in range(n):
      s, metrics = step(s, batch)
    jax.block_until_ready(s)
    holder["state"] = s

  def run_plain(n):
    p, o = holder["plain"]
    for _ in range(n):
      p, o, loss = plain_step(p, o, batch)
    jax.block_until_ready(p)
    holder["plain"] = (p, o)

  def run_nnx(n):
    for _ in range(n):
      loss = nnx_step(model, optimizer, batch)
    jax.block_until_ready(loss)

  def run_cached(n):
    for _ in range(n):
      loss = cached_step(batch)
    jax.block_until_ready(loss)

  def run_tree(n):
    for _ in range(n):
      loss = tree_step(model_t, optimizer_t, batch)
    jax.block_until_ready(loss)

  runs = {
    "adamw_flax": run_ours,
    "jax.jit": run_plain,
    "nnx.jit": run_nnx,
    "nnx.cached_partial": run_cached,
    "nnx.jit(graph=False)": run_tree,
  }
  for run in runs.values():  # compile and warm up
    run(5)
  t = interleaved_medians(runs, iters=args.iters, repeats=args.repeats)
  ours, plain, nnx_t = t["adamw_flax"], t["jax.jit"], t["nnx.jit"]
  fastest_nnx = min(t["nnx.cached_partial"], t["nnx.jit(graph=False)"])
  rows = [
    "| loop | ms / step | vs jax.jit |",
    "|---|---:|---:|",
    *(f"| {k} | {v * 1e3:.3f} | {v / plain:.2f}x |" for k, v in t.items()),
  ]
  body = (
    "8 residual MLP blocks of width 64 (LayerNorm, two Linear, GELU), batch 32, "
    f"`optax.adamw(1e-3)`; median of {args.repeats} interleaved rounds of {args.iters} steps. "
    f"Machine: {machine()}.\n\n"
    + "\n".join(rows)
    + f"\n\nadamw_flax / jax.jit = **{ours / plain:.2f}** (target <= 1.1); "
    f"nnx.jit / adamw_flax = **{nnx_t / ours:.1f}x** (target >= 3); against nnx.jit's "
    f"fastest mode in flax {flax.__version__} (`nnx.cached_partial` or `graph=False`): "
    f"**{fastest_nnx / ours:.2f}x**. adamw_flax's step also "
    "returns the lr, gradient and update norms and the skipped-step count. What it saves: "
    "`nnx.jit` flattens the module graph on every call; our `TrainState` is a pytree of "
    "arrays whose static part (`StateSpec`) hashes by identity, since hashing an NNX "
    "`GraphDef` for jit's cache lookup alone costs ~0.3-0.5 ms here."
  )
  print(body)
  if not args.no_write:
    write_section("Train step", body)


if __name__ == "__main__":
  main()
