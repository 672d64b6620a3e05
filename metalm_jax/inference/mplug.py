"""mPLUG downstream inference: generation (captioning, VQA), answer-list ranking, retrieval.

Axis letters: B batch, T encoder text length, A candidate answers, L answer length,
N images, K texts, E ITC features.

  generate          images + encoder text -> the decoder continues [BOS] through
                    `decoding.generate_from_prefill` (greedy, sampling or beam search; KV
                    cache, the fused memory's cross-attention keys / values computed once)
  rank_answers      each example's best answer of a list: the k answers whose first token is
                    likeliest are scored in full (mPLUG / ALBEF `rank_answer`)
  answer_scores     log p(answer | image, question) of every answer (the slow reference of
                    rank_answers, and the full score table)
  itc_embeddings    unit-norm ITC features of images / texts (the retrieval index)
  retrieval_scores  ITC ranks everything; each query's k_test best candidates are re-ranked
                    by the raw ITM match logit, both directions (ALBEF's released retrieval)

Retrieval is deterministic: every image and every text is encoded once and kept on the
device, identical images (bytes) and identical captions (token rows) share one encoding, so
their ITC similarities and ITM logits are bitwise equal, and ties are broken by index (stable
sorts). The ranking therefore does not depend on the run, the batch size or where a duplicate
sits in a batch.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalm_jax.inference.decoding import check_sampling, generate_from_prefill, sampling_args


# ---------------------------------------------------------------- generation
@functools.partial(nnx.jit, static_argnames=('max_new_tokens', 'beam_size'))
def _generate(module, images, tokens, rng, length_penalty, sampling, *, max_new_tokens,
              beam_size):
  memory, valid = module.encode(images, tokens)
  cache = module.decoder.init_cache(memory, valid, max_new_tokens + 1)
  bos = jnp.full((tokens.shape[0], 1), module.bos_id, jnp.int32)
  logits, cache = module.decoder.decode(bos, cache)
  return generate_from_prefill(module.decoder.decode, logits[:, -1], cache,
                               max_new_tokens=max_new_tokens, rng=rng, beam_size=beam_size,
                               length_penalty=length_penalty, eos_id=module.eos_id,
                               pad_id=module.pad_id, **(sampling or {}))


def generate(module, images: jax.Array, tokens: jax.Array, *, max_new_tokens: int,
             beam_size: int = 1, length_penalty: float = 0.0, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Decoder output for images [B, H, W, C] and encoder tokens [B, T] ([CLS] + question, or
  just [CLS] for captioning): beam search when beam_size > 1 (GNMT length_penalty), else
  greedy or sampled (temperature, top_k, top_p; rng needed to sample).

  Returns (tokens int32 [B, K, max_new_tokens], scores [B, K]), best first (K = beam_size);
  the tokens end at the first EOS (pad after it).
  """
  check_sampling(max_new_tokens=max_new_tokens, beam_size=beam_size, temperature=temperature,
                 top_k=top_k, top_p=top_p, length_penalty=length_penalty)
  if max_new_tokens + 1 > module.decoder.max_len:
    raise ValueError(f'max_new_tokens={max_new_tokens} + [BOS] exceeds the decoder max_len='
                     f'{module.decoder.max_len}.')
  if temperature > 0 and rng is None:
    raise ValueError(f'temperature={temperature} samples: pass rng= (a PRNG key).')
  return _generate(module, images, tokens, jax.random.key(0) if rng is None else rng,
                   jnp.float32(length_penalty), sampling_args(temperature, top_k, top_p),
                   max_new_tokens=max_new_tokens, beam_size=beam_size)


# ---------------------------------------------------------------- answer lists
def _teacher_forced_logp(module, memory, valid, answers):
  """log p(answers | one memory): memory [M, D], valid [M], answers [A, L] -> [A]."""
  num_answers = answers.shape[0]
  inputs = jnp.concatenate([jnp.full((num_answers, 1), module.bos_id, jnp.int32),
                            answers[:, :-1]], axis=1)
  logits = module.decoder(inputs, jnp.broadcast_to(memory, (num_answers,) + memory.shape),
                          jnp.broadcast_to(valid, (num_answers,) + valid.shape))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, answers[..., None], axis=-1)[..., 0]
  return jnp.sum(token_logp * (answers != module.pad_id), axis=-1)


@nnx.jit
def _answer_scores(module, images, tokens, answers):
  memory, valid = module.encode(images, tokens)  # [B, M, D]
  return jax.lax.map(lambda mv: _teacher_forced_logp(module, *mv, answers), (memory, valid))


