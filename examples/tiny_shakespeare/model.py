"""A nanoGPT-style character-level transformer in Flax NNX.

Decoder-only: token + learned position embeddings, pre-norm blocks of causal
self-attention and a GELU MLP (4x), LayerNorms and Linear layers without bias
(nanoGPT's ``bias=False``), a final LayerNorm and an output layer tied to the
token embedding by default. nanoGPT's init: normal(0.02), and
normal(0.02 / sqrt(2 * num_layers)) for the projections into the residual
stream.

Parameters are always float32. ``dtype="bfloat16"`` runs the dense layers'
matmuls (and the tied output layer) on bfloat16 inputs with float32
accumulation and float32 outputs, forward and backward; attention, norms,
softmax, GELU and the residual stream stay float32 (PyTorch autocast's split).

Registered as model ``"char_transformer"`` with loss :func:`lm_loss`; configs
name it ``"examples.tiny_shakespeare.model:char_transformer"`` so that the
registry imports this module.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from adamw_flax.registry import register_model

DTYPES = ("float32", "bfloat16")
# model.attention: the einsum attention below (the CPU path); jax.nn.dot_product_attention;
# the Pallas TPU splash-attention kernel (MaxText's), interpreted off TPU.
ATTENTIONS = ("einsum", "dot_product", "splash")
# model.remat: what each block keeps for the backward pass: everything; nothing
# (jax.checkpoint of the block); the outputs of its dense matmuls only.
REMATS = ("none", "full", "dots")
# The splash kernel's tile: blocks of 512 (MaxText's default) or the whole sequence if shorter;
# its tiles are multiples of 128, so other sequence lengths take the einsum path.
_SPLASH_BLOCK = 512
_SPLASH_LANES = 128
# PyTorch's LayerNorm epsilon, which nanoGPT (the reference) uses.
_LN_EPS = 1e-5


@jax.custom_vjp
def _bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return _bf16_matmul_fwd(x, w)[0]


# Why a custom VJP: autodiff of a bfloat16 matmul gives backward matmuls of a
# float32 cotangent with a bfloat16 operand, which XLA runs in float32; casting
# the cotangent keeps all three matmuls on bfloat16 inputs (tensor cores on
# GPU; AMX on CPU, where XLA still runs the weight-gradient one in float32).
# The cotangents come back in the primals' own dtypes (bfloat16 weights under
# optimizer.params_dtype=bfloat16, float32 otherwise), as a custom VJP must.
def _bf16_matmul_fwd(x: jax.Array, w: jax.Array):
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  out = jnp.dot(xb, wb, preferred_element_type=jnp.float32)
  return out, (xb, wb, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _bf16_matmul_bwd(res, g: jax.Array):
  xb, wb, x_like, w_like = res
  gb = g.astype(jnp.bfloat16)
  dx = jnp.dot(gb, wb.T, preferred_element_type=jnp.float32)
  dw = jnp.dot(xb.T, gb, preferred_element_type=jnp.float32)
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def _matmul(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
  return _bf16_matmul(x, w) if dtype == "bfloat16" else jnp.dot(x, w)


def _bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
  """``nnx.Linear``'s ``dot_general`` hook for ``dtype="bfloat16"``."""
  del precision, kwargs
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
    raise ValueError(f"expected a plain [..., in] x [in, out] matmul, got {dimension_numbers}")
  return _bf16_matmul(lhs.reshape(-1, lhs.shape[-1]), rhs).reshape(*lhs.shape[:-1], -1)


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
    dim, epsilon=_LN_EPS, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs
  )


