"""Prefix LM, and the one-stack bidirectional-prefix loss that the denoising objectives share.

Formulation (UniLM / T5's prefix LM, in one Transformer stack): each document chunk of a
packed row is split at a uniformly random point p in [1, n]; its first p positions attend
to each other in both directions (the "prefix"), the rest attend causally, and the
next-token loss is taken on positions >= p - 1 only (position p - 1, the last prefix
position, predicts the first non-prefix token and sees only the prefix, so nothing
leaks). Inputs, targets, positions and segments stay those of the packed row; `prepare`
adds `bidirectional` (int32 [L], 1 on prefix positions) and zeroes the prefix's weights.

`loss` is reused by masked LM (everything bidirectional, targets = the token itself), T5
span corruption and BART denoising (corrupted source = the bidirectional prefix, the target
decoded causally after it): any row with `bidirectional` and next-token `targets` works.
Placeholder ids (negative, `special_tokens`) are resolved against `model.vocab_size` here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metalm_jax import objectives
from metalm_jax.layers.masks import causal_mask
from metalm_jax.objectives import rows, special_tokens
from metalm_jax.objectives.causal_lm import weighted_cross_entropy


def prefix_attention_mask(bidirectional: jax.Array) -> jax.Array:
  """Causal mask opened between bidirectional positions: bool [B, 1, L, L].

  mask[b, 0, i, j] = j <= i or (bidirectional[b, i] and bidirectional[b, j]). Segment
  masking (same document) is added by the model from `segment_ids`.

  Args:
    bidirectional: int or bool [B, L].
  """
  bi = bidirectional.astype(bool)
  length = bi.shape[1]
  return causal_mask(length) | (bi[:, None, :, None] & bi[:, None, None, :])


def model_vocab_size(model) -> int:
  vocab_size = getattr(model, "vocab_size", None)
  if not isinstance(vocab_size, int):
    raise ValueError(f"{type(model).__name__} has no int `vocab_size`; objectives with special "
                     "tokens need it to place [MASK] / sentinels at the top of the vocabulary")
  return vocab_size


def loss(model, batch, *, deterministic: bool = True, rng=None):
  """Weighted next-token loss of a decoder with a bidirectional prefix per segment.

  batch: inputs, targets (int [B, L], may hold negative placeholders), weights (float
  [B, L]), segment_ids, positions (int [B, L]), bidirectional (int [B, L]).
  """
  vocab_size = model_vocab_size(model)
  inputs = special_tokens.resolve(batch["inputs"], vocab_size)
  targets = special_tokens.resolve(batch["targets"], vocab_size)
  logits, _ = model(inputs, positions=batch["positions"], segment_ids=batch["segment_ids"],
                    attention_mask=prefix_attention_mask(batch["bidirectional"]),
                    deterministic=deterministic, rngs=rng)
  return weighted_cross_entropy(logits, targets, batch["weights"])


def prepare(row: dict, rng: np.random.Generator) -> dict:
  """Packed row -> the same row with a random bidirectional prefix per segment (see above)."""
  out = {k: np.array(v) for k, v in row.items()}
  bidirectional = np.zeros_like(row["segment_ids"], dtype=np.int32)
  weights = np.asarray(row["weights"], np.float32).copy()
  for start, end in rows.segment_spans(row["segment_ids"]):
    p = int(rng.integers(1, end - start + 1))
    bidirectional[start:start + p] = 1
    weights[start:start + p - 1] = 0.0
  out["bidirectional"], out["weights"] = bidirectional, weights
  return out


objectives.register("prefix_lm", loss=loss, prepare=prepare)
