"""Beam search over a functional KV cache, with the GNMT length penalty.

Axis letters: B batch, K beams, V vocab, P prompt length, N max_new_tokens.

Any model with the cache protocol works (models.Decoder, or a wrapper whose prefill
inserts encoder outputs):
  model.init_cache(batch_size, max_len) -> cache
  model.decode(tokens [B, T], cache) -> (logits [B, T, V], new_cache)
The cache is a pytree whose non-scalar leaves have the batch axis first; scalar leaves
(such as the Decoder's shared write index) are left alone. Beams are flattened into that
axis, beam k of example b at row b * K + k, and reordered with a gather at every step.

Scoring. A hypothesis is the generated tokens up to and including the first EOS, or
N tokens without EOS (truncated). Its score is log p(tokens | prompt) / lp(length), with
the GNMT length penalty of Wu et al. (2016), lp(n) = ((5 + n) / 6) ** alpha, alpha =
`length_penalty` (0.6 in the METALM paper), n counting the EOS. This is the formula of
Tensor2Tensor, T5 / Mesh TensorFlow and the Flax WMT example (`brevity_penalty`);
fairseq instead divides by n ** alpha.

Search (as in fairseq): every step extends the K alive beams by every token. An
EOS-extension is finished only if it ranks among the K best of the K * V extensions (so
beam_size = 1 with alpha = 0 is greedy decoding); the K best non-EOS extensions stay alive.
The K best finished hypotheses are kept. The search stops when every example's K-th best
finished score is at least what its best alive beam could still reach
(alive log-prob / lp(N): log-probs only fall and lp grows with n, for alpha >= 0), or
after N steps, when the alive beams join the finished ones as truncated hypotheses.
One jitted `lax.while_loop`; the prompt is prefilled once, then the cache is tiled K times.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

# Score of an empty slot (fewer than K hypotheses exist) and of a dead beam.
NEG_INF = -1.0e9
# decode_fn(tokens [B*K, 1], cache) -> (logits [B*K, 1, V], cache)
DecodeFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


class BeamSearchOutput(NamedTuple):
  """sequences int32 [B, K, P + N] (prompt, then tokens; pad after EOS), best first;
  scores float32 [B, K], length-penalised log-probs (NEG_INF: no hypothesis)."""
  sequences: jax.Array
  scores: jax.Array


def gnmt_length_penalty(length, alpha):
  """((5 + length) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def tile_beams(cache: Any, beam_size: int) -> Any:
  """Repeats each non-scalar leaf [B, ...] -> [B * K, ...], beam k of b at row b * K + k."""
  return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, beam_size, axis=0), cache)


def gather_beams(cache: Any, parent: jax.Array) -> Any:
  """Reorders the beams of each non-scalar leaf [B * K, ...] by parent int [B, K]."""
  batch, beams = parent.shape

  def gather(x):
    if x.ndim == 0:
      return x
    x = x.reshape((batch, beams) + x.shape[1:])
    x = jax.vmap(lambda rows, idx: rows[idx])(x, parent)
    return x.reshape((batch * beams,) + x.shape[2:])

  return jax.tree.map(gather, cache)


def _check_cache(cache: Any, batch: int):
  for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
    if leaf.ndim and leaf.shape[0] != batch:
      raise ValueError(f"Cache leaf {jax.tree_util.keystr(path)} has shape {leaf.shape}; beam "
                       f"search needs the batch axis ({batch}) first on every non-scalar leaf.")


def _top_k(values: jax.Array, k: int, *arrays: jax.Array):
  """The k largest `values` [B, M] and the matching rows of each array [B, M, ...]."""
  top, idx = jax.lax.top_k(values, k)
  return (top,) + tuple(jax.vmap(lambda a, i: a[i])(a, idx) for a in arrays)


