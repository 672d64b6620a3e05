"""NumPy helpers shared by the objectives' `prepare`: read documents out of a packed row and
write rebuilt documents back into a fixed-length row.

A packed row (metalm_jax/data/pipeline.py) holds several document chunks as contiguous
segments: `segment_ids` 1, 2, ... (0 = padding), `positions` restarting at 0, and
`inputs` / `targets` the chunk's tokens and next tokens. A chunk of n input slots holds
n + 1 tokens: `inputs[s:e]` followed by `targets[e - 1]`.

Rebuilt rows use one extra key, `bidirectional` (int32 [L], 1 = the position belongs to the
segment's bidirectional part): `prefix_lm.loss` lets such positions attend to each other
in both directions, everything else attends causally, always within its segment.
"""
from __future__ import annotations

import numpy as np

PREFIX_FEATURES = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
                   "positions": np.int32, "weights": np.float32, "bidirectional": np.int32}


def segment_spans(segment_ids: np.ndarray) -> list[tuple[int, int]]:
  """[(start, end), ...] of the non-padding segments of a row, in order.

  Args:
    segment_ids: int [L]; equal ids are contiguous, 0 = padding.
  """
  ids = np.asarray(segment_ids)
  change = np.flatnonzero(np.diff(ids) != 0) + 1
  starts = np.concatenate([[0], change])
  ends = np.concatenate([change, [len(ids)]])
  return [(int(s), int(e)) for s, e in zip(starts, ends) if ids[s] != 0]


def chunk_tokens(row: dict, start: int, end: int) -> np.ndarray:
  """The n + 1 tokens of the chunk in slots [start, end): inputs then the last target."""
  return np.concatenate([row["inputs"][start:end], row["targets"][end - 1:end]])


class RowBuilder:
  """Writes rebuilt segments one after another into a fresh row of PREFIX_FEATURES [L]."""

  def __init__(self, length: int):
    self.length = length
    self.fields = {k: np.zeros(length, dtype) for k, dtype in PREFIX_FEATURES.items()}
    self.cursor = 0
    self.num_segments = 0

  def add_sequence(self, sequence: np.ndarray, *, num_bidirectional: int,
                   loss_from: int) -> None:
    """Adds one segment fed `sequence[:-1]` to predict `sequence[1:]` (next tokens).

    Positions < num_bidirectional attend bidirectionally; the next-token loss is on
    positions >= loss_from (set loss_from >= num_bidirectional - 1 so nothing leaks).
    """
    n = len(sequence) - 1
    self.add(sequence[:-1], sequence[1:], weights=np.arange(n) >= loss_from,
             bidirectional=np.arange(n) < num_bidirectional)

  def add(self, inputs, targets, *, weights, bidirectional) -> None:
    """Adds one segment with the given per-position fields (all [n])."""
    n = len(inputs)
    if self.cursor + n > self.length:
      raise ValueError(f"segment of {n} tokens does not fit: {self.cursor} of {self.length} "
                       "slots already used")
    s = slice(self.cursor, self.cursor + n)
    self.num_segments += 1
    self.fields["inputs"][s] = inputs
    self.fields["targets"][s] = targets
    self.fields["weights"][s] = np.asarray(weights, np.float32)
    self.fields["bidirectional"][s] = np.asarray(bidirectional, np.int32)
    self.fields["segment_ids"][s] = self.num_segments
    self.fields["positions"][s] = np.arange(n)
    self.cursor += n

  def row(self) -> dict[str, np.ndarray]:
    return self.fields


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """Lengths (int [num_segments], each >= 1, summing to num_items) of a uniformly random
  split of `num_items` items into `num_segments` non-empty runs."""
  if not 1 <= num_segments <= num_items:
    raise ValueError(f"cannot split {num_items} items into {num_segments} non-empty segments")
  cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
  return np.diff(np.concatenate([[0], cuts, [num_items]]))
