"""Span sampling and semi-causal masks for METALM (pure functions).

Axis letters: B batch, L length, M spans per row (static `max_spans`).

A row's non-causal spans are described three equivalent ways, all with static shapes:
  starts, lengths   int32 [M]  span m covers positions starts[m] .. starts[m] + lengths[m] - 1;
                               unused slots have length 0 (and start 0)
  span_ids          int32 [L]  0 = causal position, m + 1 = inside span m

`sample_spans` (NumPy, runs per packed row in the grain pipeline) draws them;
`span_ids_from_spans` converts; `span_loss_weights` and `semi_causal_mask` (jnp, inside the
jitted loss / model) derive the loss weights and the single-stack attention mask. Slow,
obvious loop references of the last two live in tests/test_masking.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def free_run_lengths(doc_ids: np.ndarray, free: np.ndarray) -> np.ndarray:
  """For each position i: how many consecutive positions from i are free and in i's document.

  Args:
    doc_ids: int [L] document ids (0 = padding).
    free: bool [L] positions a span may still cover.

  Returns:
    int64 [L]; 0 where position i itself is not free.
  """
  doc_ids, free = np.asarray(doc_ids), np.asarray(free, bool)
  if not free.any():
    return np.zeros(doc_ids.shape, np.int64)
  block_ends_after = np.append(doc_ids[1:] != doc_ids[:-1], True) | ~np.append(free[1:], False)
  ends = np.flatnonzero(free & block_ends_after)  # last position of each free block
  positions = np.arange(doc_ids.shape[0])
  nearest_end = ends[np.minimum(np.searchsorted(ends, positions), ends.size - 1)]
  return np.where(free, nearest_end - positions + 1, 0)


def sample_spans(doc_ids: np.ndarray, rng: np.random.Generator, *, ratio: float,
                 min_len: int, max_len: int, max_spans: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws non-overlapping spans inside single documents covering about `ratio` of tokens.

  The target is T = round(ratio * #non-padding tokens). Spans are placed one at a time:
    1. a length is drawn uniform in [min_len, max_len];
    2. it is capped by the room left: the remaining target R = T - covered (when
       R >= min_len) and the longest free stretch inside one document (so in documents
       shorter than the drawn length the span takes the longest length that fits, never
       falls back to min_len);
    3. if that would leave 0 < R - length < min_len (a remainder no span can fill without
       overshooting), the span instead takes all of R (when R <= max_len and it fits) or
       leaves exactly min_len for one more span (when R - min_len >= min_len);
    4. the start is uniform among the positions where a span of that length fits inside
       one document without overlapping an earlier span. Spans may touch each other (a
       span may start right after another ends, in the same document).
  The loop stops when T is reached, `max_spans` spans exist, or no free stretch of min_len
  tokens is left (short documents may then end below T). When 0 < R < min_len only a
  min_len span can be placed, so coverage ends at T exactly when step 3 could arrange it,
  and otherwise above it by less than min_len.

  Guarantees: every span lies inside one document (padding, id 0, is never covered), spans
  never overlap, min_len <= length <= max_len, coverage < T + min_len, and the same
  generator state gives the same spans.

  Args:
    doc_ids: int [L] document (segment) id per position; 0 = padding, never covered.
    rng: numpy Generator (the pipeline's per-row generator); same seed, same spans.
    ratio: target fraction of non-padding tokens inside spans, in [0, 1).
    min_len, max_len: span length bounds, 1 <= min_len <= max_len.
    max_spans: the static number of span slots M.

  Returns:
    (starts, lengths), int32 [max_spans] each, sorted by start with the used spans first;
    unused slots are (0, 0).
  """
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f'ratio={ratio} must be in [0, 1).')
  if not 1 <= min_len <= max_len:
    raise ValueError(f'need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}.')
  if max_spans < 1:
    raise ValueError(f'max_spans={max_spans} must be >= 1.')
  doc_ids = np.asarray(doc_ids)
  free = doc_ids != 0
  target = int(round(ratio * int(free.sum())))
  covered, spans = 0, []
  while len(spans) < max_spans and target - covered > 0:
    runs = free_run_lengths(doc_ids, free)
    room = int(runs.max(initial=0))  # the longest free stretch inside one document
    if room < min_len:
      break
    length = min(int(rng.integers(min_len, max_len + 1)), room)
    remaining = target - covered
    if remaining >= min_len:
      length = min(length, remaining)
      if 0 < remaining - length < min_len:  # a remainder no span could fill exactly
        if remaining <= min(max_len, room):
          length = remaining
        elif remaining - min_len >= min_len:
          length = remaining - min_len
    else:
      length = min_len
    start = int(rng.choice(np.flatnonzero(runs >= length)))
    free[start:start + length] = False
    spans.append((start, length))
    covered += length
  starts = np.zeros(max_spans, np.int32)
  lengths = np.zeros(max_spans, np.int32)
  for m, (start, length) in enumerate(sorted(spans)):
    starts[m], lengths[m] = start, length
  return starts, lengths


def span_ids_from_spans(starts: np.ndarray, lengths: np.ndarray, length: int) -> np.ndarray:
  """(starts, lengths) int [M] -> span_ids int32 [length]: m + 1 inside span m, 0 elsewhere."""
  span_ids = np.zeros(length, np.int32)
  for m, (start, n) in enumerate(zip(np.asarray(starts), np.asarray(lengths))):
    span_ids[start:start + n] = m + 1
  return span_ids


def span_loss_weights(span_ids: jax.Array) -> jax.Array:
  """Which positions' next-token predictions count in the semi-causal loss.

  Causal positions count; inside a span only its last position does (it predicts the token
  after the span; the others predict tokens the bidirectional encoder has already seen).

  Args:
    span_ids: int [..., L].

  Returns:
    float32 [..., L], 1.0 where the prediction counts.
  """
  span_ids = jnp.asarray(span_ids)
  following = jnp.concatenate([span_ids[..., 1:], jnp.zeros_like(span_ids[..., :1])], axis=-1)
  last_of_span = (span_ids != 0) & (following != span_ids)
  return ((span_ids == 0) | last_of_span).astype(jnp.float32)


def semi_causal_mask(span_ids: jax.Array) -> jax.Array:
  """Single-stack semi-causal attention mask.

  mask[b, 0, i, j] = (j <= i) | (span_ids[b, i] == span_ids[b, j] != 0): a token in a span
  sees its whole span bidirectionally and everything before it causally; causal tokens see
  the past (including earlier spans). Combine with `layers.masks.segment_mask` for packed rows
  (the Decoder does so when given segment_ids).

  Args:
    span_ids: int [B, L].

  Returns:
    bool [B, 1, L, L].
  """
  span_ids = jnp.asarray(span_ids)
  length = span_ids.shape[-1]
  causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  q, k = span_ids[:, :, None], span_ids[:, None, :]
  return (causal[None] | ((q == k) & (q != 0)))[:, None]


def default_span_settings(seq_len: int, *, ratio: float = 0.25) -> dict:
  """Span settings that scale with the row length L: lengths in [L/32, L/16].

  At L = 2048 this is the paper's 64-128 tokens; at the tiny configs' L = 128 it is 4-8.
  max_spans = ceil(ratio * L / min_len) always holds every sampled span, because every span
  has >= min_len tokens and coverage overshoots the target by < min_len.
  """
  min_len = max(2, seq_len // 32)
  max_len = max(min_len, seq_len // 16)
  max_spans = max(1, int(np.ceil(ratio * seq_len / min_len)))
  return dict(ratio=ratio, min_len=min_len, max_len=max_len, max_spans=max_spans)
