"""Unigram token counts of a training split: the saliency table of `config.spans.strategy =
'saliency'` (metalm_jax.masking: rare tokens score high, -log frequency).

`count_tokens` is the pure function (token id lists -> counts); `unigram_counts` reads a
prepared dataset's split through `datasets.data_source` (the TFDS / grain reading path of the
pipelines), counts `[BOS] + tokenizer.encode(text) + [EOS]` per document (the tokens packed
rows hold), and caches the result as a .npy beside the tokenizer (`cache_path`).
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import numpy as np

from metalm_jax.data import datasets


def count_tokens(token_lists: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
  """int64 [vocab_size]: how often each id occurs in `token_lists` (ids must be < vocab_size)."""
  counts = np.zeros(vocab_size, np.int64)
  for ids in token_lists:
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise ValueError(f'token ids {ids[(ids < 0) | (ids >= vocab_size)][:5].tolist()} are '
                       f'outside [0, {vocab_size})')
    counts += np.bincount(ids, minlength=vocab_size)
  return counts


def cache_path(tokenizer, dataset: str, split: str, data_dir: str) -> str:
  """`{data_dir}/tokenizers/<tokenizer>.<dataset>_<split>.unigram.npy`: beside the
  SentencePiece model it counts with (or `byte.` for the byte tokenizer)."""
  model_path = getattr(tokenizer, 'model_path', None)
  stem = (os.path.splitext(os.path.basename(model_path))[0] if model_path
          else type(tokenizer).__name__.lower().replace('tokenizer', '') or 'tokenizer')
  safe_split = ''.join(ch if ch.isalnum() else '_' for ch in split)
  return os.path.join(data_dir, 'tokenizers',
                      f'{stem}.{dataset.replace("/", "_")}_{safe_split}.unigram.npy')


def unigram_counts(dataset: str, tokenizer, *, data_dir: str | None = None,
                   split: str = 'train', text_key: str = 'text',
                   path: str | None = None) -> np.ndarray:
  """Token counts (int64 [tokenizer.vocab_size]) of `dataset`'s `split`, computed once.

  Args:
    dataset: a prepared dataset (`datasets.DATASETS`), e.g. 'pydoc_topics'.
    tokenizer: the run's tokenizer (`tokenizers.get_tokenizer`).
    data_dir: where the dataset is prepared (default `datasets.default_data_dir()`).
    split: the split counted (the training split: counting held-out text would leak it).
    text_key: the feature holding the text.
    path: the cache file (default `cache_path(...)`); read when it exists and matches the
      vocabulary size, else written.
  """
  data_dir = data_dir or datasets.default_data_dir()
  path = path or cache_path(tokenizer, dataset, split, data_dir)
  if os.path.exists(path):
    counts = np.load(path)
    if counts.shape == (tokenizer.vocab_size,):
      return counts
    logging.warning('%s has %s counts, the tokenizer %d ids: recounting', path, counts.shape,
                    tokenizer.vocab_size)
  source = datasets.data_source(dataset, split, data_dir)

  def documents():
    for i in range(len(source)):
      text = source[i][text_key]
      text = text.decode('utf-8') if isinstance(text, bytes) else text
      yield np.concatenate([[tokenizer.bos_id], tokenizer.encode(text), [tokenizer.eos_id]])

  counts = count_tokens(documents(), tokenizer.vocab_size)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp.npy'
  np.save(tmp, counts)
  os.replace(tmp, path)
  return counts

