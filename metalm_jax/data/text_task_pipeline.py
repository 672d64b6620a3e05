"""Text-to-text task rows for METALM's multitask finetuning (`data.text_tasks` examples).

An example {'inputs', 'targets', ...} becomes one decoder row:

    [BOS] inputs-tokens | targets-tokens [EOS] pad ...
    <---- encoder spans ---> <-- causal, scored -->

The input tokens (with their [BOS]) are covered by consecutive non-causal spans of at most
`max_span_len` tokens, each encoded bidirectionally on its own by METALM's encoder and put
in place of the decoder's embeddings there (semi-causal LM, `objectives.semi_causal_lm`).
The targets follow causally. Loss weights: the last input position (which predicts the
first target token) and every target position; `semi_causal_lm.loss` also zeroes every span
position but a span's last one, so the scored positions are exactly those. A model with
mode 'causal' (the baseline) reads the same row with the same weights.

Row features (no batch axis; `batch` stacks them): inputs, targets, segment_ids (1 on real
tokens), positions, span_ids int32 [L]; weights float32 [L]; span_starts, span_lengths int32
[max_spans]; input_length int32 (the positions the prompt takes), task int32 (the index of
the example's task in `multitask_dataset`'s `sources`, else -1).

Over-long text is cut, never an error: the input keeps its first `max_input_tokens` tokens
(for SQuAD-style "question: ... context: ..." the question comes first), the target its first
`seq_len - input_length - 1`. Mixing (`multitask_dataset`): FLAN / T5 examples-proportional
mixing with a cap, each task weighted by min(its examples, `mixing_cap`).
"""
from __future__ import annotations

import functools
from typing import Mapping

import grain
import numpy as np

from metalm_jax.data import tokenizers


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def max_spans_for(max_input_tokens: int, max_span_len: int) -> int:
  """Span slots a row needs for `max_input_tokens` input positions ([BOS] included)."""
  return -(-max_input_tokens // max_span_len)


def input_ids(text: str, tokenizer: tokenizers.Tokenizer, max_input_tokens: int) -> np.ndarray:
  """[BOS] + the input's tokens, cut to `max_input_tokens` positions."""
  ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)]).astype(np.int32)
  return ids[:max_input_tokens]


def prompt_row(ids: np.ndarray, *, seq_len: int, max_span_len: int, max_spans: int,
               encode_input: bool = True) -> dict[str, np.ndarray]:
  """The prompt part of a row: `ids` at positions 0.., covered by spans (if `encode_input`).

  Raises:
    ValueError: the ids need more than `max_spans` spans or leave no room in `seq_len`.
  """
  n = len(ids)
  if n >= seq_len:
    raise ValueError(f"a prompt of {n} tokens leaves no room to predict at seq_len={seq_len}; "
                     "raise seq_len or lower max_input_tokens.")
  starts = np.zeros((max_spans,), np.int32)
  lengths = np.zeros((max_spans,), np.int32)
  span_ids = np.zeros((seq_len,), np.int32)
  if encode_input:
    if max_spans_for(n, max_span_len) > max_spans:
      raise ValueError(f"a prompt of {n} tokens needs {max_spans_for(n, max_span_len)} spans "
                       f"of max_span_len={max_span_len} but max_spans={max_spans}.")
    for m, start in enumerate(range(0, n, max_span_len)):
      starts[m], lengths[m] = start, min(max_span_len, n - start)
      span_ids[start:start + lengths[m]] = m + 1
  inputs = np.zeros((seq_len,), np.int32)
  inputs[:n] = ids
  return {"inputs": inputs, "segment_ids": (np.arange(seq_len) < n).astype(np.int32),
          "positions": np.arange(seq_len, dtype=np.int32), "span_ids": span_ids,
          "span_starts": starts, "span_lengths": lengths}


def encode_example(example: Mapping, tokenizer: tokenizers.Tokenizer, *, seq_len: int,
                   max_span_len: int, max_input_tokens: int, task_index: int = -1,
                   encode_input: bool = True) -> dict[str, np.ndarray]:
  """One text-to-text example -> one training row (module docstring); `task_index` is
  stored as the row's 'task'."""
  prompt = input_ids(_text(example["inputs"]), tokenizer, max_input_tokens)
  row = prompt_row(prompt, seq_len=seq_len, max_span_len=max_span_len,
                   max_spans=max_spans_for(max_input_tokens, max_span_len),
                   encode_input=encode_input)
  target = np.concatenate([tokenizer.encode(" " + _text(example["targets"])),
                           [tokenizer.eos_id]]).astype(np.int32)
  target = target[:seq_len - len(prompt)]
  sequence = np.concatenate([prompt, target])
  text_length = len(sequence) - 1  # positions that predict a next token
  row["inputs"][:text_length] = sequence[:-1]
  targets = np.zeros((seq_len,), np.int32)
  targets[:text_length] = sequence[1:]
  positions = np.arange(seq_len)
  row["segment_ids"] = (positions < text_length).astype(np.int32)
  row["targets"] = targets
  row["weights"] = ((positions >= len(prompt) - 1) & (positions < text_length)).astype(np.float32)
  row["input_length"] = np.int32(len(prompt))
  row["task"] = np.int32(task_index)
  return row


