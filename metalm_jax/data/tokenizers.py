"""Tokenizers: bytes (zero setup) and SentencePiece (trained on a dataset, cached).

Every tokenizer reserves pad=0, bos=1, eos=2. `encode` adds no BOS/EOS; the data pipeline
adds them around each document. `decode` stops at the first EOS and drops PAD and BOS, so
it can be applied directly to a generated or padded row.

    tok = get_tokenizer("sentencepiece", dataset="pydoc_topics", data_dir=d, vocab_size=2048)
    ids = tok.encode("x = 1")          # int32 [num_tokens]
    tok.decode(ids) == "x = 1"
"""
import io
import itertools
import os
import tempfile
from typing import Iterable, Protocol

from absl import logging
import numpy as np
import sentencepiece as spm

from metalm_jax.data import datasets

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_KINDS = ("byte", "sentencepiece")
# Enough text for a good small vocabulary while keeping training to about a second.
SENTENCEPIECE_MAX_TRAIN_CHARS = 2_000_000


class Tokenizer(Protocol):
  """What the data pipeline and the generation code need from a tokenizer."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text`, int32 [num_tokens], without BOS/EOS."""

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS, PAD and BOS dropped."""


def _content_ids(ids, eos_id: int, drop: tuple[int, ...]) -> np.ndarray:
  """ids cut at the first EOS, with the `drop` ids removed; int64 [n]."""
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  eos = np.flatnonzero(ids == eos_id)
  if eos.size:
    ids = ids[:eos[0]]
  return ids[~np.isin(ids, drop)]


class ByteTokenizer:
  """UTF-8 bytes: pad 0, bos 1, eos 2, byte b -> b + 3; vocab_size 259."""

  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

  def decode(self, ids) -> str:
    ids = _content_ids(ids, self.eos_id, (self.pad_id, self.bos_id))
    bad = ids[(ids < self.offset) | (ids >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"ByteTokenizer.decode: ids {bad[:5].tolist()} are outside the byte "
                       f"range [{self.offset}, {self.vocab_size}).")
    return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model with pad 0, bos 1, eos 2, unk 3 (see `train_sentencepiece`)."""

  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self, model_path: str):
    self.model_path = model_path
    try:
      with open(model_path, "rb") as f:
        self._load(f.read())
      if self._sp.vocab_size() == 0:
        raise RuntimeError("the model has no pieces")
    except (OSError, RuntimeError) as e:
      raise ValueError(
          f"Cannot read the SentencePiece model {model_path!r} ({e}). If it is a cached model, "
          "delete the file and it will be retrained on next use.") from e
    special = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())
    if special != (PAD_ID, BOS_ID, EOS_ID):
      raise ValueError(f"SentencePiece model {model_path!r} has (pad, bos, eos) ids {special}; "
                       f"expected {(PAD_ID, BOS_ID, EOS_ID)}. Train it with train_sentencepiece.")

  def _load(self, model_proto: bytes):
    self._model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  # Pickled by value so that grain worker processes need not read the file again.
  def __getstate__(self):
    return {"model_path": self.model_path, "model_proto": self._model_proto}

  def __setstate__(self, state):
    self.model_path = state["model_path"]
    self._load(state["model_proto"])

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    ids = _content_ids(ids, self.eos_id, (self.pad_id, self.bos_id))
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"SentencePieceTokenizer.decode: ids {bad[:5].tolist()} are outside "
                       f"the vocabulary [0, {self.vocab_size}) of {self.model_path!r}.")
    return self._sp.decode(ids.tolist())


def _paragraphs(texts: Iterable[str], max_chars: int) -> Iterable[str]:
  """Non-empty paragraphs of `texts`, at most `max_chars` characters in all."""
  total = 0
  for paragraph in itertools.chain.from_iterable(t.split("\n\n") for t in texts):
    if total >= max_chars:
      return
    if paragraph.strip():
      total += len(paragraph)
      yield paragraph


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int,
                        max_chars: int = SENTENCEPIECE_MAX_TRAIN_CHARS) -> SentencePieceTokenizer:
  """Trains a unigram SentencePiece model in memory and writes it atomically.

  Lossless on any text: identity normalization, whitespace kept as is, '\\n' a piece of
  its own, and byte fallback (so no character is ever unknown). Single-threaded on the
  first `max_chars` characters of `texts`, hence deterministic: processes that train the
  same model concurrently write identical files.

  Args:
    texts: documents; split into paragraphs (on blank lines) as training sentences.
    model_path: where to write the `.model` file (its directory is created).
    vocab_size: total vocabulary size, including the 4 specials and 256 byte pieces.
    max_chars: cap on the training text.

  Returns:
    The trained tokenizer.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_paragraphs(texts, max_chars)), model_writer=model,
        vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=3, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=["\n"], max_sentence_length=1 << 16, num_threads=1,
        minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training with vocab_size={vocab_size} failed ({e}); "
                     "use a smaller vocab_size or more text.") from e
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
    f.write(model.getvalue())
  os.replace(f.name, model_path)
  return SentencePieceTokenizer(model_path)


def sentencepiece_model_path(data_dir: str, dataset: str, vocab_size: int) -> str:
  """Where `get_tokenizer` caches the SentencePiece model of a dataset."""
  return os.path.join(data_dir, "tokenizers", f"{dataset}_sp{vocab_size}.model")


def get_tokenizer(kind: str, *, dataset: str = "pydoc_topics", data_dir: str | None = None,
                  vocab_size: int = 2048, text_key: str = "text") -> Tokenizer:
  """Returns a tokenizer by kind; 'sentencepiece' trains and caches one if needed.

  Args:
    kind: 'byte' or 'sentencepiece'.
    dataset: dataset whose TRAIN split trains the SentencePiece model.
    data_dir: data directory (default `datasets.default_data_dir()`); the model is cached
      at `{data_dir}/tokenizers/{dataset}_sp{vocab_size}.model`.
    vocab_size: SentencePiece vocabulary size (ignored for 'byte').
    text_key: the dataset feature holding the text.
  """
  if kind == "byte":
    return ByteTokenizer()
  if kind != "sentencepiece":
    raise ValueError(f"Unknown tokenizer kind {kind!r}; kinds: {list(TOKENIZER_KINDS)}.")
  data_dir = data_dir or datasets.default_data_dir()
  path = sentencepiece_model_path(data_dir, dataset, vocab_size)
  if os.path.exists(path):
    return SentencePieceTokenizer(path)
  logging.info("Training a SentencePiece tokenizer (vocab_size=%d) on %s/train -> %s",
               vocab_size, dataset, path)
  source = datasets.data_source(dataset, "train", data_dir)
  texts = (source[i][text_key].decode("utf-8") for i in range(len(source)))
  return train_sentencepiece(texts, path, vocab_size)
