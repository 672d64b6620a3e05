"""Generation for METALM prompts with encoder spans, over the KV cache (left-padded batches).

Axis letters: B batch, L prompt positions (padded), M span slots, S cache slots (L + N),
N max_new_tokens, K hypotheses per prompt, V vocab.

    prompts = [metalm_prompts.text_prompt(t, tokenizer, max_input_tokens=96,
                                          max_span_len=48) for t in texts]
    tokens, scores = generate(module, prompts, max_new_tokens=16, eos_id=tokenizer.eos_id,
                              pad_id=tokenizer.pad_id)        # [n, K, N], [n, K]
    answers = [tokenizer.decode(t[0]) for t in tokens]

Prompts of different lengths share a batch LEFT-padded (`metalm_prompts.pad_left`), so every
row's next token goes to the same cache slot. Positions are counted per row from its first
real token, and padded slots are masked out of attention in the prefill and every step:
the cache is wrapped as {'decoder': the Decoder's cache, 'key_valid': bool [B, S] (the real
slots so far), 'next_position': int32 [B]}, batch-first, so beam search can tile and reorder
it. Prefill: `module.embed_inputs(tokens, span_starts, span_lengths, images)` (spans encoded,
'dual') then `module.decode(None, cache, embeddings=..., positions=..., attention_mask=...,
span_ids=...)` ('single' adds its semi-causal span mask; 'causal' ignores spans). Then
`decoding.generate_from_prefill` (greedy, sampling or beam search).

One jitted function per (graphdef, shapes, beam size, greedy or sampling; the sampling values
are traced); batches are padded to power-of-two buckets of prompts, positions (>= 16) and
span slots, so few shapes ever compile.

`greedy_reference` is the slow obvious path kept beside it: the whole right-padded row through
the model (`MetaLM.__call__`, spans exactly as in training) at every step, argmax at the end,
append. Tests hold the two equal.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalm_jax.inference.decoding import check_sampling, generate_from_prefill, sampling_args
from metalm_jax.inference.metalm_prompts import SpanPrompt, extent, pad_left, pad_right
from metalm_jax.layers.masks import causal_mask

MIN_LENGTH_BUCKET = 16


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return 1 << (max(n, minimum) - 1).bit_length()


# ---------------------------------------------------------------- the padded cache
def prefill_mask(valid: jax.Array, cache_len: int) -> jax.Array:
  """bool [B, 1, L, S] for a left-padded prefill at cache slots 0 .. L - 1: a real query sees
  the real slots up to itself; a padded query sees only itself (so no row is empty)."""
  length = valid.shape[1]
  slots = jnp.arange(cache_len)
  causal = slots[None, :] <= jnp.arange(length)[:, None]  # [L, S]
  key_valid = jnp.zeros((valid.shape[0], cache_len), bool).at[:, :length].set(valid)
  own = slots[None, None, :] == jnp.arange(length)[None, :, None]  # [1, L, S]
  mask = (causal[None] & key_valid[:, None, :] & valid[:, :, None]) | (own & ~valid[:, :, None])
  return mask[:, None]


def prefill(module, batch: dict, max_new_tokens: int) -> tuple[jax.Array, dict]:
  """Runs the left-padded prompts (`pad_left`'s dict, as arrays) through a MetaLM.

  Returns (logits float32 [B, V] after each prompt, the wrapped cache with room for
  max_new_tokens more tokens).
  """
  tokens, valid = batch["tokens"], batch["valid"]
  num_rows, length = tokens.shape
  cache_len = length + max_new_tokens
  if module.mode == "dual":
    embeddings = module.embed_inputs(tokens, batch["span_starts"], batch["span_lengths"],
                                     batch["images"],
                                     span_encoder_ids=batch.get("span_encoder_ids"))
  else:
    embeddings = module.embed_inputs(tokens)
  cache = module.init_cache(num_rows, cache_len)
  logits, cache = module.decode(None, cache, embeddings=embeddings,
                                positions=batch["positions"],
                                attention_mask=prefill_mask(valid, cache_len),
                                span_ids=batch["span_ids"])
  key_valid = jnp.zeros((num_rows, cache_len), bool).at[:, :length].set(valid)
  return logits[:, -1], {"decoder": cache, "key_valid": key_valid,
                         "next_position": valid.sum(axis=1).astype(jnp.int32)}


def padded_decode_fn(module):
  """The KV-cached step over the wrapped cache: (tokens int32 [B, T], cache) -> (logits
  [B, T, V], cache); the T tokens take the next slots, real, at each row's next positions."""

  def decode_fn(tokens, cache):
    num_rows, length = tokens.shape
    index = cache["decoder"]["index"]
    key_valid = jax.lax.dynamic_update_slice(cache["key_valid"],
                                             jnp.ones((num_rows, length), bool), (0, index))
    positions = cache["next_position"][:, None] + jnp.arange(length)
    mask = key_valid[:, None, None, :] & causal_mask(length, kv_length=key_valid.shape[1],
                                                     offset=index)
    logits, decoder_cache = module.decode(tokens, cache["decoder"], positions=positions,
                                          attention_mask=mask)
    return logits, {"decoder": decoder_cache, "key_valid": key_valid,
                    "next_position": cache["next_position"] + length}

  return decode_fn


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "beam_size"))
def _generate(graphdef, state, batch, rng, length_penalty, eos_id, pad_id, sampling, *,
              max_new_tokens, beam_size):
  module = nnx.merge(graphdef, state)
  logits, cache = prefill(module, batch, max_new_tokens)
  return generate_from_prefill(padded_decode_fn(module), logits, cache,
                               max_new_tokens=max_new_tokens, rng=rng, beam_size=beam_size,
                               length_penalty=length_penalty, eos_id=eos_id, pad_id=pad_id,
                               **(sampling or {}))


