"""Boolean attention masks, as small pure functions.

Every mask has shape [batch | 1, 1, q_len, kv_len] and dtype bool; True means "query
position may attend to key position". Masks broadcast against each other and against
attention logits [batch, heads, q_len, kv_len], so they combine with a logical AND
(`combine_masks`). Any user mask of that shape (semi-causal, prefix-LM, permutation-LM,
...) can be handed to `dot_product_attention` directly.

A row with no True entry (e.g. a padding query) is legal: attention outputs zeros there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(length: int, *, kv_length: int | None = None, offset=0) -> jax.Array:
  """Lower-triangular mask [1, 1, length, kv_length].

  Query i sits at absolute slot `offset + i` and may attend to key slots <= that slot.
  With the defaults (kv_length=length, offset=0) this is the usual causal mask; a KV cache
  decode step of `length` new tokens written at slot `offset` uses kv_length=cache length.

  Args:
    length: number of queries.
    kv_length: number of keys (defaults to `length`).
    offset: absolute slot of the first query; may be a traced int32 scalar.
  """
  kv_length = length if kv_length is None else kv_length
  q_slots = offset + jnp.arange(length)[:, None]
  kv_slots = jnp.arange(kv_length)[None, :]
  return (kv_slots <= q_slots)[None, None]


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """Same-segment mask [batch, 1, q_len, kv_len] for packed sequences.

  Args:
    q_segment_ids: int [batch, q_len]; 0 marks padding, 1, 2, ... the packed documents.
    kv_segment_ids: int [batch, kv_len]; defaults to `q_segment_ids` (self-attention).

  Returns:
    True where both positions belong to the same non-padding segment, so documents never
    see each other and padding (segment 0) attends nowhere and is attended by no one.
  """
  kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
  q = q_segment_ids[:, None, :, None]
  kv = kv_segment_ids[:, None, None, :]
  return (q == kv) & (q != 0)


def padding_mask(q_valid: jax.Array, kv_valid: jax.Array | None = None) -> jax.Array:
  """Mask [batch, 1, q_len, kv_len] that is True where both query and key are real tokens.

  Args:
    q_valid: bool [batch, q_len], True for real (non-padding) query tokens.
    kv_valid: bool [batch, kv_len]; defaults to `q_valid` (self-attention).
  """
  kv_valid = q_valid if kv_valid is None else kv_valid
  return q_valid[:, None, :, None].astype(bool) & kv_valid[:, None, None, :].astype(bool)


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of the given masks (broadcasting); None entries are skipped.

  Returns None when every mask is None (meaning "attend everywhere").
  """
  present = [m for m in masks if m is not None]
  if not present:
    return None
  combined = present[0].astype(bool)
  for m in present[1:]:
    combined = combined & m.astype(bool)
  return combined
