"""Docking pretrained BERT-family encoders: a thin facade over `metalm_jax.models.hf.bert`.

Kept for the helpers it has always offered; new code can use `metalm_jax.models.hf`
(`hf.load(path)`, `hf.import_params(path)`), which reads every supported model type. The
weight mapping (Hugging Face tensor names -> `TextEncoder(norm_position='post')` params,
BERT, RoBERTa and XLM-R) is documented in `metalm_jax.models.hf.bert`; weights are read by
the project's own safetensors reader (no PyTorch), the tokenizer with `tokenizers`.

  encoder, tokenizer = hf_import.load_bert('/path/to/all-MiniLM-L6-v2')
  hf_import.load_into(metalm.text_encoder, '/path/...')   # dock into a built MetaLM
  params = hf_import.replace_params(params, '/path/...')  # or into a trainer params dict

Errors: a directory without config.json is a FileNotFoundError; anything the importer
cannot read is an `HFImportError` (a ValueError) naming what was found.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from metalm_jax.models.hf import bert
from metalm_jax.models.hf.common import HFImportError, Tensors, check_and_cast, read_config
from metalm_jax.models.text_encoder import TextEncoder

SUPPORTED_TYPES = bert.MODEL_TYPES


def _config(path: str) -> dict:
  """config.json of a BERT-family directory (FileNotFoundError if absent)."""
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise FileNotFoundError(f'{os.path.join(path, "config.json")} not found: pass a Hugging '
                            'Face model directory (config.json + model.safetensors + '
                            'tokenizer files).')
  hf_config = read_config(path)
  if hf_config.get('model_type') not in SUPPORTED_TYPES:
    raise HFImportError(f"{path}/config.json has model_type={hf_config.get('model_type')!r}; "
                        f'the TextEncoder importer supports {list(SUPPORTED_TYPES)} (see '
                        'metalm_jax.models.hf for the other parts).')
  return hf_config


def encoder_kwargs(path: str) -> dict:
  """TextEncoder kwargs (BERT layout) from a Hugging Face `config.json`."""
  return bert.module_kwargs(_config(path))


def read_tensors(path: str) -> Tensors:
  """The checkpoint's tensors (float32 on access), any leading 'bert.' / 'roberta.' stripped."""
  return Tensors.from_dir(path, prefixes=bert.PREFIXES)


def bert_to_params(tensors: Mapping, hf_config: dict, *, num_layers: int | None = None) -> dict:
  """Hugging Face BERT-family tensors -> a pure params dict shaped like TextEncoder's."""
  if num_layers is None:
    num_layers = hf_config['num_hidden_layers']
  return bert.to_params(tensors, hf_config, num_layers=num_layers)


def replace_params(params: Mapping, path: str, *, key: str = 'text_encoder') -> dict:
  """A copy of a (trainer) params dict with params[key] replaced by the checkpoint's."""
  hf_config = _config(path)
  loaded = bert_to_params(read_tensors(path), hf_config)
  hint = f'build the encoder with hf_import.encoder_kwargs({path!r})'
  return {**params, key: check_and_cast(params[key], loaded, key, hint=hint)}


def load_into(encoder: TextEncoder, path: str) -> TextEncoder:
  """Overwrites a built TextEncoder's parameters with the checkpoint's (in place)."""
  if encoder.norm_position != 'post':
    raise ValueError("BERT checkpoints need TextEncoder(norm_position='post').")
  offset = bert.module_kwargs(_config(path))['position_offset']
  if encoder.position_offset != offset:
    raise ValueError(f'{path} numbers positions from {offset}, the encoder from '
                     f'{encoder.position_offset}: build it with hf_import.encoder_kwargs(path).')
  state = nnx.state(encoder, nnx.Param)
  loaded = replace_params({'text_encoder': state.to_pure_dict()}, path)['text_encoder']
  nnx.replace_by_pure_dict(state, loaded)
  nnx.update(encoder, state)
  return encoder


def load_tokenizer(path: str):
  """A `tokenizers.Tokenizer` from tokenizer.json, or WordPiece from vocab.txt.

  Fixed padding saved in tokenizer.json (e.g. all-MiniLM's pad-to-128) is switched off:
  `encode` returns the real tokens; pad batches yourself. (For the data pipeline's
  `Tokenizer` protocol use `data.tokenizers.get_tokenizer('hf:<dir>')`.)
  """
  import tokenizers  # optional dependency

  json_file, vocab_file = (os.path.join(path, n) for n in ('tokenizer.json', 'vocab.txt'))
  if os.path.exists(json_file):
    tokenizer = tokenizers.Tokenizer.from_file(json_file)
    tokenizer.no_padding()
    return tokenizer
  if os.path.exists(vocab_file):
    lowercase = True
    config_file = os.path.join(path, 'tokenizer_config.json')
    if os.path.exists(config_file):
      with open(config_file) as f:
        lowercase = json.load(f).get('do_lower_case', True)
    return tokenizers.BertWordPieceTokenizer(vocab_file, lowercase=lowercase)
  raise FileNotFoundError(f'no tokenizer.json or vocab.txt in {path}.')


def load_bert(path: str, *, dtype=jnp.float32, seed: int = 0):
  """(TextEncoder with the checkpoint's weights, tokenizer) from a Hugging Face directory."""
  kwargs = encoder_kwargs(path)
  # Built abstractly (no random init of parameters that are overwritten anyway).
  encoder = nnx.eval_shape(lambda: TextEncoder(**kwargs, dtype=dtype, rngs=nnx.Rngs(seed)))
  return load_into(encoder, path), load_tokenizer(path)
