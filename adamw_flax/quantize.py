r"""8-bit block-quantized Adam moments and the rounding of bfloat16 params.

No JAX library has these (optax, Flax, MaxText, Levanter, Kauldron keep
moments in a float dtype and params with a float32 master copy or round them
to nearest), so they are written here. PyTorch has them in bitsandbytes and
torchao; the formats below are our own.

**Moments.** A quantized moment is a :class:`QuantizedMoment`: one 8-bit code
per element, in the param's shape, and one float32 scale per block of
``block`` consecutive elements along the last axis (the block's largest
magnitude). A code is a tiny float relative to its block's maximum:

* ``mu`` (signed, int8 codes): 1 sign bit, 4 exponent bits, 3 mantissa bits.
  Magnitudes from :math:`2^{-16}` to :math:`1 - 2^{-4}` of the block maximum,
  with a relative rounding error at most :math:`2^{-4}` (6.25%, half a step),
  uniform across the 16 binades; smaller values round to 0 (no update, the
  safe side).
* ``nu`` (unsigned, uint8 codes) stores :math:`\sqrt{\nu}`, the quantity the
  update divides by: 4 exponent bits, 4 mantissa bits, so :math:`\sqrt{\nu}`
  spans :math:`2^{-16}` of its block maximum (:math:`\nu` spans
  :math:`2^{-32}`) with relative error at most :math:`2^{-5}` (3.1%). A
  non-zero :math:`\nu` never rounds to 0 (it is clamped to the smallest code),
  so a small second moment cannot turn into a division by ``eps`` (the
  "zero-point" failure of 8-bit second moments).

Blocks whose values are all float32 denormals (below 1.2e-38) hold zeros: next
to Adam's ``eps`` such moments are zero, and XLA:CPU's reductions flush them.

Exact zeros stay exact (code 0), and the block's largest element is exact up
to float32 rounding, so a block whose values all scale together (gradients
shrinking as training goes) tracks exactly through its scale. Quantizing and
dequantizing are a few integer operations on the float32 bit pattern (no
lookup table, no search), fused by XLA into the update.

A non-finite value makes its block's scale non-finite, so the whole block
dequantizes to NaN/inf: the update is non-finite exactly when the float path's
is, and ``skip_nonfinite`` (``optax.apply_if_finite``) skips that step and keeps
the stored moments.

**Params.** :func:`round_to_bfloat16` rounds float32 values to bfloat16 to
nearest, stochastically (unbiased: up with probability equal to the
remainder's share of the gap, from 16 random bits per element), or with a
Kahan compensation carried by the caller.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
  "MAPS",
  "QuantizedMoment",
  "block_size_for",
  "dequantize",
  "is_quantized",
  "max_relative_error",
  "moments_summary",
  "quantize",
  "random_bits16",
  "round_to_bfloat16",
  "zeros",
]


class QuantizedMoment(NamedTuple):
  """A moment stored as 8-bit codes with a float32 scale per block.

  Attributes:
    codes: ``int8`` (signed map, ``mu``) or ``uint8`` (unsigned map of
      :math:`\\sqrt{\\nu}`), the param's shape.
    scale: float32, ``shape[:-1] + (shape[-1] // block,)``: the block's
      largest magnitude (of :math:`\\sqrt{\\nu}` for ``nu``).
  """

  codes: jax.Array
  scale: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def block(self) -> int:
    return self.codes.shape[-1] // self.scale.shape[-1]

  @property
  def kind(self) -> str:
    return "mu" if self.codes.dtype == jnp.int8 else "nu"


class _Map(NamedTuple):
  exponent_bits: int
  mantissa_bits: int
  signed: bool
  sqrt: bool  # codes hold sqrt(x) (the second moment)
  zero_floor: bool  # non-zero values below range round to 0 (else to the smallest code)


MAPS: dict[str, _Map] = {
  "mu": _Map(exponent_bits=4, mantissa_bits=3, signed=True, sqrt=False, zero_floor=True),
  "nu": _Map(exponent_bits=4, mantissa_bits=4, signed=False, sqrt=True, zero_floor=False),
}


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a :class:`QuantizedMoment`."""
  return isinstance(x, QuantizedMoment)


def max_relative_error(kind: str) -> float:
  """Largest relative rounding error of an in-range value of the moment ``kind``.

  For ``nu`` it is the error of :math:`\\sqrt{\\nu}` (that of :math:`\\nu` is about twice).

  Examples:
    >>> max_relative_error("mu"), max_relative_error("nu")
    (0.0625, 0.03125)
  """
  return 2.0 ** -(MAPS[kind].mantissa_bits + 1)


def _top(m: _Map) -> float:
  # The largest magnitude a code holds, relative to the block maximum: the
  # block maximum maps onto it exactly.
  return 1.0 - 2.0 ** -(m.mantissa_bits + 1)


def block_size_for(shape: tuple[int, ...], block_size: int, min_block: int = 16) -> int | None:
  """The block length along the last axis for a leaf of ``shape``, or None to keep it in float.

  The largest divisor of the last dimension that is at most ``block_size``
  (so blocks tile each row exactly and never straddle rows or shards of
  other axes); None when that is shorter than ``min_block`` (a scale per
  handful of elements would cost more than it saves) or the leaf is a scalar.

  Examples:
    >>> block_size_for((128, 512), 256), block_size_for((384, 65), 256), block_size_for((7,), 256)
    (256, 65, None)
  """
  if not shape or shape[-1] == 0:
    return None
  n = shape[-1]
  best = max(d for d in range(1, min(n, block_size) + 1) if n % d == 0)
  return best if best >= min_block else None


def zeros(shape: tuple[int, ...], kind: str, block: int) -> QuantizedMoment:
  """The all-zero moment ``kind`` (``"mu"`` or ``"nu"``) of ``shape`` in blocks of ``block``."""
  m = MAPS[kind]
  codes = jnp.zeros(shape, jnp.int8 if m.signed else jnp.uint8)
  scale = jnp.zeros((*shape[:-1], shape[-1] // block), jnp.float32)
  return QuantizedMoment(codes, scale)


def _blocks(x: jax.Array, block: int) -> jax.Array:
  return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def quantize(x: jax.Array, kind: str, block: int) -> QuantizedMoment:
  """Quantizes float values ``x`` to the map of moment ``kind`` in blocks of ``block``.

  Args:
    x: the moment's values (any float dtype; ``nu`` must be >= 0).
    kind: ``"mu"`` (signed) or ``"nu"`` (unsigned, stored as its square root).
    block: the block length; must divide ``x.shape[-1]``.

  Returns:
    The :class:`QuantizedMoment`.

  Examples:
    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.array([[0.0, 1.0, -0.5, 2.0]]), "mu", 4)
    >>> q.codes.dtype, q.scale.tolist(), dequantize(q).tolist()
    (dtype('int8'), [[2.0]], [[0.0, 1.0, -0.5, 2.0]])
  """
  m = MAPS[kind]
  if x.shape[-1] % block:
    raise ValueError(f"block {block} does not divide the last axis of shape {x.shape}")
  v = x.astype(jnp.float32)
  if m.sqrt:
    v = jnp.sqrt(v)
  xb = _blocks(v, block)
  # sqrt(nu) >= 0: no abs (XLA:CPU materializes the reduction's input, one
  # float32 pass per elementwise op before it).
  mag = jnp.abs(xb) if m.signed else xb
  absmax = jnp.max(mag, axis=-1, keepdims=True)
  finite = jnp.isfinite(absmax)
  # The block maximum maps onto the top code. A zero block keeps scale 0;
  # a block with NaN/inf keeps its non-finite maximum as its scale (see the
  # module docstring), its codes are then irrelevant.
  safe = jnp.where(finite & (absmax > 0), absmax, 1.0)
  y = jnp.where(finite, mag * (_top(m) / safe), 0.0)
  bits = jax.lax.bitcast_convert_type(y, jnp.uint32).astype(jnp.int32)
  drop = 23 - m.mantissa_bits
  # Round to nearest on the bit pattern (a carry moves into the exponent as it
  # should), then re-base the float32 exponent so that 2^-1 is the top binade.
  rounded = (bits + (1 << (drop - 1))) >> drop
  code = rounded - ((127 - 2**m.exponent_bits) << m.mantissa_bits)
  top_code = 2 ** (m.exponent_bits + m.mantissa_bits) - 1
  floor = 0 if m.zero_floor else 1
  code = jnp.where(code < 1, jnp.where(y > 0, floor, 0), jnp.minimum(code, top_code))
  if m.signed:
    code = jnp.where(xb < 0, -code, code)
    codes = code.astype(jnp.int8)
  else:
    codes = code.astype(jnp.uint8)
  return QuantizedMoment(codes.reshape(x.shape), absmax[..., 0])


def dequantize(q: QuantizedMoment, dtype: Any = jnp.float32) -> jax.Array:
  """The float values a :class:`QuantizedMoment` holds (``nu``: squared back).

  Args:
    q: the quantized moment.
    dtype: the result's dtype.

  Returns:
    An array of the param's shape.
  """
  m = MAPS[q.kind]
  block = q.block
  codes = _blocks(q.codes, block).astype(jnp.int32)
  k = jnp.abs(codes) if m.signed else codes
  bits = (k + ((127 - 2**m.exponent_bits) << m.mantissa_bits)) << (23 - m.mantissa_bits)
  mag = jax.lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)
  mag = jnp.where(k == 0, 0.0, mag)
  scale = q.scale[..., None]
  finite = jnp.isfinite(scale)
  # A non-finite scale (a NaN or inf among the block's inputs) poisons the
  # block: its values are NaN, so the update is non-finite as the float one is.
  v = jnp.where(finite, mag * (scale / _top(m)), jnp.nan)
  if m.signed:
    v = jnp.where(codes < 0, -v, v)
  if m.sqrt:
    v = v * v
  return v.reshape(q.codes.shape).astype(dtype)


# ------------------------------------------------------------------ params


def _mix32(x: jax.Array) -> jax.Array:
  # A 32-bit integer finalizer (xor-shift-multiply, "lowbias32" constants):
  # consecutive inputs give uncorrelated, uniform outputs.
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def random_bits16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """16 random bits per element (``uint32`` values below 2^16), a function of ``key`` alone.

  One 32-bit word is drawn from ``key`` with ``jax.random``; each element's
  bits are an integer hash of its index mixed with that word. Rounding needs
  uniform, uncorrelated bits, not a cryptographic stream: this is written by
  hand because ``jax.random.bits`` (threefry) for every element took twice as
  long as the whole 8-bit AdamW update on CPU (9x optax's float32 update, on
  the 32M-param tree of benchmarks/memory_lean.py), the hash about as much as
  one more elementwise pass.

  Args:
    key: a PRNG key (e.g. folded in with the step and the leaf).
    shape: the shape of the result.

  Returns:
    ``uint32`` values in ``[0, 2^16)``.
  """
  word = jax.random.bits(key, (), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  mixed = _mix32(index * np.uint32(0x9E3779B9) + _mix32(word))
  return mixed >> 16


def round_to_bfloat16(x: jax.Array, mode: str, bits: jax.Array | None = None) -> jax.Array:
  """Rounds float32 ``x`` to bfloat16: ``"nearest"`` (even) or ``"stochastic"``.

  Stochastic rounding adds 16 random bits below bfloat16's last mantissa bit
  of the float32 pattern and truncates: a value a fraction ``f`` of the way
  from one bfloat16 to the next (in magnitude) rounds up with probability
  ``f``, so the rounding is unbiased. Non-finite values are kept as they are.

  Args:
    x: float32 values.
    mode: ``"nearest"`` or ``"stochastic"``.
    bits: for ``"stochastic"``, :func:`random_bits16` of ``x``'s shape.

  Returns:
    bfloat16 values.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.full((20000,), 1.0 + 2.0**-10, jnp.float32)  # 1/8 of the way to the next bf16
    >>> r = round_to_bfloat16(x, "stochastic", random_bits16(jax.random.key(0), x.shape))
    >>> round(float(jnp.mean(r.astype(jnp.float32) - 1.0) / 2.0**-7), 1)  # about 1/8
    0.1
    >>> float(round_to_bfloat16(x, "nearest")[0])
    1.0
  """
  x = x.astype(jnp.float32)
  if mode == "nearest":
    return x.astype(jnp.bfloat16)
  if mode != "stochastic":
    raise ValueError(f"round_to_bfloat16 mode must be 'nearest' or 'stochastic', got {mode!r}")
  if bits is None:
    raise ValueError("stochastic rounding needs bits=random_bits16(key, x.shape)")
  raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
  # Adding below the cut can carry into the exponent (up to the next binade,
  # or to inf past the largest bfloat16), which is where the value rounds.
  up = (raw + bits.astype(jnp.uint32)) & np.uint32(0xFFFF0000)
  out = jax.lax.bitcast_convert_type(up, jnp.float32)
  # Exact: `out` has bfloat16's 16 high bits only.
  return jnp.where(jnp.isfinite(x), out, x).astype(jnp.bfloat16)


# ------------------------------------------------------------------ report


def _nbytes(x: Any) -> int:
  return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize


def moments_summary(opt_state: Any) -> dict[str, dict[str, int]]:
  """Params and bytes of the Adam moments in an optimizer state, by format.

  Args:
    opt_state: an optimizer state (arrays or ``ShapeDtypeStruct`` leaves)
      holding ``optax.ScaleByAdamState`` nodes.

  Returns:
    ``{"mu": {...}, "nu": {...}}``, each with ``params`` (elements), ``bytes``,
    ``int8_params`` (elements in quantized leaves) and ``float_params``.
  """
  out = {k: {"params": 0, "bytes": 0, "int8_params": 0, "float_params": 0} for k in ("mu", "nu")}
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  for node in jax.tree.leaves(opt_state, is_leaf=is_adam):
    if not is_adam(node):
      continue
    for kind in ("mu", "nu"):
      entry = out[kind]
      for leaf in jax.tree.leaves(getattr(node, kind), is_leaf=is_quantized):
        if is_quantized(leaf):
          n = math.prod(leaf.shape)
          entry["int8_params"] += n
          entry["bytes"] += _nbytes(leaf.codes) + _nbytes(leaf.scale)
        else:
          n = math.prod(np.shape(leaf))
          entry["float_params"] += n
          entry["bytes"] += _nbytes(leaf)
        entry["params"] += n
  return out
