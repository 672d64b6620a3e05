"""grain pipelines for language modelling: documents -> packed, fixed-shape next-token batches.

One element is ONE PROCESS's batch (B = per-process batch size, L = seq_len):

    inputs       int32   [B, L]  token ids fed to the model
    targets      int32   [B, L]  the next token of each input
    segment_ids  int32   [B, L]  1, 2, ... per document (chunk) within a row; 0 = padding
    positions    int32   [B, L]  position inside the document (chunk), restarting at 0
    weights      float32 [B, L]  1.0 where targets holds a real next token, 0.0 on padding

A document becomes `[BOS] + tokenizer.encode(text) + [EOS]`, cut into chunks of at most
L + 1 tokens that overlap by one token, so every (token, next token) pair of the document
appears exactly once. A chunk `c` gives `inputs = c[:-1]`, `targets = c[1:]` (EOS is
predicted, never fed), and grain's first-fit packer places whole chunks into rows of L.
Hence every non-padding position is trained on (weights = segment_ids > 0) and attention
must stay inside a segment: `mask[i, j] = (segment_ids[i] == segment_ids[j] != 0) & (j <= i)`.

Training order: source -> this process's documents (`process_index::process_count`) ->
shuffle(seed), a new order every epoch -> repeat(num_epochs) -> tokenize + chunk -> pack ->
batch(drop_remainder=True). `iter(ds)` has `get_state()` / `set_state()` and resumes with
exactly the same batches, so it can be saved with orbax through
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`.
"""
import functools
from typing import Callable, Iterator

import grain
import jax
import numpy as np

from metalm_jax.data import tokenizers

FEATURES = {
    "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
    "weights": np.float32,
}
# An objective's per-row transform: (row, np.random.Generator) -> row.
Prepare = Callable[[dict, np.random.Generator], dict]
# Threads that read, tokenize and chunk documents ahead of the packer.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)


def document_chunks(text: str | bytes, tokenizer: tokenizers.Tokenizer,
                    seq_len: int) -> list[dict[str, np.ndarray]]:
  """Tokenizes one document into next-token chunks of at most `seq_len` pairs.

  Args:
    text: the document (bytes are decoded as UTF-8).
    tokenizer: adds nothing itself; BOS and EOS are added here.
    seq_len: L, the row length.

  Returns:
    [{'inputs': int32 [n], 'targets': int32 [n]}, ...] with 1 <= n <= L: chunk k holds
    tokens k*L .. k*L + n (inclusive) of `[BOS] + ids + [EOS]`, as inputs = the first n and
    targets = the last n.
  """
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  tokens = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text),
                           [tokenizer.eos_id]]).astype(np.int32)
  inputs, targets = tokens[:-1], tokens[1:]
  return [{"inputs": inputs[start:start + seq_len], "targets": targets[start:start + seq_len]}
          for start in range(0, len(inputs), seq_len)]


def _example_chunks(example, *, tokenizer, seq_len, text_key):
  return document_chunks(example[text_key], tokenizer, seq_len)


def packed_row_to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A row of grain's packer ('inputs', 'inputs_segment_ids', ...) -> the FEATURES of one row."""
  segment_ids = row["inputs_segment_ids"]
  return {
      "inputs": row["inputs"], "targets": row["targets"], "segment_ids": segment_ids,
      "positions": row["inputs_positions"], "weights": (segment_ids > 0).astype(np.float32),
  }


class _Flatten(grain.experimental.FlatMapTransform):
  """One document's list of chunks -> the chunks, one element each."""

  max_fan_out = 1 << 20  # Not enforced by FlatMapIterDataset; chunks per document.

  def flat_map(self, element):
    return element


def process_documents(source, *, seed: int = 0, shuffle: bool = False,
                      num_epochs: int | None = 1, process_index: int = 0,
                      process_count: int = 1) -> grain.MapDataset:
  """This process's documents, shuffled anew each epoch, repeated `num_epochs` times.

  Process p takes documents p, p + process_count, ... of `source`; with `shuffle`, each
  epoch visits them in a different order (seeded by `seed` and the epoch).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count}).")
  documents = grain.MapDataset.source(source)[process_index::process_count]
  if len(documents) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"Process {process_index} of {process_count} gets no documents: the "
                     f"source has only {len(source)}.")
  if shuffle:
    documents = documents.shuffle(seed)
  return documents.repeat(num_epochs)


def _packed_rows(documents: grain.MapDataset, tokenizer: tokenizers.Tokenizer, *, seq_len: int,
                 text_key: str, num_packing_bins: int, seed: int,
                 shuffle_bins: bool) -> grain.IterDataset:
  """Documents -> rows of FEATURES, each int32/float32 [L]."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1.")
  chunks = documents.map(functools.partial(_example_chunks, tokenizer=tokenizer,
                                           seq_len=seq_len, text_key=text_key))
  chunks = grain.experimental.FlatMapIterDataset(
      chunks.to_iter_dataset(_READ_OPTIONS), _Flatten())
  packed = grain.experimental.FirstFitPackIterDataset(
      chunks, length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=shuffle_bins)
  return packed.map(packed_row_to_example)


