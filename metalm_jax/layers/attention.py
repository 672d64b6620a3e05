"""Scaled dot-product attention (reference + fast paths) and a multi-head attention layer.

Axis letters used in einsum strings and docstrings:
  B batch, T query length, S key/value length, D d_model,
  N query heads, K key/value heads, G = N // K query heads per kv head, H head_dim.

`dot_product_attention` has a slow, obvious float32 'reference' implementation, fast
paths through `jax.nn.dot_product_attention` ('xla', 'cudnn'), and 'blockwise': an
online-softmax loop over key blocks that never materialises the T x S logits (for long
contexts); tests hold them all equal. Fully masked query rows give zeros (never NaN) in
every implementation.

A mask is a bool array broadcastable to [B, N|1, T, S], or a *mask function*
`mask_fn(q_index [t] int32, kv_index [s] int32) -> bool [B|1, N|1, t, s]` (see
`causal_segment_mask_fn`): 'blockwise' calls it per block, so even the L x L boolean mask of
a 32k-token sequence never exists; the other implementations materialise it first.

`MultiHeadAttention` does self-attention, cross-attention (separate key/value input) and
KV-cache decoding. The cache is an explicit pytree {'k': [B, S, K, H], 'v': [B, S, K, H]}
passed in and returned, so decoding stays a pure, jittable function.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

IMPLEMENTATIONS = ('reference', 'xla', 'cudnn', 'blockwise')
BLOCK_SIZE = 512  # default query / key block of 'blockwise'

# rotary(x [B, T, heads, H], positions [B, T]) -> x rotated, e.g. embeddings.rope.
RotaryFn = Callable[[jax.Array, jax.Array], jax.Array]
KVCache = dict[str, jax.Array]
# mask_fn(q_index [t], kv_index [s]) -> bool [B|1, N|1, t, s]; indices into the q / kv arrays.
MaskFn = Callable[[jax.Array, jax.Array], jax.Array]
Mask = jax.Array | MaskFn


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
  if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
    raise ValueError(
        f'num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}: '
        'grouped-query attention needs num_kv_heads to divide num_heads '
        '(num_kv_heads=num_heads is multi-head, num_kv_heads=1 multi-query attention).')


def _full_mask(mask: jax.Array, batch: int, q_len: int, kv_len: int) -> jax.Array:
  """Broadcasts a bool mask [B|1, N|1, T, S] (or [T, S]) to [B, N|1, T, S]."""
  mask = jnp.asarray(mask, dtype=bool)
  while mask.ndim < 4:
    mask = mask[None]
  return jnp.broadcast_to(mask, (batch, mask.shape[1], q_len, kv_len))


def causal_segment_mask_fn(segment_ids: jax.Array | None = None, *, causal: bool = True,
                           offset=0) -> MaskFn:
  """A lazy causal (and same-segment) mask: the mask-function twin of
  `combine_masks(causal_mask(T, offset=offset), segment_mask(segment_ids))`.

  Args:
    segment_ids: optional int [B, L] packed-document ids of the sequence (0 = padding),
      indexed by both query and key indices (self-attention).
    causal: False keeps only the segment part.
    offset: absolute slot of query 0 (a KV-cache step); may be traced.
  """
  def mask_fn(q_index, kv_index):
    mask = jnp.ones((1, 1, q_index.shape[0], kv_index.shape[0]), bool)
    if causal:
      mask = mask & (kv_index[None, :] <= offset + q_index[:, None])[None, None]
    if segment_ids is not None:
      q_seg = jnp.take(segment_ids, q_index, axis=1)[:, None, :, None]
      kv_seg = jnp.take(segment_ids, kv_index, axis=1)[:, None, None, :]
      mask = mask & (q_seg == kv_seg) & (q_seg != 0)
    return mask
  return mask_fn


def materialize_mask(mask: Mask | None, q_len: int, kv_len: int) -> jax.Array | None:
  """A mask function evaluated on every (query, key) pair -> bool [B|1, N|1, T, S]; arrays and
  None pass through."""
  if mask is None or not callable(mask):
    return mask
  return mask(jnp.arange(q_len), jnp.arange(kv_len))


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        mask: Mask | None = None) -> jax.Array:
  """Slow, obvious attention: einsum + float32 softmax.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, N % K == 0.
    v: [B, S, K, H] values.
    mask: bool [B, N|1, T, S] (broadcastable) or a mask function, True = may attend;
      None = attend everywhere.

  Returns:
    [B, T, N, H] in q's dtype; rows whose mask is all False are zero.
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  mask = materialize_mask(mask, q_len, kv_len)
  groups = num_heads // num_kv_heads
  qg = q.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, groups, head_dim)
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', qg, k.astype(jnp.float32)) / jnp.sqrt(head_dim)
  if mask is not None:
    mask = _full_mask(mask, batch, q_len, kv_len)
    mask = mask.reshape(batch, num_kv_heads if mask.shape[1] > 1 else 1, -1, q_len, kv_len)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    probs = jnp.where(mask, probs, 0.0)
  out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v.astype(jnp.float32))
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


