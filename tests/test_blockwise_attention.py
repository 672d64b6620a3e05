"""Blockwise (online-softmax) attention equals the reference, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax.layers import attention as attn_lib
from metalm_jax.layers.masks import causal_mask, combine_masks, segment_mask

B, N, K, H = 2, 6, 3, 5


def _qkv(q_len, kv_len, seed=0, kv_heads=K):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return f(B, q_len, N, H), f(B, kv_len, kv_heads, H), f(B, kv_len, kv_heads, H)


def _segments(length):
  """Two documents then padding in row 0 (fully masked rows), one document in row 1."""
  a = max(1, length // 3)
  row0 = [1] * a + [2] * max(0, length - a - 2) + [0] * min(2, length - a)
  return jnp.asarray([row0[:length], [1] * length])


@pytest.mark.parametrize("length,block", [(1, 4), (7, 3), (13, 4), (17, 64)])
def test_causal_segment_values_and_grads_equal_reference(length, block):
  q, k, v = _qkv(length, length)
  seg = _segments(length)
  mask = combine_masks(causal_mask(length), segment_mask(seg))
  fns = {
      "reference": lambda q, k, v: attn_lib.reference_attention(q, k, v, mask),
      "blockwise": lambda q, k, v: attn_lib.blockwise_attention(q, k, v, mask, block_q=block,
                                                                block_k=block),
      "lazy mask": lambda q, k, v: attn_lib.blockwise_attention(
          q, k, v, attn_lib.causal_segment_mask_fn(seg), block_q=block,
          block_k=max(1, block - 1)),
  }

  @jax.jit  # one compilation for all three values and gradients
  def values_and_grads(q, k, v):
    return {name: jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(
        q, k, v) + (fn(q, k, v),) for name, fn in fns.items()}

  results = values_and_grads(q, k, v)
  want = results.pop("reference")
  for name, got in results.items():
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-6, err_msg=name)
    for g, w in zip(got[1], want[1]):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_any_per_head_mask_with_fully_masked_rows_is_zero_there():
  q, k, v = _qkv(11, 7, seed=1)
  mask = jnp.asarray(np.random.default_rng(2).random((B, N, 11, 7)) < 0.4)
  mask = mask.at[0, :, 3].set(False).at[1, 2, 5].set(False)
  got = attn_lib.dot_product_attention(q, k, v, mask, implementation="blockwise", block_size=3)
  np.testing.assert_allclose(got, attn_lib.reference_attention(q, k, v, mask),
                             rtol=1e-5, atol=1e-6)
  assert not np.any(np.isnan(got))
  np.testing.assert_array_equal(got[0, 3], 0.0)
  np.testing.assert_array_equal(got[1, 5, 2], 0.0)


@pytest.mark.parametrize("kv_heads", [1, K])
def test_decode_shapes_unmasked_and_offset_causal(kv_heads):
  """T=1 query over 13 cache slots (multi-query and grouped), and no mask at all."""
  q, k, v = _qkv(1, 13, seed=3, kv_heads=kv_heads)
  mask = causal_mask(1, kv_length=13, offset=8)
  lazy = attn_lib.causal_segment_mask_fn(offset=8)
  want = attn_lib.reference_attention(q, k, v, mask)
  for m in (mask, lazy):
    got = attn_lib.blockwise_attention(q, k, v, m, block_q=4, block_k=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(attn_lib.blockwise_attention(q, k, v, None, block_k=5),
                             attn_lib.reference_attention(q, k, v, None), rtol=1e-5, atol=1e-6)


def test_multi_head_attention_switches_to_blockwise_past_threshold():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((B, 13, 14)), jnp.float32)
  plain = attn_lib.MultiHeadAttention(14, 2, rngs=nnx.Rngs(0))
  switched = attn_lib.MultiHeadAttention(14, 2, rngs=nnx.Rngs(0), blockwise_threshold=8,
                                         block_size=4)
  assert switched.implementation_for(8) == "reference"
  assert switched.implementation_for(9) == "blockwise"
  assert plain.implementation_for(10 ** 6) == "reference"
  mask = causal_mask(13)
  np.testing.assert_allclose(switched(x, mask=mask), plain(x, mask=mask), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(switched(x, mask=attn_lib.causal_segment_mask_fn()),
                             plain(x, mask=mask), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="blockwise_threshold"):
    attn_lib.MultiHeadAttention(14, 2, rngs=nnx.Rngs(0), blockwise_threshold=-1)


def test_materialize_mask_matches_mask_helpers():
  seg = _segments(9)
  want = combine_masks(causal_mask(9), segment_mask(seg))
  np.testing.assert_array_equal(attn_lib.materialize_mask(attn_lib.causal_segment_mask_fn(seg),
                                                          9, 9), want)
