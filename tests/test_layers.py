"""Tests for metalm_jax.layers: masks, attention, MLP, norms, embeddings (tiny, prime dims)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax.layers import (
    Embed, LayerNorm, LearnedPositions, Mlp, MultiHeadAttention, RMSNorm, causal_mask,
    combine_masks, dot_product_attention, padding_mask, reference_attention, rope,
    segment_mask, sinusoidal_positions)

B, T, S, H = 2, 5, 7, 3


def assert_all_params_annotated(module):
  """Every leaf of nnx.get_partition_spec has one logical name per array axis."""
  state = nnx.state(module)
  specs = nnx.get_partition_spec(state)
  leaves = jax.tree.leaves(state)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(leaves) == len(spec_leaves) > 0
  for value, spec in zip(leaves, spec_leaves):
    assert isinstance(spec, jax.sharding.PartitionSpec)
    assert len(spec) == value.ndim, (spec, value.shape)
    assert all(isinstance(name, str) for name in spec), spec


def normal(*shape, seed=0):
  """Test inputs from numpy (no jax compilation)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def qkv(num_heads, num_kv_heads):
  return (normal(B, T, num_heads, H, seed=1), normal(B, S, num_kv_heads, H, seed=2),
          normal(B, S, num_kv_heads, H, seed=3))


# ---------------------------------------------------------------------------- masks


def test_causal_mask_is_lower_triangular_and_offsets():
  np.testing.assert_array_equal(causal_mask(T)[0, 0], np.tril(np.ones((T, T), bool)))
  m = causal_mask(2, kv_length=S, offset=3)[0, 0]
  np.testing.assert_array_equal(m, np.arange(S)[None, :] <= 3 + np.arange(2)[:, None])
  assert causal_mask(T).shape == (1, 1, T, T)


def test_segment_mask_blocks_other_documents_and_padding():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  m = np.asarray(segment_mask(seg)[0, 0])
  expected = np.array([[1, 1, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(m, expected)
  cross = segment_mask(seg, jnp.array([[2, 1, 0]]))
  assert cross.shape == (1, 1, 5, 3)


def test_padding_and_combine_masks():
  valid = jnp.array([[True, True, False]])
  m = padding_mask(valid)
  np.testing.assert_array_equal(m[0, 0], np.outer([1, 1, 0], [1, 1, 0]).astype(bool))
  assert combine_masks(None, None) is None
  both = combine_masks(None, causal_mask(3), m)
  np.testing.assert_array_equal(both[0, 0], np.tril(np.outer([1, 1, 0], [1, 1, 0])).astype(bool))


# ------------------------------------------------------------------------- attention


@jax.jit
def reference_and_xla(q, k, v, mask, head_mask):
  """(reference, xla) outputs for a shared mask, per-head masks and no mask."""
  pairs = []
  for m in (mask, head_mask, None):
    pairs.append((dot_product_attention(q, k, v, m, implementation='reference'),
                  dot_product_attention(q, k, v, m, implementation='xla')))
  return pairs


@pytest.mark.parametrize('num_heads,num_kv_heads', [(6, 6), (6, 2), (6, 1)])
def test_reference_equals_xla_with_fully_masked_rows(num_heads, num_kv_heads):
  q, k, v = qkv(num_heads, num_kv_heads)
  rng = np.random.default_rng(0)
  mask = rng.random((B, 1, T, S)) < 0.6
  mask[0, 0, 2] = False  # a fully masked query row
  head_mask = rng.random((B, num_heads, T, S)) < 0.7
  head_mask[1, 3, 4] = False
  pairs = reference_and_xla(q, k, v, mask, head_mask)
  for ref, xla in pairs:
    assert ref.shape == (B, T, num_heads, H)
    assert np.isfinite(np.asarray(ref)).all() and np.isfinite(np.asarray(xla)).all()
    np.testing.assert_allclose(ref, xla, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(pairs[0][0][0, 2], 0.0)
  np.testing.assert_array_equal(pairs[1][1][1, 4, 3], 0.0)


def test_reference_attention_matches_numpy_softmax():
  q, k, v = qkv(6, 2)
  mask = causal_mask(T, kv_length=S, offset=2)
  out = reference_attention(q, k, v, mask)
  q, k, v, m = map(np.asarray, (q, k, v, mask[0, 0]))
  k, v = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(H)
  logits = np.where(m, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum('bhts,bshd->bthd', probs, v), atol=1e-5)


D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 11, 6, 2, 4


@pytest.fixture(scope='module')
def gqa_layer():
  return MultiHeadAttention(D_MODEL, HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                            use_bias=True, rngs=nnx.Rngs(0))


def test_gqa_layer_equals_mha_layer_with_repeated_kv_heads(gqa_layer):
  """An MHA layer whose k/v kernels repeat the GQA ones computes the same function."""
  repeat = HEADS // KV_HEADS
  mha_layer = MultiHeadAttention(D_MODEL, HEADS, head_dim=HEAD_DIM, use_bias=True,
                                 rngs=nnx.Rngs(1))
  for name in ('query', 'out'):
    for p in ('kernel', 'bias'):
      getattr(getattr(mha_layer, name), p)[...] = getattr(getattr(gqa_layer, name), p)[...]
  for name in ('key', 'value'):
    src, dst = getattr(gqa_layer, name), getattr(mha_layer, name)
    dst.kernel[...] = jnp.repeat(src.kernel[...], repeat, axis=1)
    dst.bias[...] = jnp.repeat(src.bias[...], repeat, axis=0)
  causal = nnx.jit(lambda layer, x: layer(x, mask=causal_mask(T), rotary=rope))
  x = normal(B, T, D_MODEL, seed=3)
  np.testing.assert_allclose(causal(gqa_layer, x), causal(mha_layer, x), atol=1e-5)


def test_cudnn_needs_gpu_and_unknown_implementation():
  q, k, v = qkv(2, 2)
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match='cudnn.*GPU'):
      dot_product_attention(q, k, v, implementation='cudnn')
  with pytest.raises(ValueError, match='flash'):
    dot_product_attention(q, k, v, implementation='flash')


def test_attention_validates_heads():
  with pytest.raises(ValueError, match=r'num_heads=6.*num_kv_heads=4'):
    MultiHeadAttention(12, 6, num_kv_heads=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'd_model=10.*num_heads=4'):
    MultiHeadAttention(10, 4, rngs=nnx.Rngs(0))


def test_cross_attention_and_partition_specs(gqa_layer):
  assert_all_params_annotated(gqa_layer)
  specs = nnx.get_partition_spec(nnx.state(gqa_layer))
  assert specs['key']['kernel'].get_value() == jax.sharding.PartitionSpec(
      'embed', 'kv_heads', 'head_dim')
  assert specs['out']['kernel'].get_value() == jax.sharding.PartitionSpec(
      'heads', 'head_dim', 'embed')
  x = normal(B, T, D_MODEL, seed=0)
  context = normal(B, S, D_MODEL, seed=1)
  # A query row that may attend nowhere gets just the output bias, not NaN.
  mask = np.ones((B, 1, T, S), bool)
  mask[:, :, 0] = False
  out = gqa_layer(x, context=context, mask=mask)
  assert out.shape == (B, T, D_MODEL)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out[:, 0], jnp.broadcast_to(gqa_layer.out.bias[...], (B, D_MODEL)))


@nnx.jit
def parallel_and_cached(layer, x):
  """Causal self-attention of x [B, T, D] in parallel, and as prefill(3) + 1-token steps."""
  full = layer(x, mask=causal_mask(T), rotary=rope)
  cache = layer.init_cache(B, S)
  outs = []
  for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, T)]:
    mask = causal_mask(stop - start, kv_length=S, offset=start)
    out, cache = layer.decode(x[:, start:stop], cache, index=start, mask=mask, rotary=rope)
    outs.append(out)
  return full, jnp.concatenate(outs, axis=1)


