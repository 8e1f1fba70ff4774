r"""AdamW and NAdamW as optax transforms, with optax-identical state trees.

``adamw`` is the chain optax builds (``scale_by_adam``, ``add_decayed_weights``,
``scale_by_learning_rate``), so its state restores into ``optax.adamw`` and back.
Only the Adam scaling is written here. For float32 (or wider) params it is
optax's arithmetic in optax's order, with every ``mu_dtype``, so the results are
bitwise optax's; beyond that it differs in four ways:

* with 16-bit params it computes in float32 and then stores the moments in their
  own dtypes (optax computes bfloat16/float16 moments in that dtype, where
  ``b1=0.9`` becomes ``0.8984375``, ``b2=0.999`` becomes ``1.0`` in bfloat16
  and ``eps=1e-8`` becomes 0 in float16);
* the second moment's dtype can be chosen (``nu_dtype``; a 16-bit one is
  computed with float32 ``b2``);
* the moments keep their dtypes across steps (optax promotes them when
  hyperparameters arrive as float32 arrays, e.g. under
  ``optax.inject_hyperparams``, so its state drifts from what ``init`` and a
  checkpoint hold);
* opt-in, ``update_from_stored_moments=True`` computes the update from the
  moments as stored (rounded to bfloat16), not from their unrounded float32
  values: other numbers than optax's, but about 0.6x its step time with
  ``mu_dtype=bfloat16`` on CPU (benchmarks/RESULTS.md); with 8-bit moments,
  from the dequantized new codes: one pass over the gradient on TPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamw_flax import quantize

__all__ = [
  "DecayedWeightsState",
  "ParamsRoundingState",
  "adamw",
  "add_decayed_weights",
  "nadamw",
  "round_params",
  "scale_by_adam",
]

WeightDecayMode = Literal["lr", "paper", "adamc"]
WEIGHT_DECAY_MODES: tuple[str, ...] = get_args(WeightDecayMode)
# The modes whose decay is relative to the schedule's peak (peak_learning_rate).
PEAK_MODES = ("paper", "adamc")
# How 8-bit moments round when stored (scale_by_adam's moments_rounding).
MOMENTS_ROUNDINGS = ("nearest", "stochastic")
# fold_in constant that separates the moments' rounding bits from round_params'.
_MOMENTS_STREAM = 0x6D6F6D


def _canonical_dtype(dtype: Any, name: str) -> jnp.dtype | None:
  """Canonicalizes an optional moment dtype; accepts dtypes and their names."""
  if dtype is None:
    return None
  try:
    canonical = jax.dtypes.canonicalize_dtype(dtype)
  except TypeError as e:
    raise ValueError(
      f"{name}={dtype!r} is not a dtype; pass None (the params' dtype), a jnp dtype such as "
      f"jnp.bfloat16, or its name such as 'bfloat16'."
    ) from e
  if not jnp.issubdtype(canonical, jnp.inexact):
    raise ValueError(
      f"{name}={dtype!r} is not a floating dtype; pass None (the params' dtype), 'float32', "
      f"'bfloat16', 'float16' or 'int8' (8-bit block-quantized)."
    )
  return canonical


def _moment_format(dtype: Any, name: str) -> jnp.dtype | str | None:
  """A moment's storage: None, a float dtype, or ``"int8"`` (8-bit block-quantized)."""
  try:
    if dtype is not None and jnp.dtype(dtype) == jnp.int8:  # the name or the dtype
      return "int8"
  except TypeError:
    pass  # not a dtype at all: _canonical_dtype says so
  return _canonical_dtype(dtype, name)