def _linear(din: int, dout: int, std: float, dtype: str, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
    din,
    dout,
    use_bias=False,
    kernel_init=nnx.initializers.normal(std),
    param_dtype=jnp.float32,
    dot_general=_bf16_dot_general if dtype == "bfloat16" else lax.dot_general,
    rngs=rngs,
  )


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  # Only a dropout that can fire holds an RNG stream: with rate 0 the module's
  # state is its parameters alone.
  return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as nanoGPT's ``nn.GELU()``.

  ``jax.nn.gelu(approximate=False)`` computes the same function through
  ``erfc``, whose XLA:CPU lowering took 2x longer than ``erf``'s (measured);
  the two agree to 5e-7.

  Examples:
    >>> import jax.numpy as jnp
    >>> [round(float(v), 4) for v in gelu(jnp.array([-1.0, 0.0, 2.0]))]
    [-0.1587, 0.0, 1.9545]
  """
  return 0.5 * x * (1.0 + lax.erf(x * (1.0 / math.sqrt(2.0))))


def _platform() -> str:
  """The platform being compiled for: the current mesh's devices (a TPU topology compiled
  ahead of time from a CPU machine), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def _batch_axes(batch: int) -> tuple[str, ...]:
  """The current mesh's axes (in order) whose sizes together divide ``batch``: the batch's split.

  The trainer splits a batch over ``mesh.data_axes``, which for a model without tensor
  parallelism are the mesh's axes; a kernel in ``shard_map`` over the same axes runs on each
  chip's own rows with no communication.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes, size = [], 1
  for name, n in [] if mesh.empty else mesh.shape.items():
    if n > 1 and batch % (size * n) == 0:
      axes.append(name)
      size *= n
  return tuple(axes)


def _splash(q_BxHxTxK: jax.Array, k_BxHxTxK: jax.Array, v_BxHxTxK: jax.Array) -> jax.Array:
  """Causal attention by the Pallas TPU splash-attention kernel (q already scaled)."""
  # Imported here, not at the top: 0.4 s of import for every CPU run that never uses it.
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # noqa: PLC0415

  _, h, t, _ = q_BxHxTxK.shape
  blk = min(_SPLASH_BLOCK, t)
  sizes = sa.BlockSizes(
    block_q=blk,
    block_kv=blk,
    block_kv_compute=blk,
    block_q_dkv=blk,
    block_kv_dkv=blk,
    block_kv_dkv_compute=blk,
    block_q_dq=blk,
    block_kv_dq=blk,
  )
  mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(h)])
  kernel = sa.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=_platform() != "tpu"
  )
  attend = jax.vmap(kernel)  # the kernel takes one sequence: [H, T, K]
  axes = _batch_axes(q_BxHxTxK.shape[0])
  if axes:  # a Pallas kernel is not partitioned by XLA: run it on each chip's own sequences
    spec = jax.P(axes)
    attend = jax.shard_map(attend, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  return attend(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK)


def attention(
  q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array, *, kind: str, dtype: str
) -> jax.Array:
  """Causal softmax attention by ``model.attention``'s kernel, without dropout.

  The same function as :class:`CausalSelfAttention`'s einsum path: scores scaled by
  1/sqrt(head size), a float32 softmax over the keys up to each query.

  Args:
    q_BxTxHxK: queries ``[B, T, H, K]``; ``k_BxTxHxK``, ``v_BxTxHxK`` keys and values.
    k_BxTxHxK: keys.
    v_BxTxHxK: values.
    kind: "einsum", "dot_product" (``jax.nn.dot_product_attention``: XLA's
      on CPU and TPU, cuDNN's on GPU where it applies) or "splash" (the Pallas
      TPU kernel; interpreted on other platforms, slowly: for tests).
    dtype: the dtype of q, k, v and the probabilities in the two matmuls
      ("float32" or "bfloat16"); they accumulate in float32.

  Returns:
    float32 ``[B, T, H, K]``.
  """
  t, scale = q_BxTxHxK.shape[1], 1.0 / math.sqrt(q_BxTxHxK.shape[-1])
  q, k, v = (x.astype(dtype) for x in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK))
  if kind == "splash" and t % _SPLASH_LANES == 0:
    heads_first = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
    y = _splash(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v))
    return heads_first(y).astype(jnp.float32)
  if kind == "dot_product":
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True).astype(jnp.float32)
  s_BxHxTxT = jnp.einsum(
    "bqhk,bshk->bhqs", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32
  )
  s_BxHxTxT = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s_BxHxTxT, -1e30)
  p_BxHxTxT = jax.nn.softmax(s_BxHxTxT, axis=-1).astype(dtype)
  return jnp.einsum("bhqs,bshk->bqhk", p_BxHxTxT, v, preferred_element_type=jnp.float32)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with one fused QKV projection.

  Args:
    embed_dim: model width; must be divisible by ``num_heads``.
    num_heads: number of attention heads.
    dropout: dropout rate on the attention weights and on the output
      (nanoGPT's ``attn_dropout`` and ``resid_dropout``).
    residual_std: init std of the output projection.
    dtype: matmul dtype of the projections ("float32" or "bfloat16").
    rngs: parameter (and dropout) RNG streams.
    attention: the kernel (:data:`ATTENTIONS`); "einsum" with ``attention_dtype``
      "float32" is the code below, the others :func:`attention`.
    attention_dtype: dtype of the attention matmuls' inputs ("float32" or "bfloat16").
  """

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    *,
    dropout: float,
    residual_std: float,
    dtype: str,
    rngs: nnx.Rngs,
    attention: str = "einsum",
    attention_dtype: str = "float32",
  ):
    self.num_heads = num_heads
    self.attention = attention
    self.attention_dtype = attention_dtype
    self.qkv = _linear(embed_dim, 3 * embed_dim, 0.02, dtype, rngs)
    self.proj = _linear(embed_dim, embed_dim, residual_std, dtype, rngs)
    self.attn_dropout = _dropout(dropout, rngs)
    self.dropout = _dropout(dropout, rngs)

  def __call__(
    self, x_NxD: jax.Array, *, seq_len: int, deterministic: bool | None = None
  ) -> jax.Array:
    """Attends within each sequence of ``seq_len`` consecutive rows of ``x_NxD``."""
    n, d = x_NxD.shape
    b, t, h = n // seq_len, seq_len, self.num_heads
    qkv_BxTx3xHxK = self.qkv(x_NxD).reshape(b, t, 3, h, d // h)
    q, k, v = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
    if (self.attention, self.attention_dtype) != ("einsum", "float32"):
      y_NxD = attention(q, k, v, kind=self.attention, dtype=self.attention_dtype).reshape(n, d)
      return self.dropout(self.proj(y_NxD), deterministic=deterministic)
    # Einsum attention rather than jax.nn.dot_product_attention: its XLA path
    # took 2x longer forward + backward on CPU at this size (measured).
    s_BxHxTxT = jnp.einsum("bqhk,bshk->bhqs", q * (1.0 / math.sqrt(d // h)), k)
    s_BxHxTxT = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s_BxHxTxT, -1e30)
    p_BxHxTxT = jax.nn.softmax(s_BxHxTxT, axis=-1)
    p_BxHxTxT = self.attn_dropout(p_BxHxTxT, deterministic=deterministic)
    y_NxD = jnp.einsum("bhqs,bshk->bqhk", p_BxHxTxT, v).reshape(n, d)
    return self.dropout(self.proj(y_NxD), deterministic=deterministic)


class MLP(nnx.Module):
  """GELU MLP with a 4x hidden width."""

  def __init__(
    self, embed_dim: int, *, dropout: float, residual_std: float, dtype: str, rngs: nnx.Rngs
  ):
    self.fc = _linear(embed_dim, 4 * embed_dim, 0.02, dtype, rngs)
    self.proj = _linear(4 * embed_dim, embed_dim, residual_std, dtype, rngs)
    self.dropout = _dropout(dropout, rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    return self.dropout(self.proj(gelu(self.fc(x))), deterministic=deterministic)


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    *,
    dropout: float,
    residual_std: float,
    dtype: str,
    rngs: nnx.Rngs,
    attention: str = "einsum",
    attention_dtype: str = "float32",
  ):
    self.ln1 = _layer_norm(embed_dim, rngs)
    self.attn = CausalSelfAttention(
      embed_dim,
      num_heads,
      dropout=dropout,
      residual_std=residual_std,
      dtype=dtype,
      rngs=rngs,
      attention=attention,
      attention_dtype=attention_dtype,
    )
    self.ln2 = _layer_norm(embed_dim, rngs)
    self.mlp = MLP(embed_dim, dropout=dropout, residual_std=residual_std, dtype=dtype, rngs=rngs)

  def __call__(
    self, x_NxD: jax.Array, *, seq_len: int, deterministic: bool | None = None
  ) -> jax.Array:
    x_NxD = x_NxD + self.attn(self.ln1(x_NxD), seq_len=seq_len, deterministic=deterministic)
    return x_NxD + self.mlp(self.ln2(x_NxD), deterministic=deterministic)


class CharTransformer(nnx.Module):
  """Decoder-only transformer language model (nanoGPT's ``GPT``).

  Args:
    vocab_size: number of token ids.
    num_layers: number of blocks.
    num_heads: attention heads per block.
    embed_dim: model width.
    max_len: longest context (rows of the position embedding).
    dropout: dropout rate after the embeddings, on attention weights, after
      attention and MLP (0 disables it and keeps no dropout RNG state in the
      module).
    tie_embeddings: the output layer is the token embedding's transpose.
    dtype: "float32", or "bfloat16" for bfloat16 matmuls with float32
      accumulation (parameters stay float32).
    attention: the attention kernel, one of :data:`ATTENTIONS` ("splash": the
      Pallas TPU kernel, for sequence lengths that are multiples of 128; no
      dropout on the attention weights, nor with "dot_product").
    attention_dtype: "float32", or "bfloat16" for the attention matmuls'
      inputs (scores and softmax stay float32).
    remat: what each block keeps for the backward pass, one of :data:`REMATS`:
      "none" keeps every activation; "full" recomputes the block
      (``nnx.remat``); "dots" keeps only the dense matmuls' outputs
      (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).
    rngs: RNG streams: ``params`` (or ``default``) for init, ``dropout`` (or
      ``default``) for dropout when ``dropout > 0``.

  Examples:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> m = CharTransformer(65, num_layers=1, num_heads=2, embed_dim=16, max_len=8,
    ...                     rngs=nnx.Rngs(0))
    >>> m(jnp.zeros((3, 8), jnp.int32)).shape
    (3, 8, 65)
  """

  def __init__(
    self,
    vocab_size: int,
    *,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    max_len: int,
    dropout: float = 0.0,
    tie_embeddings: bool = True,
    dtype: str = "float32",
    attention: str = "einsum",
    attention_dtype: str = "float32",
    remat: str = "none",
    rngs: nnx.Rngs,
  ):
    for key, value in (("num_layers", num_layers), ("num_heads", num_heads),
                       ("embed_dim", embed_dim), ("max_len", max_len)):  # fmt: skip
      if value < 1:
        raise ValueError(f"model.{key}={value} must be >= 1")
    if embed_dim % num_heads:
      raise ValueError(
        f"model.embed_dim={embed_dim} must be divisible by model.num_heads={num_heads}"
      )
    if dtype not in DTYPES:
      raise ValueError(f"model.dtype={dtype!r}; accepted: {', '.join(DTYPES)}")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
    for key, value, accepted in (
      ("attention", attention, ATTENTIONS),
      ("attention_dtype", attention_dtype, DTYPES),
      ("remat", remat, REMATS),
    ):
      if value not in accepted:
        raise ValueError(f"model.{key}={value!r}; accepted: {', '.join(accepted)}")
    if dropout > 0 and attention != "einsum":
      raise ValueError(
        f"model.attention={attention!r} has no dropout on the attention weights; "
        "set model.dropout=0 or model.attention='einsum'"
      )
    self.remat = remat
    self.vocab_size = vocab_size
    self.max_len = max_len
    self.dtype = dtype
    init = nnx.initializers.normal(0.02)
    self.tok_emb = nnx.Embed(
      vocab_size, embed_dim, embedding_init=init, param_dtype=jnp.float32, rngs=rngs
    )
    self.pos_emb = nnx.Embed(
      max_len, embed_dim, embedding_init=init, param_dtype=jnp.float32, rngs=rngs
    )
    self.dropout = _dropout(dropout, rngs)
    residual_std = 0.02 / math.sqrt(2 * num_layers)
    self.blocks = nnx.List(
      [
        Block(
          embed_dim,
          num_heads,
          dropout=dropout,
          residual_std=residual_std,
          dtype=dtype,
          rngs=rngs,
          attention=attention,
          attention_dtype=attention_dtype,
        )
        for _ in range(num_layers)
      ]
    )
    self.ln_f = _layer_norm(embed_dim, rngs)
    self.head = None if tie_embeddings else _linear(embed_dim, vocab_size, 0.02, dtype, rngs)

  def __call__(self, tokens_BxT: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    """Returns float32 logits ``[B, T, vocab_size]``.

    Args:
      tokens_BxT: int token ids, ``T <= max_len``.
      deterministic: True turns dropout off, False on; None leaves it to each
        Dropout's own flag (``model.eval()`` / ``model.train()``).
    """
    b, t = tokens_BxT.shape
    if t > self.max_len:
      raise ValueError(
        f"sequence length {t} exceeds the model's context model.max_len={self.max_len}"
      )
    x_BxTxD = self.tok_emb(tokens_BxT) + self.pos_emb.embedding[:t]
    # The residual stream is kept 2-D, [B*T, D]: for 3-D activations XLA:CPU
    # inserts slow transposing copies into the weight-gradient matmuls
    # (2x slower backward, measured).
    x_NxD = self.dropout(x_BxTxD.reshape(b * t, -1), deterministic=deterministic)
    for block in self.blocks:
      if self.remat != "none":
        x_NxD = _remat_block(block, x_NxD, t, deterministic, self.remat)
        continue
      x_NxD = block(x_NxD, seq_len=t, deterministic=deterministic)
    x_NxD = self.ln_f(x_NxD)
    if self.head is None:
      logits_NxV = _matmul(x_NxD, self.tok_emb.embedding[...].T, self.dtype)
    else:
      logits_NxV = self.head(x_NxD)
    return logits_NxV.reshape(b, t, -1)


def _remat_block(
  block: Block, x_NxD: jax.Array, seq_len: int, deterministic: bool | None, remat: str
) -> jax.Array:
  """``block(x_NxD)`` under ``nnx.remat`` with ``model.remat``'s policy."""
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
  run = nnx.remat(lambda b, x: b(x, seq_len=seq_len, deterministic=deterministic), policy=policy)
  return run(block, x_NxD)


def lm_loss(
  model: CharTransformer, batch: dict[str, jax.Array], *, train: bool
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy in nats, computed in float32.

  Args:
    model: the language model.
    batch: ``{"inputs": int32 [B, T], "targets": int32 [B, T]}``.
    train: dropout on (True) or off (False).

  Returns:
    ``(loss, {})``.

  """
  logits = model(batch["inputs"], deterministic=not train).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
  return loss, {}


@functools.partial(
  jax.jit, static_argnums=(0,), static_argnames=("num_tokens", "temperature", "top_k")
)
def _generate(graphdef, state, prompt_BxP, rng, *, num_tokens, temperature, top_k):
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  total = p + num_tokens
  window = min(model.max_len, total)
  buf = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt_BxP)

  def fill(i, carry):
    buf, key = carry
    # Predict token i from the last `window` tokens before it; while i < window
    # the window also holds unfilled slots after i - 1, which causal masking
    # hides from position i - 1.
    start = jnp.maximum(i - window, 0)
    ctx = lax.dynamic_slice(buf, (0, start), (b, window))
    logits = lax.dynamic_index_in_dim(
      model(ctx, deterministic=True), i - 1 - start, axis=1, keepdims=False
    )
    key, sub = jax.random.split(key)
    if temperature == 0:
      nxt = jnp.argmax(logits, axis=-1)
    else:
      logits = logits / temperature
      if top_k is not None:
        kth = lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
      nxt = jax.random.categorical(sub, logits, axis=-1)
    return lax.dynamic_update_slice(buf, nxt.astype(jnp.int32)[:, None], (0, i)), key

  return lax.fori_loop(p, total, fill, (buf, rng))[0]


def generate(
  model: CharTransformer,
  prompt_ids: Any,
  num_tokens: int,
  *,
  rng: jax.Array | int,
  temperature: float = 1.0,
  top_k: int | None = None,
) -> jax.Array:
  """Samples ``num_tokens`` tokens after a prompt (dropout off).

  The whole loop is one jitted ``fori_loop`` over a fixed-size buffer; each
  step runs the model on the last ``max_len`` tokens.

  Args:
    model: the language model (not modified).
    prompt_ids: int token ids, ``[P]`` or ``[B, P]``, ``P >= 1``.
    num_tokens: tokens to add.
    rng: a JAX PRNG key, or an int seed.
    temperature: logits are divided by it; 0 picks the most likely token.
    top_k: sample among the ``top_k`` most likely tokens only (None: all).

  Returns:
    int32 ids ``[P + num_tokens]`` (or ``[B, P + num_tokens]``): the prompt,
    then the samples.

  """
  prompt = jnp.asarray(prompt_ids, jnp.int32)
  if prompt.ndim not in (1, 2) or prompt.shape[-1] < 1:
    raise ValueError(f"prompt_ids must be [P] or [B, P] with P >= 1, got shape {prompt.shape}")
  if num_tokens < 0:
    raise ValueError(f"num_tokens={num_tokens} must be >= 0")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if top_k is not None and not 1 <= top_k <= model.vocab_size:
    raise ValueError(f"top_k={top_k} must be None or in [1, {model.vocab_size}]")
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  graphdef, state = nnx.split(model)
  out = _generate(
    graphdef,
    state,
    prompt.reshape(-1, prompt.shape[-1]),
    rng,
    num_tokens=int(num_tokens),
    temperature=float(temperature),
    top_k=top_k,
  )
  return out.reshape(*prompt.shape[:-1], -1)


# The model section's keys (beside name): a typo in one is a config error with a "did you mean".
CONFIG_FIELDS = (
  "num_layers",
  "num_heads",
  "embed_dim",
  "max_len",
  "dropout",
  "tie_embeddings",
  "dtype",
  "attention",  # attention kernel: "einsum" (default, the CPU path), "dot_product", "splash"
  "attention_dtype",  # attention matmuls' inputs: "float32" (default) or "bfloat16"
  "remat",  # per block: "none" (default, keep activations), "full", "dots" (keep matmuls)
)


@register_model("char_transformer", loss=lm_loss, config_fields=CONFIG_FIELDS)
def build(cfg: Any, *, rngs: nnx.Rngs, data_info: dict[str, Any]) -> CharTransformer:
  """Builds a :class:`CharTransformer` from ``config.model``.

  Args:
    cfg: the ``model`` section: ``num_layers``, ``num_heads``, ``embed_dim``,
      ``max_len``, ``dropout``, ``tie_embeddings``, ``dtype`` ("float32" or
      "bfloat16"); optional ``attention``, ``attention_dtype``, ``remat`` (see
      :class:`CharTransformer`; absent keys take the defaults).
    rngs: RNG streams for parameters (and dropout).
    data_info: the dataset's ``info``; ``vocab_size`` is read from it.

  Returns:
    The model, with float32 parameters.
  """
  if "vocab_size" not in data_info:
    raise KeyError(
      f"char_transformer needs data_info['vocab_size']; the dataset gave keys {sorted(data_info)}"
    )
  return CharTransformer(
    int(data_info["vocab_size"]),
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    embed_dim=cfg.embed_dim,
    max_len=cfg.max_len,
    dropout=cfg.dropout,
    tie_embeddings=cfg.tie_embeddings,
    dtype=cfg.dtype,
    attention=cfg.get("attention", "einsum"),
    attention_dtype=cfg.get("attention_dtype", "float32"),
    remat=cfg.get("remat", "none"),
    rngs=rngs,
  )
