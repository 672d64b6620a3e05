"""Permutation LM (XLNet, Yang et al. 2019): a random factorisation order per document,
expressed as attention masks, with two-stream (content / query) self-attention.

`prepare` draws, per document chunk of n slots, a uniformly random order: `perm_rank`
(int32 [L]) is each position's rank in it (0 .. n-1; 0 on padding). XLNet's partial
prediction trains only the last round(n / predict_every) positions of the order
(`weights`); `targets` is the token AT each position (the inputs are not shifted).

In the loss, with r = perm_rank and the same-segment mask S:
  content stream h: mask_c[i, j] = S[i, j] & r[j] <= r[i]  (sees itself and earlier tokens)
  query stream g:   mask_q[i, j] = S[i, j] & r[j] <  r[i]  (sees earlier tokens only, and
                    its own position through g's positional encoding, never its content)
Both streams run through the SAME Decoder blocks (shared weights): per block, keys and
values come from the normed content stream; queries from each stream; the residual MLP is
applied to both. g starts as the embedding of [MASK] (the top vocabulary id, standing in
for XLNet's learned w) and the logits of the final g predict the token at each position.
Works with `models.Decoder` (any position encoding); dropout applies to both streams.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metalm_jax import objectives
from metalm_jax.layers.masks import segment_mask
from metalm_jax.objectives import prefix_lm, rows, special_tokens
from metalm_jax.objectives.causal_lm import weighted_cross_entropy


def permutation_masks(perm_rank: jax.Array, segment_ids: jax.Array):
  """(content mask, query mask), each bool [B, 1, L, L], from ranks and segments [B, L]."""
  same = segment_mask(segment_ids)
  r_q, r_k = perm_rank[:, None, :, None], perm_rank[:, None, None, :]
  return same & (r_k <= r_q), same & (r_k < r_q)


def two_stream(model, tokens: jax.Array, *, positions: jax.Array, perm_rank: jax.Array,
               segment_ids: jax.Array, deterministic: bool = True, rngs=None):
  """Two-stream forward of a Decoder: query-stream logits [B, L, V] float32.

  Args:
    model: a models.Decoder.
    tokens: int [B, L] (no placeholders).
    positions, perm_rank, segment_ids: int [B, L].
  """
  from flax import nnx  # local: keeps module import light

  if getattr(model, "scan_layers", False):
    raise ValueError("permutation_lm runs the two attention streams block by block; build "
                     "the Decoder with scan_layers=False (config.model.scan_layers=False)")
  if not deterministic and model.dropout_rate > 0.0 and rngs is None:
    raise ValueError("deterministic=False with dropout needs rngs= (a PRNG key)")
  if isinstance(rngs, jax.Array):
    rngs = nnx.Rngs(dropout=rngs)
  mask_c, mask_q = permutation_masks(perm_rank, segment_ids)
  vocab_size = prefix_lm.model_vocab_size(model)
  h = model.add_positions(model.embed(tokens), positions)
  mask_id = jnp.full_like(tokens, vocab_size + special_tokens.MASK)
  g = model.add_positions(model.embed(mask_id), positions)
  drop = lambda x: model.embed_dropout(x, deterministic=deterministic, rngs=rngs)
  h, g = drop(h), drop(g)
  rotary = model.rotary
  for block in model.blocks:
    attn = block.attention
    hn, gn = block.attn_norm(h), block.attn_norm(g)
    k, v = attn.keys_values(hn, positions, rotary)
    dh = attn.attend(attn.queries(hn, positions, rotary), k, v, mask_c)
    dg = attn.attend(attn.queries(gn, positions, rotary), k, v, mask_q)
    bdrop = lambda x, b=block: b.dropout(x, deterministic=deterministic, rngs=rngs)
    h, g = h + bdrop(dh), g + bdrop(dg)
    h = h + bdrop(block.mlp(block.mlp_norm(h)))
    g = g + bdrop(block.mlp(block.mlp_norm(g)))
  return model.logits(model.final_norm(g))


def loss(model, batch, *, deterministic: bool = True, rng=None):
  """Query-stream cross-entropy on the positions XLNet predicts (weights > 0)."""
  logits = two_stream(model, batch["inputs"], positions=batch["positions"],
                      perm_rank=batch["perm_rank"], segment_ids=batch["segment_ids"],
                      deterministic=deterministic, rngs=rng)
  return weighted_cross_entropy(logits, batch["targets"], batch["weights"])


def make(*, predict_every: float = 6.0):
  """A permutation-LM `prepare` predicting the last 1/predict_every of each order."""
  if predict_every < 1.0:
    raise ValueError(f"predict_every={predict_every} must be >= 1 (1 = predict every token)")

  def prepare(row: dict, rng: np.random.Generator) -> dict:
    perm_rank = np.zeros(len(row["inputs"]), np.int32)
    weights = np.zeros(len(row["inputs"]), np.float32)
    for start, end in rows.segment_spans(row["segment_ids"]):
      n = end - start
      rank = rng.permutation(n).astype(np.int32)
      perm_rank[start:end] = rank
      weights[start:end] = rank >= n - max(1, int(round(n / predict_every)))
    return {"inputs": np.asarray(row["inputs"], np.int32),
            "targets": np.asarray(row["inputs"], np.int32),
            "segment_ids": np.asarray(row["segment_ids"], np.int32),
            "positions": np.asarray(row["positions"], np.int32),
            "weights": weights, "perm_rank": perm_rank}

  return prepare


prepare = make()
objectives.register("permutation_lm", loss=loss, prepare=prepare,
                     special_tokens=True)