def mixing_weights(sizes: Mapping[str, int], cap: int | None) -> dict[str, float]:
  """Examples-proportional mixing rates with a cap: min(n, cap) / sum, per task."""
  capped = {t: float(n if cap is None else min(n, cap)) for t, n in sizes.items()}
  if not capped or min(capped.values()) <= 0:
    raise ValueError(f"every task needs examples; sizes={dict(sizes)}.")
  total = sum(capped.values())
  return {t: v / total for t, v in capped.items()}


def multitask_dataset(sources: Mapping[str, object], tokenizer: tokenizers.Tokenizer, *,
                      seq_len: int, batch_size: int, max_span_len: int, max_input_tokens: int,
                      seed: int, mixing_cap: int | None = 3000, encode_input: bool = True,
                      prepare=None, process_index: int = 0, process_count: int = 1,
                      worker_count: int = 0) -> grain.IterDataset:
  """Endless shuffled training batches mixing the tasks' examples (module docstring).

  Args:
    sources: task name -> random-access examples (`datasets.data_source(...)`).
    tokenizer, seq_len, max_span_len, max_input_tokens, encode_input: see `encode_example`.
    batch_size: rows per batch (this process's).
    seed: shuffling and mixing seed.
    mixing_cap: the examples-proportional cap (None: proportional to size).
    prepare: an optional objective `prepare(row, rng) -> row` applied to each row.
    process_index, process_count: this process takes each task's examples
      process_index::process_count (mixing weights from the whole tasks' sizes).
    worker_count: grain worker processes (0: in this process).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
  tasks = list(sources)
  weights = mixing_weights({t: len(s) for t, s in sources.items()}, mixing_cap)
  encode = functools.partial(encode_example, tokenizer=tokenizer, seq_len=seq_len,
                             max_span_len=max_span_len, max_input_tokens=max_input_tokens,
                             encode_input=encode_input)
  parts = [grain.MapDataset.source(sources[t])[process_index::process_count]
           .shuffle(seed + i).repeat(None).map(functools.partial(encode, task_index=i))
           for i, t in enumerate(tasks)]
  rows = grain.MapDataset.mix(parts, [weights[t] for t in tasks]).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(16, 4 * batch_size)))
  if prepare is not None:
    rows = rows.random_map(prepare, seed=seed)
  batches = rows.batch(batch_size, drop_remainder=True)
  if worker_count:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return batches


def eval_batches(sources: Mapping[str, object], tokenizer: tokenizers.Tokenizer, *,
                 seq_len: int, batch_size: int, max_span_len: int, max_input_tokens: int,
                 encode_input: bool = True, process_index: int = 0, process_count: int = 1,
                 num_batches: int | None = None, prepare=None):
  """One unshuffled pass over every task's examples in order, in batches of rows; the last
  batch is padded with all-zero rows (weights 0). With several processes every process
  yields the same number of batches (default: enough for the largest share). `prepare`:
  an optional deterministic `prepare(row, rng=None) -> row` applied to each row."""
  encode = functools.partial(encode_example, tokenizer=tokenizer, seq_len=seq_len,
                             max_span_len=max_span_len, max_input_tokens=max_input_tokens,
                             encode_input=encode_input)
  if prepare is not None:
    encode = lambda example, task_index=-1, encode=encode: prepare(  # noqa: E731
        encode(example, task_index=task_index), None)
  everything = [(i, j) for i, s in enumerate(sources.values()) for j in range(len(s))]
  shares = [everything[p::process_count] for p in range(process_count)]
  if num_batches is None:
    num_batches = -(-max(len(s) for s in shares) // batch_size)
  names = list(sources)
  mine = shares[process_index]
  empty = None
  for b in range(num_batches):
    part = mine[b * batch_size:(b + 1) * batch_size]
    rows = [encode(sources[names[i]][j], task_index=i) for i, j in part]
    if empty is None:
      template = rows[0] if rows else encode(next(iter(sources.values()))[0])
      empty = {k: np.zeros_like(v) for k, v in template.items()}
    rows += [empty] * (batch_size - len(rows))
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
