"""Times one AdamW step (update + apply) of adamw_flax against optax, side by side.

Usage::

  python benchmarks/optimizer_update.py           # ~2 min on 2 cores
  python benchmarks/optimizer_update.py --quick   # ~30 s, fewer repetitions
  python benchmarks/optimizer_update.py --no-write  # print only

On one transformer-like pytree (~32M float32 params in ~200 leaves) it times a
jitted full optimizer step ``(params, state, grads) -> (params, state)`` with
params and state donated, for ``adamw_flax.adamw`` and ``optax.adamw``, with
float32 moments and with ``mu_dtype=bfloat16`` (ours by default, which gives
optax's numbers bitwise, and with the opt-in ``update_from_stored_moments=True``).
Next to them runs a streaming kernel with the same logical traffic (it reads
params, grads, mu, nu once and writes params, mu, nu once, in the same dtypes),
which bounds what an elementwise step can reach on this machine. Repetitions
are interleaved (one call of each variant per round) and medians reported, so
the ratios come from the same conditions on a shared, noisy machine; the minor
page faults of each call are counted too (fresh memory a step touches).

It also reads the compiled HLO of each step, and of a plain jitted
``tx.update`` with the state donated: fusions, copies and converts in the entry
computation, and the bytes those fusions read and write, which is the traffic
XLA actually schedules (more than the logical traffic when values are
recomputed or copied).

The results replace the "## Optimizer update" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw_flax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import RESULTS, cpu_model, write_section  # noqa: E402

SECTION = "## Optimizer update"
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8}


def transformer_params(
  d_model: int = 448, num_layers: int = 12, vocab: int = 6144, context: int = 512
) -> dict[str, Any]:
  """A GPT-like float32 parameter tree: ~32M params in 196 leaves by default."""
  shapes: dict[str, Any] = {
    "embed": (vocab, d_model),
    "pos_embed": (context, d_model),
    "ln_f": {"scale": (d_model,), "bias": (d_model,)},
  }
  for i in range(num_layers):
    shapes[f"layer_{i}"] = {
      "attn": {n: (d_model, d_model) for n in ("q", "k", "v", "o")}
      | {f"b{n}": (d_model,) for n in ("q", "k", "v", "o")},
      "mlp": {
        "w1": (d_model, 4 * d_model),
        "b1": (4 * d_model,),
        "w2": (4 * d_model, d_model),
        "b2": (d_model,),
      },
      "ln1": {"scale": (d_model,), "bias": (d_model,)},
      "ln2": {"scale": (d_model,), "bias": (d_model,)},
    }
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(0), len(leaves))
  arrays = [0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves, strict=True)]
  return jax.tree.unflatten(treedef, arrays)


def optimizer_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """The full step a trainer runs, with params and optimizer state donated."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def streaming_step() -> Callable[..., Any]:
  """Reads params, grads, mu, nu once; writes params, mu, nu once (same dtypes).

  Negation keeps mu and nu bounded (no overflow, no denormals) over many calls.
  """

  def step(params, state, grads):
    adam = state[0]
    params = jax.tree.map(lambda p, g: p + g, params, grads)
    mu = jax.tree.map(lambda m: -m, adam.mu)
    nu = jax.tree.map(lambda v: -v, adam.nu)
    return params, (adam._replace(mu=mu, nu=nu), *state[1:])

  return jax.jit(step, donate_argnums=(0, 1))


def logical_bytes(params: Any, state: Any, grads: Any) -> int:
  """Bytes a perfect step moves: read params, grads, mu, nu; write params, mu, nu."""
  adam = state[0]
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return size(grads) + 2 * (size(params) + size(adam.mu) + size(adam.nu))


def hlo_summary(compiled_text: str) -> dict[str, float]:
  """Counts fusions/copies/converts of the entry computation and their bytes.

  Bytes are summed over the array operands and results of every fusion and
  copy in the entry computation: the memory traffic XLA scheduled, assuming
  each such op streams its operands once.
  """
  entry = compiled_text[compiled_text.index("\nENTRY ") :]
  body = entry[entry.index("{\n") :]
  shape_re = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
  sizes: dict[str, int] = {}
  for line in body.splitlines():
    m = shape_re.match(line)
    if m and m.group(2) in _DTYPE_BYTES:
      n = int(np.prod([int(d) for d in m.group(3).split(",") if d])) if m.group(3) else 1
      sizes[m.group(1)] = n * _DTYPE_BYTES[m.group(2)]
  fusions = copies = 0
  traffic = 0
  for line in body.splitlines():
    m = shape_re.match(line)
    if not m:
      continue
    op = re.search(r"\} (fusion|copy)\(([^)]*)\)", line)
    if not op:
      continue
    if op.group(1) == "fusion":
      fusions += 1
    else:
      copies += 1
    operands = re.findall(r"%([\w.\-]+)", op.group(2))
    traffic += sizes.get(m.group(1), 0) + sum(sizes.get(o, 0) for o in operands)
  converts = len(re.findall(r" convert\(", compiled_text))
  return {"fusions": fusions, "copies": copies, "converts": converts, "traffic": traffic}