# ---------------------------------------------------------------- the public entry point
def generate(module, prompts: Sequence[SpanPrompt], *, max_new_tokens: int, eos_id: int,
             pad_id: int, rng: jax.Array | None = None, beam_size: int = 1,
             length_penalty: float = 0.0, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Continues every prompt of a MetaLM (any mode) by up to max_new_tokens tokens.

  Args:
    module: a models.MetaLM (e.g. `Model.merge(params, rest)`).
    prompts: from `metalm_prompts.text_prompt` / `vl_prompt`; any lengths and span counts.
    max_new_tokens: N >= 1 (EOS included).
    eos_id, pad_id: the tokenizer's; tokens after EOS are pad_id.
    rng: PRNG key for sampling (temperature > 0); batch c uses fold_in(rng, c).
    beam_size: K; > 1 is beam search with the GNMT `length_penalty` (METALM paper: 4, 0.6).
    temperature, top_k, top_p: sampling when beam_size == 1 (temperature 0 = greedy).
    batch_size: prompts per device call (the last call's batch is bucketed smaller).

  Returns:
    (tokens int32 [n, K, N], scores float32 [n, K]) as NumPy, best first
    (`decoding.generate_from_prefill`).
  """
  check_sampling(max_new_tokens=max_new_tokens, beam_size=beam_size, temperature=temperature,
                 top_k=top_k, top_p=top_p, length_penalty=length_penalty)
  if not prompts:
    raise ValueError("got no prompts to continue.")
  if temperature > 0 and rng is None:
    raise ValueError(f"temperature={temperature} samples: pass rng= (a PRNG key).")
  graphdef, state = nnx.split(module)
  rng = jax.random.key(0) if rng is None else rng
  sampling = sampling_args(temperature, top_k, top_p)  # traced: no recompilation
  tokens, scores = [], []
  for c, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = list(prompts[start:start + batch_size])
    rows = bucket(len(chunk))
    chunk += [chunk[-1]] * (rows - len(chunk))  # static shapes; the copies are dropped
    length, num_spans = _bucketed_extent(module, chunk, max_new_tokens)
    batch = pad_left(chunk, length=length, num_spans=num_spans, pad_id=pad_id)
    out = _generate(graphdef, state, batch, jax.random.fold_in(rng, c),
                    jnp.float32(length_penalty), jnp.int32(eos_id), jnp.int32(pad_id),
                    sampling, max_new_tokens=max_new_tokens, beam_size=beam_size)
    n = min(batch_size, len(prompts) - start)
    tokens.append(np.asarray(out[0])[:n])
    scores.append(np.asarray(out[1])[:n])
  return np.concatenate(tokens), np.concatenate(scores)


def _bucketed_extent(module, prompts, max_new_tokens: int) -> tuple[int, int]:
  """(positions L, span slots M) of a batch, rounded up to buckets; a learned position
  table caps L + max_new_tokens at the decoder's max_len."""
  longest, most_spans = extent(prompts)
  length = bucket(longest, MIN_LENGTH_BUCKET)
  decoder = module.decoder
  if decoder.position == "learned":
    room = decoder.max_len - max_new_tokens
    if longest > room:
      raise ValueError(f"a prompt of {longest} positions + max_new_tokens={max_new_tokens} "
                       f"exceeds the decoder's learned positions (max_len={decoder.max_len}); "
                       "shorten the prompts or lower max_new_tokens.")
    length = min(length, room)
  return length, bucket(most_spans)


# ---------------------------------------------------------------- the slow reference
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_tokens(graphdef, state, rows):
  module = nnx.merge(graphdef, state)
  logits, _ = module(rows["tokens"], positions=rows["positions"],
                     segment_ids=rows["segment_ids"], span_ids=rows["span_ids"],
                     span_starts=rows["span_starts"], span_lengths=rows["span_lengths"],
                     images=rows["images"], deterministic=True,
                     span_encoder_ids=rows.get("span_encoder_ids"))
  last = jnp.take_along_axis(logits, (rows["ends"] - 1)[:, None, None], axis=1)[:, 0]
  token = jnp.argmax(last, axis=-1)
  return token.astype(jnp.int32), jax.nn.log_softmax(last, axis=-1)[jnp.arange(len(token)), token]


def greedy_reference(module, prompts: Sequence[SpanPrompt], *, max_new_tokens: int,
                     eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Greedy continuations the slow, obvious way: every step runs the whole right-padded row
  through `module` (no cache), takes the argmax after each row's end and appends it there
  (pad after EOS). The reference for `generate`.

  Returns (tokens int32 [n, N], scores float32 [n]: the summed log-probs of the tokens up to
  and including EOS).
  """
  longest, most_spans = extent(prompts)
  rows = pad_right(prompts, length=longest + max_new_tokens, num_spans=max(most_spans, 1),
                   pad_id=pad_id)
  if module.mode != "dual":
    rows["images"] = None
  graphdef, state = nnx.split(module)
  index = np.arange(len(prompts))
  out = np.full((len(prompts), max_new_tokens), pad_id, np.int32)
  scores = np.zeros(len(prompts), np.float32)
  done = np.zeros(len(prompts), bool)
  for i in range(max_new_tokens):
    tokens, logp = jax.device_get(_next_tokens(graphdef, state, rows))
    scores += np.where(done, 0.0, logp)
    tokens = np.where(done, pad_id, tokens)
    out[:, i] = tokens
    done |= tokens == eos_id
    if done.all():
      break
    ends = rows["ends"]
    rows["tokens"][index, ends] = tokens
    rows["segment_ids"][index, ends] = 1
    rows["positions"][index, ends] = ends
    rows["ends"] = ends + 1
  return out, scores


__all__ = ["bucket", "generate", "greedy_reference", "padded_decode_fn", "prefill",
           "prefill_mask"]
