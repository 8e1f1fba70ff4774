"""AdamW state formats compiled by XLA:TPU for one v5p chip: memory, bytes accessed, time estimate.

Usage::

  python benchmarks/int8_tpu.py              # 268M params (16 x 4096^2), ~10 min on 2 cores
  python benchmarks/int8_tpu.py --size 1024  # a small variant (the slow test's), ~1 min
  python benchmarks/int8_tpu.py --no-write   # print only

Needs libtpu (``pip install -e '.[tpu]'``), no TPU: the compile-only devices of
``jax.experimental.topologies`` ("v5p:1x1x1", one chip). For each state format
it compiles the optimizer update and ``optax.apply_updates`` of a tree of
``--leaves`` float32 (or bfloat16) params of ``size x size``, with params and
state donated, and reads XLA's own analyses of the compiled program:

* ``args + temps``: ``memory_analysis()``'s argument and temporary bytes (the
  donated outputs alias the arguments), the update's peak in HBM;
* ``temps``: the temporaries alone;
* ``bytes/param``: ``cost_analysis()["bytes accessed"]`` over the params;
* ``XLA time``: ``cost_analysis()["optimal_seconds"]``.

Then the same with the optimizer state offloaded to host memory
(``optimizer.offload``, :mod:`adamw_flax.offload`): HBM between steps holds
params and gradients only; ``host`` is the state's bytes in pinned host memory.

The results replace the "## AdamW state formats compiled for a TPU v5p chip"
section of benchmarks/RESULTS.md (only for the full size).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import os
import pathlib
import re
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices, a CPU runtime
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.experimental import topologies  # noqa: E402

import adamw_flax  # noqa: E402
from adamw_flax import offload  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, write_section  # noqa: E402

TITLE = "AdamW state formats compiled for a TPU v5p chip"
INT8 = {"mu_dtype": "int8", "nu_dtype": "int8"}
# (label, params dtype, the optimizer)
FORMATS: list[tuple[str, Any, Any]] = [
  ("optax float32", jnp.float32, lambda: optax.adamw(1e-3)),
  ("ours float32", jnp.float32, lambda: adamw_flax.adamw(1e-3)),
  ("ours bf16 mu", jnp.float32, lambda: adamw_flax.adamw(1e-3, mu_dtype="bfloat16")),
  ("ours int8 mu + nu", jnp.float32, lambda: adamw_flax.adamw(1e-3, **INT8)),
  (
    "ours int8 mu + nu, rounded to nearest",
    jnp.float32,
    lambda: adamw_flax.adamw(1e-3, **INT8, moments_rounding="nearest"),
  ),
  (
    "ours bf16 params + int8",
    jnp.bfloat16,
    lambda: adamw_flax.adamw(1e-3, **INT8, params_rounding="stochastic"),
  ),
  # The opt-in update from the stored (new) codes: one pass over the gradient.
  (
    "ours int8 mu + nu, update from stored moments",
    jnp.float32,
    lambda: adamw_flax.adamw(1e-3, **INT8, update_from_stored_moments=True),
  ),
  (
    "ours bf16 params + int8, update from stored moments",
    jnp.bfloat16,
    lambda: adamw_flax.adamw(
      1e-3, **INT8, params_rounding="stochastic", update_from_stored_moments=True
    ),
  ),
]
STORED = "ours int8 mu + nu, update from stored moments"
OFFLOADED = ("ours float32", "ours int8 mu + nu", "ours bf16 params + int8")
# The measurement of the previous implementation (same program, same
# libtpu), for the before/after table.
BEFORE = {
  "ours int8 mu + nu, rounded to nearest": (5455, 2887, 168.7, 19.26),
  "ours bf16 params + int8": (3120, 1576, 153.3, 17.51),
}


def chip() -> Any:
  """The compile-only device of one v5p chip."""
  topo = topologies.get_topology_desc(
    platform="tpu", topology_name="v5p:1x1x1", chips_per_host_bounds=[1, 1, 1]
  )
  return topo.devices[0]


def compile_update(tx: Any, pdtype: Any, leaves: int, size: int, offloaded: bool) -> dict:
  """Compiles update + apply_updates for ``leaves`` params of ``size x size``; XLA's figures."""
  mesh = jax.sharding.Mesh([chip()], ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = {
    f"w{i:02d}": jax.ShapeDtypeStruct((size, size), pdtype, sharding=rep) for i in range(leaves)
  }
  state = jax.eval_shape(tx.init, params)
  shardings = jax.tree.map(lambda _: rep, state)
  if offloaded:
    shardings = offload.place(state, shardings, ("opt_state",), "tpu")
  state = jax.tree.map(
    lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), state, shardings
  )

  def step(p, s, g):
    s = offload.to_device(s, shardings)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), offload.to_host(s, shardings)

  t0 = time.perf_counter()
  out_shardings = (jax.tree.map(lambda _: rep, params), shardings)
  jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)
  compiled = jitted.lower(params, state, params).compile()
  m = compiled.memory_analysis()
  hlo = hlo_bytes(compiled.as_text(), leaves * size * size)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  n = leaves * size * size
  mib = 2.0**20
  return {
    "args": m.argument_size_in_bytes / mib,
    "temps": m.temp_size_in_bytes / mib,
    "host": m.host_argument_size_in_bytes / mib,
    "bytes_per_param": float(cost["bytes accessed"]) / n,
    "ms": float(cost["optimal_seconds"]) * 1e3,
    "compile_s": time.perf_counter() - t0,
    "hlo": hlo,
  }


