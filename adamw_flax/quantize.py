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
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import tpu as pltpu

__all__ = [
  "MAPS",
  "AdamScalars",
  "adam_scalars",
  "adam_update",
  "kernel_supports",
  "leaf_bits",
  "moment_word",
  "QuantizedMoment",
  "block_size_for",
  "dequantize",
  "in_form_of",
  "is_quantized",
  "max_relative_error",
  "moment_of",
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


def moment_of(x: Any) -> Any:
  """``x`` as a :class:`QuantizedMoment` where it is one in a mapping's form, else ``x`` itself.

  A mapping of exactly ``codes`` and ``scale`` is how a moment comes back
  from Orbax restoring without a target (a dict), and from ``nnx.Optimizer``
  after its first update: it keeps the state in Variables and refills them
  from ``nnx.state`` of the new state, which turns the NamedTuple into an
  ``nnx.State``.

  Examples:
    >>> q = zeros((2, 256), "mu", 256)
    >>> moment_of({"codes": q.codes, "scale": q.scale}) == q
    True
  """
  if isinstance(x, Mapping) and set(x) == {"codes", "scale"}:
    return QuantizedMoment(x["codes"], x["scale"])
  return x


def in_form_of(new: Any, old: Any) -> Any:
  """A new moment ``new`` in the container of the old one ``old`` (the inverse of :func:`moment_of`).

  So that a state tree keeps its structure across an update
  (``optax.apply_if_finite`` and ``MultiSteps`` select between old and new
  states leaf by leaf).
  """
  if is_quantized(new) and not is_quantized(old) and is_quantized(moment_of(old)):
    return type(old)({"codes": new.codes, "scale": new.scale})
  return new


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


def quantize(x: jax.Array, kind: str, block: int, bits: jax.Array | None = None) -> QuantizedMoment:
  """Quantizes float values ``x`` to the map of moment ``kind`` in blocks of ``block``.

  Args:
    x: the moment's values (any float dtype; ``nu`` must be >= 0).
    kind: ``"mu"`` (signed) or ``"nu"`` (unsigned, stored as its square root).
    block: the block length; must divide ``x.shape[-1]``.
    bits: None to round to nearest; else 16 random bits per element
      (:func:`random_bits16` of ``x.shape``) for stochastic rounding (see
      :func:`adam_update`).

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
  absmax = jnp.where(_has_nan(xb, keepdims=True), jnp.nan, absmax)
  rbits = None if bits is None else _blocks(bits, block)
  codes = _encode(xb, absmax, m, rbits)
  return QuantizedMoment(codes.reshape(x.shape), absmax[..., 0])


def _encode(v: jax.Array, absmax: jax.Array, m: _Map, rbits: jax.Array | None) -> jax.Array:
  """The codes of ``v`` (signed ``mu`` or ``sqrt(nu)``) in blocks whose largest magnitude is ``absmax``.

  ``absmax`` broadcasts against ``v`` (a block per row of the last axis, or
  one per row of a kernel's slice); ``rbits``: None (to nearest) or 16 random
  bits per element (stochastic).
  """
  mag = jnp.abs(v) if m.signed else v
  finite = jnp.isfinite(absmax)
  # The block maximum maps onto the top code. A zero block keeps scale 0;
  # a block with NaN/inf keeps its non-finite maximum as its scale (see the
  # module docstring), its codes are then irrelevant.
  safe = jnp.where(finite & (absmax > 0), absmax, 1.0)
  y = jnp.where(finite, mag * (_top(m) / safe), 0.0)
  bits = jax.lax.bitcast_convert_type(y, jnp.uint32).astype(jnp.int32)
  drop = 23 - m.mantissa_bits
  if rbits is None:
    # Round to nearest on the bit pattern (a carry moves into the exponent as
    # it should), then re-base the float32 exponent so that 2^-1 is the top binade.
    rounded = (bits + (1 << (drop - 1))) >> drop
  else:
    # Stochastic: 16 random bits spread over the dropped ones, then truncate:
    # up with probability equal to the remainder's share of the gap.
    rounded = (bits + (rbits.astype(jnp.int32) << (drop - 16))) >> drop
  code = rounded - ((127 - 2**m.exponent_bits) << m.mantissa_bits)
  top_code = 2 ** (m.exponent_bits + m.mantissa_bits) - 1
  if rbits is not None and m.zero_floor:
    # Below the smallest code (and up to it, where truncation would give the
    # reserved code 0): code 1 with probability y / (its value), else 0, so
    # that tiny values of mu are unbiased instead of flushed to 0.
    smallest = _code_value(m, 1)
    up = rbits.astype(jnp.float32) < y * (65536.0 / smallest)
    code = jnp.where(y < smallest, jnp.where(up, 1, 0), jnp.minimum(code, top_code))
  elif m.zero_floor:  # below the smallest code: 0 (a clip: the same codes, two ops fewer)
    code = jnp.clip(code, 0, top_code)
  else:  # a positive value below the smallest code: that code; 0 stays 0
    code = jnp.where(code < 1, jnp.where(y > 0, 1, 0), jnp.minimum(code, top_code))
  if m.signed:
    return jnp.where(v < 0, -code, code).astype(jnp.int8)
  return code.astype(jnp.uint8)


def _code_value(m: _Map, code: int) -> float:
  """The magnitude code ``code`` stands for, relative to the top binade (the block maximum is ``_top``)."""
  bits = (code + ((127 - 2**m.exponent_bits) << m.mantissa_bits)) << (23 - m.mantissa_bits)
  return float(np.array(bits, np.uint32).view(np.float32))


def _decode(codes: jax.Array, factor: jax.Array, m: _Map) -> jax.Array:
  """The float32 values of ``codes`` times ``factor`` (the block's ``scale / _top``, NaN if non-finite).

  ``nu`` is squared back. ``factor`` broadcasts against ``codes``.
  """
  c = codes.astype(jnp.int32)
  k = jnp.abs(c) if m.signed else c
  bits = (k + ((127 - 2**m.exponent_bits) << m.mantissa_bits)) << (23 - m.mantissa_bits)
  mag = jax.lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)
  mag = jnp.where(k == 0, 0.0, mag)
  v = mag * factor
  if m.signed:
    v = jnp.where(c < 0, -v, v)
  if m.sqrt:
    v = v * v
  return v


def _factor(scale: jax.Array, m: _Map) -> jax.Array:
  # A non-finite scale (a NaN or inf among the block's inputs) poisons the
  # block: its values are NaN, so the update is non-finite as the float one is.
  return jnp.where(jnp.isfinite(scale), scale / _top(m), jnp.nan)


def dequantize(q: QuantizedMoment, dtype: Any = jnp.float32) -> jax.Array:
  """The float values a :class:`QuantizedMoment` holds (``nu``: squared back).

  Args:
    q: the quantized moment.
    dtype: the result's dtype.

  Returns:
    An array of the param's shape.
  """
  v = _values_blocked(_blocks(q.codes, q.block), q.scale, q.kind)
  return v.reshape(q.codes.shape).astype(dtype)


# ------------------------------------------------------------------ the 8-bit Adam step
#
# One leaf's step with both moments 8-bit, block by block. Dequantizing,
# updating and requantizing a whole moment as separate array expressions
# makes XLA hold float32 copies of the moments: XLA:TPU relays each
# (rows, blocks, block) view of a tiled (rows, cols) array out (168.7 bytes
# accessed per param, 2887 MiB of temporaries for 268M params on a v5p chip,
# benchmarks/RESULTS.md), and XLA:CPU recomputes the dequantization in every
# consumer. So:
#
# * on TPU a Pallas kernel requantizes tile by tile (a block maximum needs the
#   whole block before the first code is written: no XLA fusion can do that
#   in one pass), in place in the donated codes, and the update itself stays
#   an XLA fusion that ``optax.apply_updates`` fuses into: a kernel's output
#   is materialized, and under optax's API the update is an array;
# * on CPU the same split: a loop over chunks of rows requantizes in place,
#   its float32 temporaries a chunk's, in cache, and the update is an
#   elementwise expression that ``optax.apply_updates`` fuses into (no
#   leaf-sized update buffer, see _loop_update);
# * on GPU the leaf runs in one piece (a loop of small fusions would be
#   launch-bound).
#
# Both run per shard (jax.experimental.custom_partitioning): blocks never
# straddle shards, so a shard's blocks are whole, and the random bits of
# stochastic rounding hash each element's global index.


class AdamScalars(NamedTuple):
  """The float32 scalars of one Adam step, as the update's arithmetic uses them.

  Attributes:
    one_minus_b1: ``1 - b1``.
    b1: the first moment's decay.
    one_minus_b2: ``1 - b2``.
    b2: the second moment's decay.
    bc1: ``1 - b1**t``.
    bc2: ``1 - b2**t``.
    bc1_next: ``1 - b1**(t+1)`` (Nesterov; else unused).
    eps: added outside the square root.
    eps_root: added inside it.
  """

  one_minus_b1: jax.Array
  b1: jax.Array
  one_minus_b2: jax.Array
  b2: jax.Array
  bc1: jax.Array
  bc2: jax.Array
  bc1_next: jax.Array
  eps: jax.Array
  eps_root: jax.Array


def adam_scalars(
  b1: Any, b2: Any, eps: Any, eps_root: Any, bc1: Any, bc2: Any, bc1_next: Any = None
) -> AdamScalars:
  """:class:`AdamScalars` from Python floats or float32 arrays.

  Each becomes the float32 value XLA would use for it in ``(1 - b1) * g``
  and the like (Python floats round once to float32, arrays stay as they are).

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added outside the square root.
    eps_root: added inside it.
    bc1: ``1 - b1**t`` for the step's count ``t``.
    bc2: ``1 - b2**t``.
    bc1_next: ``1 - b1**(t+1)``, for Nesterov momentum; None: unused.

  Returns:
    The scalars, float32 arrays.
  """
  f = lambda x: jnp.asarray(x, jnp.float32)
  return AdamScalars(
    f(1 - b1), f(b1), f(1 - b2), f(b2), f(bc1), f(bc2), f(1.0 if bc1_next is None else bc1_next),
    f(eps), f(eps_root),
  )  # fmt: skip


def _moments(g: jax.Array, mu_c: jax.Array, nu_c: jax.Array, s: AdamScalars):
  # scale_by_adam's expressions and operand order (optax's update_moment and
  # update_moment_per_elem_norm), on float32 values.
  return s.one_minus_b1 * g + s.b1 * mu_c, s.one_minus_b2 * g**2 + s.b2 * nu_c


def _direction(g: jax.Array, mu: jax.Array, nu: jax.Array, s: AdamScalars, nesterov: bool):
  # scale_by_adam's update from the unrounded new moments.
  if nesterov:
    mu_hat = s.b1 * (mu / s.bc1_next) + s.one_minus_b1 * (g / s.bc1)
  else:
    mu_hat = mu / s.bc1
  return mu_hat / (jnp.sqrt(nu / s.bc2 + s.eps_root) + s.eps)


def _absmax(v: jax.Array, m: _Map, keepdims: bool = True) -> jax.Array:
  """The block maximum over the last axis (kept unless ``keepdims`` is False) of ``mu`` (``v`` signed) or of ``sqrt(nu)`` (``v = nu``).

  Equal to ``max(|v|)`` and ``max(sqrt(v))`` (sqrt is monotonic), but each a
  reduction of the stored values: XLA:CPU fuses ``abs`` and everything that
  computed ``v`` into a reduction's input, and reduces such a computed input
  several times slower (measured: the whole CPU step 2.2x float32's with
  these, 5x with ``max(|v|)``). The outer ``abs`` turns a block of ``-0.0``
  into ``+0.0`` as ``max(|v|)`` has it.
  """
  if m.signed:
    top = jnp.maximum(
      jnp.max(v, axis=-1, keepdims=keepdims), -jnp.min(v, axis=-1, keepdims=keepdims)
    )
    return jnp.abs(top)
  return jnp.sqrt(jnp.max(v, axis=-1, keepdims=keepdims))


def _element_bits(index: jax.Array, word: jax.Array) -> jax.Array:
  """32 random bits per element: its global flat ``index`` (uint32) hashed with the step's ``word``.

  ``word`` is ``_mix32`` of 32 bits drawn from the step's key, as in
  :func:`random_bits16`: the same hash, so the bits are as uniform.
  """
  return _mix32(index * np.uint32(0x9E3779B9) + word)


def _split_bits(h: jax.Array) -> tuple[jax.Array, jax.Array]:
  # mu rounds with the high 16 bits, nu with the low 16.
  return h >> 16, h & np.uint32(0xFFFF)


def _each(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Per-block values ``x`` (``(..., blocks)``) over the elements of blocks ``shape`` (``(..., blocks, block)``).

  A broadcast_in_dim, not a ``(..., blocks, 1)`` view: XLA:CPU gives such a
  view another layout and copies it inside every fusion that reads it.
  """
  return jax.lax.broadcast_in_dim(x, shape, tuple(range(x.ndim)))


def _values_blocked(codes: jax.Array, scale: jax.Array, kind: str) -> jax.Array:
  """The float32 values of ``codes`` in blocks ``(..., blocks, block)``, ``scale`` ``(..., blocks)``.

  The dequantization of the CPU and GPU paths (:func:`_values_tiled` is the TPU paths').
  """
  return _decode(codes, _each(_factor(scale, MAPS[kind]), codes.shape), MAPS[kind])


def _has_nan(v: jax.Array, keepdims: bool = False) -> jax.Array:
  """Whether each block (last axis) of ``v`` holds a NaN, which poisons the block's scale.

  A sum: XLA:CPU's vectorized block maximum may skip a NaN, a sum never does
  (finite values sum to NaN only past float32's range in both signs). The TPU
  kernel tests for NaN in its own way.
  """
  return jnp.isnan(jnp.sum(v, axis=-1, keepdims=keepdims))


def _requant(g, cm, sm, cn, sn, s, h):
  """The new moments of a chunk, requantized: ``(mu codes, mu scale, nu codes, nu scale)``.

  Arrays in blocks ``(..., blocks, block)``, scales ``(..., blocks)``; ``h``
  None or the chunk's :func:`_element_bits`. Also returns the unrounded new
  moments, for an update in the same pass.
  """
  mu_map, nu_map = MAPS["mu"], MAPS["nu"]
  mu_c, nu_c = _values_blocked(cm, sm, "mu"), _values_blocked(cn, sn, "nu")
  mu_new, nu_new = _moments(g, mu_c, nu_c, s)
  am = _absmax(mu_new, mu_map, keepdims=False)
  an = _absmax(nu_new, nu_map, keepdims=False)
  # A NaN (in the gradient, or a poisoned old block) is in mu_new: both scales.
  nan = _has_nan(mu_new)
  am, an = jnp.where(nan, jnp.nan, am), jnp.where(nan, jnp.nan, an)
  bm, bn = (None, None) if h is None else _split_bits(h)
  codes_mu = _encode(mu_new, _each(am, g.shape), mu_map, bm)
  codes_nu = _encode(jnp.sqrt(nu_new), _each(an, g.shape), nu_map, bn)
  return (codes_mu, am, codes_nu, an), (mu_new, nu_new)


def _chunk_step(g, cm, sm, cn, sn, s, nesterov, h, from_stored=False):
  """A leaf's step in one piece; arrays in blocks ``(..., blocks, block)``, scales ``(..., blocks)``.

  Returns ``(u, mu codes, mu scale, nu codes, nu scale)``; ``h`` is None or
  the :func:`_element_bits`; ``from_stored``: the update from the new codes
  (:func:`adam_update`).
  """
  new, (mu_new, nu_new) = _requant(g, cm, sm, cn, sn, s, h)
  if from_stored:
    codes_mu, am, codes_nu, an = new
    mu_new, nu_new = _values_blocked(codes_mu, am, "mu"), _values_blocked(codes_nu, an, "nu")
  return (_direction(g, mu_new, nu_new, s, nesterov), *new)


def _update_of(g, cm, sm, cn, sn, s, nesterov, stored):
  """The update of a leaf's 2-D view from its codes: the old ones (``stored`` False) or the new ones.

  An elementwise expression that ``optax.apply_updates`` fuses into, so the
  update is never written out. XLA:CPU iterates that fusion over the param's
  (rows, cols) shape: a block that is not a power of two reaches its scale
  through a chain of selects on the column (:func:`_expand`), since a
  ``(rows, blocks, block)`` view costs a division and a gather per element
  there (measured: the step of a 448-column leaf 40% slower).
  """
  rows, cols = g.shape
  nb = sm.shape[-1]
  block = cols // nb
  if block & (block - 1) and nb <= 16:
    mu, nu = _values_tiled(cm, sm, "mu"), _values_tiled(cn, sn, "nu")
  else:
    three = lambda x: x.reshape(rows, nb, block)
    g, mu, nu = three(g), _values_blocked(three(cm), sm, "mu"), _values_blocked(three(cn), sn, "nu")
  if not stored:
    mu, nu = _moments(g, mu, nu, s)
  return _direction(g, mu, nu, s, nesterov).reshape(rows, cols)


# Elements per chunk of the loop: 2^18 float32 (1 MiB, the L2 of the CPU
# benchmarks/RESULTS.md measures on) was fastest of 2^15..2^20 there.
_CHUNK_ELEMENTS = 1 << 18
# A leaf of at least this many rows that fits one chunk still runs as two:
# the loop's in-place writes go to a (rows, blocks, block) buffer, which
# XLA:CPU writes vector by vector, while a leaf in one piece writes its codes
# through the (rows, cols) view, element by element where a block is not a
# power of two (measured: the step of a 448x448 leaf 1.6x faster in two).
_MIN_SPLIT_ROWS = 16


def _loop_update(g, cm, sm, cn, sn, s, word, row_ids, col0, c_total, nesterov, chunk,
                 from_stored=False):  # fmt: skip
  """The step of a (local) leaf: a loop over chunks of rows requantizes, the update stays elementwise.

  Args:
    g, cm, sm, cn, sn: gradient, codes and scales, shaped like the leaf (local shard).
    s: the :class:`AdamScalars`.
    word: None (round to nearest) or the step's mixed random word (uint32).
    row_ids: the global index of each local row of the 2-D view (int32).
    col0: the global column of the first local column (int32).
    c_total: the leaf's last dimension (global).
    nesterov: Nesterov momentum.
    chunk: elements per chunk; None: the leaf in one piece (GPUs, where a
      loop of small fusions would be launch-bound).
    from_stored: the update from the new codes (:func:`adam_update`).

  Returns:
    ``(u, mu codes, mu scale, nu codes, nu scale)`` shaped like the inputs.

  The loop requantizes in place, chunk by chunk, its float32 temporaries a
  chunk's. The update is computed apart, from the gradient and the codes
  (:func:`_update_of`), so ``optax.apply_updates`` fuses it into the param
  update and no float32 buffer of the whole leaf exists: XLA:CPU allocates
  its temporaries afresh each call, and a leaf-sized update buffer per leaf
  cost a page fault per 4 KiB (41.6k per step on the 32M-param tree of
  benchmarks/memory_lean.py).
  """
  shape, scale_shape = g.shape, sm.shape
  cols = shape[-1]
  nb = scale_shape[-1]
  block = cols // nb
  rows = math.prod(shape[:-1])
  blocks = (rows, nb, block)

  def bits(r0, n):
    if word is None:
      return None
    # The element's global index row * c_total + col, in blocks.
    at = (n, nb, block)
    base = jax.lax.dynamic_slice_in_dim(row_ids, r0, n).astype(jnp.uint32) * np.uint32(c_total)
    base = _each(base + col0.astype(jnp.uint32), at)
    col = jax.lax.broadcasted_iota(jnp.uint32, at, 1) * np.uint32(block)
    return _element_bits(base + col + jax.lax.broadcasted_iota(jnp.uint32, at, 2), word)

  g3, cm3, cn3 = g.reshape(blocks), cm.reshape(blocks), cn.reshape(blocks)
  sm2, sn2 = sm.reshape(rows, nb), sn.reshape(rows, nb)
  t = rows if chunk is None else max(1, min(rows, chunk // cols))
  if rows <= t and (chunk is None or rows < _MIN_SPLIT_ROWS):
    u, *new = _chunk_step(g3, cm3, sm2, cn3, sn2, s, nesterov, bits(0, rows), from_stored)
  else:
    t = min(t, -(-rows // 2))

    def rows_of(r0, n, carry):
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, r0, n, 0)
      chunk_new, _ = _requant(sl(g3), *(sl(a) for a in carry), s, bits(r0, n))
      up = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x, r0, 0)
      return tuple(up(b, x) for b, x in zip(carry, chunk_new, strict=True))

    two = lambda x: x.reshape(rows, -1)
    if not from_stored:
      u = _update_of(two(g), two(cm), sm2, two(cn), sn2, s, nesterov, stored=False)
    # The codes and scales are written in place through their (rows, blocks,
    # block) view; XLA:CPU copies the old codes for the update, which reads them.
    new = (cm3, sm2, cn3, sn2)
    full = rows // t
    new = jax.lax.fori_loop(0, full, lambda i, c: rows_of(i * t, t, c), new)
    if rows % t:
      new = rows_of(full * t, rows % t, new)
    if from_stored:
      cm_new, sm_new, cn_new, sn_new = new
      u = _update_of(two(g), two(cm_new), sm_new, two(cn_new), sn_new, s, nesterov, stored=True)
  cm3, sm2, cn3, sn2 = new
  return (
    u.reshape(shape), cm3.reshape(shape), sm2.reshape(scale_shape), cn3.reshape(shape),
    sn2.reshape(scale_shape),
  )  # fmt: skip


# Rows of a kernel tile: a multiple of 32 (int8 arrays tile by 32 rows on
# TPU) holding at most this many elements (double-buffered, the tile's inputs
# and outputs take 16 bytes per element of VMEM).
_TILE_ELEMENTS = 1 << 18
# Blocks per row the kernel unrolls (its code grows with them); longer rows
# take the loop.
_KERNEL_MAX_BLOCKS = 64


def kernel_supports(shape: tuple[int, ...], block: int) -> bool:
  """Whether the TPU kernel requantizes a leaf of ``shape`` in blocks of ``block``.

  Its blocks must be whole 128-lane vectors (``block % 128 == 0``), at most
  64 to a row, and a 32-row tile of a row must fit its tile; other leaves take
  the loop (:func:`adam_update`).

  Args:
    shape: the leaf's (local) shape.
    block: the block length.

  Returns:
    True where :func:`adam_update` uses the kernel on TPU.
  """
  cols = shape[-1]
  return block % 128 == 0 and cols // block <= _KERNEL_MAX_BLOCKS and 32 * cols <= _TILE_ELEMENTS


def _requant_kernel(rows, cols, block, tr, stochastic, c_total):
  nb = cols // block
  mu_map, nu_map = MAPS["mu"], MAPS["nu"]

  def kernel(fsc, isc, g_ref, cm_ref, sm_ref, cn_ref, sn_ref, cmo_ref, smo_ref, cno_ref, sno_ref):
    s = AdamScalars(fsc[0], fsc[1], fsc[2], fsc[3], *([fsc[0]] * 5))
    word = isc[0].astype(jnp.uint32)
    row0 = isc[1] + pl.program_id(0) * tr
    for b in range(nb):  # the row's blocks, each a (tr, block) slice of whole vectors
      sl = slice(b * block, (b + 1) * block)
      g = g_ref[:, sl].astype(jnp.float32)
      mu_c = _decode(cm_ref[:, sl], _factor(sm_ref[:, b : b + 1], mu_map), mu_map)
      nu_c = _decode(cn_ref[:, sl], _factor(sn_ref[:, b : b + 1], nu_map), nu_map)
      mu_new, nu_new = _moments(g, mu_c, nu_c, s)
      am = _absmax(mu_new, mu_map)
      an = _absmax(nu_new, nu_map)
      # A NaN makes the block's scale NaN as in XLA, whatever the vector
      # unit's max does with NaN.
      nan = jnp.max(jnp.where(mu_new == mu_new, 0.0, 1.0), axis=-1, keepdims=True) > 0
      am = jnp.where(nan, jnp.nan, am)
      bm = bn = None
      if stochastic:
        r = jax.lax.broadcasted_iota(jnp.int32, (tr, block), 0) + row0
        c = jax.lax.broadcasted_iota(jnp.int32, (tr, block), 1) + (isc[2] + b * block)
        index = r.astype(jnp.uint32) * np.uint32(c_total) + c.astype(jnp.uint32)
        bm, bn = _split_bits(_element_bits(index, word))
      cmo_ref[:, sl] = _encode(mu_new, am, mu_map, bm)
      cno_ref[:, sl] = _encode(jnp.sqrt(nu_new), an, nu_map, bn)
      smo_ref[:, b : b + 1] = am
      sno_ref[:, b : b + 1] = an

  return kernel


def _kernel_requant(g, cm, sm, cn, sn, s, word, row0, col0, c_total, interpret):
  """Requantizes a (local) leaf's moments with the Pallas kernel, in place.

  Row ``i`` of its 2-D view is global row ``row0 + i`` (for the random bits).

  Returns:
    ``(mu codes, mu scale, nu codes, nu scale)``.
  """
  shape, scale_shape = g.shape, sm.shape
  cols, nb = shape[-1], scale_shape[-1]
  rows = math.prod(shape[:-1])
  block = cols // nb
  tr = rows if rows <= 32 else min(rows // 32 * 32, max(32, _TILE_ELEMENTS // cols // 32 * 32))
  stochastic = word is not None
  fsc = jnp.stack([s.one_minus_b1, s.b1, s.one_minus_b2, s.b2])
  zero = jnp.zeros((), jnp.int32)
  bits = zero if word is None else jax.lax.bitcast_convert_type(word, jnp.int32)
  isc = jnp.stack([bits, jnp.asarray(row0, jnp.int32), jnp.asarray(col0, jnp.int32)])
  smem = pl.BlockSpec(memory_space=pltpu.SMEM)
  tile = lambda w: pl.BlockSpec((tr, w), lambda i: (i, 0))
  args = (g.reshape(rows, cols), cm.reshape(rows, cols), sm.reshape(rows, nb))
  args += (cn.reshape(rows, cols), sn.reshape(rows, nb))
  n = rows * cols
  out = pl.pallas_call(
    _requant_kernel(rows, cols, block, tr, stochastic, c_total),
    grid=(pl.cdiv(rows, tr),),
    in_specs=[smem, smem, tile(cols), tile(cols), tile(nb), tile(cols), tile(nb)],
    out_specs=[tile(cols), tile(nb), tile(cols), tile(nb)],
    out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args[1:]],
    # In place: the donated codes and scales are overwritten.
    input_output_aliases={3: 0, 4: 1, 5: 2, 6: 3},
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
    cost_estimate=pl.CostEstimate(
      flops=80 * n,
      transcendentals=2 * n,
      bytes_accessed=n * (g.dtype.itemsize + 4) + 16 * rows * nb,
    ),
    interpret=interpret,
  )(fsc, isc, *args)
  return (
    out[0].reshape(shape),
    out[1].reshape(scale_shape),
    out[2].reshape(shape),
    out[3].reshape(scale_shape),
  )


def _expand(x: jax.Array, cols: int) -> jax.Array:
  """``x`` (``(..., blocks)``) repeated over each block's elements, as ``(..., cols)``.

  A chain of selects on the column index instead of a reshape: XLA:TPU fuses
  it into the update (a ``(..., blocks, block)`` view of a tiled array is a
  relayout: a copy of the whole leaf, measured).
  """
  nb = x.shape[-1]
  block = cols // nb
  shape = (*x.shape[:-1], cols)
  which = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) // block
  out = jnp.broadcast_to(x[..., :1], shape)
  for b in range(1, nb):
    out = jnp.where(which == b, x[..., b : b + 1], out)
  return out


def _values_tiled(codes: jax.Array, scale: jax.Array, kind: str) -> jax.Array:
  """The float32 values of a (local) leaf's ``codes``, its ``scale`` reaching them through :func:`_expand`.

  The TPU paths' dequantization (no ``(rows, blocks, block)`` view of a tiled array).
  """
  return _decode(codes, _expand(_factor(scale, MAPS[kind]), codes.shape[-1]), MAPS[kind])


def _xla_update(g, cm, sm, cn, sn, s, word, nesterov, from_stored=False):
  """The step as XLA fusions only (no kernel, no custom call): for sharded leaves on TPU.

  XLA's SPMD partitioner splits it like any array expression (a Pallas
  kernel needs ``custom_partitioning``, which XLA:TPU does not compile for
  the compile-only devices ``python -m train.compile`` uses, jax 0.10.2 /
  libtpu 0.0.42.1). Block maxima are reductions of each block's columns and
  per-block values reach the elements through :func:`_expand`, both without
  a ``(rows, blocks, block)`` view.
  """
  shape, cols, nb = g.shape, g.shape[-1], sm.shape[-1]
  block = cols // nb
  mu_map, nu_map = MAPS["mu"], MAPS["nu"]
  mu_new, nu_new = _moments(g, _values_tiled(cm, sm, "mu"), _values_tiled(cn, sn, "nu"), s)
  cut = lambda x, b: x[..., b * block : (b + 1) * block]
  am = jnp.concatenate([_absmax(cut(mu_new, b), mu_map) for b in range(nb)], axis=-1)
  an = jnp.concatenate([_absmax(cut(nu_new, b), nu_map) for b in range(nb)], axis=-1)
  bm, bn = (None, None) if word is None else leaf_bits(word, shape)
  codes_mu = _encode(mu_new, _expand(am, cols), mu_map, bm)
  codes_nu = _encode(jnp.sqrt(nu_new), _expand(an, cols), nu_map, bn)
  if from_stored:
    mu_new, nu_new = _values_tiled(codes_mu, am, "mu"), _values_tiled(codes_nu, an, "nu")
  u = _direction(g, mu_new, nu_new, s, nesterov)
  return u, codes_mu, am, codes_nu, an


# ------------------------------------------------------------------ per shard


def _leaf_spec(mesh: Any, sharding: Any, shape: tuple[int, ...], scale_shape: tuple[int, ...]):
  """The spec the step runs a leaf under: the codes' own, less what would split a block.

  Dimensions whose devices do not divide both the leaf's and its scales'
  length are gathered (sharding.opt_state_shardings never makes such codes).
  """
  spec = getattr(sharding, "spec", None)  # None: not a NamedSharding, gathered
  entries = list(spec) if spec is not None else []
  entries += [None] * (len(shape) - len(entries))
  out = []
  for d, entry in enumerate(entries[: len(shape)]):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    n = math.prod(mesh.shape[a] for a in axes)
    out.append(entry if shape[d] % n == 0 and scale_shape[d] % n == 0 else None)
  return jax.sharding.PartitionSpec(*out)


def _shard_offsets(spec: Any, mesh: Any, local: tuple[int, ...]) -> list[Any]:
  """Per dimension, the global index of this shard's first element (traced)."""
  out = []
  for entry, n in zip(spec, local, strict=True):
    if entry is None:
      out.append(jnp.zeros((), jnp.int32))
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    index = jnp.zeros((), jnp.int32)
    for a in axes:  # row-major over the dimension's axes, as the spec splits it
      index = index * mesh.shape[a] + jax.lax.axis_index(a)
    out.append(index * n)
  return out


def _row_ids(local: tuple[int, ...], full: tuple[int, ...], offsets: list[Any]) -> jax.Array:
  """The global row (of the leaf's 2-D view) of each local row."""
  lead = local[:-1]
  if not lead:
    return jnp.zeros((1,), jnp.int32)
  rid = jnp.zeros(lead, jnp.int32)
  for d in range(len(lead)):
    rid = rid * full[d] + (jax.lax.broadcasted_iota(jnp.int32, lead, d) + offsets[d])
  return rid.reshape(-1)


def _per_shard(local_fn: Any, operands: tuple[Any, ...]):
  """Runs ``local_fn`` on each shard of a leaf (``custom_partitioning``; inline on one device).

  Args:
    local_fn: ``(g, cm, sm, cn, sn, scalars, word, row_ids, col0, affine) ->
      (u, cm, sm, cn, sn)`` on a shard: ``row_ids`` the global row (of the
      leaf's 2-D view) of each local row, ``col0`` the global index of the
      first local column, ``affine`` whether row ``i`` is ``row_ids[0] + i``.
    operands: ``(g, cm, sm, cn, sn, scalars, word)`` (``word`` may be None).

  Returns:
    ``local_fn``'s outputs for the whole leaf.
  """
  g, cm, sm, cn, sn, scalars, word = operands
  shape, scale_shape = tuple(g.shape), tuple(sm.shape)
  has_word = word is not None
  kinds = ["leaf", "leaf", "scale", "leaf", "scale"]

  def run(g, cm, sm, cn, sn, scalars, *word):
    rows = _row_ids(shape, shape, [0] * len(shape))
    return local_fn(g, cm, sm, cn, sn, scalars, word[0] if word else None, rows, jnp.int32(0), True)

  fn = custom_partitioning(run)

  def partition(mesh, arg_shapes, result_shape):
    spec = _leaf_spec(mesh, arg_shapes[1].sharding, shape, scale_shape)
    leaf = jax.sharding.NamedSharding(mesh, spec)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    local = tuple(
      n // math.prod(mesh.shape[a] for a in _axes(e)) for n, e in zip(shape, spec, strict=True)
    )
    arg_shardings = (leaf,) * 5 + jax.tree.map(lambda _: rep, tuple(arg_shapes[5:]))
    out_shardings = tuple(leaf for _ in kinds)
    # Rows of a shard are consecutive global rows unless a leading dimension
    # after the first is split.
    affine = all(e is None for e in list(spec)[1:-1])

    def lower_fn(g, cm, sm, cn, sn, scalars, *word):
      offsets = _shard_offsets(spec, mesh, local)
      rows = _row_ids(local, shape, offsets)
      w = word[0] if word else None
      return local_fn(g, cm, sm, cn, sn, scalars, w, rows, offsets[-1], affine)

    return mesh, lower_fn, out_shardings, arg_shardings

  def infer(mesh, arg_shapes, result_shape):
    spec = _leaf_spec(mesh, arg_shapes[1].sharding, shape, scale_shape)
    return tuple(jax.sharding.NamedSharding(mesh, spec) for _ in kinds)

  # For Shardy: the last axis is blocks x block (one block: no compound factor,
  # which Shardy refuses with a factor of size 1); partition() settles the rest.
  block = shape[-1] // scale_shape[-1]
  leaf_rule, scale_rule = ("... (k b)", "... k") if scale_shape[-1] > 1 else ("... c", "... k")
  ins = [leaf_rule, leaf_rule, scale_rule, leaf_rule, scale_rule] + [""] * len(scalars)
  ins += [""] * has_word
  outs = [leaf_rule if k == "leaf" else scale_rule for k in kinds]
  fn.def_partition(
    partition,
    infer_sharding_from_operands=infer,
    sharding_rule=f"{', '.join(ins)} -> {', '.join(outs)}",
    **({"b": block} if scale_shape[-1] > 1 else {}),
  )
  return fn(g, cm, sm, cn, sn, scalars, *([word] if has_word else []))


def _axes(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


# ------------------------------------------------------------------ the step


def adam_update(
  g: jax.Array,
  mu: QuantizedMoment,
  nu: QuantizedMoment,
  scalars: AdamScalars,
  *,
  nesterov: bool = False,
  word: jax.Array | None = None,
  impl: str | None = None,
  from_stored: bool = False,
) -> tuple[jax.Array, QuantizedMoment, QuantizedMoment]:
  r"""One Adam step of a leaf whose moments are both 8-bit: the update and the new moments.

  The arithmetic is :func:`adamw_flax.scale_by_adam`'s on the dequantized
  moments (the update reads the unrounded new moments), and the new moments
  are requantized as :func:`quantize` does, block by block: the codes equal
  ``quantize(new moment)``'s bitwise when rounding to nearest. No float32
  copy of a whole moment is held: on TPU a Pallas kernel requantizes tile by
  tile in place while the update stays an XLA fusion (``optax.apply_updates``
  fuses into it); on CPU a loop over chunks of rows requantizes in place and
  the update is likewise an elementwise expression; on GPU the leaf runs in
  one piece. Each shard of a sharded leaf runs on its own.

  With ``word`` the codes are rounded stochastically: up or down with the
  probabilities that make the stored moment unbiased (mu values below the
  smallest code round to it or to 0 likewise; a positive nu still never
  rounds to 0). The bits are a hash of each element's global index with
  ``word``, so they do not depend on how the leaf is sharded or chunked.

  Args:
    g: the gradient, float32.
    mu: the first moment.
    nu: the second moment (same shape and blocks).
    scalars: the step's :class:`AdamScalars`.
    nesterov: Nesterov momentum.
    word: None (round to nearest) or the step's random word for this leaf:
      ``_mix32`` of 32 bits from the step's key (:func:`moment_word`).
    impl: None (by platform), ``"loop"``, ``"kernel"`` (the TPU path; off
      TPU its kernel runs in Pallas interpret mode, for tests) or ``"xla"``
      (the TPU path of steps traced under a mesh of several devices).
    from_stored: compute the update from the new moments as stored (the
      dequantized new codes) instead of the unrounded ones: other numbers
      (``update_from_stored_moments``), for one pass over the gradient on
      TPU. There the kernel requantizes first, and the update, a fusion
      ``optax.apply_updates`` fuses into, reads the new codes and scales,
      not the gradient and the old codes a second time.

  Returns:
    ``(update, mu, nu)``: the update in float32, the new moments.
  """
  shape = tuple(g.shape)
  if impl not in (None, "loop", "kernel", "xla"):
    raise ValueError(f"impl must be None, 'loop', 'kernel' or 'xla', got {impl!r}")
  interpret = jax.default_backend() != "tpu"  # impl="kernel" off TPU: Pallas interpret mode

  def loop(chunk):
    def run(g, cm, sm, cn, sn, s, w, rows, col0, affine):
      return _loop_update(
        g, cm, sm, cn, sn, s, w, rows, col0, shape[-1], nesterov, chunk, from_stored
      )

    return run

  def kernel(g, cm, sm, cn, sn, s, w, rows, col0, affine):
    local_shape = tuple(g.shape)
    if not (affine and kernel_supports(local_shape, local_shape[-1] // sm.shape[-1])):
      return loop(_CHUNK_ELEMENTS)(g, cm, sm, cn, sn, s, w, rows, col0, affine)
    requant = lambda: _kernel_requant(
      g, cm, sm, cn, sn, s, w, rows[0], col0, shape[-1], impl == "kernel" and interpret
    )
    if from_stored:  # the new codes' values: the gradient and the old codes are read once
      new = requant()
      mu_new, nu_new = _values_tiled(new[0], new[1], "mu"), _values_tiled(new[2], new[3], "nu")
    else:
      mu_new, nu_new = _moments(g, _values_tiled(cm, sm, "mu"), _values_tiled(cn, sn, "nu"), s)
    u = _direction(g, mu_new, nu_new, s, nesterov)
    return (u, *(new if from_stored else requant()))

  def local(g, cm, sm, cn, sn, s, w, rows, col0, affine):
    args = (g, cm, sm, cn, sn, s, w, rows, col0)
    if impl is not None:
      return (loop(_CHUNK_ELEMENTS) if impl == "loop" else kernel)(*args, affine)
    # Chosen per shard, inside the partitioned call (XLA's SPMD partitioner does
    # not reach a custom partitioning inside a platform conditional). GPUs take
    # the leaf in one piece: a loop of small fusions would be launch-bound.
    branch = lambda f: lambda *a: f(*a, affine)
    return jax.lax.platform_dependent(
      *args,
      tpu=branch(kernel),
      cuda=branch(loop(None)),
      rocm=branch(loop(None)),
      default=branch(loop(_CHUNK_ELEMENTS)),
    )

  operands = (g, mu.codes, mu.scale, nu.codes, nu.scale, scalars, word)
  xla = lambda g, cm, sm, cn, sn, s, w: _xla_update(g, cm, sm, cn, sn, s, w, nesterov, from_stored)
  mesh = jax.sharding.get_abstract_mesh()
  if impl == "xla":
    out = xla(*operands)
  elif impl is None and not mesh.empty and mesh.size > 1:
    # A step traced under a mesh of several devices: on TPU the XLA path
    # (see _xla_update), elsewhere each shard on its own.
    out = jax.lax.platform_dependent(
      *operands, tpu=xla, default=lambda *ops: _per_shard(local, ops)
    )
  else:
    out = _per_shard(local, operands)
  u, cm, sm, cn, sn = out
  return u, QuantizedMoment(cm, sm), QuantizedMoment(cn, sn)


def leaf_bits(word: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """The 16 random bits per element that ``mu`` and ``nu`` of a leaf round with (:func:`adam_update`'s).

  Args:
    word: the leaf's :func:`moment_word`.
    shape: the leaf's shape.

  Returns:
    ``(bits for mu, bits for nu)``, ``uint32`` arrays of ``shape`` below 2^16.
  """
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _split_bits(_element_bits(index, word))


def moment_word(key: jax.Array) -> jax.Array:
  """The random word :func:`adam_update` rounds a leaf's codes with, from its step's key.

  Args:
    key: a PRNG key (the seed's, folded in with the step count and the leaf).

  Returns:
    A ``uint32`` scalar.
  """
  return _mix32(jax.random.bits(key, (), jnp.uint32))


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
