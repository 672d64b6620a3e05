"""BART denoising (Lewis et al. 2020, section 2.2): reconstruct a document from a noised copy.

Noising functions (NumPy, on one document's tokens; [MASK] = `special_tokens.MASK`):
  token_masking        round(ratio * n) random tokens -> [MASK]
  token_deletion       round(ratio * n) random tokens deleted
  text_infilling       spans with Poisson(3) lengths covering round(ratio * n) tokens, each
                       replaced by ONE [MASK] (a 0-length span inserts a [MASK])
  sentence_permutation sentences (split after `sentence_end_ids`) shuffled
  document_rotation    rotated to start at a uniformly random token
A noising config is a weighted mix `{name: weight}`: each document gets one function drawn
by weight, or with `compose=True` all of them in the order above reversed (document-level
first, as BART-large combines sentence permutation with text infilling).

Formulation in one stack (fixed length L): a chunk's slots hold `noised ++ original`, fed as
inputs[i] -> targets[i] = next token; the noised source is the `bidirectional` prefix and
the loss is on the original (the decoder's reconstruction) only. Source and target must
fit the chunk's own slots, so about the first half of each chunk is used (the longest
prefix that fits after noising). Positions restart per chunk. The loss is `prefix_lm.loss`.

Sentence permutation needs to know which token ids end a sentence; the pipeline does not
know the tokenizer, so pass `sentence_end_ids=denoising.sentence_end_ids(tokenizer)` to
`make` and register the result (the built-in names without sentence permutation need none).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from metalm_jax import objectives
from metalm_jax.objectives import prefix_lm, rows, special_tokens

NOISE_FUNCTIONS = ("token_masking", "token_deletion", "text_infilling", "sentence_permutation",
                   "document_rotation")


def token_masking(tokens: np.ndarray, rng: np.random.Generator, *, ratio: float = 0.3):
  """round(ratio * n) random tokens replaced by [MASK]; same length."""
  out = np.asarray(tokens, np.int32).copy()
  num = int(round(ratio * len(out)))
  out[rng.choice(len(out), num, replace=False)] = special_tokens.MASK
  return out


def token_deletion(tokens: np.ndarray, rng: np.random.Generator, *, ratio: float = 0.3):
  """round(ratio * n) random tokens deleted (order kept); length n - round(ratio * n)."""
  tokens = np.asarray(tokens, np.int32)
  num = int(round(ratio * len(tokens)))
  keep = np.ones(len(tokens), bool)
  keep[rng.choice(len(tokens), num, replace=False)] = False
  return tokens[keep]


def infilling_spans(length: int, rng: np.random.Generator, *, ratio: float = 0.3,
                    poisson_lambda: float = 3.0) -> list[tuple[int, int]]:
  """Non-overlapping (start, span_length) of text infilling, sorted by start.

  Span lengths ~ Poisson(poisson_lambda) are drawn until they cover round(ratio * length)
  tokens (the last is cut to fit); spans sit in distinct gaps between the clean tokens,
  so a 0-length span is an insertion point.
  """
  num_noise = int(round(ratio * length))
  num_clean = length - num_noise
  lengths = []
  while sum(lengths) < num_noise and len(lengths) < num_clean + 1:  # one span per gap
    lengths.append(int(rng.poisson(poisson_lambda)))
  if lengths:
    lengths[-1] += num_noise - sum(lengths)  # cut the last span (or extend it if gaps ran out)
  gaps = np.sort(rng.choice(num_clean + 1, len(lengths), replace=False))
  spans, consumed = [], 0
  for gap, span_length in zip(gaps, rng.permutation(np.asarray(lengths, int))):
    spans.append((int(gap) + consumed, int(span_length)))
    consumed += int(span_length)
  return spans


def text_infilling(tokens: np.ndarray, rng: np.random.Generator, *, ratio: float = 0.3,
                   poisson_lambda: float = 3.0):
  """Each Poisson(poisson_lambda)-length span replaced by a single [MASK]."""
  tokens = np.asarray(tokens, np.int32)
  out, cursor = [], 0
  for start, span_length in infilling_spans(len(tokens), rng, ratio=ratio,
                                            poisson_lambda=poisson_lambda):
    out.extend(tokens[cursor:start].tolist())
    out.append(special_tokens.MASK)
    cursor = start + span_length
  out.extend(tokens[cursor:].tolist())
  return np.asarray(out, np.int32)


def split_sentences(tokens: np.ndarray, sentence_end_ids: Collection[int]) -> list[np.ndarray]:
  """Sentences: runs ending after a sentence-end id (the last may end without one)."""
  tokens = np.asarray(tokens, np.int32)
  ends = np.flatnonzero(np.isin(tokens, list(sentence_end_ids))) + 1
  return [s for s in np.split(tokens, ends) if len(s)]


def sentence_permutation(tokens: np.ndarray, rng: np.random.Generator, *,
                         sentence_end_ids: Collection[int]):
  """The document's sentences in a random order; same tokens, same length."""
  sentences = split_sentences(tokens, sentence_end_ids)
  if not sentences:
    return np.asarray(tokens, np.int32)
  return np.concatenate([sentences[i] for i in rng.permutation(len(sentences))]).astype(np.int32)