def compile_parts(size: int) -> dict[str, dict]:
  """The update from stored moments' two passes compiled apart, for one ``size x size`` leaf.

  ``kernel``: the Pallas requantization, codes and scales donated (its four
  outputs); ``update``: the update from the new codes and scales plus
  ``optax.apply_updates``, params donated. Their bytes add up to what the
  whole step would touch if XLA scheduled it as two passes and nothing else.
  Built from quantize's own pieces (private: no public function compiles
  one pass alone), the expressions the kernel path of ``adam_update`` uses.
  """
  from adamw_flax import quantize as q  # noqa: PLC0415 (after the platform is set)

  mesh = jax.sharding.Mesh([chip()], ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  nb = size // 256
  shape = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  args = (shape((size, size), jnp.float32), shape((size, size), jnp.int8),
          shape((size, nb), jnp.float32), shape((size, size), jnp.uint8),
          shape((size, nb), jnp.float32))  # fmt: skip
  s = q.adam_scalars(0.9, 0.999, 1e-8, 0.0, 0.1, 0.001)

  def kernel(g, cm, sm, cn, sn):
    return q._kernel_requant(g, cm, sm, cn, sn, s, None, 0, 0, size, False)

  def update(p, cm, sm, cn, sn):
    mu, nu = q._values_tiled(cm, sm, "mu"), q._values_tiled(cn, sn, "nu")
    u = -1e-3 * q._direction(p, mu, nu, s, False)
    return optax.apply_updates(p, u)

  out = {}
  for name, fn, donate in (("kernel", kernel, (1, 2, 3, 4)), ("update", update, (0,))):
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out[name] = {
      "bytes_per_param": float(cost["bytes accessed"]) / size**2,
      "ms": float(cost["optimal_seconds"]) * 1e3,
    }
  return out


def measure(leaves: int, size: int) -> dict[str, dict]:
  out = {}
  for label, pdtype, make in FORMATS:
    for offloaded in (False, True):
      if offloaded and label not in OFFLOADED:
        continue
      name = f"{label}, state offloaded" if offloaded else label
      out[name] = compile_update(make(), pdtype, leaves, size, offloaded)
      r = out[name]
      print(
        f"  {name}: HLO bytes/param by kind {', '.join(f'{k} {v:.1f}' for k, v in r['hlo'].items())}"
      )
      print(
        f"  {name}: args+temps {r['args'] + r['temps']:.0f} MiB, temps {r['temps']:.0f}, host "
        f"{r['host']:.0f}, {r['bytes_per_param']:.1f} B/param, {r['ms']:.2f} ms "
        f"({r['compile_s']:.0f} s to compile)",
        flush=True,
      )
  # One leaf alone: the update's own bytes, before XLA schedules several leaves together.
  for label, pdtype, make in FORMATS:
    if label in ("ours float32", "ours int8 mu + nu", STORED):
      out[f"{label}, one leaf"] = compile_update(make(), pdtype, 1, size, False)
  parts = compile_parts(size)
  print("  update from stored moments, passes compiled apart (bytes/param, ms): "
        + ", ".join(f"{k} {v['bytes_per_param']:.2f} {v['ms']:.3f}" for k, v in parts.items()))  # fmt: skip
  out["parts"] = parts
  return out


def table(rows: dict[str, dict], leaves: int, size: int) -> str:
  ref = rows["ours float32"]
  ref_mem = ref["args"] + ref["temps"]
  state = 2 * leaves * size * size * 4 / 2.0**20  # the float32 state: mu and nu
  lines = [
    "| state | args + temps MiB | / float32 | temps MiB | temps / float32 state | host MiB "
    "| bytes accessed / param | XLA time ms | / float32 |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    if name.endswith("one leaf") or name == "parts":
      continue
    mem = r["args"] + r["temps"]
    lines.append(
      f"| {name} | {mem:.0f} | {mem / ref_mem:.2f} | {r['temps']:.0f} | "
      f"{r['temps'] / state:.1%} | {r['host']:.0f} | {r['bytes_per_param']:.1f} | "
      f"{r['ms']:.2f} | {r['ms'] / ref['ms']:.2f} |"
    )
  return "\n".join(lines)


def section(rows: dict[str, dict], leaves: int, size: int, when: str) -> str:
  n = leaves * size * size
  ref = rows["ours float32"]
  q, one, one_ref = (
    rows["ours int8 mu + nu"],
    rows["ours int8 mu + nu, one leaf"],
    rows["ours float32, one leaf"],
  )
  stored_one = rows[f"{STORED}, one leaf"]
  parts = rows["parts"]
  apart = sum(p["bytes_per_param"] for p in parts.values())
  apart_ms = sum(p["ms"] for p in parts.values()) * leaves
  kinds = lambda r: ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["hlo"].items()) if v >= 0.05)
  ref_mem = ref["args"] + ref["temps"]
  before = [
    "| state | args + temps MiB | temps MiB | bytes accessed / param | XLA time ms |",
    "|---|---|---|---|---|",
  ]
  for name, (mem, temps, bpp, ms) in BEFORE.items():
    r = rows[name]
    before.append(
      f"| {name}: before | {mem} ({mem / ref_mem:.2f}x) | {temps} | {bpp} | {ms} "
      f"({ms / ref['ms']:.2f}x) |"
    )
    before.append(
      f"| {name}: now | {r['args'] + r['temps']:.0f} ({(r['args'] + r['temps']) / ref_mem:.2f}x)"
      f" | {r['temps']:.0f} | {r['bytes_per_param']:.1f} | {r['ms']:.2f} "
      f"({r['ms'] / ref['ms']:.2f}x) |"
    )
  return "\n".join(
    [
      "Written by `python benchmarks/int8_tpu.py`: XLA:TPU's compile of the optimizer update "
      f"and `optax.apply_updates` on {n / 1e6:.0f}M params ({leaves} leaves of {size}x{size}), "
      "params and state donated, for one v5p chip (`v5p:1x1x1`, compile-only devices; no TPU "
      f"ran). Compiled {when}; libtpu {_libtpu()}.",
      "",
      table(rows, leaves, size),
      "",
      "Before and after the block-wise 8-bit update (the issue's measurement of the previous "
      "code, the same program):",
      "",
      *before,
      "",
      "Targets for int8 against float32: args + temps <= 0.70x, temps <= 5% of the float32 "
      "state, <= 18 bytes accessed per param, XLA time <= 0.80x; bf16 params + int8 args + "
      "temps <= 0.45x. How the 8-bit update runs on TPU: a Pallas kernel requantizes each "
      "tile in place (the block maximum needs the whole block before its first code), and "
      "the update is an XLA fusion that `optax.apply_updates` fuses into (the old codes "
      "dequantized through a chain of selects on the column index: a `(rows, blocks, "
      "block)` view of a tiled array is a relayout, a copy of the leaf). Under optax's API "
      "the update is an array, so the two passes both read the gradient and the old codes. "
      f"Bytes per param in the compiled HLO by kind, int8 with {leaves} leaves: {kinds(q)}; "
      f"one leaf compiled alone: {kinds(one)}, {one['bytes_per_param']:.1f} bytes accessed "
      f"per param and {one['ms'] / one_ref['ms']:.2f}x float32's time. With {leaves} leaves "
      "XLA's memory-space assignment adds copies of the 8-bit codes into a faster memory "
      "space (`copy-start`/`copy-done` of `s8`/`u8` codes into `S(1)` in the HLO: the "
      "`memory-space copies` above) that the "
      "cost analysis counts: the rest of the bytes and of the time. The 18-byte target "
      "needs one pass over the gradient, which under `tx.update` + `optax.apply_updates` "
      "only an update from the *stored* (rounded) moments allows: other numbers than "
      "these (which equal the previous code's bitwise). That is the opt-in "
      "`update_from_stored_moments=True` (`optimizer.update_from_stored_moments`): the kernel "
      "requantizes first and the update reads the new codes, not the gradient and the old "
      f"codes again; its bytes in the HLO by kind: {kinds(rows[STORED])}, "
      f"{rows[STORED]['bytes_per_param']:.1f} bytes accessed per param by XLA's cost "
      f"analysis, {rows[STORED]['ms'] / ref['ms']:.2f}x float32's time. One leaf compiled "
      f"alone: {kinds(stored_one)}, {stored_one['bytes_per_param']:.1f} bytes per param and "
      f"{stored_one['ms'] / one_ref['ms']:.2f}x float32's time: there XLA's memory-space "
      "assignment moves the params (float32) through the faster memory space, and the cost "
      "analysis counts more bytes than the instructions' operands and results add up to, so "
      "the option's gain depends on how XLA schedules the whole step. Its two passes "
      f"compiled apart (one leaf): the kernel {parts['kernel']['bytes_per_param']:.2f} bytes "
      f"per param, the update with `optax.apply_updates` {parts['update']['bytes_per_param']:.2f}:"
      f" {apart:.1f} together, the target's 18 plus the scales, and "
      f"{apart_ms / ref['ms']:.2f}x float32's time for {leaves} such leaves. What the whole "
      "program adds is XLA:TPU's scheduling of the passes together (memory-space copies, "
      "the cost analysis of a fusion that reads a custom call's outputs), which no "
      "expression in JAX controls.",
      "",
      "`ours int8 mu + nu` rounds its codes stochastically (the default, "
      "`optimizer.moments_rounding`); rounded to nearest it computes what the previous "
      "code did, bitwise (the before/after rows). Offloaded rows: the optimizer state in "
      "pinned host memory between steps (`optimizer.offload=opt_state`); the step brings "
      "it into HBM for the update and writes it back. HBM between steps (args) drops by "
      "the offloaded bytes, which appear as host bytes; 8-bit codes stay in HBM (XLA:TPU "
      "in this libtpu does not compile host transfers of 8-bit arrays in a step), so with "
      "int8 moments only the float32 scales move. During the update XLA keeps the state's "
      "device copies live at once (temps), so this update-only program's peak does not "
      "drop; in a train step the peak is the backward pass's, which no longer holds the "
      "state (see the pod_lm table).",
    ]
  )


