"""mPLUG inference (inference.mplug): KV-cached generation against teacher forcing, top-k answer
ranking against full scoring, retrieval against a slow all-pairs reference, and retrieval's
determinism with duplicated images and captions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax.inference import mplug as mplug_inference
from metalm_jax.models import mplug

VOCAB, NEW, EOS = 41, 5, 2


@pytest.fixture(scope='module')
def module():
  return mplug.MPlug(
      vocab_size=VOCAB, d_model=18, itc_dim=7,
      vision_encoder=dict(image_size=8, patch_size=4, channels=1, d_model=18, num_layers=1,
                          num_heads=2, d_ff=22),
      text_encoder=dict(num_layers=1, num_heads=2, d_ff=22, max_len=11),
      fusion=dict(num_layers=2, stride=1, num_heads=2, d_ff=22),
      decoder=dict(num_layers=2, num_heads=2, d_ff=22, max_len=11), rngs=nnx.Rngs(1))


def captions(num, seed=0, length=7):
  """[CLS] words [EOS] pad rows of different lengths."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((num, length), np.int32)
  for i in range(num):
    n = 1 + i % (length - 2)
    tokens[i, 0], tokens[i, 1:1 + n], tokens[i, 1 + n] = 1, rng.integers(4, VOCAB - 1, n), EOS
  return tokens


def images(num, seed=0):
  return np.random.default_rng(seed).uniform(size=(num, 8, 8, 1)).astype(np.float32)


# ---------------------------------------------------------------- generation
@nnx.jit
def _teacher_forced_logits(module, images, tokens, decoder_tokens):
  return module(images, tokens, decoder_tokens)


def test_greedy_generation_equals_teacher_forced_argmax_loop(module):
  x, q = images(3), captions(3, seed=1)
  tokens, scores = mplug_inference.generate(module, x, q, max_new_tokens=NEW)
  assert tokens.shape == (3, 1, NEW) and scores.shape == (3, 1)
  # Reference: the whole decoder row at every step, argmax appended (pad after EOS).
  rows = np.zeros((3, NEW + 1), np.int32)
  rows[:, 0] = module.bos_id
  done, expected = np.zeros(3, bool), np.zeros(3, np.float32)
  for i in range(NEW):
    logp = np.asarray(jax.nn.log_softmax(_teacher_forced_logits(module, x, q, rows)[:, i]))
    token = np.where(done, module.pad_id, logp.argmax(-1))
    expected += np.where(done, 0.0, logp.max(-1))
    rows[:, i + 1] = token
    done |= token == EOS
  np.testing.assert_array_equal(tokens[:, 0], rows[:, 1:])
  np.testing.assert_allclose(scores[:, 0], expected, atol=1e-4)
  beams, beam_scores = mplug_inference.generate(module, x, q, max_new_tokens=NEW, beam_size=3,
                                                length_penalty=0.6)
  assert beams.shape == (3, 3, NEW) and np.all(np.diff(np.asarray(beam_scores), axis=1) <= 0)


# ---------------------------------------------------------------- answer ranking
@nnx.jit
def _first_token_logp(module, images, tokens):
  memory, valid = module.encode(images, tokens)
  bos = jnp.full((tokens.shape[0], 1), module.bos_id, jnp.int32)
  return jax.nn.log_softmax(module.decoder(bos, memory, valid)[:, 0], axis=-1)


def test_rank_answers_scores_the_k_likeliest_first_tokens_in_full(module):
  x, q = images(3, seed=2), captions(3, seed=3)
  answers = np.array([[5, EOS, 0, 0], [5, 7, EOS, 0], [8, EOS, 0, 0], [9, 10, 11, EOS],
                      [12, EOS, 0, 0]], np.int32)  # two share their first token
  full = np.asarray(mplug_inference.answer_scores(module, x, q, answers))  # [3, 5]
  best, best_score = mplug_inference.rank_answers(module, x, q, answers, k=99)
  np.testing.assert_array_equal(best, full.argmax(1))
  np.testing.assert_allclose(best_score, full.max(1), atol=1e-4)
  first = np.asarray(_first_token_logp(module, x, q))[:, answers[:, 0]]  # [3, 5]
  for k in (1, 2):
    best, best_score = mplug_inference.rank_answers(module, x, q, answers, k=k)
    for b in range(3):
      shortlist = np.argsort(-first[b], kind='stable')[:k]  # ties: lower index first
      expected = shortlist[np.argmax(full[b, shortlist])]
      assert int(best[b]) == expected, (k, b)
      np.testing.assert_allclose(best_score[b], full[b, expected], atol=1e-4)


