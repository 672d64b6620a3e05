"""Tokenizers: bytes (zero setup), SentencePiece (trained on a dataset, cached) and the
Hugging Face tokenizer of a pretrained model's directory.

The byte and SentencePiece tokenizers reserve pad=0, bos=1, eos=2; a Hugging Face tokenizer
keeps the ids of its checkpoint (`HFTokenizer`: e.g. BERT pad 0, bos = [CLS] 101, eos =
[SEP] 102; GPT-2 bos = eos = pad = <|endoftext|> 50256), so code reads them from the
tokenizer, never assumes them. `encode` adds no BOS/EOS; the data pipeline adds them around
each document. `decode` stops at the first EOS and drops PAD and BOS, so it can be applied
directly to a generated or padded row.

    tok = get_tokenizer("sentencepiece", dataset="pydoc_topics", data_dir=d, vocab_size=2048)
    tok = get_tokenizer("hf:/ckpt/bert-base-uncased")   # tokenizer.json of a model directory
    ids = tok.encode("x = 1")          # int32 [num_tokens]
    tok.decode(ids) == "x = 1"
"""
import io
import itertools
import json
import os
import tempfile
from typing import Iterable, Protocol

from absl import logging
import numpy as np
import sentencepiece as spm

from metalm_jax.data import datasets

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_KINDS = ("byte", "sentencepiece")
# Prefix of the Hugging Face kind: 'hf:<dir>' reads <dir>/tokenizer.json (HFTokenizer).
HF_PREFIX = "hf:"
HF_KIND_HELP = "or 'hf:<dir>' (a Hugging Face model directory holding tokenizer.json)"
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


# Special-token roles an HFTokenizer resolves, and the token strings tried (in this order)
# when no file names a role (BERT, RoBERTa / XLM-R, GPT-2, LLaMA 3, Gemma spellings).
HF_ROLES = ("pad", "bos", "eos", "unk", "cls", "sep", "mask")
HF_WELL_KNOWN = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>"),
    "eos": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
}


def _token_content(value) -> str | None:
  """A special token as tokenizer_config.json / special_tokens_map.json write it: a string,
  an AddedToken dict ({'content': ...}) or null."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _read_json(file: str) -> dict:
  if not os.path.isfile(file):
    return {}
  with open(file) as f:
    data = json.load(f)
  return data if isinstance(data, dict) else {}


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer (`tokenizer.json` of a model directory).

  The tokenizer as saved (normalizer, pre-tokenizer, model, decoder), with fixed padding and
  truncation switched off: `encode` gives the real tokens of one text and adds no special
  tokens (no [CLS] / [SEP] / <s>), as the `Tokenizer` protocol asks.

  Special ids (None where absent), each from the first source that names it:
    1. tokenizer_config.json `<role>_token` (a string or an AddedToken dict),
    2. special_tokens_map.json `<role>_token`,
    3. config.json `<role>_token_id` (the first one of a list),
    4. a well-known spelling in the vocabulary (HF_WELL_KNOWN: '[PAD]', '<s>', ...);
  roles: pad, bos, eos, unk, cls, sep, mask. Then the fallbacks the pipeline needs:
    bos_id: the CLS token (BERT: [CLS]), else the EOS token (GPT-2's <|endoftext|>);
    eos_id: the SEP token (BERT: [SEP]), else the BOS token;
    pad_id: the EOS token (GPT-2 has no pad; pad = eos, as transformers' generate does).
  A tokenizer with neither a BOS nor an EOS after these is a ValueError.

  Sizes: `vocab_size` is the tokenizer's (1 + the largest id it produces, added tokens
  included): every id of `encode` is below it. `model_vocab_size` is config.json's
  `vocab_size` (None without one), which can be larger (embedding tables padded to a
  multiple of 8 / 64): a model that docks the checkpoint's embeddings needs
  config.model.vocab_size = model_vocab_size, any other model >= vocab_size.

  Pickled by value (the tokenizer.json text), so grain worker processes need not read the
  directory again.
  """

  def __init__(self, path: str):
    """Args: path: a Hugging Face model directory holding tokenizer.json (and optionally
    tokenizer_config.json, special_tokens_map.json, config.json), or a tokenizer.json file."""
    if os.path.isfile(path):
      directory, json_file = os.path.dirname(path) or ".", path
    else:
      directory, json_file = path, os.path.join(path, "tokenizer.json")
    if not os.path.isdir(directory):
      raise ValueError(f"Hugging Face tokenizer directory {directory!r} does not exist; "
                       "config.data.tokenizer='hf:<dir>' names a model directory holding "
                       "tokenizer.json (e.g. the folder `save_pretrained` writes).")
    if not os.path.isfile(json_file):
      names = sorted(os.listdir(directory))
      hint = (" It has vocab.txt / a slow tokenizer only: write tokenizer.json once with "
              "transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)."
              if {"vocab.txt", "vocab.json", "spiece.model"} & set(names) else "")
      raise ValueError(f"{json_file} not found ({directory} holds {names[:12]}); an "
                       f"'hf:<dir>' tokenizer reads tokenizer.json.{hint}")
    tokenizer_lib = _import_tokenizers()
    try:
      tokenizer = tokenizer_lib.Tokenizer.from_file(json_file)
    except Exception as e:  # the library raises a bare Exception on a malformed file
      raise ValueError(f"Cannot read the Hugging Face tokenizer {json_file!r} ({e}).") from e
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self.path = path
    self._load(tokenizer.to_str())
    self.model_vocab_size = _read_json(os.path.join(directory, "config.json")).get("vocab_size")
    self.special_ids = self._special_ids(directory)
    for role, token_id in self.special_ids.items():
      setattr(self, f"{role}_id", token_id)

  def _load(self, tokenizer_json: str):
    self._tokenizer_json = tokenizer_json
    self._tokenizer = _import_tokenizers().Tokenizer.from_str(tokenizer_json)
    vocab = self._tokenizer.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1 if vocab else 0

  def __getstate__(self):
    return {"path": self.path, "tokenizer_json": self._tokenizer_json,
            "model_vocab_size": self.model_vocab_size, "special_ids": self.special_ids}

  def __setstate__(self, state):
    self.path, self.model_vocab_size = state["path"], state["model_vocab_size"]
    self._load(state["tokenizer_json"])
    self.special_ids = state["special_ids"]
    for role, token_id in self.special_ids.items():
      setattr(self, f"{role}_id", token_id)

  def _special_ids(self, directory: str) -> dict[str, int | None]:
    """{role: id or None} for HF_ROLES, resolved as the class docstring says."""
    files = [(name, _read_json(os.path.join(directory, name)))
             for name in ("tokenizer_config.json", "special_tokens_map.json")]
    model_config = _read_json(os.path.join(directory, "config.json"))
    ids = {}
    for role in HF_ROLES:
      ids[role] = None
      for name, data in files:
        token = _token_content(data.get(f"{role}_token"))
        if token is not None:
          ids[role] = self._tokenizer.token_to_id(token)
          if ids[role] is None:
            raise ValueError(f"{os.path.join(directory, name)} names {role}_token={token!r}, "
                             f"which is not in the vocabulary of {self.path!r}.")
          break
      else:
        value = model_config.get(f"{role}_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and 0 <= value < self.vocab_size:
          ids[role] = value
        else:
          ids[role] = next((self._tokenizer.token_to_id(t) for t in HF_WELL_KNOWN[role]
                            if self._tokenizer.token_to_id(t) is not None), None)
    if ids["bos"] is None:
      ids["bos"] = ids["cls"] if ids["cls"] is not None else ids["eos"]
    if ids["eos"] is None:
      ids["eos"] = ids["sep"] if ids["sep"] is not None else ids["bos"]
    if ids["pad"] is None:
      ids["pad"] = ids["eos"]
    if ids["eos"] is None:
      raise ValueError(
          f"The Hugging Face tokenizer {self.path!r} has no BOS / EOS token (none named in "
          "tokenizer_config.json, special_tokens_map.json or config.json, and none of "
          f"{HF_WELL_KNOWN['bos'] + HF_WELL_KNOWN['eos']} in its vocabulary); the data "
          "pipeline needs both: add bos_token / eos_token to tokenizer_config.json.")
    return ids

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids,
                      dtype=np.int32)

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS, PAD and BOS dropped. A leading BOS is skipped
    first, so it never ends the text where bos_id == eos_id (GPT-2). Other special tokens
    ([MASK], [UNK], ...) are kept as text."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and ids[0] == self.bos_id:
      ids = ids[1:]
    ids = _content_ids(ids, self.eos_id, (self.pad_id, self.bos_id))
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"HFTokenizer.decode: ids {bad[:5].tolist()} are outside the "
                       f"vocabulary [0, {self.vocab_size}) of {self.path!r}.")
    return self._tokenizer.decode(ids.tolist(), skip_special_tokens=False)


