"""Tiny random Hugging Face model directories, saved by `transformers` itself, with real
`tokenizer.json` files made by the `tokenizers` library: what a downloaded checkpoint looks
like, at test size (no network). Named after the Hub repos the paper configs expect, under
a root directory (`configs/*.py:pretrained=<root>`)."""
import json
import os

import numpy as np
import pytest

CLIP_B16 = "openai/clip-vit-base-patch16"
BERT = "google-bert/bert-base-uncased"
GPT2 = "openai-community/gpt2"

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "the", "is", "this", "what", "digit", "number", "image", "of", "shows", "picture",
         "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "?",
         ".", "yes", "no", "question", "answer", ":", "handwritten", "##s"]
# Every letter and digit, alone and as a continuation: any word has a WordPiece spelling (no
# [UNK]), so a changed character always changes the encoder's ids.
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
WORDS += [c for c in CHARS if c not in WORDS] + [f"##{c}" for c in CHARS if f"##{c}" not in WORDS]
WORDS += [c for c in "()[]{}<>=+-*/_,;'\"!#%&|^~`@$" if c not in WORDS]


def reference_packages():
  """(torch, transformers) for the parity tests, offline (no Hub access ever); the calling
  test module is skipped, saying what to install, when they are absent."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  torch = pytest.importorskip("torch", reason="torch (CPU) is needed for the reference")
  transformers = pytest.importorskip(
      "transformers", reason="transformers is not installed: pip install transformers==5.23.0")
  return torch, transformers


def _randomise(model, seed):
  """Every parameter random (norm scales and biases too), so a mapping mistake shows."""
  import torch

  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
  return model.eval()


def clip_vision(root, *, image_size=16, patch_size=8, hidden=32, layers=2, heads=4, seed=0):
  """A CLIPVisionModel directory at root/openai/clip-vit-base-patch16."""
  import transformers

  path = os.path.join(root, CLIP_B16)
  config = transformers.CLIPVisionConfig(
      image_size=image_size, patch_size=patch_size, hidden_size=hidden, num_hidden_layers=layers,
      num_attention_heads=heads, intermediate_size=2 * hidden, hidden_act="quick_gelu")
  _randomise(transformers.CLIPVisionModel(config), seed).save_pretrained(path)
  return path


def wordpiece_tokenizer(path):
  """A lower-casing BERT WordPiece tokenizer.json (+ tokenizer_config.json) in `path`."""
  import tokenizers as hf

  vocab = {w: i for i, w in enumerate(WORDPIECE_SPECIALS + WORDS)}
  tok = hf.Tokenizer(hf.models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = hf.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = hf.pre_tokenizers.BertPreTokenizer()
  tok.decoder = hf.decoders.WordPiece()
  tok.add_special_tokens(WORDPIECE_SPECIALS)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"do_lower_case": True, "pad_token": "[PAD]", "unk_token": "[UNK]",
               "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}, f)
  return len(vocab)


def bert(root, *, hidden=32, layers=2, heads=4, max_positions=64, seed=1):
  """A BertModel directory with its WordPiece tokenizer at root/google-bert/bert-base-uncased."""
  import transformers

  path = os.path.join(root, BERT)
  vocab_size = wordpiece_tokenizer(path)
  config = transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
      num_attention_heads=heads, intermediate_size=2 * hidden,
      max_position_embeddings=max_positions, pad_token_id=0)
  _randomise(transformers.BertModel(config), seed).save_pretrained(path)
  return path


def byte_bpe_tokenizer(path, texts, vocab_size=400):
  """A GPT-2-style byte-level BPE tokenizer.json trained on `texts`; <|endoftext|> is bos =
  eos (= pad, GPT-2 has none). Returns its vocabulary size."""
  import tokenizers as hf

  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                   show_progress=False,
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}, f)
  return tok.get_vocab_size()


def gpt2(root, *, hidden=32, layers=2, heads=4, positions=256, seed=2):
  """A GPT2LMHeadModel directory with a byte-level BPE tokenizer at root/openai-community/gpt2."""
  import transformers

  path = os.path.join(root, GPT2)
  texts = [" ".join(WORDS)] * 4 + ["what digit is this? the image shows a handwritten seven."] * 4
  vocab_size = byte_bpe_tokenizer(path, texts)
  config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers,
                                   n_head=heads, n_positions=positions, bos_token_id=0,
                                   eos_token_id=0)
  _randomise(transformers.GPT2LMHeadModel(config), seed).save_pretrained(path)
  return path


def flat(tree, prefix=""):
  """{'/'-joined path: numpy array} of a nested params dict."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flat(value, name + "/"))
    else:
      out[name] = np.asarray(value)
  return out