def _libtpu() -> str:
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


_BYTES = {"f32": 4, "bf16": 2, "s8": 1, "u8": 1, "s32": 4, "u32": 4, "pred": 1}


def hlo_bytes(text: str, n: int) -> dict[str, float]:
  """Bytes per param that the entry computation's instructions read and write, by kind.

  ``fusion`` (XLA's own kernels), ``custom-call`` (the Pallas kernel),
  ``memory-space copies`` (``copy-start`` reads, ``copy-done`` writes), ``copy``;
  each instruction's result and operands, from the shapes in the optimized HLO.
  """
  entry = text[text.index("\nENTRY") :]
  sizes: dict[str, int] = {}
  out: dict[str, float] = collections.defaultdict(float)
  shape_re = re.compile(r"(\w+)\[([\d,]*)\]")

  def nbytes(shape: str) -> int:
    total = 0
    for dt, dims in shape_re.findall(shape.split("{")[0] if "(" not in shape else shape):
      if dt in _BYTES:
        k = 1
        for d in filter(None, dims.split(",")):
          k *= int(d)
        total += k * _BYTES[dt]
    return total

  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*)$", line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    sizes[name] = nbytes(shape)
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    if op in ("fusion", "custom-call", "copy"):
      out[op] += (sizes[name] + sum(sizes.get(o, 0) for o in operands)) / n
    elif op == "copy-start":  # reads its operand (its result tuple holds both ends)
      out["memory-space copies"] += sum(sizes.get(o, 0) for o in operands) / n
      sizes[name] = 0
    elif op == "copy-done":  # writes the destination
      out["memory-space copies"] += sizes[name] / n
  return dict(out)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--leaves", type=int, default=16)
  ap.add_argument("--size", type=int, default=4096)
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args()
  rows = measure(args.leaves, args.size)
  when = f"{datetime.date.today()} on {machine()}"
  print(table(rows, args.leaves, args.size))
  if not args.no_write and args.size == 4096 and args.leaves == 16:
    write_section(TITLE, section(rows, args.leaves, args.size, when))


if __name__ == "__main__":
  main()