def _import_tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top  (optional dependency)
  except ImportError as e:
    raise ImportError("'hf:<dir>' tokenizers need the `tokenizers` package: "
                      "pip install tokenizers==0.23.3") from e
  return tokenizers


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
    kind: 'byte', 'sentencepiece', or 'hf:<dir>': the `HFTokenizer` of a Hugging Face model
      directory's tokenizer.json (dataset, data_dir and vocab_size are then ignored).
    dataset: dataset whose TRAIN split trains the SentencePiece model.
    data_dir: data directory (default `datasets.default_data_dir()`); the model is cached
      at `{data_dir}/tokenizers/{dataset}_sp{vocab_size}.model`.
    vocab_size: SentencePiece vocabulary size (ignored for 'byte').
    text_key: the dataset feature holding the text.
  """
  if kind == "byte":
    return ByteTokenizer()
  if kind.startswith(HF_PREFIX):
    return hf_tokenizer(kind)
  if kind != "sentencepiece":
    raise ValueError(f"Unknown tokenizer kind {kind!r}; kinds: {list(TOKENIZER_KINDS)} "
                     f"{HF_KIND_HELP}.")
  data_dir = data_dir or datasets.default_data_dir()
  path = sentencepiece_model_path(data_dir, dataset, vocab_size)
  if os.path.exists(path):
    return SentencePieceTokenizer(path)
  logging.info("Training a SentencePiece tokenizer (vocab_size=%d) on %s/train -> %s",
               vocab_size, dataset, path)
  source = datasets.data_source(dataset, "train", data_dir)
  texts = (source[i][text_key].decode("utf-8") for i in range(len(source)))
  return train_sentencepiece(texts, path, vocab_size)


def hf_tokenizer(kind: str) -> HFTokenizer:
  """The `HFTokenizer` of a kind 'hf:<dir>' (ValueError for an empty <dir>)."""
  path = kind[len(HF_PREFIX):]
  if not path:
    raise ValueError(f"Tokenizer kind {kind!r} names no directory; write 'hf:<dir>' with the "
                     "Hugging Face model directory that holds tokenizer.json.")
  return HFTokenizer(os.path.expanduser(path))
