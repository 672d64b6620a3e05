"""Spans in the encoder's own vocabulary: a docked encoder keeps its tokenizer.

A docked pretrained text encoder (BERT, MiniLM, ...) was trained on its own tokenizer, and
the decoder keeps its own. The spans are still chosen on the decoder's row (the semi-causal
objective's `span_starts` / `span_lengths`); this module gives each span's text in the
encoder's tokens:

    span m -> decoder ids tokens[s_m : s_m + l_m] -> text (decoder tokenizer's decode)
           -> [CLS] + encoder ids of the text (cut to fit) + [SEP], padded with the
              encoder's pad id to Ce = config.model.encoder_span_len
    unused slots (length 0): [CLS] [SEP]

added to the row as `span_encoder_ids` int32 [M, Ce]. `MetaLM` (encoder_span_len > 0) encodes
them and its resampler connector puts one output per decoder position of the span. The
encoder sees exactly the span's own text, so the semi-causal guarantees are unchanged: no
position outside a span reaches the encoder, and the loss stays on the causal positions plus
each span's last one. A span's text longer than Ce - 2 encoder tokens keeps its first ones.

[CLS] / [SEP] are the encoder tokenizer's cls_id / sep_id, else its bos_id / eos_id.
"""
from __future__ import annotations

import numpy as np

from metalm_jax.data import tokenizers


class EncoderSpans:
  """Adds `span_encoder_ids` [M, Ce] to a row that has inputs / span_starts / span_lengths.

  Picklable (grain workers). `prepare` (optional): a `prepare(row, rng)` that adds the spans
  first (the semi-causal objective's); then this is a drop-in `prepare` itself.
  """

  def __init__(self, decoder_tokenizer: tokenizers.Tokenizer,
               encoder_tokenizer: tokenizers.Tokenizer, length: int, prepare=None):
    if length < 3:
      raise ValueError(f'config.model.encoder_span_len={length} must be >= 3 ([CLS] + at least '
                       'one token + [SEP]).')
    self.decoder_tokenizer, self.encoder_tokenizer = decoder_tokenizer, encoder_tokenizer
    self.length, self.prepare = length, prepare
    enc = encoder_tokenizer
    self.start_id = _first(getattr(enc, 'cls_id', None), enc.bos_id)
    self.end_id = _first(getattr(enc, 'sep_id', None), enc.eos_id)
    self.pad_id = enc.pad_id

  def span_ids(self, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int32 [M, Ce]: each span's text in the encoder's tokens (module docstring)."""
    out = np.full((len(starts), self.length), self.pad_id, np.int32)
    for m, (start, length) in enumerate(zip(starts, lengths)):
      body = np.zeros((0,), np.int32)
      if length > 0:
        text = self.decoder_tokenizer.decode(np.asarray(tokens[start:start + length]))
        body = np.asarray(self.encoder_tokenizer.encode(text), np.int32)[:self.length - 2]
      ids = np.concatenate([[self.start_id], body, [self.end_id]])
      out[m, :len(ids)] = ids
    return out

  def __call__(self, row: dict, rng: np.random.Generator | None = None) -> dict:
    if self.prepare is not None:
      row = self.prepare(row, rng)
    return dict(row, span_encoder_ids=self.span_ids(row['inputs'], row['span_starts'],
                                                    row['span_lengths']))


def _first(*ids):
  for i in ids:
    if i is not None:
      return int(i)
  raise ValueError('the encoder tokenizer has neither cls_id/sep_id nor bos_id/eos_id.')


__all__ = ['EncoderSpans']
