"""Greedy decoding of a METALM language model whose prompt is read by its encoder.

The prompt's tokens ([BOS] + text, cut to `max_input_tokens`) are laid out exactly as
`data.text_task_pipeline` lays out a training row: consecutive non-causal spans of at most
`max_span_len` tokens, encoded bidirectionally and put in place of the decoder's embeddings;
the decoder then generates causally after them.

    predictor = TextGreedyPredictor(model, params, rest, tokenizer, seq_len=128,
                                    max_span_len=48, max_input_tokens=96, max_new_tokens=16,
                                    batch_size=32)
    predictor(["question: ... context: ...", ...])  # -> ["answer", ...]
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metalm_jax.data import text_task_pipeline
from metalm_jax.train import state as state_lib


class TextGreedyPredictor:
  """Greedy decoding of METALM on text prompts: the prompt's tokens go to the encoder as
  spans (as in `text_task_pipeline`), then the decoder generates. Each step runs the whole
  fixed-shape row (no KV cache: rows are short, the spans stay exactly as in training)."""

  def __init__(self, model: state_lib.Model, params, rest, tokenizer, *, seq_len: int,
               max_span_len: int, max_input_tokens: int, max_new_tokens: int,
               batch_size: int, encode_input: bool = True):
    self.tokenizer, self.params, self.rest = tokenizer, params, rest
    self.seq_len, self.max_span_len = seq_len, max_span_len
    self.max_input_tokens, self.batch_size = max_input_tokens, batch_size
    self.encode_input = encode_input  # False: the prompt is causal (the causal baseline)
    self.max_new_tokens = min(max_new_tokens, seq_len - max_input_tokens)
    if self.max_new_tokens < 1:
      raise ValueError(f"seq_len={seq_len} - max_input_tokens={max_input_tokens} leaves no "
                       "room to generate.")

    def next_tokens(params, rest, rows):
      m = model.merge(params, rest)
      logits, _ = m(rows["inputs"], positions=rows["positions"],
                    segment_ids=rows["segment_ids"], span_ids=rows["span_ids"],
                    span_starts=rows["span_starts"], span_lengths=rows["span_lengths"],
                    deterministic=True)
      last = jnp.take_along_axis(logits, (rows["ends"] - 1)[:, None, None], axis=1)[:, 0]
      return jnp.argmax(last, axis=-1).astype(jnp.int32)

    self._next_tokens = jax.jit(next_tokens)

  def __call__(self, texts: Sequence[str]) -> list[str]:
    """The generated text after each prompt (up to [EOS], stripped)."""
    return [self.tokenizer.decode(row).strip() for row in self.generate_ids(texts)]

  def generate_ids(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_new_tokens]: the generated ids, pad after [EOS]."""
    n = len(texts)
    if not 0 < n <= self.batch_size:
      raise ValueError(f"got {n} prompts; between 1 and batch_size={self.batch_size}.")
    padded = list(texts) + [texts[-1]] * (self.batch_size - n)  # static shapes
    max_spans = text_task_pipeline.max_spans_for(self.max_input_tokens, self.max_span_len)
    rows = [text_task_pipeline.prompt_row(
        text_task_pipeline.input_ids(t, self.tokenizer, self.max_input_tokens),
        seq_len=self.seq_len, max_span_len=self.max_span_len, max_spans=max_spans,
        encode_input=self.encode_input)
            for t in padded]
    rows = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    ends = rows["segment_ids"].sum(axis=1).astype(np.int32)
    index = np.arange(self.batch_size)
    out = np.full((self.batch_size, self.max_new_tokens), self.tokenizer.pad_id, np.int32)
    done = np.zeros(self.batch_size, bool)
    for i in range(self.max_new_tokens):
      tokens = np.asarray(self._next_tokens(self.params, self.rest, dict(rows, ends=ends)))
      tokens = np.where(done, self.tokenizer.pad_id, tokens)
      out[:, i] = tokens
      done |= tokens == self.tokenizer.eos_id
      if done.all() or i + 1 == self.max_new_tokens:
        break
      rows["inputs"][index, ends] = tokens
      rows["segment_ids"][index, ends] = 1
      ends = ends + 1
    return out[:n]