def test_attention_decode_matches_parallel(gqa_layer):
  full, cached = parallel_and_cached(gqa_layer, normal(B, T, D_MODEL, seed=0))
  np.testing.assert_allclose(cached, full, atol=1e-5)


# ---------------------------------------------------------------- mlp, norms, embeddings


@pytest.mark.parametrize('activation', ['gelu', 'swiglu'])
def test_mlp_shapes_and_annotations(activation):
  mlp = Mlp(11, 13, activation=activation, use_bias=True, rngs=nnx.Rngs(0))
  assert_all_params_annotated(mlp)
  assert mlp(jnp.ones((B, T, 11))).shape == (B, T, 11)
  with pytest.raises(ValueError, match='relu'):
    Mlp(11, 13, activation='relu', rngs=nnx.Rngs(0))


def test_norms_float32_statistics():
  x = (normal(B, T, 11, seed=0) * 5 + 3).astype(jnp.bfloat16)
  rms = RMSNorm(11, dtype=jnp.bfloat16)
  ln = LayerNorm(11)
  assert_all_params_annotated(rms)
  assert_all_params_annotated(ln)
  y = rms(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(jnp.mean(y.astype(jnp.float32) ** 2, -1), 1.0, atol=2e-2)
  z = ln(x)
  assert z.dtype == jnp.float32
  np.testing.assert_allclose(jnp.mean(z, -1), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.var(z, -1), 1.0, atol=1e-3)


def test_rope_preserves_norm_and_is_relative():
  x = normal(1, 1, 2, 6, seed=0)
  q, k = x[:, :, :1], x[:, :, 1:]
  np.testing.assert_allclose(jnp.linalg.norm(rope(x, jnp.array([[7]])), axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  def score(m, n):
    return jnp.sum(rope(q, jnp.array([[m]])) * rope(k, jnp.array([[n]])))
  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-4)
  np.testing.assert_allclose(rope(x, jnp.zeros((1, 1), jnp.int32)), x)
  with pytest.raises(ValueError, match='even head_dim'):
    rope(jnp.ones((1, 1, 1, 5)), jnp.zeros((1, 1)))


def test_sinusoidal_positions():
  table = sinusoidal_positions(jnp.arange(T)[None], 6)
  assert table.shape == (1, T, 6)
  np.testing.assert_allclose(table[0, 0], [0, 0, 0, 1, 1, 1])
  np.testing.assert_allclose(table[0, 3, 0], np.sin(3.0), rtol=1e-6)


def test_embed_attend_and_learned_positions():
  embed = Embed(37, 11, rngs=nnx.Rngs(0))
  positions = LearnedPositions(13, 11, rngs=nnx.Rngs(0))
  assert_all_params_annotated(embed)
  assert_all_params_annotated(positions)
  tokens = jnp.array([[3, 36, 0]])
  np.testing.assert_allclose(embed(tokens)[0, 1], embed.embedding[...][36])
  x = normal(1, 3, 11, seed=1)
  np.testing.assert_allclose(embed.attend(x), x @ embed.embedding[...].T, atol=1e-5)
  assert positions(jnp.array([[0, 12]])).shape == (1, 2, 11)
  assert nnx.get_partition_spec(nnx.state(positions))['embedding'].get_value() == (
      jax.sharding.PartitionSpec('length', 'embed'))