def lm_dataset(source, tokenizer: tokenizers.Tokenizer, *, seq_len: int, batch_size: int,
               seed: int, shuffle: bool = True, num_epochs: int | None = None,
               process_index: int = 0, process_count: int = 1, text_key: str = "text",
               num_packing_bins: int | None = None, worker_count: int = 0,
               prepare: Prepare | None = None) -> grain.IterDataset:
  """Training batches of packed documents for one process (see the module docstring).

  Args:
    source: random-access documents (`datasets.data_source(...)`), each a dict with
      `text_key` holding str or UTF-8 bytes.
    tokenizer: a `tokenizers.Tokenizer`.
    seq_len: L.
    batch_size: B, this process's batch size (global batch / process_count).
    seed: shuffling seed in [0, 2**32): the document order (new every epoch) and the order
      of packed rows.
    shuffle: False reads documents and rows in order.
    num_epochs: passes over the documents; None repeats forever.
    process_index, process_count: this process takes documents process_index::process_count.
    text_key: the document feature to tokenize.
    num_packing_bins: rows packed at once (default 4 * B); more bins, less padding.
    prepare: an objective's per-row `prepare(row, rng) -> row` (NumPy; masking, spans...),
      applied to each packed row before batching with a generator seeded from `seed` and
      the row's index, so it is deterministic and resumes exactly. Its outputs must have
      static shapes.
    worker_count: grain worker processes (0: all in this process). Workers need absl flags
      parsed (`app.run`) and a `__main__` guard. The batches depend on the worker count,
      so store it with the iterator state and resume with the same count.

  Returns:
    A grain IterDataset of dicts of numpy arrays (FEATURES, each [B, L]).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  documents = process_documents(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                process_index=process_index, process_count=process_count)
  rows = _packed_rows(documents, tokenizer, seq_len=seq_len,
                      text_key=text_key, num_packing_bins=num_packing_bins or 4 * batch_size,
                      seed=seed, shuffle_bins=shuffle)
  if prepare is not None:
    rows = rows.random_map(prepare, seed=seed)
  batches = rows.batch(batch_size, drop_remainder=True)
  if worker_count:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return batches


def empty_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """An all-padding batch (weights 0): FEATURES, each [B, L]."""
  return {k: np.zeros((batch_size, seq_len), dtype) for k, dtype in FEATURES.items()}


def _eval_dataset(source, tokenizer, *, seq_len, batch_size, process_index, process_count,
                  text_key, prepare=None) -> grain.IterDataset:
  documents = process_documents(source, process_index=process_index,
                                process_count=process_count)
  rows = _packed_rows(documents, tokenizer,
                      seq_len=seq_len, text_key=text_key, num_packing_bins=4 * batch_size,
                      seed=0, shuffle_bins=False)
  if prepare is not None:
    rows = rows.random_map(prepare, seed=0)
  pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
  return rows.batch(batch_size, batch_fn=pad)


def count_eval_batches(source, tokenizer: tokenizers.Tokenizer, *, seq_len: int,
                       batch_size: int, process_count: int = 1, text_key: str = "text") -> int:
  """The most `eval_batches` any process yields (packs every process's documents)."""
  return max(
      sum(1 for _ in _eval_dataset(source, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                   process_index=i, process_count=process_count,
                                   text_key=text_key))
      for i in range(process_count))


def eval_batches(source, tokenizer: tokenizers.Tokenizer, *, seq_len: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1, num_batches: int | None = None,
                 text_key: str = "text",
                 prepare: Prepare | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic, unshuffled pass over `source` for evaluation, in FEATURES batches.

  The last partial batch is padded with empty rows (weights 0). With several processes,
  every process must run the same number of eval steps: all yield `num_batches` batches
  (default `count_eval_batches(...)`, computed here), the short ones padded with
  all-zero batches. `prepare` (an objective's row transform) runs with a fixed seed.

  Yields:
    dicts of numpy arrays, each [batch_size, seq_len].
  """
  if num_batches is None and process_count > 1:
    num_batches = count_eval_batches(source, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                     process_count=process_count, text_key=text_key)
  count = 0
  for batch in _eval_dataset(source, tokenizer, seq_len=seq_len, batch_size=batch_size,
                             process_index=process_index, process_count=process_count,
                             text_key=text_key, prepare=prepare):
    if count == num_batches:
      raise ValueError(f"num_batches={num_batches} is too small for process {process_index}'s "
                       "evaluation data; use count_eval_batches(...).")
    count += 1
    last = batch
    yield batch
  for _ in range(count, num_batches or 0):
    yield (empty_batch(batch_size, seq_len) if count == 0
           else {k: np.zeros_like(v) for k, v in last.items()})


def make_global_batch(batch: dict[str, np.ndarray],
                      sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Assembles every process's batch into global arrays, batch axis sharded by `sharding`.

  Args:
    batch: this process's batch, each [B, L].
    sharding: e.g. NamedSharding(mesh, P(('data', 'fsdp'))), the batch axis over the data
      axes; each process's devices along them receive that process's rows.

  Returns:
    dict of jax.Array, each [B * process_count, L] (for a batch axis split across processes).
  """
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
