"""Tests for metalm_jax.models.decoder: masks, positions, KV cache, dropout, registry."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax.layers import causal_mask
from metalm_jax.models import MODELS, Decoder, build_model, flops_per_token, param_count

VOCAB, D, L = 37, 16, 11
BASE = dict(vocab_size=VOCAB, d_model=D, num_layers=2, num_heads=4, d_ff=24, max_len=17)
CONFIGS = {
    'rope_mha': dict(position='rope'),
    'rope_gqa': dict(position='rope', num_kv_heads=2),
    'learned_mqa': dict(position='learned', num_kv_heads=1, mlp_activation='gelu',
                        norm='layernorm', tie_embeddings=True),
    'learned_mha': dict(position='learned', dropout_rate=0.3),
    'sinusoidal_gqa': dict(position='sinusoidal', num_kv_heads=2, attention_impl='xla'),
    # Hugging Face checkpoint layouts (models.hf.decoders): Qwen2-like, GPT-2-like.
    'rope_qkv_bias_tied': dict(position='rope', num_kv_heads=2, attention_bias='qkv',
                               rope_theta=1e6, norm_epsilon=1e-5, tie_embeddings=True,
                               scale_tied_logits=False),
    'learned_all_bias': dict(position='learned', mlp_activation='gelu', norm='layernorm',
                             attention_bias='all', mlp_bias=True),
}


@pytest.fixture(scope='module')
def models():
  return {name: Decoder(**BASE, **cfg, rngs=nnx.Rngs(i)) for i, (name, cfg) in
          enumerate(CONFIGS.items())}


@pytest.fixture(scope='module')
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, L)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, tokens, positions=None, segment_ids=None, attention_mask=None):
  logits, _ = nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids,
                                         attention_mask=attention_mask)
  return logits


def logits_of(model, tokens, **kwargs):
  return forward(*nnx.split(model), tokens, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def cached_logits(graphdef, state, tokens):
  """Prefill of 5 tokens, then a scan of 1-token decode steps -> ([B, L, V], index)."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(tokens.shape[0], 13)
  prefill, cache = model.decode(tokens[:, :5], cache)

  def step(cache, token):
    logits, cache = model.decode(token[:, None], cache)
    return cache, logits[:, 0]

  cache, steps = jax.lax.scan(step, cache, tokens[:, 5:].T)
  return jnp.concatenate([prefill, steps.transpose(1, 0, 2)], axis=1), cache['index']


def test_every_param_has_logical_partition_spec(models):
  for model in models.values():
    state = nnx.state(model)
    leaves = jax.tree.leaves(state)
    specs = jax.tree.leaves(nnx.get_partition_spec(state),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == len(specs)
    for value, spec in zip(leaves, specs):
      assert len(spec) == value.ndim and all(isinstance(n, str) for n in spec), spec
  assert 'head' not in nnx.state(models['learned_mqa'])  # tied embeddings


@pytest.mark.parametrize('name', ['rope_mha', 'rope_gqa', 'learned_mqa', 'learned_mha'])
def test_kv_cache_decode_matches_parallel_forward(models, tokens, name):
  model = models[name]
  full = logits_of(model, tokens)
  cached, index = cached_logits(*nnx.split(model), tokens)
  assert full.shape == (2, L, VOCAB) and full.dtype == jnp.float32
  assert int(index) == L
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=2e-5)