def beam_search_from_logits(decode_fn: DecodeFn, logits: jax.Array, cache: Any, *,
                            beam_size: int, max_new_tokens: int, length_penalty,
                            eos_id, pad_id) -> tuple[jax.Array, jax.Array]:
  """Beam search after a prefill (traceable; call it inside your own jit).

  Args:
    decode_fn: one step, (tokens int32 [B*K, 1], cache) -> (logits [B*K, 1, V], cache).
    logits: [B, V], the next-token logits at the end of each prompt (from the prefill).
    cache: the prefilled cache for batch B, with room for max_new_tokens more tokens.
    beam_size: K >= 1.
    max_new_tokens: N >= 1.
    length_penalty: alpha >= 0 of the GNMT penalty (may be traced).
    eos_id: int (may be traced); -1 = no EOS (every hypothesis has N tokens).
    pad_id: token written after EOS.

  Returns:
    (tokens int32 [B, K, N], scores float32 [B, K]), best first.
  """
  batch, vocab = logits.shape
  beams, steps = beam_size, max_new_tokens
  _check_cache(cache, batch)
  eos_id, pad_id = jnp.asarray(eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32)
  has_eos = eos_id >= 0
  is_eos = (jnp.arange(vocab) == eos_id) & has_eos  # [V]
  max_bound = gnmt_length_penalty(steps, length_penalty)
  empty = jnp.full((batch, beams, steps), pad_id, jnp.int32)
  state = {
      "i": jnp.zeros((), jnp.int32),
      "logits": jnp.broadcast_to(logits.astype(jnp.float32)[:, None], (batch, beams, vocab)),
      # Only beam 0 is live at first, so the first step picks K distinct tokens.
      "alive_lp": jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF) * jnp.ones((batch, 1)),
      "alive_seqs": empty,
      "fin_scores": jnp.full((batch, beams), NEG_INF, jnp.float32),
      "fin_seqs": empty,
      "cache": tile_beams(cache, beams),
  }

  def not_done(s):
    best_alive = s["alive_lp"][:, 0] / max_bound
    finished = s["fin_scores"][:, -1] >= best_alive
    return (s["i"] < steps) & ~jnp.all(finished)

  def step(s):
    i = s["i"]
    live = s["alive_lp"] > NEG_INF / 2  # [B, K]
    cand = s["alive_lp"][..., None] + jax.nn.log_softmax(s["logits"], axis=-1)  # [B, K, V]
    cand = jnp.where(live[..., None], cand, NEG_INF)
    # Finished: EOS extensions that rank among the K best of all K * V extensions.
    kth_best = jax.lax.top_k(cand.reshape(batch, beams * vocab), beams)[0][:, -1:]
    eos_lp = jnp.sum(jnp.where(is_eos, cand, 0.0), axis=-1)  # [B, K]
    eos_ok = has_eos & live & (eos_lp >= kth_best)
    eos_scores = jnp.where(eos_ok, eos_lp / gnmt_length_penalty(i + 1, length_penalty),
                           NEG_INF)
    eos_seqs = s["alive_seqs"].at[:, :, i].set(eos_id)
    fin_scores, fin_seqs = _top_k(
        jnp.concatenate([s["fin_scores"], eos_scores], axis=1), beams,
        jnp.concatenate([s["fin_seqs"], eos_seqs], axis=1))
    # Alive: the K best non-EOS extensions.
    flat = jnp.where(is_eos, NEG_INF, cand).reshape(batch, beams * vocab)
    alive_lp, flat_idx = jax.lax.top_k(flat, beams)
    parent, token = flat_idx // vocab, (flat_idx % vocab).astype(jnp.int32)
    alive_lp = jnp.where(alive_lp > NEG_INF / 2, alive_lp, NEG_INF)
    alive_seqs = jax.vmap(lambda rows, p: rows[p])(s["alive_seqs"], parent)
    alive_seqs = alive_seqs.at[:, :, i].set(token)
    cache = gather_beams(s["cache"], parent)
    logits, cache = decode_fn(token.reshape(batch * beams, 1), cache)
    return {"i": i + 1, "logits": logits[:, -1].astype(jnp.float32).reshape(batch, beams, vocab),
            "alive_lp": alive_lp, "alive_seqs": alive_seqs, "fin_scores": fin_scores,
            "fin_seqs": fin_seqs, "cache": cache}

  s = jax.lax.while_loop(not_done, step, state)
  # Beams alive after N steps are truncated hypotheses; after an early stop none can win.
  truncated = jnp.where((s["i"] == steps) & (s["alive_lp"] > NEG_INF / 2),
                        s["alive_lp"] / max_bound, NEG_INF)
  scores, tokens = _top_k(jnp.concatenate([s["fin_scores"], truncated], axis=1), beams,
                          jnp.concatenate([s["fin_seqs"], s["alive_seqs"]], axis=1))
  return tokens, scores


def beam_search(model: nnx.Module, prompt: jax.Array, *, max_new_tokens: int,
                beam_size: int = 4, length_penalty: float = 0.6, eos_id: int | None = None,
                pad_id: int = 0) -> BeamSearchOutput:
  """The K best continuations of every prompt under the GNMT-penalised log-probability.

  Args:
    model: a module with `init_cache` / `decode` (e.g. models.Decoder).
    prompt: int [B, P]; all rows have the same length P (no per-row padding).
    max_new_tokens: N >= 1, the most tokens generated (EOS included).
    beam_size: K >= 1 (4 in the METALM paper).
    length_penalty: alpha >= 0 in ((5 + n) / 6) ** alpha (0.6 in the METALM paper).
    eos_id: ends a hypothesis; None = every hypothesis has N tokens.
    pad_id: fills the positions after EOS (and empty hypotheses).

  Returns:
    BeamSearchOutput(sequences int32 [B, K, P + N], scores float32 [B, K]), best first.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  if beam_size < 1:
    raise ValueError(f"beam_size={beam_size} must be >= 1.")
  if length_penalty < 0:
    raise ValueError(f"length_penalty={length_penalty} must be >= 0 (the early stop relies "
                     "on it; 0 = no penalty).")
  graphdef, state = nnx.split(model)
  return _beam_search(graphdef, state, jnp.asarray(prompt, jnp.int32),
                      jnp.float32(length_penalty), jnp.int32(-1 if eos_id is None else eos_id),
                      jnp.int32(pad_id), beam_size=beam_size, max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "beam_size", "max_new_tokens"))
def _beam_search(graphdef, state, prompt, length_penalty, eos_id, pad_id, *, beam_size,
                 max_new_tokens):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.decode(prompt, cache)
  tokens, scores = beam_search_from_logits(
      model.decode, logits[:, -1], cache, beam_size=beam_size,
      max_new_tokens=max_new_tokens, length_penalty=length_penalty, eos_id=eos_id,
      pad_id=pad_id)
  prompts = jnp.broadcast_to(prompt[:, None], (batch, beam_size, prompt_len))
  return BeamSearchOutput(jnp.concatenate([prompts, tokens], axis=2), scores)