def _check_hyperparameter(name: str, value: Any) -> None:
  """Rejects Adam constants that arrive already rounded to a 16-bit float."""
  dtype = getattr(value, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    return
  if jnp.finfo(dtype).bits < 32:
    # The rounding has happened before we see the value: bfloat16 turns
    # b2=0.999 into 1.0 and float16 turns eps=1e-8 into 0, and both give NaN
    # updates (optax#1414, optax#1754). Failing here names the cause.
    raise ValueError(
      f"scale_by_adam got {name} as a {jnp.dtype(dtype).name} array; in 16-bit floats "
      f"b2=0.999 rounds to 1.0 and eps=1e-8 to 0, which makes the updates NaN. "
      f"optax.inject_hyperparams casts hyperparameters to the params' dtype: pass "
      f"hyperparam_dtype=jnp.float32 to optax.inject_hyperparams, or give {name} as a "
      f"Python float or a float32 array."
    )


def _is_narrow(dtype: Any) -> bool:
  """Whether ``dtype`` is a floating dtype narrower than float32 (bfloat16, float16)."""
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _check_flag(name: str, value: Any) -> None:
  """Rejects a non-boolean flag (a config string such as "false" is truthy)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name}={value!r} must be True or False.")


def _upcast(x: jax.Array) -> jax.Array:
  """Returns ``x`` in at least float32 (16-bit floats are widened)."""
  return x.astype(jnp.float32) if _is_narrow(x.dtype) else x


def _wide_exponent(dtype: Any) -> bool:
  """Whether ``dtype`` has at least float32's exponent range (bfloat16 does)."""
  return jnp.finfo(dtype).maxexp >= jnp.finfo(jnp.float32).maxexp


def scale_by_adam(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  *,
  nesterov: bool = False,
  nu_dtype: Any | None = None,
  update_from_stored_moments: bool = False,
  quantize_block_size: int | None = None,
  quantize_min_size: int | None = None,
  quantize_mask: Any = None,
  moments_rounding: str | None = None,
  rounding_seed: int | None = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam's bias-corrected moments, computed in float32 or wider.

  The drop-in counterpart of :func:`optax.scale_by_adam`: same arguments, same
  state (:class:`optax.ScaleByAdamState`, same leaves and dtypes), same numbers
  bitwise for float32 inputs. For each leaf, with :math:`t` the step count after
  the increment,

  .. math::

    \begin{align*}
      m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
      v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) |g_t|^2, \\
      u_t &\leftarrow \frac{m_t / (1 - \beta_1^t)}
        {\sqrt{v_t / (1 - \beta_2^t) + \bar\varepsilon} + \varepsilon},
    \end{align*}

  and with ``nesterov=True`` the numerator becomes
  :math:`\beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)`.

  Precision: with float32 (or wider) gradients every operation is optax's, in
  optax's order and dtypes, for any ``mu_dtype``: the first moment is computed
  as ``(1 - b1) * g + b1 * mu`` from the stored ``mu`` (for a 16-bit ``mu`` the
  product is taken in its dtype, so ``b1`` is rounded to it as in optax, e.g.
  0.9 to 0.8984375 in bfloat16), the update reads the unrounded float32
  moments, and only the state is rounded to ``mu_dtype``/``nu_dtype``: the
  results equal optax's bitwise. A 16-bit ``nu_dtype`` (not an optax option)
  is computed with float32 ``b2``: in bfloat16, 0.999 would round to 1.0 and
  the second moment would never decay (optax#1414).

  With 16-bit gradients (16-bit params) the moments are computed in float32
  from widened inputs with exact hyperparameters, rounded to their storage
  dtypes, and the update reads the stored moments as optax's does (its
  moments are 16-bit values), except float16 ones, which would flush small
  second moments to zero: there the unrounded values are used. The update is
  returned in the gradients' dtype. optax instead does the arithmetic in 16
  bits with ``b1``, ``b2`` and ``eps`` rounded to them (bfloat16: ``b2=0.999``
  becomes 1.0, so the second moment never decays; float16: ``eps=1e-8``
  becomes 0, so a zero gradient gives NaN). A 16-bit second moment still
  cannot follow ``b2=0.999``'s 0.1% steps (half a bfloat16 ulp is 0.2%): pass
  ``nu_dtype=jnp.float32`` for that.

  ``update_from_stored_moments=True`` makes float32 params use the stored
  moments too: with bfloat16 storage the update then reads the new ``mu`` (and
  ``nu``) after rounding, i.e. :math:`u_t` above with :math:`m_t` replaced by
  :math:`\operatorname{bf16}(m_t)` (relative difference up to :math:`2^{-9}`
  per step), and the moments are computed with exact float32 ``b1``/``b2``.
  This is the faster step on CPU: with donated state, the exact update needs
  the old ``mu`` after the new one overwrote its buffer, so XLA copies every
  ``mu`` leaf into fresh memory first (about 1.6x the float32 step time, against
  about 1.0x with the flag; benchmarks/RESULTS.md). float16 storage keeps the
  unrounded values either way. With 8-bit moments the flag computes the
  update from the dequantized new codes (the moments as the next step reads
  them) instead of the unrounded new moments: on TPU the kernel requantizes
  first and the update reads the new codes, so the gradient and the old codes
  are read once (benchmarks/RESULTS.md, "AdamW state formats compiled for a
  TPU v5p chip").

  Args:
    b1: Decay rate of the first moment (a Python float or float32 array).
    b2: Decay rate of the second moment (a Python float or float32 array).
    eps: Added to the denominator outside the square root.
    eps_root: Added to the second moment inside the square root; needed to
      differentiate through the update where gradients are zero.
    mu_dtype: Storage dtype of the first moment; None means the params' dtype.
    nesterov: Whether to use Nesterov momentum (Dozat 2016).
    nu_dtype: Storage dtype of the second moment; None means the params' dtype
      (optax's behaviour). Beyond optax: e.g. ``jnp.float32`` with bfloat16
      params keeps the second moment from stalling at bfloat16 resolution.
    update_from_stored_moments: Beyond optax; compute the update from the
      moments rounded to their (bfloat16) storage dtypes instead of their
      unrounded values. False (default) gives optax's numbers for float32
      params; True trades them for a faster step with ``mu_dtype=bfloat16``
      or 8-bit moments on TPU (see Precision). No effect when the moments are
      stored in float32 or wider, or (16-bit moments) with 16-bit params,
      which use the stored moments anyway.
    quantize_block_size: with ``mu_dtype``/``nu_dtype="int8"``, the longest
      block of elements along the last axis that share a scale (the block is
      the largest divisor of the last dimension up to this); None: 256.
    quantize_min_size: leaves with fewer elements keep float32 moments (their
      scales would cost more than the codes save); None: 4096. (Both default
      to None so that ``optax.inject_hyperparams`` does not take them for
      hyperparameters; under it, name any you set in ``static_args``.)
    quantize_mask: which leaves may be quantized (a tree of booleans like
      the params, or a callable ``params -> tree``); None: all. The others
      keep float32 moments (e.g. embeddings, as bitsandbytes does).
    moments_rounding: how 8-bit moments round when stored: ``"stochastic"``
      (None: unbiased, so a moment that should move by less than half its
      code spacing per step, as ``b2=0.999``'s 0.1% steps do, moves on
      average instead of stalling; see :func:`adamw_flax.quantize.adam_update`
      and benchmarks/RESULTS.md) or ``"nearest"``. The bits are a function of
      ``rounding_seed``, the step count and the leaf, so a resumed run rounds
      as the uninterrupted one.
    rounding_seed: seed of the stochastic rounding; None: 0.

  Returns:
    An :class:`optax.GradientTransformation` whose state is an
    :class:`optax.ScaleByAdamState`.

  Raises:
    ValueError: If a dtype is not a floating dtype, ``b1``, ``b2``, ``eps``
      or ``eps_root`` is a 16-bit float array (already rounded), or
      ``update_from_stored_moments`` is not a boolean.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import adamw_flax
    >>> params = {"w": jnp.ones((2,), jnp.bfloat16)}
    >>> tx = adamw_flax.scale_by_adam(nu_dtype=jnp.float32)
    >>> state = tx.init(params)
    >>> state.mu["w"].dtype, state.nu["w"].dtype
    (dtype(bfloat16), dtype('float32'))
    >>> updates, state = tx.update({"w": jnp.full((2,), 0.5, jnp.bfloat16)}, state)
    >>> updates["w"]
    Array([1, 1], dtype=bfloat16)
  """
  mu_dtype = _moment_format(mu_dtype, "mu_dtype")
  nu_dtype = _moment_format(nu_dtype, "nu_dtype")
  _check_flag("update_from_stored_moments", update_from_stored_moments)
  quantize_block_size = 256 if quantize_block_size is None else quantize_block_size
  quantize_min_size = 4096 if quantize_min_size is None else quantize_min_size
  if quantize_block_size < 16:
    raise ValueError(f"quantize_block_size={quantize_block_size} must be >= 16")
  moments_rounding = "stochastic" if moments_rounding is None else moments_rounding
  if moments_rounding not in MOMENTS_ROUNDINGS:
    raise ValueError(
      f"moments_rounding must be one of {MOMENTS_ROUNDINGS}, got {moments_rounding!r}"
    )
  # The stochastic rounding's stream, apart from round_params' (same seed).
  moments_key = jax.random.fold_in(jax.random.key(rounding_seed or 0), _MOMENTS_STREAM)
  for name, value in (("b1", b1), ("b2", b2), ("eps", eps), ("eps_root", eps_root)):
    _check_hyperparameter(name, value)

  step_rule = _AdamRule(
    b1, b2, eps, eps_root, nesterov, update_from_stored_moments, moments_rounding == "stochastic"
  )

  def init_fn(params: optax.Params) -> optax.ScaleByAdamState:
    sizes = (quantize_mask, quantize_block_size, quantize_min_size)
    mu = _init_moments(params, mu_dtype, "mu", *sizes)
    nu = _init_moments(params, nu_dtype, "nu", *sizes)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update_fn(
    updates: optax.Updates, state: optax.ScaleByAdamState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.ScaleByAdamState]:
    count_inc = optax.safe_increment(state.count)
    # Scalars as optax.tree.bias_correction computes them: 1 - decay**count.
    bc1 = 1 - b1**count_inc
    bc2 = 1 - b2**count_inc
    bc1_next = 1 - b1 ** optax.safe_increment(count_inc) if nesterov else None
    step_key = jax.random.fold_in(moments_key, count_inc)

    is_none = lambda x: x is None
    g_leaves, treedef = jax.tree.flatten(updates, is_leaf=is_none)
    mu_in, nu_in = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    # An 8-bit moment may come as a mapping (nnx.Optimizer's state after its
    # first update); it goes back in the form it came in.
    mu_leaves, nu_leaves = map(quantize.moment_of, mu_in), map(quantize.moment_of, nu_in)
    p_leaves = [None] * len(g_leaves) if params is None else treedef.flatten_up_to(params)
    out = []
    for i, (g, m, v, p) in enumerate(zip(g_leaves, mu_leaves, nu_leaves, p_leaves, strict=True)):
      eight_bit = quantize.is_quantized(m) or quantize.is_quantized(v)
      word = None  # the leaf's stochastic-rounding bits: of the seed, the count and the leaf
      if step_rule.stochastic and eight_bit and g is not None:
        word = quantize.moment_word(jax.random.fold_in(step_key, i))
      out.append(_adam_leaf(step_rule, (bc1, bc2, bc1_next), g, m, v, p, word))
    new_updates = treedef.unflatten([o[0] for o in out])
    mu = treedef.unflatten([quantize.in_form_of(o[1], m) for o, m in zip(out, mu_in, strict=True)])
    nu = treedef.unflatten([quantize.in_form_of(o[2], v) for o, v in zip(out, nu_in, strict=True)])
    return new_updates, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _init_moments(
  params: optax.Params, fmt: Any, kind: str, quantize_mask: Any, block_size: int, min_size: int
) -> Any:
  """One moment's initial tree: zeros in ``fmt``, or 8-bit where a leaf may and can be quantized."""
  if fmt != "int8":
    # optax.tree.zeros_like, as optax's init, so leaves and dtypes match.
    return optax.tree.zeros_like(params, dtype=fmt)
  allowed = jax.tree.map(lambda _: True, params) if quantize_mask is None else quantize_mask
  if callable(allowed):
    allowed = allowed(params)

  def leaf(p, ok):
    shape = tuple(np.shape(p))
    block = quantize.block_size_for(shape, block_size)
    if (
      ok
      and block is not None
      and jnp.issubdtype(p.dtype, jnp.floating)
      and math.prod(shape) >= min_size
    ):
      return quantize.zeros(shape, kind, block)
    return jnp.zeros(shape, jnp.float32)  # kept in float32

  return jax.tree.map(leaf, params, allowed)


class _AdamRule(NamedTuple):
  """scale_by_adam's static settings, as one leaf's step reads them."""

  b1: float
  b2: float
  eps: float
  eps_root: float
  nesterov: bool
  update_from_stored_moments: bool
  stochastic: bool  # 8-bit moments rounded stochastically


def _adam_leaf(rule: _AdamRule, corrections: tuple, g, mu, nu, p, word):
  """One leaf's Adam step: ``(update, stored mu, stored nu)``.

  ``corrections`` are ``(1 - b1**t, 1 - b2**t, 1 - b1**(t+1) or None)``;
  ``word`` is None or the leaf's stochastic-rounding word (8-bit moments).
  """
  if g is None:
    return None, mu, nu
  b1, b2, eps, eps_root = rule.b1, rule.b2, rule.eps, rule.eps_root
  bc1, bc2, bc1_next = corrections
  # 16-bit params (with gradients widened to float32 before the chain, as
  # the trainer does for bfloat16 params) take the 16-bit path too.
  narrow_grad = _is_narrow(g.dtype) or (p is not None and _is_narrow(p.dtype))
  # Float32 params (and the opt-out of the flag) take optax's arithmetic:
  # b1 * mu in mu's own dtype, promoted by the add. 16-bit params, and the
  # flag, widen mu first so b1 is not rounded to 16 bits.
  exact_optax = not (narrow_grad or rule.update_from_stored_moments)
  q_mu, q_nu = quantize.is_quantized(mu), quantize.is_quantized(nu)
  g_c = _upcast(g).astype(jnp.float32) if q_mu or q_nu else _upcast(g)
  if q_mu and q_nu:
    # Both 8-bit: block by block, without float32 copies of the moments
    # (the same arithmetic as below, the same codes).
    scalars = quantize.adam_scalars(b1, b2, eps, eps_root, bc1, bc2, bc1_next)
    u, mu_store, nu_store = quantize.adam_update(
      g_c, mu, nu, scalars, nesterov=rule.nesterov, word=word,
      from_stored=rule.update_from_stored_moments,
    )  # fmt: skip
    return u.astype(g.dtype), mu_store, nu_store
  # 8-bit moments are dequantized to float32 and the update computed there;
  # XLA fuses dequantize, update and requantize into the step.
  if q_mu:
    mu_c = quantize.dequantize(mu)
  else:
    mu_c = mu if exact_optax else _upcast(mu)
  # nu is always widened: a 16-bit nu is our nu_dtype, not an optax option,
  # and b2=0.999 would round to 1.0 in bfloat16 (optax#1414).
  nu_c = quantize.dequantize(nu) if q_nu else _upcast(nu)
  # optax's expressions and operand order (tree.update_moment and
  # tree.update_moment_per_elem_norm).
  mu_new = (1 - b1) * g_c + b1 * mu_c
  g_sq = g_c**2 if jnp.isrealobj(g_c) else (g_c.conj() * g_c).real
  nu_new = (1 - b2) * g_sq + b2 * nu_c
  bits_mu, bits_nu = (None, None) if word is None else quantize.leaf_bits(word, g.shape)
  mu_store = quantize.quantize(mu_new, "mu", mu.block, bits_mu) if q_mu else mu_new.astype(mu.dtype)
  nu_store = quantize.quantize(nu_new, "nu", nu.block, bits_nu) if q_nu else nu_new.astype(nu.dtype)
  mu_used, nu_used = _moments_read(
    exact_optax, rule.update_from_stored_moments, (q_mu, q_nu), (mu, nu), (mu_new, nu_new),
    (mu_store, nu_store),
  )  # fmt: skip
  if rule.nesterov:
    mu_hat = b1 * (mu_used / bc1_next.astype(mu_used.dtype)) + (1 - b1) * (
      g_c / bc1.astype(g_c.dtype)
    )
  else:
    mu_hat = mu_used / bc1.astype(mu_used.dtype)
  nu_hat = nu_used / bc2.astype(nu_used.dtype)
  u = mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)
  return u.astype(g.dtype), mu_store, nu_store


def _moments_read(exact_optax, flag, quantized, moments, new, stored_moments):
  """Which moments the update reads: ``(mu, nu)``.

  optax reads the unrounded ones (promoted to float32 for float32 params), so
  the default does too, and float32 storage makes the choice moot. With
  16-bit params, or on request, the stored (rounded) ones are read where
  their dtype has float32's exponent range (bfloat16): then the update
  depends on the new state alone, and XLA need not keep the old mu alive past
  its in-place overwrite, which with donated state costs a copy of every mu
  leaf (benchmarks/RESULTS.md). float16 storage would flush small second
  moments to zero and the update to inf, so it keeps the unrounded ones.
  8-bit moments: the update reads the unrounded values (computed anyway),
  or with the flag (``flag``) the stored ones, as the 8-bit step does.
  """
  from_stored = not exact_optax
  out = []
  for q, m, fresh, store in zip(quantized, moments, new, stored_moments, strict=True):
    if q:
      out.append(quantize.dequantize(store) if flag else fresh)
    else:
      out.append(_upcast(store) if from_stored and _wide_exponent(m.dtype) else fresh)
  return tuple(out)


def _is_zero_constant(weight_decay: Any) -> bool:
  # Same test as optax.add_decayed_weights uses to skip the add.
  return isinstance(weight_decay, (int, float)) and weight_decay == 0.0


def _decoupled_weight_decay(
  weight_decay: optax.ScalarOrSchedule,
  learning_rate: optax.ScalarOrSchedule,
  mode: str,
  peak_learning_rate: jax.typing.ArrayLike | None,
) -> optax.ScalarOrSchedule:
  """Returns the strength to give add_decayed_weights (later scaled by lr(t))."""
  if mode not in WEIGHT_DECAY_MODES:
    raise ValueError(
      f"weight_decay_mode={mode!r} is not one of {WEIGHT_DECAY_MODES}: 'lr' multiplies the "
      f"decay by the learning rate (optax, PyTorch), 'paper' by lr(t)/peak_learning_rate "
      f"(Loshchilov et al.)."
    )
  if mode == "lr":
    if peak_learning_rate is not None:
      raise ValueError(
        f"peak_learning_rate={peak_learning_rate!r} is only used with "
        f"weight_decay_mode='paper' or 'adamc'; drop it or set one of those modes."
      )
    return weight_decay
  if peak_learning_rate is None:
    if callable(learning_rate):
      raise ValueError(
        "weight_decay_mode='paper' with a learning-rate schedule needs peak_learning_rate "
        "(the base lr the schedule's multiplier is relative to, usually its maximum): pass "
        "e.g. peak_learning_rate=3e-4."
      )
    peak_learning_rate = learning_rate
  if isinstance(peak_learning_rate, (int, float)) and peak_learning_rate <= 0:
    raise ValueError(
      f"weight_decay_mode='paper' divides by the peak learning rate, which must be > 0; "
      f"got peak_learning_rate={peak_learning_rate!r}."
    )
  if _is_zero_constant(weight_decay):
    return weight_decay
  # -lr(t) * (u + (wd / peak) * p) == -lr(t) * u - (lr(t) / peak) * wd * p: the
  # paper's decay is optax's chain with a rescaled strength, so the state tree
  # (empty, or a counter for a schedule) stays optax's.
  if mode == "adamc":
    # AdamC (Defazio et al. 2025): the decay's strength follows lr(t) / peak, so
    # the applied decay is lr(t)^2 / peak * wd: the weights' equilibrium norm
    # stays balanced as the schedule decays. A constant lr at its peak is "lr".
    wd_at = weight_decay if callable(weight_decay) else (lambda count: weight_decay)
    if not callable(learning_rate):
      ratio = learning_rate / peak_learning_rate
      return (
        (lambda count: wd_at(count) * ratio) if callable(weight_decay) else weight_decay * ratio
      )
    return lambda count: wd_at(count) * learning_rate(count) / peak_learning_rate
  if callable(weight_decay):
    return lambda count: weight_decay(count) / peak_learning_rate
  return weight_decay / peak_learning_rate


class DecayedWeightsState(NamedTuple):
  """State of :func:`add_decayed_weights`.

  Attributes:
    count: updates so far (reads a schedule strength at it).
    init_params: the params at ``init`` for ``decay_to_init`` (their own
      dtypes), else an empty tuple.
  """

  count: jax.Array
  init_params: Any


def add_decayed_weights(
  weight_decay: optax.ScalarOrSchedule,
  mask: Any = None,
  *,
  multipliers: Any = None,
  decay_to_init: bool = False,
) -> optax.GradientTransformation:
  r"""``u + s_t m (\theta - \theta_0)``: decoupled weight decay with per-leaf strengths or towards init.

  optax's ``add_decayed_weights`` takes an on/off mask and decays towards 0;
  this adds per-leaf multipliers :math:`m` (big_vision's ``wd_mults``,
  axlearn's ``per_param_scale``) and the decay towards the initial params
  :math:`\theta_0` (Kauldron's ``decay_to_init``, for fine-tuning), kept in the
  state in the params' dtypes. With neither, :func:`adamw` uses optax's.

  Args:
    weight_decay: the strength :math:`s`, a constant or a schedule of the update count.
    mask: booleans (a tree, or a callable ``params -> tree``) of the leaves to
      decay; None: all.
    multipliers: floats (a tree or callable) multiplying each leaf's strength;
      None: 1.
    decay_to_init: decay towards the params given to ``init`` instead of 0.

  Returns:
    An ``optax.GradientTransformation`` with a :class:`DecayedWeightsState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = add_decayed_weights(0.5, multipliers={"a": 0.0, "b": 2.0}, decay_to_init=True)
    >>> state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
    >>> params = {"a": jnp.full(2, 3.0), "b": jnp.full(2, 3.0)}
    >>> updates, _ = tx.update({"a": jnp.zeros(2), "b": jnp.zeros(2)}, state, params)
    >>> updates["a"].tolist(), updates["b"].tolist()
    ([0.0, 0.0], [2.0, 2.0])
  """

  def tree_of(spec, params, default):
    if spec is None:
      return jax.tree.map(lambda _: default, params)
    return spec(params) if callable(spec) else spec

  def init(params):
    init_params = jax.tree.map(jnp.asarray, params) if decay_to_init else ()
    return DecayedWeightsState(jnp.zeros((), jnp.int32), init_params)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError(
        "add_decayed_weights reads the current parameters: call update(grads, state, params)"
      )
    strength = weight_decay(state.count) if callable(weight_decay) else weight_decay
    on = tree_of(mask, params, True)
    scale = tree_of(multipliers, params, 1.0)
    origin = state.init_params if decay_to_init else jax.tree.map(jnp.zeros_like, params)

    def leaf(u, p, p0, m, f):
      if isinstance(m, bool) and not m:
        return u
      factor = jnp.asarray(strength, jnp.float32) * jnp.asarray(f, jnp.float32)
      decay = factor * (p.astype(jnp.float32) - p0.astype(jnp.float32))
      out = u + decay.astype(u.dtype)
      return out if isinstance(m, bool) else jnp.where(m, out, u)

    updates = jax.tree.map(leaf, updates, params, origin, on, scale)
    return updates, DecayedWeightsState(optax.safe_increment(state.count), state.init_params)

  return optax.GradientTransformation(init, update)


ROUNDINGS = ("nearest", "stochastic", "kahan")


class ParamsRoundingState(NamedTuple):
  """State of :func:`round_params`.

  Attributes:
    count: updates so far (with ``key``, it picks each step's random bits).
    key: ``"stochastic"``: the raw ``uint32`` data of the PRNG key made from
      the seed (a step's bits are ``fold_in(key, count)``, so a resumed run
      draws what the uninterrupted one would); else ``()``.
    compensation: ``"kahan"``: per bfloat16 param, the rounding error carried
      to the next update (bfloat16; ``None`` for other leaves); else ``()``.
  """

  count: jax.Array
  key: Any
  compensation: Any


def round_params(mode: str = "stochastic", seed: int = 0) -> optax.GradientTransformation:
  r"""Makes ``optax.apply_updates`` round bfloat16 params the way ``mode`` says.

  Put it last in a chain over params kept in bfloat16 (no float32 master
  copy). With a plain chain, the update is added in bfloat16 (or in float32
  and rounded to nearest): an update below half a bfloat16 ulp of its param
  (:math:`2^{-9}` relative) is lost, every step, and late in training most
  are. This transform computes the new param
  :math:`\theta + u` in float32 and rounds it

  * ``"nearest"``: to nearest (what ``apply_updates`` does: the contrast);
  * ``"stochastic"``: up or down with the probabilities that make the rounding
    unbiased (:func:`adamw_flax.quantize.round_to_bfloat16`); the random bits
    come from the seed and the update count, so a run resumed from a
    checkpoint continues bitwise as the uninterrupted one;
  * ``"kahan"``: to nearest, keeping what was lost in a bfloat16 compensation
    buffer that is added to the next update (2 more bytes per param).

  It returns float32 updates :math:`\operatorname{round}(\theta + u) - \theta`,
  exact in float32, so ``optax.apply_updates`` (as ``nnx.Optimizer`` and
  ``TrainState.apply_gradients`` call it) lands exactly on the rounded value.
  Leaves that are not bfloat16 pass through unchanged.

  Args:
    mode: ``"nearest"``, ``"stochastic"`` or ``"kahan"``.
    seed: seed of the stochastic rounding's bits.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ParamsRoundingState`;
    its ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones(4, jnp.bfloat16)}
    >>> tx = optax.chain(optax.sgd(1e-3), round_params("kahan"))
    >>> state = tx.init(params)
    >>> for _ in range(8):
    ...   updates, state = tx.update({"w": -jnp.ones(4, jnp.bfloat16)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> float(params["w"][0])  # 8 steps of +1e-3; nearest rounding would stay at 1.0
    1.0078125
  """
  if mode not in ROUNDINGS:
    raise ValueError(f"round_params mode must be one of {ROUNDINGS}, got {mode!r}")

  def bf16(p: Any) -> bool:
    return p is not None and p.dtype == jnp.bfloat16

  def init(params):
    key = jax.random.key_data(jax.random.key(seed)) if mode == "stochastic" else ()
    if mode == "kahan":
      comp = jax.tree.map(lambda p: jnp.zeros_like(p) if bf16(p) else None, params)
    else:
      comp = ()
    return ParamsRoundingState(jnp.zeros((), jnp.int32), key, comp)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("round_params reads the current parameters: call update(u, state, params)")
    is_none = lambda x: x is None
    u_leaves, treedef = jax.tree.flatten(updates, is_leaf=is_none)
    p_leaves = treedef.flatten_up_to(params)
    kahan = mode == "kahan"
    c_leaves = treedef.flatten_up_to(state.compensation) if kahan else [None] * len(u_leaves)
    step_key = None
    if mode == "stochastic":
      step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
    out_u, out_c = [], []
    for i, (u, p, c) in enumerate(zip(u_leaves, p_leaves, c_leaves, strict=True)):
      if u is None or not bf16(p):
        out_u.append(u)
        out_c.append(c)
        continue
      p32 = p.astype(jnp.float32)
      y = u.astype(jnp.float32)
      if kahan:
        y = y + c.astype(jnp.float32)
      x = p32 + y
      if mode == "stochastic":
        bits = quantize.random_bits16(jax.random.fold_in(step_key, i), p.shape)
        new = quantize.round_to_bfloat16(x, "stochastic", bits)
      else:
        new = quantize.round_to_bfloat16(x, "nearest")
      moved = new.astype(jnp.float32) - p32  # exact: both are bfloat16 values
      out_u.append(moved)
      # What rounding lost, carried over (a non-finite step leaves NaN here,
      # which optax.apply_if_finite discards with the rest of the state).
      out_c.append((y - moved).astype(jnp.bfloat16) if kahan else c)
    comp = treedef.unflatten(out_c) if kahan else state.compensation
    new_state = ParamsRoundingState(optax.safe_increment(state.count), state.key, comp)
    return treedef.unflatten(out_u), new_state

  return optax.GradientTransformation(init, update)


def _check_mask(mask: Any) -> None:
  """Rejects a bare boolean mask, the silent result of an unstatic callable mask."""
  if isinstance(mask, bool) or (
    hasattr(mask, "dtype") and getattr(mask, "ndim", None) == 0 and mask.dtype == jnp.bool_
  ):
    # optax.inject_hyperparams calls a callable mask as a schedule unless it is
    # in static_args; mask_fn(step) then gives a bare bool and weight decay is
    # silently applied to all or none of the leaves.
    raise ValueError(
      f"mask={mask!r} is a single boolean, not a tree of booleans or a callable. Under "
      f"optax.inject_hyperparams a callable mask must be named in static_args "
      f"(static_args=('mask',)), else it is called with the step count. To decay every "
      f"leaf pass mask=None; to decay none pass weight_decay=0.0."
    )


def _require_params(
  inner: optax.GradientTransformationExtraArgs, weight_decay: Any, rounding: str | None = None
) -> optax.GradientTransformationExtraArgs:
  """Makes a missing ``params`` a clear error when weight decay or the rounding needs them."""

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      if rounding is not None:
        raise ValueError(
          f"adamw rounds the bfloat16 params (params_rounding={rounding!r}), which reads them, "
          "but update() got params=None. Call tx.update(grads, opt_state, params)."
        )
      if _is_zero_constant(weight_decay):
        # optax.add_decayed_weights asks for params even when a constant 0
        # skips the add, and nothing else in the chain reads them, so the
        # updates (same tree) stand in for them.
        return inner.update(updates, state, updates, **extra_args)
      # optax's own message does not say what to pass, and under a mask it
      # surfaces from inside optax.masked.
      raise ValueError(
        f"adamw applies weight decay (weight_decay={weight_decay!r}), which reads the current "
        f"parameters, but update() got params=None. Call tx.update(grads, opt_state, params) "
        f"(nnx.Optimizer.update and flax TrainState.apply_gradients pass them for you), or "
        f"build the optimizer with weight_decay=0.0."
      )
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  weight_decay: optax.ScalarOrSchedule = 1e-4,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  *,
  nesterov: bool = False,
  nu_dtype: Any | None = None,
  weight_decay_mode: WeightDecayMode = "lr",
  peak_learning_rate: jax.typing.ArrayLike | None = None,
  weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
  update_from_stored_moments: bool = False,
  weight_decay_multipliers: Any | Callable[[optax.Params], Any] | None = None,
  decay_to_init: bool = False,
  quantize_block_size: int | None = None,
  quantize_min_size: int | None = None,
  quantize_mask: Any | Callable[[optax.Params], Any] | None = None,
  params_rounding: str | None = None,
  rounding_seed: int | None = None,
  moments_rounding: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with decoupled weight decay; a drop-in for :func:`optax.adamw`.

  Same arguments, defaults, state tree (leaves and dtypes) and, for float32
  params with any ``mu_dtype``, bitwise the same updates as
  :func:`optax.adamw`, so a run can switch between
  the two mid-training in either direction. It is
  ``optax.chain(scale_by_adam, optax.add_decayed_weights, optax.scale_by_learning_rate)``
  with this module's :func:`scale_by_adam`.

  Let :math:`\alpha_t` be the learning rate (a constant or a schedule),
  :math:`\beta_1, \beta_2, \varepsilon, \bar\varepsilon` the arguments ``b1``,
  ``b2``, ``eps``, ``eps_root``, :math:`\lambda` the weight decay and
  :math:`\theta_t` the parameters. From :math:`m_0 = v_0 = 0`, step
  :math:`t \ge 1` with gradient :math:`g_t` computes

  .. math::

    \begin{align*}
      m_t &\leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
      v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2, \\
      \hat{m}_t &\leftarrow m_t / (1-\beta_1^t), \qquad
      \hat{v}_t \leftarrow v_t / (1-\beta_2^t), \\
      a_t &\leftarrow \hat{m}_t / \left(\sqrt{\hat{v}_t + \bar\varepsilon}
        + \varepsilon\right),
    \end{align*}

  (with ``nesterov=True``,
  :math:`\hat{m}_t \leftarrow \beta_1 m_t / (1-\beta_1^{t+1}) + (1-\beta_1) g_t / (1-\beta_1^t)`)
  and then, depending on ``weight_decay_mode``:

  .. math::

    \begin{align*}
      \text{"lr" (optax, PyTorch):} \quad
        \theta_t &\leftarrow \theta_{t-1} - \alpha_t \left(a_t + \lambda \theta_{t-1}\right), \\
      \text{"paper" (Loshchilov et al.):} \quad
        \theta_t &\leftarrow \theta_{t-1} - \alpha_t a_t
          - \eta_t \lambda \theta_{t-1}, \qquad
        \eta_t = \alpha_t / \alpha_{\text{peak}}.
    \end{align*}

  In "paper" mode the decay follows the schedule multiplier :math:`\eta_t` but
  not the base learning rate, so ``weight_decay`` is a per-step fraction
  (e.g. 1e-4 shrinks weights by 0.01% a step at the peak); it is implemented as
  the "lr" chain with strength :math:`\lambda / \alpha_{\text{peak}}`, so the
  state tree is the same. :math:`\alpha_{\text{peak}}` is
  ``peak_learning_rate``, or the learning rate itself when that is a constant.

  Precision: with float32 params every operation is optax's, ``mu_dtype``
  included (the update reads the unrounded float32 moments; only the state is
  rounded). With 16-bit params Adam's moments are computed in float32 and
  stored in ``mu_dtype``/``nu_dtype``; with float16 params a zero gradient
  gives a zero update, where optax's float16 arithmetic turns ``eps=1e-8`` into
  0 and returns NaN (optax#1754). ``update_from_stored_moments=True`` computes
  the update from the bfloat16-rounded moments instead: not optax's numbers,
  but with float32 params and ``mu_dtype=bfloat16`` about 0.6x optax's step
  time on CPU, where the exact update makes XLA copy every ``mu`` leaf of a
  donated state first. See :func:`scale_by_adam`.

  With :func:`optax.inject_hyperparams`: name a callable mask in
  ``static_args`` (``static_args=("mask",)``), or inject_hyperparams treats it as
  a schedule; give ``mu_dtype``/``nu_dtype`` as strings (``"bfloat16"``) or in
  ``static_args`` for the same reason; and with 16-bit params pass
  ``hyperparam_dtype=jnp.float32``, since bfloat16 turns ``b2=0.999`` into 1.0
  (optax#1414; this transform raises a ValueError rather than return NaN).

  Args:
    learning_rate: A constant or a schedule ``count -> lr``.
    b1: Exponential decay rate of the first moment.
    b2: Exponential decay rate of the second moment.
    eps: Added to the denominator outside the square root.
    eps_root: Added inside the square root; needed to differentiate through the
      update (meta-gradients) where gradients can be zero.
    mu_dtype: Storage dtype of the first moment (a dtype or its name); None
      means the params' dtype.
    weight_decay: Strength :math:`\lambda` of the decay, a constant or a
      schedule. A constant 0 skips the decay (and the need for ``params``).
    mask: Which leaves get weight decay: a tree of booleans with the params'
      structure or a prefix of it, or a callable ``params -> such a tree``.
      Adam's scaling applies to every leaf.
    nesterov: Whether to use Nesterov momentum (NAdamW, Dozat 2016).
    nu_dtype: Storage dtype of the second moment; None means the params' dtype
      (optax's behaviour). Not in optax: e.g. ``"float32"`` with bfloat16
      params lets the second moment follow ``b2=0.999``'s 0.1% steps, which a
      bfloat16 one cannot (half its ulp is 0.2%), at 2 more bytes per param.
    weight_decay_mode: ``"lr"`` (default, optax's and PyTorch's: decay scaled
      by the learning rate), ``"paper"`` (scaled by the schedule multiplier
      only, as in Loshchilov et al.; see above) or ``"adamc"`` (Defazio et
      al. 2025: the strength :math:`\lambda \alpha_t / \alpha_{\text{peak}}`,
      then scaled by :math:`\alpha_t` as in "lr": the decay stays balanced
      with the update as the schedule decays; Levanter's ``adamc_weight_decay``).
    peak_learning_rate: :math:`\alpha_{\text{peak}}` for ``"paper"`` and ``"adamc"``;
      required when ``learning_rate`` is a schedule, defaults to the constant
      learning rate otherwise; an error in ``"lr"`` mode.
    weight_decay_mask: Another name for ``mask`` (optax PR 1635); give one
      of the two.
    update_from_stored_moments: Compute the update from the moments rounded
      to their bfloat16 or 8-bit storage instead of their unrounded values
      (default False: optax's numbers). Faster with float32 params and
      ``mu_dtype=bfloat16``, and with 8-bit moments on TPU; see
      :func:`scale_by_adam`.
    weight_decay_multipliers: Per-leaf multipliers of ``weight_decay`` (a
      tree of floats or a callable ``params -> tree``), e.g. 0.1 for
      embeddings; not in optax. Replaces optax's decay by
      :func:`add_decayed_weights` (another state node).
    decay_to_init: Decay towards the params given to ``init`` (kept in the
      state, in their dtypes) instead of towards 0; not in optax.
    quantize_block_size / quantize_min_size / quantize_mask: with
      ``mu_dtype``/``nu_dtype="int8"`` (8-bit block-quantized moments, about
      1.02 bytes per param each): see :func:`scale_by_adam`.
    params_rounding: for bfloat16 params, how the update is applied:
      ``"stochastic"``, ``"kahan"`` or ``"nearest"`` (:func:`round_params`,
      appended to the chain: its state is a fourth element). None (default):
      optax's chain of three.
    rounding_seed: seed of ``params_rounding="stochastic"`` and of
      ``moments_rounding="stochastic"`` (separate streams); None: 0.
    moments_rounding: with 8-bit moments, ``"stochastic"`` (None) or
      ``"nearest"`` rounding of the stored codes: see :func:`scale_by_adam`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is optax's:
    ``(ScaleByAdamState, EmptyState | WeightDecaySchedule | MaskedState,
    EmptyState | ScaleByScheduleState)``.

  Raises:
    ValueError: On both ``mask`` and ``weight_decay_mask``, a mask that is a
      single boolean (what an unstatic callable mask becomes under
      ``inject_hyperparams``), an unknown
      ``weight_decay_mode``, a schedule in "paper" mode without
      ``peak_learning_rate``, a bad dtype, 16-bit Adam constants, a
      non-boolean ``update_from_stored_moments``, and, at ``update``,
      ``params=None`` while weight decay is on.

  Examples:
    >>> import optax
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import adamw_flax
    >>> def f(x): return jnp.sum(x ** 2)  # simple quadratic function
    >>> solver = adamw_flax.adamw(learning_rate=0.003)
    >>> params = jnp.array([1., 2., 3.])
    >>> print('Objective function: ', f(params))
    Objective function:  14.0
    >>> opt_state = solver.init(params)
    >>> for _ in range(5):
    ...  grad = jax.grad(f)(params)
    ...  updates, opt_state = solver.update(grad, opt_state, params)
    ...  params = optax.apply_updates(params, updates)
    ...  print('Objective function: {:.2E}'.format(f(params)))
    Objective function: 1.40E+01
    Objective function: 1.39E+01
    Objective function: 1.39E+01
    Objective function: 1.39E+01
    Objective function: 1.38E+01

    The paper's decay under a cosine schedule, without decay on biases:

    >>> schedule = optax.cosine_decay_schedule(1e-3, decay_steps=1000)
    >>> tx = adamw_flax.adamw(
    ...     schedule, weight_decay=1e-4, weight_decay_mode="paper",
    ...     peak_learning_rate=1e-3, mask=lambda p: {"b": False, "w": True})
    >>> state = tx.init({"b": jnp.zeros(3), "w": jnp.ones((3, 3))})

  References:
    Loshchilov et al., `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.

    Dozat, `Incorporating Nesterov Momentum into Adam
    <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.
  """
  if weight_decay_mask is not None:
    if mask is not None:
      raise ValueError(
        "adamw got both mask and weight_decay_mask, which are two names for the same "
        "argument; pass only one of them."
      )
    mask = weight_decay_mask
  _check_mask(mask)
  strength = _decoupled_weight_decay(
    weight_decay, learning_rate, weight_decay_mode, peak_learning_rate
  )
  if weight_decay_multipliers is not None or decay_to_init:
    decay = add_decayed_weights(
      strength, mask, multipliers=weight_decay_multipliers, decay_to_init=decay_to_init
    )
  else:  # optax's own: its state and numbers
    decay = optax.add_decayed_weights(strength, mask)
  inner = optax.chain(
    scale_by_adam(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      nesterov=nesterov,
      nu_dtype=nu_dtype,
      update_from_stored_moments=update_from_stored_moments,
      quantize_block_size=quantize_block_size,
      quantize_min_size=quantize_min_size,
      quantize_mask=quantize_mask,
      moments_rounding=moments_rounding,
      rounding_seed=rounding_seed,
    ),
    decay,
    optax.scale_by_learning_rate(learning_rate),
    *([round_params(params_rounding, rounding_seed or 0)] if params_rounding is not None else []),
  )
  return _require_params(inner, weight_decay, params_rounding)


nadamw = functools.partial(adamw, nesterov=True)
nadamw.__doc__ = r"""NAdamW: :func:`adamw` with Nesterov momentum; a drop-in for :func:`optax.nadamw`.

  ``nadamw(...)`` is ``adamw(..., nesterov=True)``: same arguments and defaults
  (including the keyword-only ``nu_dtype``, ``weight_decay_mode``,
  ``peak_learning_rate``, ``weight_decay_mask`` and
  ``update_from_stored_moments``), same state tree as
  :func:`optax.nadamw`. It replaces :math:`\hat{m}_t \leftarrow m_t / (1-\beta_1^t)`
  with

  .. math::

    \hat{m}_t \leftarrow \beta_1 m_t / (1-\beta_1^{t+1}) + (1-\beta_1) g_t / (1-\beta_1^t).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