def document_rotation(tokens: np.ndarray, rng: np.random.Generator):
  """The document rotated to start at a uniformly random token."""
  tokens = np.asarray(tokens, np.int32)
  return np.roll(tokens, -int(rng.integers(len(tokens)))) if len(tokens) else tokens


def sentence_end_ids(tokenizer, ends: str = ".!?") -> list[int]:
  """Token ids whose text ends with one of `ends` (sentence-final pieces of a tokenizer)."""
  out = []
  for token_id in range(3, tokenizer.vocab_size):
    try:
      text = tokenizer.decode([token_id])
    except ValueError:
      continue
    if text.rstrip() and text.rstrip()[-1] in ends:
      out.append(token_id)
  return out


def make(weights: Mapping[str, float], *, compose: bool = False, ratio: float = 0.3,
         poisson_lambda: float = 3.0, sentence_end_ids: Collection[int] | None = None):
  """A BART denoising `prepare` from a weighted mix of noising functions.

  Args:
    weights: {noising function name: weight > 0}, names from NOISE_FUNCTIONS.
    compose: apply every function of `weights` (document-level ones first) instead of
      drawing one per document.
    ratio: the share of tokens masked / deleted / infilled.
    poisson_lambda: mean infilling span length.
    sentence_end_ids: token ids ending a sentence (required by sentence_permutation).
  """
  unknown = sorted(set(weights) - set(NOISE_FUNCTIONS))
  if unknown or not weights:
    raise ValueError(f"noising functions {unknown or '{}'} unknown or none given; choose "
                     f"from {NOISE_FUNCTIONS}")
  if any(w <= 0 for w in weights.values()):
    raise ValueError(f"noising weights {dict(weights)} must all be > 0")
  if "sentence_permutation" in weights and not sentence_end_ids:
    raise ValueError("sentence_permutation needs sentence_end_ids=; pass "
                     "denoising.sentence_end_ids(tokenizer)")
  functions = {
      "token_masking": lambda t, r: token_masking(t, r, ratio=ratio),
      "token_deletion": lambda t, r: token_deletion(t, r, ratio=ratio),
      "text_infilling": lambda t, r: text_infilling(t, r, ratio=ratio,
                                                   poisson_lambda=poisson_lambda),
      "sentence_permutation": lambda t, r: sentence_permutation(
          t, r, sentence_end_ids=sentence_end_ids),
      "document_rotation": document_rotation,
  }
  names = [n for n in reversed(NOISE_FUNCTIONS) if n in weights]
  probs = np.asarray([weights[n] for n in names], float)
  probs /= probs.sum()

  def noise(tokens, rng):
    chosen = names if compose else [names[rng.choice(len(names), p=probs)]]
    for name in chosen:
      tokens = functions[name](tokens, rng)
    return tokens

  def prepare(row: dict, rng: np.random.Generator) -> dict:
    builder = rows.RowBuilder(len(row["inputs"]))
    for start, end in rows.segment_spans(row["segment_ids"]):
      slots = end - start
      original = rows.chunk_tokens(row, start, end)
      m = (slots + 1) // 2
      while m >= 1:
        source = noise(original[:m], rng)
        if len(source) + m - 1 <= slots and len(source):
          builder.add_sequence(np.concatenate([source, original[:m]]),
                               num_bidirectional=len(source), loss_from=len(source) - 1)
          break
        m -= max(1, len(source) + m - 1 - slots)
    return builder.row()

  return prepare


for _name in ("token_masking", "token_deletion", "text_infilling", "document_rotation"):
  objectives.register(f"bart_{_name}", loss=prefix_lm.loss, prepare=make({_name: 1.0}),
                      special_tokens=True)
# A weighted mix: each document gets one of the tokenizer-independent noisings.
objectives.register("bart_denoising", loss=prefix_lm.loss, prepare=make(
    {"token_masking": 1.0, "token_deletion": 1.0, "text_infilling": 2.0,
     "document_rotation": 1.0}), special_tokens=True)
