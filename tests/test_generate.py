"""Tests for metalm_jax.inference.generate: greedy == no-cache argmax loop, eos, sampling
(temperature, top-k, top-p)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax.inference import generate, sample_logits
from metalm_jax.models import Decoder

VOCAB, PROMPT, NEW = 37, 5, 7


@pytest.fixture(scope='module')
def model():
  return Decoder(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                 d_ff=24, position='rope', rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def prompt():
  return jax.random.randint(jax.random.key(0), (3, PROMPT), 1, VOCAB)


@functools.partial(jax.jit, static_argnums=0)
def argmax_loop_without_cache(graphdef, state, prompt):
  """Slow reference: a full forward per new token (causal, so the zero tail is unseen)."""
  model = nnx.merge(graphdef, state)
  tokens = jnp.concatenate([prompt, jnp.zeros((prompt.shape[0], NEW), jnp.int32)], axis=1)

  def step(t, tokens):
    logits, _ = model(tokens)
    return tokens.at[:, t].set(jnp.argmax(logits[:, t - 1], axis=-1))

  return jax.lax.fori_loop(PROMPT, PROMPT + NEW, step, tokens)


@pytest.fixture(scope='module')
def greedy(model, prompt):
  return generate(model, prompt, max_new_tokens=NEW, rng=jax.random.key(0))


def test_greedy_generate_equals_argmax_loop_without_cache(model, prompt, greedy):
  expected = argmax_loop_without_cache(*nnx.split(model), prompt)
  assert greedy.shape == (3, PROMPT + NEW) and greedy.dtype == jnp.int32
  np.testing.assert_array_equal(greedy, expected)


def test_rows_emit_pad_after_eos(model, prompt, greedy):
  eos = int(greedy[0, PROMPT + 2])  # row 0 emits eos as its third new token
  out = np.asarray(generate(model, prompt, max_new_tokens=NEW, rng=jax.random.key(0),
                            eos_id=eos, pad_id=VOCAB - 1 if eos != VOCAB - 1 else 1))
  pad = VOCAB - 1 if eos != VOCAB - 1 else 1
  greedy = np.asarray(greedy)
  for row in range(3):
    hits = np.flatnonzero(greedy[row, PROMPT:] == eos)
    stop = PROMPT + (hits[0] + 1 if hits.size else NEW)
    np.testing.assert_array_equal(out[row, :stop], greedy[row, :stop])
    assert (out[row, stop:] == pad).all()
  assert (out[0, PROMPT + 3:] == pad).all()


def test_sampling_is_seeded_and_top_k_one_is_greedy(model, prompt, greedy):
  sample = functools.partial(generate, model, prompt, max_new_tokens=NEW, temperature=1.0)
  a = sample(rng=jax.random.key(1), top_k=1)
  np.testing.assert_array_equal(a, greedy)
  logits = jax.random.normal(jax.random.key(2), (4, VOCAB))
  draw = functools.partial(sample_logits, logits, temperature=0.7, top_k=3)
  np.testing.assert_array_equal(draw(jax.random.key(3)), draw(jax.random.key(3)))
  top3 = np.argsort(np.asarray(logits), axis=-1)[:, -3:]
  for seed in range(5):
    picked = np.asarray(draw(jax.random.key(seed)))
    assert all(picked[i] in top3[i] for i in range(4))


def test_top_p_one_changes_nothing_and_a_tiny_nucleus_is_greedy(model, prompt, greedy):
  sample = functools.partial(generate, model, prompt, max_new_tokens=NEW, temperature=1.0,
                             rng=jax.random.key(4))
  plain = sample()
  np.testing.assert_array_equal(sample(top_p=1.0), plain)
  np.testing.assert_array_equal(sample(top_p=1e-4), greedy)
  assert not np.array_equal(plain, greedy)  # sampling does sample here


def test_generate_validates_arguments(model, prompt):
  with pytest.raises(ValueError, match='max_new_tokens=0'):
    generate(model, prompt, max_new_tokens=0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match='temperature=-1'):
    generate(model, prompt, max_new_tokens=2, rng=jax.random.key(0), temperature=-1.0)
  with pytest.raises(ValueError, match='top_p=1.5'):
    generate(model, prompt, max_new_tokens=2, rng=jax.random.key(0), temperature=1.0,
             top_p=1.5)
