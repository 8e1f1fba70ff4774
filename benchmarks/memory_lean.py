"""Memory-lean AdamW states: bytes per param, update time and quality, side by side.

Usage::

  python benchmarks/memory_lean.py                    # ~15 min on 2 cores (all parts)
  python benchmarks/memory_lean.py --parts bytes,time  # bytes and update time only (~2 min)
  python benchmarks/memory_lean.py --no-write         # print only

1. **Bytes per param** of the whole state (params + optimizer state), counted
   from the arrays of ``tx.init`` on the 32M-param transformer-like tree of
   ``optimizer_update.py``, for float32, bfloat16 ``mu``, bfloat16 moments,
   int8 moments and bfloat16 params + int8 moments; and per device with ZeRO-1
   over 8 forced host devices (a subprocess).
2. **Update time** of the full jitted step (update + apply, state donated)
   on the same tree against ``optax.adamw`` float32, interleaved medians.
3. **Quality**: the Tiny Shakespeare 2000-step cosine recipe through ``python -m train``
   (canonical text, same seed, validation loss over 200 batches at the end),
   and an MLP classifier on a teacher task through the Python API, for each
   state format.

The results replace the "## Memory-lean AdamW state" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw_flax
from adamw_flax import quantize

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import SHARED_TEXT, interleaved_medians, machine, write_section  # noqa: E402
from optimizer_update import optimizer_step, transformer_params  # noqa: E402

TITLE = "Memory-lean AdamW state"
# The canonical text (set by --text; default: the project's shared copy beside the repository).
TEXT = [SHARED_TEXT]

# (label, params dtype, adamw_flax.adamw keyword arguments)
FORMATS: list[tuple[str, Any, dict[str, Any]]] = [
  ("float32", jnp.float32, {}),
  ("bf16 mu", jnp.float32, {"mu_dtype": "bfloat16"}),
  ("bf16 moments", jnp.float32, {"mu_dtype": "bfloat16", "nu_dtype": "bfloat16"}),
  ("int8 moments", jnp.float32, {"mu_dtype": "int8", "nu_dtype": "int8"}),
  (
    "int8 moments (nearest)",
    jnp.float32,
    {"mu_dtype": "int8", "nu_dtype": "int8", "moments_rounding": "nearest"},
  ),
  (
    "bf16 params + int8 moments (stochastic)",
    jnp.bfloat16,
    {"mu_dtype": "int8", "nu_dtype": "int8", "params_rounding": "stochastic"},
  ),
  (
    "bf16 params + int8 moments (kahan)",
    jnp.bfloat16,
    {"mu_dtype": "int8", "nu_dtype": "int8", "params_rounding": "kahan"},
  ),
]


def _bytes(tree: Any) -> int:
  return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def bytes_table(params: dict[str, Any]) -> tuple[list[str], dict[str, float]]:
  n = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
  rows, totals = [], {}
  for label, pdtype, kwargs in FORMATS:
    p = jax.tree.map(lambda x, d=pdtype: jax.ShapeDtypeStruct(x.shape, d), params)
    state = jax.eval_shape(adamw_flax.adamw(1e-3, **kwargs).init, p)
    moments = quantize.moments_summary(state)
    quantized = moments["mu"]["int8_params"]
    per_q = ""
    if quantized:
      qb = 0
      for leaf in jax.tree.leaves(state, is_leaf=quantize.is_quantized):
        if quantize.is_quantized(leaf):
          qb += _bytes(leaf)
      per_q = f"{qb / quantized:.3f}"
    total = (_bytes(p) + _bytes(state)) / n
    totals[label] = total
    rows.append(
      f"| {label} | {_bytes(p) / n:.2f} | {moments['mu']['bytes'] / n:.3f} | "
      f"{moments['nu']['bytes'] / n:.3f} | {per_q or '-'} | {total:.3f} |"
    )
  return rows, totals


ZERO1_CODE = r"""
import json, math, jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, {here!r})
import adamw_flax
from adamw_flax import config, sharding
from optimizer_update import transformer_params
from memory_lean import FORMATS
params = jax.eval_shape(transformer_params)
n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
mesh = jax.make_mesh((8,), ("data",))
mcfg = config.default_config().mesh
mcfg.shard_opt_state = "data"
out = {{}}
for label, pdtype, kwargs in FORMATS:
  p = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, pdtype), params)
  state = jax.eval_shape(adamw_flax.adamw(1e-3, **kwargs).init, p)
  specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), p)
  sh = sharding.opt_state_shardings(state, p, specs, mesh, mcfg)
  placed = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), state, sh)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  pp = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), p)
  b = sharding.per_device_bytes({{"params": pp, "opt_state": placed}}, by_part=True)
  out[label] = {{k: v / n for k, v in b.items()}}
