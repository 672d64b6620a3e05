"""T5 span corruption (Raffel et al. 2020, section 3.1.4): 15% noise, mean span length 3.

Per document chunk, `random_spans_noise_mask` marks round(15%) of the tokens as noise, in
round(noise / 3) spans placed uniformly at random (T5's `random_spans_noise_mask`). The
source keeps the clean tokens and replaces span k by the sentinel <extra_id_k>; the target
lists each sentinel followed by its span:

    original  a b c d e f g h
    source    a <0> d e f <1> h          target  <0> b c <1> g

Formulation in one stack (encoder-decoder in one Transformer, fixed length L): a chunk's
slots hold `source ++ target`, fed as inputs[i] -> targets[i] = next token; the source is
the `bidirectional` prefix and the loss is on the target tokens only (the last source
position predicts <extra_id_0>). Such a chunk needs m + 2 * spans - 1 slots for m original
tokens, so `prepare` corrupts the longest leading part of each chunk that still fits in the
chunk's own slots (about 80% of it; the tail is dropped); positions restart per chunk and
continue from source into target. Sentinels are placeholders (`special_tokens.sentinel`),
resolved to the top of the model vocabulary by `prefix_lm.loss`.
"""
from __future__ import annotations

import numpy as np

from metalm_jax import objectives
from metalm_jax.objectives import prefix_lm, rows, special_tokens


def num_noise_and_spans(length: int, noise_density: float, mean_span_length: float):
  """(noise tokens, spans) for a document of `length` tokens, as in T5 (spans capped by
  the number of sentinels)."""
  num_noise = int(round(length * noise_density))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = max(1, int(round(num_noise / mean_span_length)))
  return num_noise, min(num_spans, num_noise, length - num_noise, special_tokens.NUM_SENTINELS)


def random_spans_noise_mask(length: int, rng: np.random.Generator, *,
                            noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> np.ndarray:
  """bool [length], True on noise tokens: noise and clean runs alternate, clean first.

  Needs length >= 2 (one clean and one noise token at least).
  """
  if length < 2:
    raise ValueError(f"length={length}: span corruption needs at least 2 tokens")
  num_noise, num_spans = num_noise_and_spans(length, noise_density, mean_span_length)
  noise_lengths = rows.random_segmentation(num_noise, num_spans, rng)
  clean_lengths = rows.random_segmentation(length - num_noise, num_spans, rng)
  runs = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
  is_noise = np.tile([False, True], num_spans)
  return np.repeat(is_noise, runs)


def corrupt(tokens: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(source, target) of T5 span corruption; both int32 with sentinel placeholders."""
  tokens = np.asarray(tokens, np.int32)
  span_start = noise & ~np.concatenate([[False], noise[:-1]])
  span_index = np.maximum(np.cumsum(span_start) - 1, 0)  # only read at span starts
  sentinels = special_tokens.sentinel(span_index).astype(np.int32)
  source = np.where(span_start, sentinels, tokens)[~noise | span_start]
  target = np.where(span_start, sentinels, 0)
  # target: for each span, its sentinel then its tokens.
  target = np.stack([target, tokens], axis=1)  # [len, 2]: (sentinel or 0, token)
  keep = np.stack([span_start, noise], axis=1)
  return source, target[keep]


def reconstruct(source: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Inverse of `corrupt`: each sentinel of `source` replaced by its span from `target`."""
  spans, current = {}, None
  for token in np.asarray(target).tolist():
    if token <= -2:
      current = token
      spans[current] = []
    elif current is not None:
      spans[current].append(token)
  out = []
  for token in np.asarray(source).tolist():
    out.extend(spans.get(token, []) if token <= -2 else [token])
  return np.asarray(out, np.int32)


def fitting_length(slots: int, noise_density: float, mean_span_length: float) -> int:
  """The most original tokens m whose corrupted chunk fits: m + 2 * spans(m) - 1 <= slots."""
  for m in range(slots + 1, 1, -1):
    if m + 2 * num_noise_and_spans(m, noise_density, mean_span_length)[1] - 1 <= slots:
      return m
  return 0


def make(*, noise_density: float = 0.15, mean_span_length: float = 3.0):
  """A span-corruption `prepare` (register it under a new name to use other rates)."""
  if not 0.0 < noise_density < 1.0:
    raise ValueError(f"noise_density={noise_density} must be in (0, 1)")
  if mean_span_length < 1.0:
    raise ValueError(f"mean_span_length={mean_span_length} must be >= 1")

  def prepare(row: dict, rng: np.random.Generator) -> dict:
    builder = rows.RowBuilder(len(row["inputs"]))
    for start, end in rows.segment_spans(row["segment_ids"]):
      m = fitting_length(end - start, noise_density, mean_span_length)
      if m < 2:
        continue  # too short to corrupt: dropped (left as padding)
      tokens = rows.chunk_tokens(row, start, end)[:m]
      noise = random_spans_noise_mask(m, rng, noise_density=noise_density,
                                      mean_span_length=mean_span_length)
      source, target = corrupt(tokens, noise)
      builder.add_sequence(np.concatenate([source, target]),
                           num_bidirectional=len(source), loss_from=len(source) - 1)
    return builder.row()

  return prepare


prepare = make()
objectives.register("span_corruption", loss=prefix_lm.loss, prepare=prepare,
                     special_tokens=True)