def answer_scores(module, images: jax.Array, tokens: jax.Array,
                  answers: jax.Array) -> jax.Array:
  """log p(answer | image, question) [B, A] of every candidate answers [A, L] (answer tokens
  then [EOS], pad after), summed over the answer's tokens: the slow, full answer-list
  scoring (`rank_answers` with k >= A is its argmax)."""
  return _answer_scores(module, images, tokens, answers)


@functools.partial(nnx.jit, static_argnames=('k',))
def _rank_answers(module, images, tokens, answers, *, k):
  memory, valid = module.encode(images, tokens)
  bos = jnp.full((tokens.shape[0], 1), module.bos_id, jnp.int32)
  first = jax.nn.log_softmax(module.decoder(bos, memory, valid)[:, 0].astype(jnp.float32), -1)
  _, top = jax.lax.top_k(first[:, answers[:, 0]], k)  # [B, k]; ties: lower index first
  scores = jax.lax.map(lambda args: _teacher_forced_logp(module, *args),
                       (memory, valid, answers[top]))  # [B, k]
  best = jnp.argmax(scores, axis=1)
  return (jnp.take_along_axis(top, best[:, None], axis=1)[:, 0],
          jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0])


def rank_answers(module, images: jax.Array, tokens: jax.Array, answers: jax.Array, *,
                 k: int) -> tuple[jax.Array, jax.Array]:
  """Each example's best answer of answers [A, L] (answer [EOS] pad), as mPLUG / ALBEF rank
  a VQA answer list: the k answers with the likeliest first token are scored in full,
  log p(answer | image, question), and the best is kept.

  Returns (index into answers int32 [B], its log-probability float32 [B]); k >= A scores
  every answer (the argmax of `answer_scores`).
  """
  if k < 1:
    raise ValueError(f'k={k} must be >= 1 (answers scored in full per example).')
  return _rank_answers(module, images, tokens, answers, k=min(k, len(answers)))


# ---------------------------------------------------------------- retrieval
@nnx.jit
def _image_features(module, images):
  image = module.encode_image(images)
  return module.itc_features(image=image)[0], image


@nnx.jit
def _text_features(module, tokens):
  text = module.encode_text(tokens)
  return module.itc_features(text=text)[1], text


@nnx.jit
def _itm_match_logits(module, image_h, text_h, text_valid, image_index, text_index):
  """The ITM match logit [P] of the pairs (image_h[image_index], text_h[text_index]): the
  encodings stay on the device, only the indices travel."""
  _, fused = module.fuse(image_h[image_index], text_h[text_index], text_valid[text_index])
  return module.itm_logits(fused)[:, 1]


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """x [m, ...] -> [n, ...] (m <= n) by repeating the last row: one compiled shape."""
  if len(x) > n:
    raise ValueError(f'a batch of {len(x)} rows exceeds batch_size={n}.')
  return x if len(x) == n else np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def _batches(x: np.ndarray, batch_size: int) -> list[np.ndarray]:
  return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def first_occurrence(keys: Iterable) -> np.ndarray:
  """int64 [N]: for each key, the index of its first equal key (identical items -> one)."""
  seen = {}
  return np.array([seen.setdefault(key, i) for i, key in enumerate(keys)], np.int64)


def _digest(x: np.ndarray) -> bytes:
  return hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest()


def _encode(fn, module, batches, batch_size):
  """(ITC features NumPy [n, E], hidden states on device [n, ..., D], digests) of batches."""
  feats, hidden, keys = [], [], []
  for x in batches:
    x = np.asarray(x)
    f, h = fn(module, _pad_rows(x, batch_size))
    feats.append(np.asarray(f)[:len(x)])
    hidden.append(h[:len(x)])
    keys += [_digest(row) for row in x]
  return np.concatenate(feats), jnp.concatenate(hidden), keys


