"""Span sampling and semi-causal masks for METALM (pure functions).

Axis letters: B batch, L length, M spans per row (static `max_spans`).

A row's non-causal spans are described three equivalent ways, all with static shapes:
  starts, lengths   int32 [M]  span m covers positions starts[m] .. starts[m] + lengths[m] - 1;
                               unused slots have length 0 (and start 0)
  span_ids          int32 [L]  0 = causal position, m + 1 = inside span m

`sample_spans` (NumPy, runs per packed row in the grain pipeline) draws them, with a span
selection strategy (`SPAN_STRATEGIES`, `config.spans.strategy`: 'random', 'length_aware',
'saliency'; the saliency scores come from `unigram_scores` / `saliency_scores`);
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


SPAN_STRATEGIES = ('random', 'length_aware', 'saliency')


def sample_spans(doc_ids: np.ndarray, rng: np.random.Generator, *, ratio: float,
                 min_len: int, max_len: int, max_spans: int, strategy: str = 'random',
                 scores: np.ndarray | None = None,
                 temperature: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
  """Draws non-overlapping spans inside single documents covering about `ratio` of tokens.

  `strategy` picks which spans (`SPAN_STRATEGIES`; config key `config.spans.strategy`):
    'random'        the length uniform in [min_len, max_len], the start uniform (below);
    'length_aware'  a document first, then a length that grows with the document's length
                    (short documents get short spans, long documents long ones);
    'saliency'      spans centred on informative tokens: a centre drawn with probability
                    proportional to exp(scores[i] / temperature) among free positions
                    (`scores` float [L]: e.g. `saliency_scores(ids, unigram_scores(counts))`,
                    -log frequency, or per-token losses of a model: any higher-is-salient
                    score works).
  Every strategy shares the guarantees below and the capping of steps 2-3; only the draws of
  the length and of the position differ. 'random' is the original sampler, draw for draw.

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

  'length_aware' instead draws a free position uniformly among those that start a min_len
  stretch, takes its document d (n_d tokens in the row of L) and draws the length as
  min_len + Binomial(max_len - min_len, n_d / L) (mean proportional to n_d); steps 2-3 then
  cap it by d's longest free stretch, and the start is uniform inside d.
  'saliency' draws the centre c (step 4 first), the length as in step 1, caps it by the
  free stretch holding c (steps 2-3) and places the span as centred on c as that stretch
  allows.

  Guarantees: every span lies inside one document (padding, id 0, is never covered), spans
  never overlap, min_len <= length <= max_len, coverage < T + min_len, and the same
  generator state gives the same spans.

  Args:
    doc_ids: int [L] document (segment) id per position; 0 = padding, never covered.
    rng: numpy Generator (the pipeline's per-row generator); same seed, same spans.
    ratio: target fraction of non-padding tokens inside spans, in [0, 1).
    min_len, max_len: span length bounds, 1 <= min_len <= max_len.
    max_spans: the static number of span slots M.
    strategy: one of `SPAN_STRATEGIES`.
    scores: float [L], 'saliency' only (required there): higher = more salient.
    temperature: 'saliency' only, > 0: lower concentrates centres on the top scores.

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
  if strategy not in SPAN_STRATEGIES:
    raise ValueError(f'strategy={strategy!r} is not a span strategy; valid: '
                     f'{list(SPAN_STRATEGIES)}.')
  kw = dict(ratio=ratio, min_len=min_len, max_len=max_len, max_spans=max_spans)
  if strategy == 'random':
    spans = _random_spans(np.asarray(doc_ids), rng, **kw)
  elif strategy == 'length_aware':
    spans = _length_aware_spans(np.asarray(doc_ids), rng, **kw)
  else:
    if scores is None:
      raise ValueError("strategy='saliency' needs scores (float [L], higher = more salient), "
                       'e.g. saliency_scores(row_ids, unigram_scores(counts)).')
    if not temperature > 0:
      raise ValueError(f'temperature={temperature} must be > 0.')
    scores = np.asarray(scores, np.float64)
    if scores.shape != np.shape(doc_ids):
      raise ValueError(f'scores has shape {scores.shape}; expected {np.shape(doc_ids)} '
                       '(one score per position).')
    spans = _saliency_spans(np.asarray(doc_ids), rng, scores=scores,
                            temperature=float(temperature), **kw)
  starts = np.zeros(max_spans, np.int32)
  lengths = np.zeros(max_spans, np.int32)
  for m, (start, length) in enumerate(sorted(spans)):
    starts[m], lengths[m] = start, length
  return starts, lengths


def _cap_length(length: int, *, remaining: int, room: int, min_len: int, max_len: int) -> int:
  """Steps 2-3: a drawn `length` capped by `room` (a free stretch inside one document, >=
  min_len) and the remaining target, avoiding remainders no span can fill."""
  length = min(length, room)
  if remaining >= min_len:
    length = min(length, remaining)
    if 0 < remaining - length < min_len:  # a remainder no span could fill exactly
      if remaining <= min(max_len, room):
        length = remaining
      elif remaining - min_len >= min_len:
        length = remaining - min_len
  else:
    length = min_len
  return length


def _place_spans(doc_ids, *, ratio, max_spans, draw):
  """The placement loop every strategy shares: spans are drawn one at a time until the
  target coverage is reached, `max_spans` exist, or `draw` finds no room. `draw(free, runs,
  remaining)` returns (start, length) of the next span, or None when no free stretch of
  min_len tokens is left (`runs` = `free_run_lengths(doc_ids, free)`)."""
  free = doc_ids != 0
  target = int(round(ratio * int(free.sum())))
  covered, spans = 0, []
  while len(spans) < max_spans and target - covered > 0:
    span = draw(free, free_run_lengths(doc_ids, free), target - covered)
    if span is None:
      break
    start, length = span
    free[start:start + length] = False
    spans.append((start, length))
    covered += length
  return spans


def _random_spans(doc_ids, rng, *, ratio, min_len, max_len, max_spans):
  def draw(free, runs, remaining):
    del free
    room = int(runs.max(initial=0))  # the longest free stretch inside one document
    if room < min_len:
      return None
    length = _cap_length(int(rng.integers(min_len, max_len + 1)), remaining=remaining,
                         room=room, min_len=min_len, max_len=max_len)
    return int(rng.choice(np.flatnonzero(runs >= length))), length
  return _place_spans(doc_ids, ratio=ratio, max_spans=max_spans, draw=draw)


def _length_aware_spans(doc_ids, rng, *, ratio, min_len, max_len, max_spans):
  row_length = doc_ids.shape[0]

  def draw(free, runs, remaining):
    del free
    candidates = np.flatnonzero(runs >= min_len)
    if candidates.size == 0:
      return None
    doc = doc_ids[int(rng.choice(candidates))]
    in_doc = doc_ids == doc
    doc_runs = np.where(in_doc, runs, 0)
    share = int(in_doc.sum()) / row_length  # the document's length, relative to the row
    length = min_len + int(rng.binomial(max_len - min_len, share))
    length = _cap_length(length, remaining=remaining, room=int(doc_runs.max()),
                         min_len=min_len, max_len=max_len)
    return int(rng.choice(np.flatnonzero(doc_runs >= length))), length
  return _place_spans(doc_ids, ratio=ratio, max_spans=max_spans, draw=draw)


def _saliency_spans(doc_ids, rng, *, ratio, min_len, max_len, max_spans, scores, temperature):
  positions = np.arange(doc_ids.shape[0])

  def draw(free, runs, remaining):
    # Each free position's stretch: [block_start, block_start + block_len).
    starts_block = free & ((positions == 0) | ~np.roll(free, 1) |
                           (doc_ids != np.roll(doc_ids, 1)))
    block_start = np.maximum.accumulate(np.where(starts_block, positions, 0))
    block_len = np.where(free, runs[block_start], 0)
    candidates = np.flatnonzero(block_len >= min_len)
    if candidates.size == 0:
      return None
    logits = scores[candidates] / temperature
    weights = np.exp(logits - logits.max())
    centre = int(rng.choice(candidates, p=weights / weights.sum()))
    lo, room = int(block_start[centre]), int(block_len[centre])
    length = _cap_length(int(rng.integers(min_len, max_len + 1)), remaining=remaining,
                         room=room, min_len=min_len, max_len=max_len)
    return min(max(centre - (length - 1) // 2, lo), lo + room - length), length
  return _place_spans(doc_ids, ratio=ratio, max_spans=max_spans, draw=draw)


def unigram_scores(counts: np.ndarray) -> np.ndarray:
  """Token id -> saliency, -log p(token) with add-one smoothing (rare tokens score high).

  Args:
    counts: int [V], how often each token id occurs in the training split
      (`data.unigram.unigram_counts`).

  Returns:
    float32 [V], >= 0.
  """
  counts = np.asarray(counts, np.float64)
  return (-np.log((counts + 1.0) / (counts.sum() + counts.shape[0]))).astype(np.float32)


def saliency_scores(token_ids: np.ndarray, score_table: np.ndarray) -> np.ndarray:
  """Per-position scores of a row: score_table[token_ids] (ids beyond the table score as the
  rarest: the table's maximum)."""
  token_ids = np.asarray(token_ids)
  table = np.asarray(score_table, np.float32)
  inside = (token_ids >= 0) & (token_ids < table.shape[0])
  return np.where(inside, table[np.clip(token_ids, 0, table.shape[0] - 1)], table.max())


def prefix_length(text_length: int, rng: np.random.Generator, *, strategy: str = 'random',
                  scores: np.ndarray | None = None, temperature: float = 0.25) -> int:
  """How many text tokens join the image span of a vision-language row (its encoder span is
  the image + a text prefix; the decoder predicts the rest): an int in [0, n - 1] for a text
  of n >= 1 tokens (0 when n <= 1), so at least one token is always predicted.

    'random'        uniform in [0, n - 1] (the METALM recipe; the draw of `vl_prepare`)
    'length_aware'  a fraction of the text, uniform in [1/4, 3/4] (rounded): longer texts
                    give longer prefixes, with the same mean as 'random' and less spread
    'saliency'      the prefix ends right after a salient token: position c is drawn with
                    probability ~ exp(scores[c] / temperature) over the text (`scores` [n],
                    e.g. `saliency_scores` of the row's text), the prefix is c + 1 (at most
                    n - 1), so the encoder reads the rare token with the image
  """
  if strategy not in SPAN_STRATEGIES:
    raise ValueError(f'strategy={strategy!r} is not a span strategy; valid: '
                     f'{list(SPAN_STRATEGIES)}.')
  n = int(text_length)
  if strategy == 'random':
    return int(rng.integers(0, max(n, 1)))
  if n <= 1:
    return 0
  if strategy == 'length_aware':
    return int(min(round(rng.uniform(0.25, 0.75) * (n - 1)), n - 1))
  if scores is None or len(scores) < n:
    raise ValueError(f"strategy='saliency' needs scores for the text's {n} tokens.")
  logits = np.asarray(scores[:n], np.float64) / temperature
  probs = np.exp(logits - logits.max())
  centre = int(rng.choice(n, p=probs / probs.sum()))
  return min(centre + 1, n - 1)


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
