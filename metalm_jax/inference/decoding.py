"""The decoding core every model shares: greedy, sampling or beam search after a prefill.

Axis letters: B batch, K hypotheses per example (beams; 1 unless beam search), V vocab,
N max_new_tokens.

A model family only has to provide one KV-cached step and a prefill:

    logits, cache = <prefill the prompts>          # logits [B, V] at each prompt's end
    decode_fn = lambda tokens, cache: ...          # tokens [B, 1] -> (logits [B, 1, V], cache)
    tokens, scores = generate_from_prefill(decode_fn, logits, cache, max_new_tokens=N, ...)

`generate_from_prefill` is traceable (call it inside your own jit) and returns
(tokens int32 [B, K, N], scores float32 [B, K]), best first:
  beam_size > 1   beam search (`beam_search.beam_search_from_logits`, GNMT length penalty);
                  scores are length-penalised log-probabilities.
  beam_size == 1  one `lax.while_loop` of greedy (temperature 0) or sampled (temperature > 0,
                  optionally restricted by top-k and / or top-p) tokens, stopping early once
                  every row has emitted EOS; scores are the log-probabilities of the emitted
                  tokens (EOS included) under the model (temperature 1). As in Hugging Face's
                  `num_beams=1`, the length penalty is not used.
Tokens after a row's EOS are `pad_id`. Step i samples with `jax.random.fold_in(rng, i)`.

The cache is any pytree the decode_fn understands; beam search needs every non-scalar leaf
batch-first (it tiles and reorders rows).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from metalm_jax.inference.beam_search import beam_search_from_logits

# top_k meaning "no limit" (clipped to the vocabulary).
NO_TOP_K = 2 ** 30
# decode_fn(tokens int32 [B, 1], cache) -> (logits [B, 1, V], cache)
DecodeFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def sample_logits(logits: jax.Array, rng: jax.Array | None, *, temperature=0.0,
                  top_k=None, top_p=None) -> jax.Array:
  """Next tokens int32 [B] from logits [B, V].

  A Python temperature of 0 is greedy (argmax; top_k / top_p are then irrelevant).
  Otherwise samples from softmax(logits / temperature) restricted to the top_k largest
  logits (if set; ties at the k-th are all kept) and then to the nucleus (if top_p < 1): the
  most likely tokens whose probabilities, in decreasing order, first reach top_p in total (at
  least one token; ties at the edge are all kept). temperature, top_k and top_p may be traced
  (changing them does not recompile); a traced temperature of 0 is greedy too.
  """
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  if top_k is not None or top_p is not None:
    vocab = logits.shape[-1]
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    threshold = ordered[..., -1:]  # keep everything
    if top_k is not None:
      k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, vocab)
      threshold = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, threshold.shape), -1)
      ordered = jnp.where(jnp.arange(vocab) < k, ordered, -jnp.inf)
    if top_p is not None:
      probs = jax.nn.softmax(ordered, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly likelier tokens
      kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1
      nucleus = jnp.take_along_axis(ordered, kept - 1, axis=-1)
      threshold = jnp.where(jnp.asarray(top_p) >= 1.0, threshold,
                            jnp.maximum(threshold, nucleus))
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
  sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
  return jnp.where(jnp.asarray(temperature) > 0, sampled, greedy)


def check_sampling(*, max_new_tokens: int, beam_size: int = 1, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None,
                   length_penalty: float = 0.0) -> None:
  """Raises ValueError naming the first bad decoding setting (call before tracing)."""
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1.')
  if beam_size < 1:
    raise ValueError(f'beam_size={beam_size} must be >= 1 (1 = greedy or sampling).')
  if temperature < 0.0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 = greedy).')
  if top_k is not None and top_k < 1:
    raise ValueError(f'top_k={top_k} must be >= 1 or None.')
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p={top_p} must be in (0, 1] or None.')
  if length_penalty < 0:
    raise ValueError(f'length_penalty={length_penalty} must be >= 0 (0 = no penalty).')
  if beam_size > 1 and (temperature > 0 or top_k is not None or top_p is not None):
    raise ValueError(f'beam_size={beam_size} searches deterministically; drop temperature='
                     f'{temperature}, top_k={top_k}, top_p={top_p} (or use beam_size=1 to '
                     'sample).')


def sampling_args(temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> dict | None:
  """The sampling settings to pass through a jit as traced values: None for greedy
  (temperature 0), else {'temperature', 'top_k', 'top_p'} as arrays (top_k None -> no
  limit, top_p None -> 1.0), so one compilation serves every sampling setting. Unpack with
  `generate_from_prefill(..., **(sampling or {}))`."""
  if temperature == 0:
    return None
  return {'temperature': jnp.float32(temperature),
          'top_k': jnp.int32(NO_TOP_K if top_k is None else top_k),
          'top_p': jnp.float32(1.0 if top_p is None else top_p)}


def generate_from_prefill(decode_fn: DecodeFn, logits: jax.Array, cache: Any, *,
                          max_new_tokens: int, rng: jax.Array | None = None,
                          beam_size: int = 1, temperature: float = 0.0,
                          top_k: int | None = None, top_p: float | None = None,
                          length_penalty=0.0, eos_id=-1,
                          pad_id=0) -> tuple[jax.Array, jax.Array]:
  """Continues every prefilled prompt by up to `max_new_tokens` tokens (traceable).

  Args:
    decode_fn: one KV-cached step, (tokens int32 [B, 1], cache) -> (logits [B, 1, V], cache).
    logits: [B, V], the next-token logits at the end of each prompt (from the prefill).
    cache: the prefilled cache, with room for max_new_tokens more tokens.
    max_new_tokens: N >= 1 (static).
    rng: PRNG key for sampling (unused when greedy or beam search).
    beam_size: K; > 1 runs beam search (static).
    temperature, top_k, top_p: sampling (`sample_logits`); a Python temperature of 0 is
      greedy, traced values (`sampling_args`) do not recompile when they change.
    length_penalty: alpha of the GNMT penalty, beam search only (may be traced).
    eos_id: int (may be traced); -1 = no EOS.
    pad_id: token written after EOS (may be traced).

  Returns:
    (tokens int32 [B, K, N], scores float32 [B, K]), best first (module docstring).
  """
  if beam_size > 1:
    return beam_search_from_logits(decode_fn, logits, cache, beam_size=beam_size,
                                   max_new_tokens=max_new_tokens,
                                   length_penalty=length_penalty, eos_id=eos_id, pad_id=pad_id)
  tokens, scores = _sample_loop(decode_fn, logits, cache, rng, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                eos_id=eos_id, pad_id=pad_id)
  return tokens[:, None], scores[:, None]


def _sample_loop(decode_fn, logits, cache, rng, *, max_new_tokens, temperature, top_k, top_p,
                 eos_id, pad_id):
  """Greedy / sampled tokens int32 [B, N] and their summed log-probs float32 [B]."""
  batch = logits.shape[0]
  if rng is None:
    rng = jax.random.key(0)  # greedy; the public entry points ask for a key to sample
  eos_id, pad_id = jnp.asarray(eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32)

  def emit(i, logits, done, out, score):
    """Picks token i from logits [B, V] (pad where done); updates done, out, score."""
    logits = logits.astype(jnp.float32)
    token = sample_logits(logits, jax.random.fold_in(rng, i), temperature=temperature,
                          top_k=top_k, top_p=top_p)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)
    score = score + jnp.where(done, 0.0, logp[:, 0])
    token = jnp.where(done, pad_id, token)
    return token, done | (token == eos_id), out.at[:, i].set(token), score

  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  first = emit(0, logits, jnp.zeros((batch,), bool), out, jnp.zeros((batch,), jnp.float32))

  def not_done(carry):
    i, _, done, *_ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    i, token, done, out, score, cache = carry
    logits, cache = decode_fn(token[:, None], cache)
    token, done, out, score = emit(i, logits[:, -1], done, out, score)
    return i + 1, token, done, out, score, cache

  carry = (jnp.ones((), jnp.int32),) + first + (cache,)
  _, _, _, out, score, _ = jax.lax.while_loop(not_done, step, carry)
  return out, score


__all__ = ['DecodeFn', 'NO_TOP_K', 'check_sampling', 'generate_from_prefill', 'sample_logits',
           'sampling_args']