def program_fingerprint(compiled_text: str) -> list[str]:
  """The compiled instructions with names and debug metadata stripped."""
  lines = []
  for line in compiled_text.splitlines():
    if not re.match(r"^\s*(ROOT )?%[\w.\-]+ = ", line):
      continue
    line = re.sub(r", metadata=\{[^}]*\}", "", line)
    lines.append(re.sub(r"%[\w.\-]+", "%", line).strip())
  return lines


def plain_update(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """``tx.update`` alone under jit, with the optimizer state donated."""
  return jax.jit(lambda grads, state, params: tx.update(grads, state, params), donate_argnums=1)


# (label, mu_dtype, extra adamw_flax.adamw arguments); optax runs the same
# label without the extras.
SETTINGS = (
  ("fp32", None, {}),
  ("bf16 mu", jnp.bfloat16, {}),
  ("bf16 mu, update_from_stored_moments", jnp.bfloat16, {"update_from_stored_moments": True}),
)


def run(repeats: int, warmup: int) -> dict[str, Any]:
  params = transformer_params()
  grads = jax.tree.map(lambda p: 1e-3 * jnp.sin(p * 100.0), params)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  num_leaves = len(jax.tree.leaves(params))

  # name -> (transform whose state the step carries, the jitted step)
  variants: dict[str, tuple[optax.GradientTransformation, Callable[..., Any]]] = {}
  for label, mu_dtype, extra in SETTINGS:
    ours = adamw_flax.adamw(1e-3, mu_dtype=mu_dtype, **extra)
    if not extra:
      reference = optax.adamw(1e-3, mu_dtype=mu_dtype)
      variants[f"optax {label}"] = (reference, optimizer_step(reference))
    variants[f"ours {label}"] = (ours, optimizer_step(ours))
    if not extra:
      variants[f"stream {label}"] = (reference, streaming_step())
  # A/A control: a second, separately compiled optax fp32 step. Its ratio to the
  # first is this run's noise floor for the ratios.
  control = optax.adamw(1e-3)
  variants["optax fp32 (A/A)"] = (control, optimizer_step(control))
  # Each variant owns its buffers, since donation consumes them every call.
  live: dict[str, list[Any]] = {}
  steps: dict[str, Callable[..., Any]] = {}
  info: dict[str, dict[str, float]] = {}
  update_info: dict[str, dict[str, float]] = {}
  fingerprints: dict[str, list[str]] = {}
  for name, (tx, step) in variants.items():
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    text = step.lower(p, s, grads).compile().as_text()
    info[name] = hlo_summary(text)
    fingerprints[name] = program_fingerprint(text)
    info[name]["logical"] = logical_bytes(p, s, grads)
    if not name.startswith("stream") and "A/A" not in name:
      text = plain_update(tx).lower(grads, s, p).compile().as_text()
      update_info[name] = hlo_summary(text)
    steps[name] = step
    live[name] = [p, s]
    for _ in range(warmup):
      live[name][:] = step(live[name][0], live[name][1], grads)
    jax.block_until_ready(live[name])

  load_before = os.getloadavg()[0]
  times: dict[str, list[float]] = {name: [] for name in variants}
  faults: dict[str, list[int]] = {name: [] for name in variants}
  names = list(variants)
  for r in range(repeats):
    # Rotate the order so no variant always runs right after the same one.
    for name in names[r % len(names) :] + names[: r % len(names)]:
      faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      live[name][:] = steps[name](live[name][0], live[name][1], grads)
      jax.block_until_ready(live[name])
      times[name].append(time.perf_counter() - start)
      faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
  medians = {name: statistics.median(t) for name, t in times.items()}
  # Ratios within each round, then their median: robust to load that drifts
  # between rounds on a shared machine.
  paired = {
    label: statistics.median(
      a / b
      for a, b in zip(times[f"ours {label}"], times[f"optax {label.split(',')[0]}"], strict=True)
    )
    for label, _, _ in SETTINGS
  }
  paired["A/A"] = statistics.median(
    a / b for a, b in zip(times["optax fp32 (A/A)"], times["optax fp32"], strict=True)
  )
  identical = {
    label: fingerprints[f"ours {label}"] == fingerprints[f"optax {label}"]
    for label in ("fp32", "bf16 mu")
  }
  return {
    "load": (load_before, os.getloadavg()[0]),
    "paired": paired,
    "identical": identical,
    "num_params": num_params,
    "num_leaves": num_leaves,
    "medians": medians,
    "faults": {name: statistics.median(f) for name, f in faults.items()},
    "info": info,
    "update_info": update_info,
    "repeats": repeats,
  }


def report(result: dict[str, Any]) -> str:
  med, info, faults = result["medians"], result["info"], result["faults"]
  lines = [
    "| variant | median ms | logical MB | GB/s (logical) | % of stream GB/s "
    "| XLA fusions / copies / converts | XLA-scheduled MB | page faults / step |",
    "|---|---:|---:|---:|---:|---|---:|---:|",
  ]
  for label, _, extra in SETTINGS:
    if extra:
      continue
    stream_gbs = info[f"stream {label}"]["logical"] / med[f"stream {label}"] / 1e9
    names = [f"optax {label}", f"ours {label}"]
    names += [f"ours {other}" for other, _, e in SETTINGS if e and other.startswith(label)]
    for name in [*names, f"stream {label}"]:
      gbs = info[name]["logical"] / med[name] / 1e9
      i = info[name]
      lines.append(
        f"| {name} | {med[name] * 1e3:.1f} | {i['logical'] / 1e6:.0f} | {gbs:.1f} "
        f"| {100 * gbs / stream_gbs:.0f}% | {i['fusions']:.0f} / {i['copies']:.0f} / "
        f"{i['converts']:.0f} | {i['traffic'] / 1e6:.0f} | {faults[name]:.0f} |"
      )
  paired, same = result["paired"], result["identical"]
  fast = "bf16 mu, update_from_stored_moments"
  ratios = [
    f"- ours / optax, fp32: **{med['ours fp32'] / med['optax fp32']:.2f}** (ratio of medians), "
    f"{paired['fp32']:.2f} (median of per-round ratios); compiled programs "
    + (
      "identical instruction for instruction, so any deviation from 1.00 is noise"
      if same["fp32"]
      else "differ"
    ),
    f"- ours / optax, bf16 mu (default: optax's numbers bitwise): "
    f"**{med['ours bf16 mu'] / med['optax bf16 mu']:.2f}** (ratio of medians), "
    f"{paired['bf16 mu']:.2f} (median of per-round ratios); compiled programs "
    + (
      "identical instruction for instruction, so any deviation from 1.00 is noise"
      if same["bf16 mu"]
      else "differ"
    ),
    f"- ours / optax, bf16 mu with `update_from_stored_moments=True` (other numbers): "
    f"**{med[f'ours {fast}'] / med['optax bf16 mu']:.2f}** (ratio of medians), "
    f"{paired[fast]:.2f} (median of per-round ratios)",
    f"- A/A control (a second optax fp32 step / the first): "
    f"{med['optax fp32 (A/A)'] / med['optax fp32']:.2f} (ratio of medians), "
    f"{paired['A/A']:.2f} (median of per-round ratios): the noise floor of this run",
    f"- optax bf16 mu / optax fp32: {med['optax bf16 mu'] / med['optax fp32']:.2f}; "
    f"ours bf16 mu / ours fp32: {med['ours bf16 mu'] / med['ours fp32']:.2f}; "
    f"with `update_from_stored_moments=True`: {med[f'ours {fast}'] / med['ours fp32']:.2f}",
  ]
  upd = result["update_info"]
  plain = ", ".join(
    f"{name} {upd[name]['copies']:.0f}" for name in upd if name in info and "A/A" not in name
  )
  ratios.append(
    f"- `copy` ops in a plain jitted `tx.update` with the state donated (no apply): {plain}"
  )
  return "\n".join(lines) + "\n\n" + "\n".join(ratios)


EXPLANATION = """\
What limits the speed (read from `jax.jit(step).lower(...).compile().as_text()`):

- The step is memory-bound: a few flops per element against 28 bytes/param of
  logical traffic in fp32. XLA:CPU fuses each leaf's elementwise work into
  loop fusions, but only single-output ones: one writes the new `mu`, one the
  new `nu`, and one the new params, reading the *new* `mu` and `nu` back. So
  fp32 schedules 40 B/param (g is read three times, mu and nu twice) instead of
  28: by bytes alone 70% of the streaming kernel's rate (measured a little
  higher: neither kernel is purely bandwidth-bound here, both pay a fixed cost
  per fusion, 588 of them, 3 per leaf, most small). optax and ours compile
  to the same program instruction for instruction (the float32 path is optax's
  op order, which is also why the numbers are bitwise equal), so the fp32 ratio
  is 1 up to noise. One fusion per leaf would need multi-output loop fusion,
  which XLA:CPU does not form by default (its
  `--xla_backend_extra_options=xla_cpu_use_multi_output_fusion` made both
  optax steps slower here), and the state layout (separate `mu` and `nu` trees)
  is fixed by compatibility with optax.
- `mu_dtype=bfloat16` with float32 params, optax and our default (the same
  numbers bitwise, and the same compiled program): the update uses the float32
  `mu` *before* rounding, which is stored nowhere, so the params fusion
  recomputes it from the old bf16 `mu` and g. The old `mu` buffer is donated
  and overwritten in place by the `mu` fusion, so XLA first copies every `mu`
  leaf (196 `copy` ops) into a fresh temporary: 64 MB of new memory every step,
  about 15,600 minor page faults (the `page faults / step` column), on top of
  the copies themselves (single-threaded: no `outer_dimension_partitions`).
  Scheduled traffic: 42 B/param (copy 4, mu 8, nu 12, params 18: p, g, nu, the
  mu copy), about fp32's 40, yet 1.5-1.7x its time: the fresh memory and the
  serial copies are the cost. (optax also multiplies the bf16 `mu` by `b1`
  rounded to bf16, 0.8984375, and so do we by default, to keep its numbers.)
- Why our default cannot do better without changing the numbers: the only
  copy-free order runs the params fusion (which reads the old `mu`) before the
  in-place `mu` store, and that needs the store to depend on apply_updates'
  output, which an optax transform never sees. Within the transform,
  `jax.lax.optimization_barrier` cannot order fusions on CPU: XLA:CPU's
  OptimizationBarrierExpander deletes barriers before fusion and scheduling
  (with a barrier around the float32 `mu` the compiled program is optax's,
  copies included). Materializing the float32
  `mu` once instead (we forced it through a `lax.cond`) swaps the 64 MB bf16
  copy for a 128 MB float32 temporary: twice the page faults, 1.16x optax's
  time. A plain jitted `tx.update` with donated state is no better: jax aliases
  the donated moment buffers to the returned updates (same shapes and dtypes,
  earlier in the outputs), which costs copies even in fp32, optax's and ours
  alike.
- The opt-in `update_from_stored_moments=True` computes the update from the
  stored, rounded bf16 `mu` (and exact float32 `b1`), so the update depends on
  the new state alone: the params fusion reads the new bf16 `mu` (2 B) instead
  of recomputing it from g and the old `mu`, no copy and no fresh memory are
  needed, and the scheduled traffic falls to 34 B/param (mu 8, nu 12, params
  14), below fp32's. The price is the numbers: each step's update differs from
  optax's by the bf16 rounding of `mu` (up to 2^-9 relative). With float32
  moments the flag changes nothing.
"""


def write_results(result: dict[str, Any], table: str) -> None:
  date = datetime.date.today().isoformat()
  section = (
    f"`python benchmarks/optimizer_update.py` ({date}): one jitted AdamW step "
    f"(update + apply_updates, params and state donated) on a transformer-like tree of "
    f"{result['num_params'] / 1e6:.1f}M float32 params in {result['num_leaves']} leaves; "
    f"median of {result['repeats']} interleaved repetitions. Machine: "
    f"{jax.device_count()}x {jax.devices()[0].platform.upper()} device, "
    f"{_cpu_count()}-core CPU, {cpu_model()}; jax {jax.__version__}, optax {optax.__version__}; "
    f"load average {result['load'][0]:.1f} before / {result['load'][1]:.1f} after (the cores "
    f"are shared with other jobs, so absolute times vary between runs: read the ratios, "
    f"measured side by side). "
    f"`stream` is a jitted elementwise kernel with the same logical traffic (reads params, "
    f"grads, mu, nu; writes params, mu, nu); logical MB counts those bytes once, "
    f"XLA-scheduled MB sums the operands and results of the compiled fusions and copies; "
    f"page faults / step is the median count of minor page faults per call (fresh memory "
    f"the step touches). `ours bf16 mu` is the default (optax's numbers bitwise); "
    f"`update_from_stored_moments` is the opt-in that computes the update from the "
    f"rounded bf16 mu.\n\n"
    f"{table}\n\n{EXPLANATION}"
  )
  write_section(SECTION.removeprefix("## "), section)


def _cpu_count() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="few repetitions (~30 s)")
  parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
  parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
  args = parser.parse_args()
  repeats = args.repeats or (7 if args.quick else 41)
  result = run(repeats=repeats, warmup=1 if args.quick else 3)
  table = report(result)
  print(table)
  if not args.no_write:
    write_results(result, table)
    print(f"wrote the '{SECTION}' section of {RESULTS}")


if __name__ == "__main__":
  main()