# ---------------------------------------------------------------- retrieval
@nnx.jit
def _all_pairs(module, images, tokens):
  """Slow reference: ITC similarities [N, K] and the ITM match logit of every pair [N, K]."""
  image = module.encode_image(images)
  text = module.encode_text(tokens)
  image_f, text_f = module.itc_features(image=image, text=text)
  n, k = images.shape[0], tokens.shape[0]
  pair_image = jnp.repeat(image, k, axis=0)  # pair (i, j) at row i * k + j
  pair_text = jnp.tile(text, (n, 1, 1))
  _, fused = module.fuse(pair_image, pair_text, jnp.tile(tokens != module.pad_id, (n, 1)))
  return image_f @ text_f.T, module.itm_logits(fused)[:, 1].reshape(n, k)


def rank(scores):
  return np.argsort(-np.asarray(scores), axis=1, kind='stable')


def test_retrieval_re_ranks_the_k_test_best_by_the_raw_itm_logit(module):
  x, t = images(4, seed=4), captions(6, seed=5)
  out = mplug_inference.retrieval_scores(module, x, t, k_test=3, batch_size=4)
  sim, itm = (np.asarray(a) for a in _all_pairs(module, x, t))
  np.testing.assert_allclose(out['itc_i2t'], sim, atol=1e-5)
  np.testing.assert_allclose(out['itc_t2i'], sim.T, atol=1e-5)
  for key, s, m in (('i2t', sim, itm), ('t2i', sim.T, itm.T)):
    for q in range(s.shape[0]):
      top = rank(s)[q, :3]
      rest = rank(s)[q, 3:]
      # The k_test best by ITC, re-ordered by the ITM match logit; the rest after, by ITC.
      expected = np.concatenate([top[np.argsort(-m[q, top], kind='stable')], rest])
      np.testing.assert_array_equal(rank(out[key])[q], expected, err_msg=f'{key} {q}')
      np.testing.assert_allclose(out[key][q, top], m[q, top], atol=1e-5)


def test_retrieval_is_deterministic_with_duplicated_images_and_captions(module):
  x, t = images(5, seed=6), captions(7, seed=7)
  x[3], x[4] = x[0], x[1]  # duplicated images
  t[2], t[5], t[6] = t[4], t[4], t[1]  # duplicated captions: {2, 4, 5} and {1, 6}
  runs = [mplug_inference.retrieval_scores(module, x, t, k_test=3, batch_size=b)
          for b in (2, 2, 5)]
  runs.append(mplug_inference.retrieval_scores(module, iter([x[:2], x[2:4], x[4:]]), t,
                                               k_test=3, batch_size=2))
  for key in ('itc_i2t', 'itc_t2i', 'i2t', 't2i'):
    ranks = [rank(r[key]) for r in runs]
    for other in ranks[1:]:  # the same ranking across calls, batch sizes and input forms
      np.testing.assert_array_equal(other, ranks[0], err_msg=key)
  for r in runs:
    i2t, t2i = r['i2t'], r['t2i']
    # Duplicates score bitwise alike, so the stable ranking orders them by index.
    for group in ([2, 4, 5], [1, 6]):
      assert all(np.array_equal(i2t[:, group[0]], i2t[:, j]) for j in group[1:])
      assert all(np.array_equal(t2i[group[0]], t2i[j]) for j in group[1:])
      positions = np.argsort(rank(i2t), axis=1)[:, group]  # where each lands per query
      assert np.all(np.diff(positions, axis=1) > 0)
    np.testing.assert_array_equal(i2t[3], i2t[0])
    np.testing.assert_array_equal(t2i[:, 4], t2i[:, 1])
  np.testing.assert_array_equal(runs[0]['i2t'], runs[1]['i2t'])  # bitwise, run to run
  with pytest.raises(ValueError, match='k_test=0'):
    mplug_inference.retrieval_scores(module, x, t, k_test=0)