print(json.dumps(out))
"""


def zero1_bytes() -> dict[str, dict[str, float]]:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  code = ZERO1_CODE.format(here=str(HERE))
  out = subprocess.run(
    [sys.executable, "-c", code],
    env=env,
    capture_output=True,
    text=True,
    check=True,
    timeout=1800,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def update_times(params: dict[str, Any], quick: bool) -> tuple[dict[str, float], dict[str, float]]:
  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
  runs = {}
  keep = []
  variants = [("optax float32", jnp.float32, optax.adamw(1e-3))]
  variants += [(f"ours {label}", d, adamw_flax.adamw(1e-3, **kw)) for label, d, kw in FORMATS]
  for name, dtype, tx in variants:
    p = jax.tree.map(lambda x, d=dtype: jnp.array(x, d), params)
    g = jax.tree.map(lambda x, d=dtype: x.astype(d), grads)
    step = optimizer_step(tx)
    holder = {"p": p, "s": tx.init(p)}
    holder["p"], holder["s"] = step(holder["p"], holder["s"], g)  # compile
    jax.block_until_ready(holder["p"])

    def run(iters, holder=holder, step=step, g=g):
      for _ in range(iters):
        holder["p"], holder["s"] = step(holder["p"], holder["s"], g)
      jax.block_until_ready(holder["p"])

    runs[name] = run
    keep.append(holder)
  ms = interleaved_medians(runs, iters=2 if quick else 3, repeats=3 if quick else 7)
  faults = {}
  for name, run in runs.items():  # minor page faults: temporaries allocated afresh each call
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(3)
    faults[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
  return ms, faults


# ---------------------------------------------------------------- quality

QUALITY = [
  ("float32 (default)", []),
  ("int8 moments", ["optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8"]),
  (
    "int8 moments, update from stored moments",
    [
      "optimizer.mu_dtype=int8",
      "optimizer.nu_dtype=int8",
      "optimizer.update_from_stored_moments=True",
    ],
  ),
  ("bf16 params, stochastic", ["optimizer.params_dtype=bfloat16"]),
  ("bf16 params, kahan", ["optimizer.params_dtype=bfloat16", "optimizer.params_rounding=kahan"]),
  (
    "bf16 params, nearest",
    ["optimizer.params_dtype=bfloat16", "optimizer.params_rounding=nearest"],
  ),
  (
    "bf16 params stochastic + int8 moments",
    ["optimizer.params_dtype=bfloat16", "optimizer.mu_dtype=int8", "optimizer.nu_dtype=int8"],
  ),
]


def shakespeare_quality(
  tmp: pathlib.Path, runs: list[tuple[str, list[str]]] | None = None
) -> list[tuple[str, float, float, str]]:
  """Trains each of ``runs`` (default QUALITY) through ``python -m train``; (label, val, s, B/param)."""
  out = []
  for i, (label, overrides) in enumerate(QUALITY if runs is None else runs):
    workdir = tmp / f"ts{i}"
    args = [
      sys.executable,
      "-m",
      "train",
      # The 2000-step cosine recipe (the CPU default before the WSD recipe): the
      # reference's schedule, embeddings not decayed.
      "--config=configs/tiny_shakespeare.py:nanogpt",
      "--config.optimizer.weight_decay_mask=default",
      f"--workdir={workdir}",
      f"--config.data.path={TEXT[0]}",
      "--config.trainer.eval_every=0",
      "--config.trainer.eval_batches=200",
      "--config.checkpoint.every_steps=0",
      "--config.trainer.progress=False",
      *[f"--config.{o}" for o in overrides],
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode:
      raise RuntimeError(f"{label}: python -m train failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if r.get("split") == "eval"][-1]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("bytes per trained param"))
    total = line.rsplit("total ", 1)[-1]
    out.append((label, loss, wall, total))
    print(f"  shakespeare {label}: val {loss:.4f}, {wall:.0f} s, {total} B/param", flush=True)
  return out


def mlp_quality() -> list[tuple[str, float, float]]:
  """An MLP classifier (2 hidden layers of 512) on a fixed random teacher, each format."""
  from flax import nnx

  d_in, hidden, classes, batch, steps = 64, 512, 10, 128, 1500
  teacher = jax.random.normal(jax.random.key(7), (d_in, classes)) / math.sqrt(d_in)
  xs = jax.random.normal(jax.random.key(8), (steps * batch + 4096, d_in))
  labels = jnp.argmax(jnp.tanh(2 * xs @ teacher) + 0.3 * jnp.sin(3 * xs[:, :classes]), -1)

  class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.l1 = nnx.Linear(d_in, hidden, rngs=rngs)
      self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
      self.out = nnx.Linear(hidden, classes, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
      x = self.drop(jax.nn.gelu(self.l1(x)))
      return self.out(jax.nn.gelu(self.l2(x)))

  def loss_fn(model, batch, *, train):
    del train
    logits = model(batch["x"]).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}

  out = []
  for label, overrides in QUALITY:
    cfg = adamw_flax.config.default_config()
    cfg.optimizer.learning_rate = 2e-3
    cfg.optimizer.schedule = "warmup_cosine"
    cfg.optimizer.warmup_steps = 100
    cfg.optimizer.weight_decay = 0.05
    cfg.trainer.num_steps = steps
    cfg.trainer.seed = 3
    adamw_flax.config.apply_overrides(cfg, overrides)
    state = adamw_flax.create_train_state(MLP, cfg)
    step = adamw_flax.make_train_step(loss_fn)
    evaluate = adamw_flax.make_eval_step(loss_fn)
    for i in range(steps):
      sl = slice(i * batch, (i + 1) * batch)
      state, _ = step(state, {"x": xs[sl], "y": labels[sl]})
    held = {"x": xs[-4096:], "y": labels[-4096:]}
    metrics = evaluate(state, held)
    out.append((label, float(metrics["loss"]), float(metrics["accuracy"])))
    print(f"  mlp {label}: loss {out[-1][1]:.4f}, accuracy {out[-1][2]:.4f}", flush=True)
  return out


CACHE = HERE / "memory_lean.json"  # each part's last results, so parts can be rerun alone
PARTS = ("bytes", "time", "shakespeare", "mlp")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument(
    "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
  )
  ap.add_argument("--no-write", action="store_true")
  ap.add_argument("--text", default=str(TEXT[0]), help="the canonical Tiny Shakespeare text")
  args = ap.parse_args()
  TEXT[0] = pathlib.Path(args.text)
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    ap.error(f"unknown parts {unknown}; choose from {PARTS}")
  cache: dict[str, Any] = json.loads(CACHE.read_text()) if CACHE.exists() else {}
  stamp = f"{datetime.date.today()} on {machine()}"

  params = transformer_params()
  if "bytes" in parts:
    rows, totals = bytes_table(params)
    cache["bytes"] = {"when": stamp, "rows": rows, "totals": totals, "zero1": zero1_bytes()}
  if "time" in parts:
    ms, faults = update_times(params, args.quick)
    cache["time"] = {"when": stamp, "ms": ms, "faults": faults}
  if "shakespeare" in parts:
    with tempfile.TemporaryDirectory() as tmp:
      cache["shakespeare"] = {"when": stamp, "rows": shakespeare_quality(pathlib.Path(tmp))}
  if "mlp" in parts:
    cache["mlp"] = {"when": stamp, "rows": mlp_quality()}
  text = section(cache, sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))
  print(text)
  if not args.no_write:
    CACHE.write_text(json.dumps(cache, indent=1) + "\n")
    write_section(TITLE, text)


UPDATE_TIME_NOTE = (
  "int8 rows round their codes stochastically (the default) unless marked nearest. How the "
  "8-bit step runs on CPU (`quantize.adam_update`): a loop over chunks of rows (2^18 "
  "elements; a leaf that fits one chunk runs as two) requantizes in place through "
  "`(rows, blocks, block)` views, its float32 temporaries a chunk's, and the update is an "
  "elementwise expression of the gradient and the old codes that `optax.apply_updates` "
  "fuses into, so no float32 buffer of a whole leaf exists. The codes and scales are the "
  "previous code's bitwise, the update to a few float32 ulp (XLA:CPU contracts "
  "multiply-adds per fusion; on this tree the params after three steps were bitwise "
  "equal). Before (3.78x stochastic, 3.33x nearest, 41.7k page faults per step), the loop "
  "also wrote the update into a leaf-sized buffer, which XLA:CPU allocates afresh each "
  "call (163 MiB of temporaries for this tree), and a leaf in one piece wrote its codes "
  "through the `(rows, cols)` view, which XLA:CPU indexes element by element when a block "
  "is not a power of two (224 here). The page faults left come from XLA:CPU's copies of "
  "the old codes, which the update reads while the loop rewrites them in place (writing "
  "the new codes to fresh buffers instead was slower). Each chunk also sums its new first "
  "moment per block so that a NaN poisons the block's scale (XLA:CPU's vectorized block "
  "maximum may skip a NaN, which let the update from the stored codes stay finite): about "
  "5% of the step. This VM's timings drift from run to run: three runs without that sum "
  "gave int8 2.09x, 2.13x and 2.48x (stochastic) and 1.82x, 1.84x and 2.34x (nearest). "
  "Pinned to one core the ratios are higher (about 2.9x and 2.6x): float32 is memory-bound "
  "and gains little from the second core. Stochastic rounding adds an integer hash per "
  "element, which XLA:CPU computes in the fusion of each moment's codes."
)


def section(cache: dict[str, Any], n: int) -> str:
  body = [
    "Written by `python benchmarks/memory_lean.py`; each part says where it was measured "
    "(parts can be rerun alone with `--parts`)."
  ]
  if "bytes" in cache:
    b = cache["bytes"]
    totals = b["totals"]
    body += [
      "",
      f"### Bytes per param of params + optimizer state ({n / 1e6:.1f}M-param tree, "
      "`tx.init` arrays)",
      "",
      f"Counted {b['when']}.",
      "",
      "| state | params | mu | nu | both moments per quantized param | total |",
      "|---|---|---|---|---|---|",
      *b["rows"],
      "",
      "Targets: both 8-bit moments together <= 2.05 bytes per quantized param; the whole "
      f"state <= 6.05 with int8 moments (here {totals['int8 moments']:.3f}) and <= 4.05 with "
      f"bf16 params as well (here {totals['bf16 params + int8 moments (stochastic)']:.3f}; "
      "Kahan adds its 2-byte compensation). Leaves under 4096 elements (biases, norms) keep "
      "float32 moments; this tree has no module types, so no embedding exclusion applies.",
      "",
      "Per device with ZeRO-1 (`mesh.shard_opt_state=data`) on 8 forced host devices, params "
      "replicated, bytes per param of the whole model:",
      "",
      "| state | params | optimizer state | total |",
      "|---|---|---|---|",
      *[
        f"| {k} | {v['params']:.3f} | {v['opt_state']:.3f} | {v['total']:.3f} |"
        for k, v in b["zero1"].items()
      ],
    ]
  if "time" in cache:
    ms = cache["time"]["ms"]
    faults = cache["time"].get("faults", {})
    base = ms["optax float32"]
    body += [
      "",
      "### Update time (jitted update + apply, state donated), interleaved medians",
      "",
      f"Measured {cache['time']['when']}.",
      "",
      "| step | ms | / optax float32 | minor page faults / step |",
      "|---|---|---|---|",
      *[
        f"| {k} | {v * 1e3:.1f} | {v / base:.2f} | {faults.get(k, float('nan')):.0f} |"
        for k, v in ms.items()
      ],
      "",
      UPDATE_TIME_NOTE,
    ]
  if "shakespeare" in cache:
    ts = cache["shakespeare"]["rows"]
    ref = ts[0][1]
    body += [
      "",
      "### Quality: Tiny Shakespeare, 2000-step cosine recipe (`:nanogpt` with the `default` "
      "mask; seed 1337, val loss over 200 batches)",
      "",
      f"Measured {cache['shakespeare']['when']}.",
      "",
      "| state | val loss | vs float32 | bytes/param (start-up report) |",
      "|---|---|---|---|",
      *[f"| {lab} | {loss:.4f} | {loss - ref:+.4f} | {b} |" for lab, loss, _, b in ts],
      "",
      "(Wall times are in memory_lean.json; the quality runs share the machine with other "
      "work, so they are not timings: see the update-time table.)",
      "",
      "Targets: int8 moments within 0.02 of float32; bf16 params with stochastic rounding and "
      "with Kahan within 0.03. bf16 params without `mu_dtype` keep bf16 moments (the params' "
      "dtype, as optax). The embeddings (and norms, under 4096 elements) keep float32 moments "
      "(`optimizer.float_moments=embeddings`): 17,664 of 804,096 params, which costs 0.07 "
      "bytes per param per moment on this small model (6.18 instead of 6.05).",
    ]
  if "mlp" in cache:
    body += [
      "",
      "### Quality: MLP classifier (64-512-512-10, dropout 0.1, teacher labels; 1500 steps of "
      "128; held-out 4096)",
      "",
      f"Measured {cache['mlp']['when']}.",
      "",
      "| state | loss | accuracy |",
      "|---|---|---|",
      *[f"| {lab} | {loss:.4f} | {acc:.4f} |" for lab, loss, acc in cache["mlp"]["rows"]],
    ]
  return "\n".join(body)


if __name__ == "__main__":
  main()
