"""Tests for metalm_jax.inference.beam_search: greedy, a trap greedy falls in, brute force."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax.inference import generate
from metalm_jax.inference.beam_search import NEG_INF, beam_search, gnmt_length_penalty
from metalm_jax.models import Decoder

VOCAB, PROMPT, NEW = 13, 5, 6


class TableModel(nnx.Module):
  """Logits from a table [position, previous token, V]: the cache holds the last token."""

  def __init__(self, table: np.ndarray):
    self.table = nnx.Variable(jnp.asarray(table, jnp.float32))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    del max_len, dtype
    return {"index": jnp.zeros((), jnp.int32), "last": jnp.zeros((batch_size,), jnp.int32)}

  def decode(self, tokens, cache, *, positions=None):
    del positions
    steps = cache["index"] + jnp.arange(tokens.shape[1])
    steps = jnp.minimum(steps, self.table.shape[0] - 1)
    logits = self.table[...][steps[None, :], tokens]  # [B, T, V]
    return logits, {"index": cache["index"] + tokens.shape[1], "last": tokens[:, -1]}


class TinyRnn(nnx.Module):
  """h <- tanh(h W + E[token]); logits = 3 h U: a model whose logits depend on all history."""

  def __init__(self, vocab: int, dim: int, seed: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    self.embed = nnx.Param(jax.random.normal(keys[0], (vocab, dim)))
    self.w = nnx.Param(jax.random.normal(keys[1], (dim, dim)) / np.sqrt(dim))
    self.u = nnx.Param(3.0 * jax.random.normal(keys[2], (dim, vocab)) / np.sqrt(dim))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    del max_len
    return {"h": jnp.zeros((batch_size, self.w.shape[0]), dtype)}

  def decode(self, tokens, cache, *, positions=None):
    del positions
    h, outs = cache["h"], []
    for t in range(tokens.shape[1]):
      h = jnp.tanh(h @ self.w[...] + self.embed[...][tokens[:, t]])
      outs.append(h @ self.u[...])
    return jnp.stack(outs, axis=1), {"h": h}


def numpy_log_probs(model: TinyRnn, prefix: list[int]) -> np.ndarray:
  """Reference: log p(next | prefix) [V] of TinyRnn, in float64 numpy."""
  embed, w, u = (np.asarray(p[...], np.float64) for p in (model.embed, model.w, model.u))
  h = np.zeros(w.shape[0])
  for token in prefix:
    h = np.tanh(h @ w + embed[token])
  logits = h @ u
  return logits - np.logaddexp.reduce(logits)


def brute_force(model, prompt, *, vocab, steps, eos, alpha):
  """Every hypothesis (ends at its first EOS or after `steps` tokens), best score first."""
  out = []

  def visit(prefix, lp):
    log_probs = numpy_log_probs(model, list(prompt) + prefix)
    for token in range(vocab):
      seq, total = prefix + [token], lp + log_probs[token]
      if token == eos or len(seq) == steps:
        out.append((total / ((5 + len(seq)) / 6) ** alpha, tuple(seq)))
      else:
        visit(seq, total)

  visit([], 0.0)
  return sorted(out, reverse=True)


def reference_beam_search(model, prompt, *, beam_size, steps, eos, alpha):
  """Slow obvious beam search (same rules, no early stop): [(score, hypothesis)], best first."""
  pen = lambda n: ((5 + n) / 6) ** alpha
  alive, finished = [(0.0, ())], []
  for t in range(steps):
    cands = sorted(((lp + numpy_log_probs(model, list(prompt) + list(seq))[tok], seq + (tok,))
                    for lp, seq in alive for tok in range(model.embed.shape[0])), reverse=True)
    finished += [(lp / pen(t + 1), seq) for lp, seq in cands[:beam_size] if seq[-1] == eos]
    alive = [c for c in cands if c[1][-1] != eos][:beam_size]
  finished += [(lp / pen(steps), seq) for lp, seq in alive]
  return sorted(finished, reverse=True)[:beam_size]


def hypothesis(row: np.ndarray, eos: int) -> tuple:
  """Generated tokens up to and including the first EOS."""
  hits = np.flatnonzero(row == eos)
  return tuple(row[:hits[0] + 1] if hits.size else row)


@pytest.fixture(scope="module")
def decoder():
  return Decoder(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                 d_ff=24, position="rope", rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompt():
  return jax.random.randint(jax.random.key(1), (3, PROMPT), 1, VOCAB)


@pytest.fixture(scope="module")
def greedy(decoder, prompt):
  return np.asarray(generate(decoder, prompt, max_new_tokens=NEW, rng=jax.random.key(0)))


def test_beam_size_one_is_greedy(decoder, prompt, greedy):
  # Without EOS every hypothesis has N tokens, so any length penalty keeps the argmax path.
  out = beam_search(decoder, prompt, max_new_tokens=NEW, beam_size=1, length_penalty=0.6)
  assert out.sequences.shape == (3, 1, PROMPT + NEW) and out.scores.shape == (3, 1)
  np.testing.assert_array_equal(out.sequences[:, 0], greedy)
  # With EOS (a token greedy emits in row 0) and no length penalty, too; pad after EOS.
  eos = int(greedy[0, PROMPT + 2])
  with_eos = np.asarray(generate(decoder, prompt, max_new_tokens=NEW, rng=jax.random.key(0),
                                 eos_id=eos, pad_id=0))
  out = beam_search(decoder, prompt, max_new_tokens=NEW, beam_size=1, length_penalty=0.0,
                    eos_id=eos, pad_id=0)
  np.testing.assert_array_equal(out.sequences[:, 0], with_eos)


def test_beam_scores_are_the_decoders_log_probs(decoder, prompt):
  """Rescoring each returned hypothesis by a full forward pass checks the cache reordering."""
  eos, alpha = 4, 0.6
  out = beam_search(decoder, prompt, max_new_tokens=NEW, beam_size=4, length_penalty=alpha,
                    eos_id=eos)
  sequences, scores = np.asarray(out.sequences), np.asarray(out.scores)
  assert np.all(np.diff(scores, axis=1) <= 0), scores
  forward = jax.jit(lambda g, s, x: jax.nn.log_softmax(nnx.merge(g, s)(x)[0]), static_argnums=0)
  log_probs = np.asarray(forward(*nnx.split(decoder), jnp.asarray(sequences.reshape(12, -1))))
  log_probs = log_probs.reshape(3, 4, PROMPT + NEW, VOCAB)
  for b, k in itertools.product(range(3), range(4)):
    tokens = hypothesis(sequences[b, k, PROMPT:], eos)
    lp = sum(log_probs[b, k, PROMPT - 1 + t, tok] for t, tok in enumerate(tokens))
    np.testing.assert_allclose(scores[b, k], lp / gnmt_length_penalty(len(tokens), alpha),
                               rtol=1e-4)
    assert len(set(hypothesis(sequences[b, j, PROMPT:], eos) for j in range(4))) == 4


def test_beam_finds_the_sequence_greedy_misses():
  """First token 0 (p 0.5) or 1 (p 0.45); after 0 the model is unsure, after 1 it ends."""
  vocab, eos, pad = 4, 3, 2
  table = np.zeros((8, vocab, vocab), np.float32)  # uniform unless set
  table[0, 0] = np.log([0.5, 0.45, 0.0001, 0.0499])
  table[1, 1] = np.log([0.01, 0.01, 0.01, 0.97])
  model = TableModel(table)
  prompt = jnp.zeros((1, 1), jnp.int32)
  greedy = np.asarray(generate(model, prompt, max_new_tokens=3, rng=jax.random.key(0),
                               eos_id=eos, pad_id=pad))
  assert greedy[0, 1] == 0  # greedy commits to the likelier first token
  out = beam_search(model, prompt, max_new_tokens=3, beam_size=4, length_penalty=0.6,
                    eos_id=eos, pad_id=pad)
  np.testing.assert_array_equal(out.sequences[0, 0], [0, 1, eos, pad])
  np.testing.assert_allclose(out.scores[0, 0], np.log(0.45 * 0.97) / (7 / 6) ** 0.6, rtol=1e-5)
  greedy_lp = np.log(0.5) + 2 * np.log(0.25)  # uniform after token 0, no EOS in 3 tokens
  assert out.scores[0, 0] > greedy_lp / (8 / 6) ** 0.6


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_equals_brute_force(alpha):
  """With K above the number of hypotheses the search is exhaustive, early stop included."""
  vocab, steps, eos = 3, 4, 2
  model = TinyRnn(vocab, 5, seed=3)
  prompts = np.array([[0, 1], [1, 1]])
  out = beam_search(model, prompts, max_new_tokens=steps, beam_size=32, length_penalty=alpha,
                    eos_id=eos, pad_id=0)
  for b, prompt in enumerate(prompts):
    expected = brute_force(model, prompt, vocab=vocab, steps=steps, eos=eos, alpha=alpha)
    assert len(expected) == 31
    got_scores = np.asarray(out.scores[b])
    np.testing.assert_allclose(got_scores[:31], [s for s, _ in expected], rtol=1e-4, atol=1e-5)
    assert got_scores[31] == NEG_INF  # only 31 hypotheses exist
    got = [hypothesis(np.asarray(out.sequences[b, k, 2:]), eos) for k in range(31)]
    assert got == [seq for _, seq in expected]


def test_narrow_beam_top_is_brute_force_best_on_small_search():
  """K = 4 on a peaked model: the best hypothesis agrees with exhaustive search."""
  vocab, steps, eos = 3, 4, 2
  model = TinyRnn(vocab, 5, seed=3)
  prompt = np.array([[0, 1]])
  out = beam_search(model, prompt, max_new_tokens=steps, beam_size=4, eos_id=eos)
  best_score, best = brute_force(model, prompt[0], vocab=vocab, steps=steps, eos=eos,
                                 alpha=0.6)[0]
  assert hypothesis(np.asarray(out.sequences[0, 0, 2:]), eos) == best
  np.testing.assert_allclose(out.scores[0, 0], best_score, rtol=1e-4)


@pytest.mark.parametrize("beam_size", [2, 4])
def test_beam_search_equals_slow_reference(beam_size):
  """Early stopping and the cache gathers change nothing against a plain Python search."""
  vocab, steps, eos = 5, 6, 1
  for seed in range(3):
    model = TinyRnn(vocab, 7, seed=seed)
    prompt = np.array([[0, 3, 4]])
    out = beam_search(model, prompt, max_new_tokens=steps, beam_size=beam_size,
                      length_penalty=0.6, eos_id=eos)
    expected = reference_beam_search(model, prompt[0], beam_size=beam_size, steps=steps,
                                     eos=eos, alpha=0.6)
    np.testing.assert_allclose(out.scores[0], [s for s, _ in expected], rtol=1e-4)
    got = [hypothesis(np.asarray(out.sequences[0, k, 3:]), eos) for k in range(beam_size)]
    assert got == [seq for _, seq in expected]


def test_errors_name_the_bad_value(decoder, prompt):
  with pytest.raises(ValueError, match="beam_size=0"):
    beam_search(decoder, prompt, max_new_tokens=2, beam_size=0)
  with pytest.raises(ValueError, match="length_penalty=-1"):
    beam_search(decoder, prompt, max_new_tokens=2, length_penalty=-1.0)