def retrieval_scores(module, images: np.ndarray | Iterable[np.ndarray], tokens: np.ndarray, *,
                     k_test: int, batch_size: int = 64) -> dict[str, np.ndarray]:
  """Image-text retrieval as ALBEF / mPLUG's released code does it, deterministically.

  ITC similarities rank every candidate; each query's k_test best (stable: ties by index)
  are re-ranked by the ITM head's raw match logit (`itm_logits(...)[:, 1]`); the others
  stay below them in ITC order. Each image and text is encoded once and kept on the device;
  only the fusion runs per (query, candidate) pair, once per distinct pair of the two
  directions (module docstring: duplicates share encodings, so rankings are reproducible).

  Args:
    images: [N, H, W, C], or an iterable of batches [b <= batch_size, H, W, C] in order (e.g.
      read from disk while the previous batch is encoded).
    tokens: [K, T] ([CLS] caption [EOS], pad_id after).
    k_test: candidates re-ranked by ITM per query (ALBEF's k_test: 256 COCO, 128 Flickr).
    batch_size: rows per device call (encoders and fusion).

  Returns {'itc_i2t' [N, K], 'itc_t2i' [K, N]: ITC similarities; 'i2t' [N, K], 't2i' [K, N]:
  the final scores (higher = earlier; rank with a stable sort)}, NumPy.
  """
  if k_test < 1:
    raise ValueError(f'k_test={k_test} must be >= 1 (candidates re-ranked by ITM per query).')
  if isinstance(images, (np.ndarray, jax.Array)):
    images = _batches(np.asarray(images), batch_size)
  tokens = np.asarray(tokens, np.int32)
  image_f, image_h, image_keys = _encode(_image_features, module, images, batch_size)
  # Distinct captions are encoded once; text i reads row text_row[i] of the distinct ones.
  text_first = first_occurrence(row.tobytes() for row in tokens)
  distinct_text, text_row = np.unique(text_first, return_inverse=True)
  text_f, text_h, _ = _encode(_text_features, module, _batches(tokens[distinct_text],
                                                               batch_size), batch_size)
  text_valid = jnp.asarray(tokens[distinct_text] != module.pad_id)
  distinct_image, image_row = np.unique(first_occurrence(image_keys), return_inverse=True)
  sim = (image_f[distinct_image] @ text_f.T)[image_row][:, text_row]  # [N, K]

  def candidates(scores):  # each query's k_test best, ties by index
    top = np.argsort(-scores, axis=1, kind='stable')[:, :min(k_test, scores.shape[1])]
    return np.repeat(np.arange(scores.shape[0]), top.shape[1]), top.reshape(-1)

  i2t_q, i2t_c = candidates(sim)
  t2i_q, t2i_c = candidates(sim.T)
  pairs = np.concatenate([  # (distinct image, distinct text) of every candidate pair
      np.stack([image_row[i2t_q], text_row[i2t_c]], axis=1),
      np.stack([image_row[t2i_c], text_row[t2i_q]], axis=1)])
  distinct_pairs, pair_row = np.unique(pairs, axis=0, return_inverse=True)
  pair_row = pair_row.reshape(-1)
  image_index = distinct_image[distinct_pairs[:, 0]].astype(np.int32)  # rows of image_h
  logits = np.concatenate([
      np.asarray(_itm_match_logits(module, image_h, text_h, text_valid,
                                   _pad_rows(i, batch_size), _pad_rows(t, batch_size)))[:len(i)]
      for i, t in zip(_batches(image_index, batch_size),
                      _batches(distinct_pairs[:, 1].astype(np.int32), batch_size))])
  logits = logits[pair_row]
  floor = logits.min() - 1.0  # every non-candidate scores below every candidate

  def rerank(scores, queries, cands, itm):
    out = floor - (scores.max() - scores)
    out[queries, cands] = itm
    return out

  n = len(i2t_q)
  return {'itc_i2t': sim, 'itc_t2i': sim.T,
          'i2t': rerank(sim, i2t_q, i2t_c, logits[:n]),
          't2i': rerank(sim.T, t2i_q, t2i_c, logits[n:])}


def retrieve(module, images: np.ndarray, tokens: np.ndarray, *, k: int = 16,
             batch_size: int = 64) -> dict[str, np.ndarray]:
  """The former name of `retrieval_scores` (k = k_test); kept until its callers move."""
  return retrieval_scores(module, images, tokens, k_test=k, batch_size=batch_size)


def itc_embeddings(module, images=None, tokens=None, *, batch_size: int = 64):
  """Unit-norm ITC features of images [N, H, W, C] and / or texts [K, T], in batches.

  Returns (image_features [N, E] | None, text_features [K, E] | None) as NumPy.
  """
  def run(fn, x):
    return None if x is None else _encode(fn, module, _batches(np.asarray(x), batch_size),
                                          batch_size)[0]
  return run(_image_features, images), run(_text_features, tokens)


__all__ = ['answer_scores', 'first_occurrence', 'generate', 'itc_embeddings', 'rank_answers',
           'retrieval_scores', 'retrieve']
