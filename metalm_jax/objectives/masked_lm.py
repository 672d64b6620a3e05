"""Masked LM with dynamic masking (BERT's 80/10/10 corruption, RoBERTa's fresh mask per epoch).

Formulation: the Decoder becomes a bidirectional encoder: every position is marked
`bidirectional` (so each attends to its whole segment) and predicts the ORIGINAL token at
its own position. `prepare` picks round(mask_rate * n) of the row's n real tokens (at least
one); of those, round(80%) become [MASK] (placeholder `special_tokens.MASK`), round(10%) a
random token, and the rest stay unchanged. `targets` holds the original token at every
position (so a row can be checked against its source) and `weights` is 1 on the picked
positions only. The loss is `prefix_lm.loss`.

Dynamic masking: `prepare` runs in the grain pipeline with a generator seeded by the row's
index, which differs between epochs, so each pass over the data gets a new mask
(RoBERTa, section 4.1) instead of BERT's static, preprocessed one.

Random replacements are drawn uniformly from [0, vocab_size) when `make(vocab_size=...)`
is given; by default (the pipeline does not know the vocabulary) from the real tokens of
the same row, i.e. the row's unigram distribution.
"""
from __future__ import annotations

import numpy as np

from metalm_jax import objectives
from metalm_jax.objectives import prefix_lm, special_tokens


def mask_tokens(tokens: np.ndarray, valid: np.ndarray, rng: np.random.Generator, *,
                mask_rate: float = 0.15, mask_fraction: float = 0.8,
                random_fraction: float = 0.1, vocab_size: int | None = None):
  """BERT corruption of one row.

  Args:
    tokens: int [L] original tokens.
    valid: bool [L], positions that may be picked (real tokens).
    rng: NumPy generator.
    mask_rate: fraction of valid positions picked for prediction.
    mask_fraction, random_fraction: of the picked, the share replaced by [MASK] / by a
      random token; the rest stay unchanged.
    vocab_size: random tokens from [0, vocab_size); None = from the row's valid tokens.

  Returns:
    (corrupted int32 [L], picked bool [L]).
  """
  if not 0.0 < mask_rate <= 1.0:
    raise ValueError(f"mask_rate={mask_rate} must be in (0, 1]")
  if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1.0:
    raise ValueError(f"mask_fraction={mask_fraction} + random_fraction={random_fraction} must "
                     "be non-negative and sum to at most 1")
  corrupted = np.asarray(tokens, np.int32).copy()
  picked = np.zeros(len(tokens), bool)
  candidates = np.flatnonzero(valid)
  if candidates.size == 0:
    return corrupted, picked
  num_pick = max(1, int(round(mask_rate * candidates.size)))
  chosen = rng.permutation(rng.choice(candidates, num_pick, replace=False))
  picked[chosen] = True
  num_mask = int(round(mask_fraction * num_pick))
  num_random = min(int(round(random_fraction * num_pick)), num_pick - num_mask)
  corrupted[chosen[:num_mask]] = special_tokens.MASK
  random_slots = chosen[num_mask:num_mask + num_random]
  if vocab_size is None:
    corrupted[random_slots] = rng.choice(tokens[candidates], num_random)
  else:
    corrupted[random_slots] = rng.integers(0, vocab_size, num_random)
  return corrupted, picked


def make(*, mask_rate: float = 0.15, mask_fraction: float = 0.8, random_fraction: float = 0.1,
         vocab_size: int | None = None):
  """A masked-LM `prepare` with the given rates (register it under a new name to use it)."""

  def prepare(row: dict, rng: np.random.Generator) -> dict:
    valid = row["segment_ids"] > 0
    corrupted, picked = mask_tokens(row["inputs"], valid, rng, mask_rate=mask_rate,
                                    mask_fraction=mask_fraction,
                                    random_fraction=random_fraction, vocab_size=vocab_size)
    return {"inputs": corrupted, "targets": np.asarray(row["inputs"], np.int32),
            "segment_ids": np.asarray(row["segment_ids"], np.int32),
            "positions": np.asarray(row["positions"], np.int32),
            "weights": picked.astype(np.float32), "bidirectional": valid.astype(np.int32)}

  return prepare


prepare = make()
objectives.register("masked_lm", loss=prefix_lm.loss, prepare=prepare,
                     special_tokens=True)
