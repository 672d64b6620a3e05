"""PPLM steering at decode time (Dathathri et al. 2020, "Plug and Play Language Models"),
with a bag-of-words attribute.

Before each generated token, PPLM nudges the model's memory of the past, here the KV cache,
towards text that contains the bag's words, leaving the weights alone:

  1. p_clean = p(x_{t+1} | x_<=t) from the unmodified cache ("unperturbed").
  2. Delta (zeros, shaped like the cached keys/values) takes `num_iterations` normalised
     gradient steps on
        L(Delta) = -log sum_{w in bag} p_Delta(w)  +  kl_scale * KL(p_Delta || p_clean),
        Delta <- Delta - step_size * grad / ||grad||^gamma   (norm per cache tensor and row),
     where p_Delta is the next-token distribution with the cache keys/values + Delta.
  3. The perturbed distribution is fused with the clean one ("geometric mean fusion"):
        p ~ p_Delta^gm_scale * p_clean^(1 - gm_scale),
     and the next token is taken from p (greedy, or sampled with temperature / top-k).
  4. Two caches advance: the clean one, and the perturbed one, which keeps Delta (so the
     steering accumulates over the generated text, as in the reference implementation).

Works with any model with the cache protocol of `inference.generate` whose cache is
{'index': int, 'layers': pytree of float arrays [B, S, ...]} (e.g. models.Decoder: keys and
values per block). With num_iterations=0 it is exactly greedy / sampled decoding.
Everything runs in one jitted function (a fori_loop over tokens, each with a fori_loop of
gradient steps).
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalm_jax.inference.decoding import sample_logits

_SMALL = 1e-10


def bag_of_words(tokenizer, words: Iterable[str]) -> np.ndarray:
  """Token ids (int32 [W], unique) of the words that are a single token, as in PPLM.

  Each word is tried as written and with a leading space. Raises if none is one token.
  """
  words = list(words)
  ids = set()
  for word in words:
    for text in (word, " " + word):
      pieces = tokenizer.encode(text)
      if len(pieces) == 1:
        ids.add(int(pieces[0]))
  if not ids:
    raise ValueError(f"none of the words {words[:10]} is a single token of the tokenizer; "
                     "choose words that are (e.g. frequent ones) or pass token ids directly")
  return np.asarray(sorted(ids), np.int32)


def bag_probability(probs: jax.Array, bag: jax.Array) -> jax.Array:
  """The bag's probability mass sum_{w in bag} probs[..., w]: [...]. probs [..., V]."""
  return probs[..., bag].sum(-1)


def generate(model: nnx.Module, prompt: jax.Array, bag: jax.Array, *, max_new_tokens: int,
             rng: jax.Array | None = None, num_iterations: int = 3, step_size: float = 0.02,
             kl_scale: float = 0.01, gm_scale: float = 0.9, gamma: float = 1.5,
             temperature: float = 0.0, top_k: int | None = None):
  """Continues `prompt` steered towards the bag of words.

  Args:
    model: init_cache / decode model (e.g. models.Decoder).
    prompt: int [B, P], P >= 1 (e.g. BOS + the encoded prompt).
    bag: int [W] token ids of the attribute (see `bag_of_words`).
    max_new_tokens: T >= 1.
    rng: PRNG key for sampling (unused when greedy).
    num_iterations: gradient steps on the cache per token (0 = no steering).
    step_size: PPLM's alpha.
    kl_scale: weight of KL(p_perturbed || p_clean).
    gm_scale: fusion exponent of the perturbed distribution (1 = perturbed only).
    gamma: gradient normalisation exponent.
    temperature, top_k: as `inference.generate.sample_logits` (0 = greedy).

  Returns:
    (tokens int32 [B, P + T], {'bag_mass': [B, T] the bag's mass under the fused
    distribution each token is drawn from, 'clean_bag_mass': [B, T] under the clean model
    given the same prefix}).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if num_iterations < 0:
    raise ValueError(f"num_iterations={num_iterations} must be >= 0")
  if not 0.0 <= gm_scale <= 1.0:
    raise ValueError(f"gm_scale={gm_scale} must be in [0, 1]")
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt has shape {prompt.shape}; expected [batch, length >= 1]")
  bag = jnp.asarray(bag, jnp.int32).reshape(-1)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt, bag, rng, jnp.float32(step_size),
                   jnp.float32(kl_scale), jnp.float32(gm_scale), jnp.float32(gamma),
                   max_new_tokens=max_new_tokens, num_iterations=num_iterations,
                   temperature=float(temperature), top_k=top_k)


def _normalise(grad: jax.Array, gamma) -> jax.Array:
  """grad / (||grad|| + small)^gamma, the norm over all axes but the batch axis."""
  axes = tuple(range(1, grad.ndim))
  norm = jnp.sqrt(jnp.sum(jnp.square(grad), axis=axes, keepdims=True))
  return grad / (norm + _SMALL) ** gamma


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "num_iterations",
                                             "temperature", "top_k"))
def _generate(graphdef, state, prompt, bag, rng, step_size, kl_scale, gm_scale, gamma, *,
              max_new_tokens, num_iterations, temperature, top_k):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  if prompt_len > 1:
    _, cache = model.decode(prompt[:, :-1], cache)

  def with_delta(cache, delta):
    return dict(cache, layers=jax.tree.map(jnp.add, cache["layers"], delta))

  def next_log_probs(cache, token):
    logits, new_cache = model.decode(token[:, None], cache)
    return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)), new_cache

  def step(i, carry):
    token, clean, perturbed, out, masses = carry
    log_clean, clean = next_log_probs(clean, token)
    p_clean = jnp.exp(log_clean)

    def attribute_loss(delta):
      log_p, _ = next_log_probs(with_delta(perturbed, delta), token)
      p = jnp.exp(log_p)
      bow = -jnp.log(bag_probability(p, bag) + _SMALL)
      kl = jnp.sum(p * (log_p - log_clean), axis=-1)
      return jnp.sum(bow + kl_scale * kl)  # rows are independent: a sum keeps per-row grads

    def grad_step(_, delta):
      grads = jax.grad(attribute_loss)(delta)
      return jax.tree.map(lambda d, g: d - step_size * _normalise(g, gamma), delta, grads)

    delta = jax.tree.map(jnp.zeros_like, perturbed["layers"])
    delta = jax.lax.fori_loop(0, num_iterations, grad_step, delta)
    log_pert, perturbed = next_log_probs(with_delta(perturbed, delta), token)
    fused = jax.nn.log_softmax(gm_scale * log_pert + (1.0 - gm_scale) * log_clean)
    token = sample_logits(fused, jax.random.fold_in(rng, i), temperature=temperature,
                          top_k=top_k)
    masses = (masses[0].at[:, i].set(bag_probability(jnp.exp(fused), bag)),
              masses[1].at[:, i].set(bag_probability(p_clean, bag)))
    return token, clean, perturbed, out.at[:, i].set(token), masses

  out = jnp.zeros((batch, max_new_tokens), jnp.int32)
  masses = (jnp.zeros((batch, max_new_tokens)), jnp.zeros((batch, max_new_tokens)))
  carry = (prompt[:, -1], cache, cache, out, masses)
  _, _, _, out, (bag_mass, clean_mass) = jax.lax.fori_loop(0, max_new_tokens, step, carry)
  return (jnp.concatenate([prompt, out], axis=1),
          {"bag_mass": bag_mass, "clean_bag_mass": clean_mass})