@functools.partial(jax.jit, static_argnums=0)
def prefix_lm_cached_logits(graphdef, state, tokens, prefix_mask):
  """Bidirectional prefill of the first 5 tokens, then causal 1-token steps."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(tokens.shape[0], L)
  prefill, cache = model.decode(tokens[:, :5], cache, attention_mask=prefix_mask[:, :, :5])

  def step(cache, token):
    logits, cache = model.decode(token[:, None], cache)
    return cache, logits[:, 0]

  _, steps = jax.lax.scan(step, cache, tokens[:, 5:].T)
  return jnp.concatenate([prefill, steps.transpose(1, 0, 2)], axis=1)


def test_prefix_lm_mask_in_forward_and_cached_prefill(models, tokens):
  prefix_mask = causal_mask(L) | (jnp.arange(L) < 5)[None, None, None, :]
  model = models['rope_gqa']
  full = logits_of(model, tokens, attention_mask=prefix_mask)
  assert not np.allclose(full[:, :5], logits_of(model, tokens)[:, :5])
  np.testing.assert_allclose(prefix_lm_cached_logits(*nnx.split(model), tokens, prefix_mask),
                             full, atol=2e-5, rtol=2e-5)


def test_causal_future_tokens_do_not_change_the_past(models, tokens):
  changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % VOCAB)
  for name in ('rope_gqa', 'learned_mqa'):
    a, b = logits_of(models[name], tokens), logits_of(models[name], changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_packed_segments_do_not_leak(models, tokens):
  """Two documents packed in one row equal the documents run separately (padded)."""
  seg = jnp.array([[1] * 4 + [2] * 7] * 2)
  pos = jnp.array([list(range(4)) + list(range(7))] * 2)
  doc2 = jnp.concatenate([tokens[:, 4:], jnp.zeros((2, 4), jnp.int32)], axis=1)
  model = models['sinusoidal_gqa']  # absolute positions: per-document positions matter
  packed = logits_of(model, tokens, positions=pos, segment_ids=seg)
  alone = logits_of(model, doc2)
  np.testing.assert_allclose(packed[:, 4:], alone[:, :7], atol=1e-5)
  assert np.isfinite(np.asarray(packed)).all()


def test_attention_mask_replaces_causal_and_padding_segment_is_finite(models, tokens):
  model = models['rope_gqa']
  bidirectional = jnp.ones((1, 1, L, L), bool)
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % VOCAB)
  a = logits_of(model, tokens, attention_mask=bidirectional)
  b = logits_of(model, changed, attention_mask=bidirectional)
  assert not np.allclose(a[:, 0], b[:, 0])  # position 0 now sees the last token
  # The explicit causal mask reproduces the default.
  np.testing.assert_allclose(logits_of(model, tokens, attention_mask=causal_mask(L)),
                             logits_of(model, tokens), atol=1e-6)
  # Padding (segment 0) rows attend nowhere: finite, and real tokens unaffected.
  seg = jnp.array([[1] * 8 + [0] * 3] * 2)
  padded = logits_of(model, tokens, segment_ids=seg)
  assert np.isfinite(np.asarray(padded)).all()
  np.testing.assert_allclose(padded[:, :8], logits_of(model, tokens)[:, :8], atol=1e-5)


def test_embeddings_input_is_the_semi_causal_insertion_point(models, tokens):
  model = models['learned_mha']
  logits, out = model(tokens)
  logits_e, out_e = model(embeddings=model.embed(tokens))
  np.testing.assert_allclose(logits_e, logits, atol=1e-6)
  assert out['hidden'].shape == (2, L, D)
  np.testing.assert_allclose(out_e['hidden'], out['hidden'], atol=1e-6)
  with pytest.raises(ValueError, match='exactly one'):
    model(tokens, embeddings=model.embed(tokens))
  with pytest.raises(ValueError, match='exactly one'):
    model()


def test_dropout_only_when_not_deterministic(models, tokens):
  model = models['learned_mha']  # dropout_rate=0.3
  base, _ = model(tokens)
  same, _ = model(tokens, deterministic=True, rngs=jax.random.key(1))
  np.testing.assert_array_equal(same, base)
  drop1, _ = model(tokens, deterministic=False, rngs=jax.random.key(1))
  drop1b, _ = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(1)))
  drop2, _ = model(tokens, deterministic=False, rngs=jax.random.key(2))
  assert not np.allclose(drop1, base)
  assert not np.allclose(drop1, drop2)
  np.testing.assert_array_equal(drop1, drop1b)
  with pytest.raises(ValueError, match='rngs='):
    model(tokens, deterministic=False)


def test_gradients_are_finite_with_padding_and_dropout(models, tokens):
  graphdef, state = nnx.split(models['learned_mha'])
  seg = jnp.array([[1] * 6 + [2] * 3 + [0] * 2] * 2)

  @jax.jit
  def grads(state, rng):
    def loss(state):
      logits, _ = nnx.merge(graphdef, state)(tokens, segment_ids=seg, deterministic=False,
                                             rngs=rng)
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
    return jax.grad(loss)(state)

  leaves = jax.tree.leaves(grads(state, jax.random.key(0)))
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


def test_learned_positions_cache_length_is_checked(models):
  with pytest.raises(ValueError, match='max_len=18'):
    models['learned_mha'].init_cache(1, 18)
  models['rope_mha'].init_cache(1, 18)  # rope has no table


def test_registry_param_count_and_flops(tokens):
  model = build_model('decoder', rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **BASE)
  assert logits_of(model, tokens).dtype == jnp.float32  # bf16 compute, float32 logits
  assert MODELS['decoder'] is Decoder
  d, f, v = D, 24, VOCAB
  per_block = 4 * d * d + 3 * d * f + 2 * d  # attention, swiglu, two rmsnorm scales
  assert param_count(model) == v * d + 2 * per_block + d + d * v
  assert param_count(nnx.state(model)) == param_count(model)
  with pytest.raises(ValueError, match=r"'encoder' is not a known model; known: \[.*'decoder'"):
    build_model('encoder', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config.model.n_layers.*Did you mean 'num_layers'"):
    build_model('decoder', rngs=nnx.Rngs(0), n_layers=2, **BASE)
  assert flops_per_token(100, num_layers=2, num_heads=4, head_dim=4, seq_len=8) == (
      600 + 12 * 2 * 4 * 4 * 8)


def test_blockwise_threshold_switches_the_decoder_without_changing_its_output():
  """Past `blockwise_threshold` the decoder attends blockwise under a lazy mask: same logits."""
  kw = dict(vocab_size=37, d_model=16, num_layers=2, num_heads=4, d_ff=32, max_len=64)
  plain = Decoder(**kw, rngs=nnx.Rngs(0))
  blockwise = Decoder(**kw, blockwise_threshold=8, block_size=4, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 37)
  segments = jnp.array([[1] * 6 + [2] * 7, [1] * 10 + [0] * 3])
  want, _ = plain(tokens, segment_ids=segments)
  got, _ = blockwise(tokens, segment_ids=segments)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_checkpoint_layout_options(tokens):
  """attention_bias is validated; biases appear only where asked; scale_tied_logits=False
  drops the 1/sqrt(d_model) of the tied head and nothing else."""
  with pytest.raises(ValueError, match="attention_bias='out'"):
    Decoder(**BASE, attention_bias='out', rngs=nnx.Rngs(0))
  qkv = nnx.state(Decoder(**BASE, attention_bias='qkv', rngs=nnx.Rngs(0)),
                  nnx.Param).to_pure_dict()['blocks'][0]['attention']
  assert 'bias' in qkv['query'] and 'bias' in qkv['value'] and 'bias' not in qkv['out']
  scaled = Decoder(**BASE, tie_embeddings=True, rngs=nnx.Rngs(0))
  plain = Decoder(**BASE, tie_embeddings=True, scale_tied_logits=False, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(plain(tokens)[0]) / np.sqrt(D),
                             np.asarray(scaled(tokens)[0]), rtol=1e-5, atol=1e-6)
