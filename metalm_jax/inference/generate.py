"""Generation for plain decoders (Decoder, HybridDecoder) over a functional KV cache.

Any model with the cache protocol works:
  model.init_cache(batch_size, max_len) -> cache
  model.decode(tokens [B, T], cache) -> (logits [B, T, V], new_cache)

`generate` splits the model (nnx.split) and runs one jitted function: a prefill of the
whole prompt, then `decoding.generate_from_prefill` (greedy, or sampling with temperature,
top-k and top-p; one `lax.while_loop` of one-token steps). All prompts in a batch have the
same length P (no per-row padding: a Mamba layer's state would absorb pad tokens); the
output is [B, P + max_new_tokens]. Prompts of different lengths with encoder spans
(METALM) go through `inference.metalm.generate`; beam search through `beam_search`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from metalm_jax.inference.decoding import (check_sampling, generate_from_prefill, sample_logits,
                                           sampling_args)


def generate(model: nnx.Module, prompt: jax.Array, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, pad_id: int = 0) -> jax.Array:
  """Continues every prompt by `max_new_tokens` tokens.

  Args:
    model: a module with `init_cache` / `decode` (e.g. models.Decoder).
    prompt: int [B, P]; all rows have the same length P (no per-row padding).
    max_new_tokens: number of tokens to generate (>= 1).
    rng: PRNG key for sampling (unused when greedy).
    temperature: 0.0 = greedy; > 0 samples.
    top_k: sample among the k most likely tokens only.
    top_p: sample from the nucleus of probability mass top_p only (1.0 = every token).
    eos_id: once a row emits eos_id, its later tokens are pad_id.
    pad_id: token emitted after eos.

  Returns:
    int32 [B, P + max_new_tokens]: the prompt followed by the generated tokens.
  """
  check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p)
  graphdef, state = nnx.split(model)
  # eos / pad and the sampling settings are traced: changing them does not recompile.
  return _generate(graphdef, state, jnp.asarray(prompt, jnp.int32), rng,
                   jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
                   sampling_args(temperature, top_k, top_p), max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens'))
def _generate(graphdef, state, prompt, rng, eos_id, pad_id, sampling, *, max_new_tokens):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.decode(prompt, cache)
  tokens, _ = generate_from_prefill(model.decode, logits[:, -1], cache,
                                    max_new_tokens=max_new_tokens, rng=rng, eos_id=eos_id,
                                    pad_id=pad_id, **(sampling or {}))
  return jnp.concatenate([prompt, tokens[:, 0]], axis=1)


__all__ = ['generate', 'sample_logits']