_NEG = -1e30  # masked logit: finite, so exp() differences never produce inf - inf


def _mask_blocks(mask: Mask | None, q_len: int, kv_len: int, padded_q: int,
                 padded_kv: int) -> Callable[[jax.Array, jax.Array, int, int], jax.Array]:
  """block(q_start, kv_start, bq, bk) -> bool [B|1, N|1, bq, bk], padding keys masked out."""
  if mask is not None and not callable(mask):
    mask = jnp.asarray(mask, bool)
    while mask.ndim < 4:
      mask = mask[None]
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, padded_q - q_len), (0, padded_kv - kv_len)))

  def block(q_start, kv_start, bq, bk):
    kv_index = kv_start + jnp.arange(bk)
    valid = (kv_index < kv_len)[None, None, None, :]
    if mask is None:
      return jnp.broadcast_to(valid, (1, 1, bq, bk))
    if callable(mask):
      q_index = jnp.minimum(q_start + jnp.arange(bq), q_len - 1)
      return mask(q_index, jnp.minimum(kv_index, kv_len - 1)) & valid
    return jax.lax.dynamic_slice(mask, (0, 0, q_start, kv_start), mask.shape[:2] + (bq, bk))
  return block


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask | None = None,
                        *, block_q: int = BLOCK_SIZE, block_k: int = BLOCK_SIZE) -> jax.Array:
  """Memory-efficient attention: online softmax over key blocks (Rabe & Staats 2021; the
  recurrence FlashAttention tiles), equal to `reference_attention` up to float rounding.

  `lax.map` over query blocks of `block_q`, each a `lax.scan` over key blocks of `block_k`
  carrying the running max m, normaliser l and unnormalised output acc [B, K, G, bq, (H)];
  a key block whose mask is all False is skipped (`lax.cond`), so causal attention does about
  half the work. Peak memory is O(block_q * block_k) logits per step instead of T x S; the
  backward recomputes each query block (`jax.checkpoint`), so it stores no T x S either.

  Args / returns: as `reference_attention` (mask: bool array or mask function).
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  bq, bk = min(block_q, q_len), min(block_k, kv_len)
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  block_mask = _mask_blocks(mask, q_len, kv_len, nq * bq, nk * bk)
  f32 = jnp.float32
  qb = jnp.pad(q.astype(f32) / jnp.sqrt(head_dim).astype(f32),
               ((0, 0), (0, nq * bq - q_len), (0, 0), (0, 0)))
  qb = qb.reshape(batch, nq, bq, num_kv_heads, groups, head_dim).swapaxes(0, 1)
  pad_kv = lambda x: jnp.pad(x.astype(f32), ((0, 0), (0, nk * bk - kv_len), (0, 0), (0, 0)))
  kb = pad_kv(k).reshape(batch, nk, bk, num_kv_heads, head_dim).swapaxes(0, 1)
  vb = pad_kv(v).reshape(batch, nk, bk, num_kv_heads, head_dim).swapaxes(0, 1)

  def heads(m):  # [B|1, N|1, bq, bk] -> [B|1, K|1, G|1, bq, bk]
    if m.shape[1] == 1:
      return m[:, :, None]
    return m.reshape(m.shape[0], num_kv_heads, groups, bq, bk)

  def query_block(args):
    q_i, i = args  # [B, bq, K, G, H]

    def kv_step(carry, inputs):
      k_j, v_j, j = inputs
      allowed = heads(block_mask(i * bq, j * bk, bq, bk))

      def update(carry):
        m, l, acc = carry
        s = jnp.einsum('BTKGH,BSKH->BKGTS', q_i, k_j)
        s = jnp.where(allowed, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum('BKGTS,BSKH->BKGTH', p, v_j)
        return m_new, l, acc

      return jax.lax.cond(jnp.any(allowed), update, lambda c: c, carry), None

    shape = (batch, num_kv_heads, groups, bq)
    init = (jnp.full(shape, _NEG, f32), jnp.zeros(shape, f32), jnp.zeros(shape + (head_dim,), f32))
    (_, l, acc), _ = jax.lax.scan(kv_step, init, (kb, vb, jnp.arange(nk)))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows with no allowed key: acc = 0
    return out.transpose(0, 3, 1, 2, 4)  # [B, bq, K, G, H]

  out = jax.lax.map(jax.checkpoint(query_block), (qb, jnp.arange(nq)))  # [nq, B, bq, K, G, H]
  out = out.swapaxes(0, 1).reshape(batch, nq * bq, num_heads, head_dim)[:, :q_len]
  return out.astype(q.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: Mask | None = None, *,
                          implementation: str = 'reference',
                          block_size: int = BLOCK_SIZE) -> jax.Array:
  """Scaled dot-product attention with grouped-query heads.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys; N % K == 0 (K = N: multi-head, K = 1: multi-query).
    v: [B, S, K, H] values.
    mask: bool, broadcastable to [B, N|1, T, S], or a mask function; True = may attend.
      None = no masking.
    implementation: 'reference' (einsum + float32 softmax), 'xla' or 'cudnn'
      (`jax.nn.dot_product_attention`; 'cudnn' needs a GPU and bf16/fp16 inputs), or
      'blockwise' (online softmax over blocks of `block_size`; no T x S array).
    block_size: query and key block length of 'blockwise'.

  Returns:
    [B, T, N, H]. Query rows with no allowed key are zero.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r} is not one of {IMPLEMENTATIONS}.')
  _check_heads(q.shape[2], k.shape[2])
  if implementation == 'reference':
    return reference_attention(q, k, v, mask)
  if implementation == 'blockwise':
    return blockwise_attention(q, k, v, mask, block_q=block_size, block_k=block_size)
  if implementation == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError(
        f"implementation='cudnn' needs a GPU but the default backend is "
        f"{jax.default_backend()!r}; use implementation='xla' or 'reference'.")
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  mask = _full_mask(materialize_mask(mask, q.shape[1], k.shape[1]), q.shape[0], q.shape[1], k.shape[1])
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  # jax fills fully masked rows with a uniform average over values; make them zero.
  any_key = jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None]  # [B, T, N|1, 1]
  return jnp.where(any_key, out, jnp.zeros_like(out))


