"""Autoregressive generation over a functional KV cache (greedy, temperature, top-k).

Any model with the cache protocol works:
  model.init_cache(batch_size, max_len) -> cache
  model.decode(tokens [B, T], cache) -> (logits [B, T, V], new_cache)

`generate` splits the model (nnx.split) and runs one jitted function: a prefill of the
whole prompt, then a `jax.lax.fori_loop` of one-token decode steps (one compilation for
the loop). All prompts in a batch have the same length P (left-pad or bucket them
beforehand); the output is [B, P + max_new_tokens].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float = 0.0,
                  top_k: int | None = None) -> jax.Array:
  """Next tokens int32 [B] from logits [B, V].

  temperature == 0 is greedy (argmax; top_k is then irrelevant). Otherwise samples from
  softmax(logits / temperature), restricted to the top_k largest logits if top_k is set.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: nnx.Module, prompt: jax.Array, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             pad_id: int = 0) -> jax.Array:
  """Continues every prompt by `max_new_tokens` tokens.

  Args:
    model: a module with `init_cache` / `decode` (e.g. models.Decoder).
    prompt: int [B, P]; all rows have the same length P (no per-row padding).
    max_new_tokens: number of tokens to generate (>= 1).
    rng: PRNG key for sampling (unused when greedy).
    temperature: 0.0 = greedy; > 0 samples.
    top_k: sample among the k most likely tokens only.
    eos_id: once a row emits eos_id, its later tokens are pad_id.
    pad_id: token emitted after eos.

  Returns:
    int32 [B, P + max_new_tokens]: the prompt followed by the generated tokens.
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1.')
  if temperature < 0.0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 = greedy).')
  if top_k is not None and top_k < 1:
    raise ValueError(f'top_k={top_k} must be >= 1 or None.')
  graphdef, state = nnx.split(model)
  # eos / pad are traced (-1 = no eos), so changing them does not recompile.
  return _generate(graphdef, state, jnp.asarray(prompt, jnp.int32), rng,
                   jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
                   max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_k=top_k)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'temperature',
                                             'top_k'))
def _generate(graphdef, state, prompt, rng, eos_id, pad_id, *, max_new_tokens,
              temperature, top_k):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt.shape
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)

  def emit(i, token, done, out):
    """Writes token [B] (pad where already done) as generated token i; updates done."""
    token = jnp.where(done, pad_id, token)
    done = done | (token == eos_id)
    return token, done, out.at[:, i].set(token)

  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.decode(prompt, cache)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  first = sample(logits[:, -1], jax.random.fold_in(rng, 0))
  token, done, out = emit(0, first, jnp.zeros((batch,), bool), out)

  def step(i, carry):
    token, done, out, cache = carry
    logits, cache = model.decode(token[:, None], cache)
    token, done, out = emit(i, sample(logits[:, -1], jax.random.fold_in(rng, i)), done, out)
    return token, done, out, cache

  _, _, out, _ = jax.lax.fori_loop(1, max_new_tokens, step, (token, done, out, cache))
  return jnp.concatenate([prompt, out], axis=1)
