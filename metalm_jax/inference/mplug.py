"""mPLUG downstream inference: generation (captioning, VQA), answer-list ranking, retrieval.

Axis letters: B batch, T encoder text length, A candidate answers, L answer length,
N images, K texts, E ITC features.

  generate          images + encoder text -> beam search in the decoder (KV cache; the fused
                    memory's cross-attention keys / values computed once)
  answer_scores     log p(answer | image, question) of every answer of a list (teacher forcing)
  itc_embeddings    unit-norm ITC features of images / texts (the retrieval index)
  itm_scores        P(match) of given (image, text) pairs from the fused [CLS]
  retrieve          ITC top-k re-ranked by ITM, both directions (mPLUG / ALBEF retrieval)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalm_jax.inference.beam_search import beam_search_from_logits


@functools.partial(nnx.jit, static_argnames=('max_new_tokens', 'beam_size'))
def _generate(module, images, tokens, length_penalty, *, max_new_tokens, beam_size):
  memory, valid = module.encode(images, tokens)
  cache = module.decoder.init_cache(memory, valid, max_new_tokens + 1)
  bos = jnp.full((tokens.shape[0], 1), module.bos_id, jnp.int32)
  logits, cache = module.decoder.decode(bos, cache)
  return beam_search_from_logits(module.decoder.decode, logits[:, -1], cache,
                                 beam_size=beam_size, max_new_tokens=max_new_tokens,
                                 length_penalty=length_penalty, eos_id=module.eos_id,
                                 pad_id=module.pad_id)


def generate(module, images: jax.Array, tokens: jax.Array, *, max_new_tokens: int,
             beam_size: int = 1, length_penalty: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Decoder output for images [B, H, W, C] and encoder tokens [B, T] ([CLS] + question, or
  just [CLS] for captioning). beam_size 1 with length_penalty 0 is greedy.

  Returns (tokens int32 [B, beam_size, max_new_tokens], scores [B, beam_size]), best first;
  the tokens end at the first EOS (pad after it).
  """
  if max_new_tokens + 1 > module.decoder.max_len:
    raise ValueError(f'max_new_tokens={max_new_tokens} + [BOS] exceeds the decoder max_len='
                     f'{module.decoder.max_len}.')
  return _generate(module, images, tokens, length_penalty, max_new_tokens=max_new_tokens,
                   beam_size=beam_size)


@nnx.jit
def _answer_scores(module, images, tokens, answers):
  memory, valid = module.encode(images, tokens)  # [B, M, D]
  num_answers = answers.shape[0]
  inputs = jnp.concatenate([jnp.full((num_answers, 1), module.bos_id, jnp.int32),
                            answers[:, :-1]], axis=1)
  weights = (answers != module.pad_id).astype(jnp.float32)

  def one(mem, val):  # every answer against one example's memory
    logits = module.decoder(inputs, jnp.broadcast_to(mem, (num_answers,) + mem.shape),
                            jnp.broadcast_to(val, (num_answers,) + val.shape))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, answers[..., None], axis=-1)[..., 0]
    return jnp.sum(token_logp * weights, axis=-1)

  return jax.lax.map(lambda mv: one(*mv), (memory, valid))


def answer_scores(module, images: jax.Array, tokens: jax.Array,
                  answers: jax.Array) -> jax.Array:
  """log p(answer | image, question) [B, A] of every candidate answers [A, L] (answer tokens
  then [EOS], pad after), summed over the answer's tokens: mPLUG's answer-list ranking."""
  return _answer_scores(module, images, tokens, answers)


@nnx.jit
def _image_embeddings(module, images):
  image = module.encode_image(images)
  return module.itc_features(image=image)[0], image


@nnx.jit
def _text_embeddings(module, tokens):
  text = module.encode_text(tokens)
  return module.itc_features(text=text)[1], text


def itc_embeddings(module, images=None, tokens=None, *, batch_size: int = 64):
  """Unit-norm ITC features of images [N, H, W, C] and / or texts [K, T], in batches.

  Returns (image_features [N, E] | None, text_features [K, E] | None) as NumPy.
  """
  def run(fn, x):
    if x is None:
      return None
    return np.concatenate([np.asarray(fn(module, x[i:i + batch_size])[0])
                           for i in range(0, len(x), batch_size)])
  return run(_image_embeddings, images), run(_text_embeddings, tokens)


@nnx.jit
def _itm_scores(module, images, tokens):
  image = module.encode_image(images)
  text = module.encode_text(tokens)
  _, fused = module.fuse(image, text, tokens != module.pad_id)
  return jax.nn.softmax(module.itm_logits(fused), axis=-1)[:, 1]


def itm_scores(module, images, tokens, *, batch_size: int = 64) -> np.ndarray:
  """P(match) [P] of the pairs (images [P, H, W, C], tokens [P, T])."""
  return np.concatenate([np.asarray(_itm_scores(module, images[i:i + batch_size],
                                                tokens[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def retrieve(module, images: np.ndarray, tokens: np.ndarray, *, k: int = 16,
             batch_size: int = 64) -> dict:
  """Image-text retrieval as mPLUG / ALBEF do it: ITC similarities rank everything, then the
  top k candidates of each query are re-ranked by ITM's P(match) (the rest keep their ITC
  order, below them).

  Args:
    images: [N, H, W, C]; tokens: [K, T] ([CLS] + caption + [EOS]).
    k: candidates re-ranked by ITM per query.

  Returns {'itc_i2t' [N, K], 'itc_t2i' [K, N]: ITC similarities; 'i2t' [N, K], 't2i' [K, N]:
  the final ranking scores (higher = earlier)}.
  """
  image_f, text_f = itc_embeddings(module, images, tokens, batch_size=batch_size)
  sim = image_f @ text_f.T  # [N, K]

  def rerank(scores, pair_of):
    out = scores - scores.max() - 2.0  # below every re-ranked candidate (ITM is in [0, 1])
    top = np.argsort(-scores, axis=1)[:, :min(k, scores.shape[1])]
    pairs = [(q, c) for q in range(scores.shape[0]) for c in top[q]]
    image_idx, text_idx = zip(*[pair_of(q, c) for q, c in pairs])
    p = itm_scores(module, images[list(image_idx)], tokens[list(text_idx)],
                   batch_size=batch_size)
    for (q, c), s in zip(pairs, p):
      out[q, c] = s
    return out

  return {'itc_i2t': sim, 'itc_t2i': sim.T,
          'i2t': rerank(sim, lambda q, c: (q, c)),
          't2i': rerank(sim.T, lambda q, c: (c, q))}


__all__ = ['answer_scores', 'generate', 'itc_embeddings', 'itm_scores', 'retrieve']