def _kernel_init(in_axis, out_axis):
  return nnx.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                           in_axis=in_axis, out_axis=out_axis)


class MultiHeadAttention(nnx.Module):
  """Multi-head / grouped-query / multi-query attention with q, k, v, o projections.

  Parameters (logical axis names):
    query.kernel [D, N, H] ('embed', 'heads', 'head_dim')
    key.kernel, value.kernel [D, K, H] ('embed', 'kv_heads', 'head_dim')
    out.kernel [N, H, D] ('heads', 'head_dim', 'embed')
    biases (use_bias=True): the kernels' output axes; `out_bias` overrides use_bias for
      the output projection alone (Qwen2: q / k / v biases, none on the output).

  Building blocks (`queries`, `keys_values`, `attend`) are public so that composite
  layers (e.g. cross-attention over cached encoder keys) can reuse them.

  Long contexts: with `blockwise_threshold` set, the 'reference' implementation switches to
  'blockwise' (blocks of `block_size`) whenever the key length exceeds the threshold.
  """

  def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, use_bias: bool = False,
               out_bias: bool | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs,
               implementation: str = 'reference', blockwise_threshold: int | None = None,
               block_size: int = BLOCK_SIZE):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _check_heads(num_heads, num_kv_heads)
    if head_dim is None:
      if d_model % num_heads != 0:
        raise ValueError(
            f'd_model={d_model} is not divisible by num_heads={num_heads}: '
            'pass head_dim explicitly or pick num_heads dividing d_model.')
      head_dim = d_model // num_heads
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f'implementation={implementation!r} is not one of {IMPLEMENTATIONS}.')
    self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
    if blockwise_threshold is not None and blockwise_threshold < 0:
      raise ValueError(f'blockwise_threshold={blockwise_threshold} must be >= 0 or None (off).')
    if block_size < 1:
      raise ValueError(f'block_size={block_size} must be >= 1.')
    self.head_dim, self.implementation, self.dtype = head_dim, implementation, dtype
    self.blockwise_threshold, self.block_size = blockwise_threshold, block_size

    out_bias = use_bias if out_bias is None else out_bias

    def proj(einsum_str, shape, names, in_axis, out_axis, use_bias=use_bias):
      bias_names = tuple(names[a] for a in range(len(names)) if a not in in_axis)
      return nnx.Einsum(
          einsum_str, shape,
          tuple(shape[a] for a in range(len(shape)) if a not in in_axis) if use_bias else None,
          kernel_init=nnx.with_partitioning(_kernel_init(in_axis, out_axis), names),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), bias_names),
          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.query = proj('BTD,DNH->BTNH', (d_model, num_heads, head_dim),
                      ('embed', 'heads', 'head_dim'), (0,), (1, 2))
    self.key = proj('BSD,DKH->BSKH', (d_model, num_kv_heads, head_dim),
                    ('embed', 'kv_heads', 'head_dim'), (0,), (1, 2))
    self.value = proj('BSD,DKH->BSKH', (d_model, num_kv_heads, head_dim),
                      ('embed', 'kv_heads', 'head_dim'), (0,), (1, 2))
    self.out = proj('BTNH,NHD->BTD', (num_heads, head_dim, d_model),
                    ('heads', 'head_dim', 'embed'), (0, 1), (2,), use_bias=out_bias)

  def queries(self, x: jax.Array, positions: jax.Array | None = None,
              rotary: RotaryFn | None = None) -> jax.Array:
    """[B, T, D] -> queries [B, T, N, H], rotated by `rotary(q, positions)` if given."""
    q = self.query(x)
    return q if rotary is None else rotary(q, _default_positions(x, positions))

  def keys_values(self, x: jax.Array, positions: jax.Array | None = None,
                  rotary: RotaryFn | None = None) -> tuple[jax.Array, jax.Array]:
    """[B, S, D] -> keys, values [B, S, K, H]; keys rotated by `rotary` if given."""
    k, v = self.key(x), self.value(x)
    return (k if rotary is None else rotary(k, _default_positions(x, positions))), v

  def implementation_for(self, kv_len: int) -> str:
    """The implementation used for a key length: 'blockwise' past `blockwise_threshold`."""
    if (self.implementation == 'reference' and self.blockwise_threshold is not None
        and kv_len > self.blockwise_threshold):
      return 'blockwise'
    return self.implementation

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array,
             mask: Mask | None = None) -> jax.Array:
    """Attention of q [B, T, N, H] over k, v [B, S, K, H] + output projection -> [B, T, D]."""
    out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                                implementation=self.implementation_for(k.shape[1]),
                                block_size=self.block_size)
    return self.out(out)

  def __call__(self, x: jax.Array, *, context: jax.Array | None = None,
               mask: Mask | None = None, positions: jax.Array | None = None,
               context_positions: jax.Array | None = None,
               rotary: RotaryFn | None = None) -> jax.Array:
    """Self-attention (context=None) or cross-attention over `context`.

    Args:
      x: [B, T, D] query input.
      context: [B, S, D] key/value input; None means x (self-attention).
      mask: bool [B|1, N|1, T, S], True = may attend.
      positions: int [B, T] positions of x for `rotary` (default arange).
      context_positions: int [B, S] positions of context (default: `positions` for
        self-attention, arange for cross-attention).
      rotary: optional rotary function applied to q and k, e.g. `embeddings.rope`.

    Returns:
      [B, T, D].
    """
    if context is None:
      context, context_positions = x, positions
    q = self.queries(x, positions, rotary)
    k, v = self.keys_values(context, context_positions, rotary)
    return self.attend(q, k, v, mask)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Empty KV cache {'k', 'v'}: zeros [batch_size, max_len, K, H]."""
    shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}

  def decode(self, x: jax.Array, cache: KVCache, *, index: jax.Array,
             mask: Mask | None = None, positions: jax.Array | None = None,
             rotary: RotaryFn | None = None) -> tuple[jax.Array, KVCache]:
    """Self-attention of T new tokens written into the cache at slot `index`.

    Args:
      x: [B, T, D] new tokens (T > 1 for a prefill, 1 for a decoding step).
      cache: {'k', 'v'} [B, S_max, K, H] from `init_cache` or a previous call.
      index: int32 scalar, first free cache slot (may be traced).
      mask: bool [B|1, N|1, T, S_max] over cache slots; typically
        `causal_mask(T, kv_length=S_max, offset=index)` (slots never written stay masked).
      positions: int [B, T] positions for `rotary` (default index + arange(T)).
      rotary: optional rotary function applied to q and k.

    Returns:
      (out [B, T, D], new cache).
    """
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(x.shape[1]), x.shape[:2])
    q = self.queries(x, positions, rotary)
    k, v = self.keys_values(x, positions, rotary)
    start = (0, index, 0, 0)
    new_cache = {
        'k': jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), start),
        'v': jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), start),
    }
    return self.attend(q, new_cache['k'], new_cache['v'], mask), new_cache


def _default_positions(x: jax.Array, positions: jax.Array | None) -> jax.Array:
  """positions, or arange(length) broadcast to [B, length]."""
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
