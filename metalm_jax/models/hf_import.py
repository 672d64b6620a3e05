"""Docking pretrained BERT-family encoders: Hugging Face directories -> TextEncoder.

A Hugging Face model directory holds `config.json`, `model.safetensors` and the tokenizer
(`tokenizer.json`, or `vocab.txt` for WordPiece). Weights are read with the `safetensors`
NumPy API (no PyTorch), renamed and transposed onto `TextEncoder(norm_position='post')`:

  embeddings.word_embeddings.weight [V, D]         -> word_embeddings.embedding [V, D]
  embeddings.position_embeddings.weight [P, D]     -> position_embeddings.embedding
  embeddings.token_type_embeddings.weight [T, D]   -> token_type_embeddings.embedding
  embeddings.LayerNorm.{weight,bias}               -> embedding_norm.{scale,bias}
  encoder.layer.i.attention.self.{query,key,value}.weight [N*H, D] -> layers[i].attention.
                                                      {query,key,value}.kernel [D, N, H]
  encoder.layer.i.attention.output.dense.weight [D, N*H] -> layers[i].attention.out.kernel
                                                      [N, H, D]
  encoder.layer.i.attention.output.LayerNorm      -> layers[i].attention_norm
  encoder.layer.i.intermediate.dense.weight [F, D] -> layers[i].ffn.wi.kernel [D, F]
  encoder.layer.i.output.dense.weight [D, F]      -> layers[i].ffn.wo.kernel [F, D]
  encoder.layer.i.output.LayerNorm                -> layers[i].ffn_norm
  (biases alike; a leading 'bert.' is stripped; the pooler and MLM heads are ignored)

  encoder, tokenizer = hf_import.load_bert('/path/to/all-MiniLM-L6-v2')
  hf_import.load_into(metalm.text_encoder, '/path/...')   # dock into a built MetaLM
  params = hf_import.replace_params(params, '/path/...')  # or into a trainer params dict
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalm_jax.models.text_encoder import TextEncoder

SUPPORTED_TYPES = ('bert',)


def _read_config(path: str) -> dict:
  config_file = os.path.join(path, 'config.json')
  if not os.path.exists(config_file):
    raise FileNotFoundError(f'{config_file} not found: pass a Hugging Face model directory '
                            '(config.json + model.safetensors + tokenizer files).')
  with open(config_file) as f:
    return json.load(f)


def encoder_kwargs(path: str) -> dict:
  """TextEncoder kwargs (BERT layout) from a Hugging Face `config.json`."""
  hf = _read_config(path)
  if hf.get('model_type') not in SUPPORTED_TYPES:
    raise ValueError(f"{path}/config.json has model_type={hf.get('model_type')!r}; "
                     f'supported: {SUPPORTED_TYPES}.')
  if hf.get('hidden_act', 'gelu') != 'gelu':
    raise ValueError(f"hidden_act={hf['hidden_act']!r} in {path}/config.json; the TextEncoder "
                     "implements the exact-erf 'gelu' only.")
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise ValueError(f"position_embedding_type={hf['position_embedding_type']!r}; only "
                     "'absolute' positions can be imported.")
  return dict(vocab_size=hf['vocab_size'], d_model=hf['hidden_size'],
              num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
              d_ff=hf['intermediate_size'], max_len=hf['max_position_embeddings'],
              type_vocab_size=hf.get('type_vocab_size', 2), norm_position='post',
              layer_norm_eps=hf.get('layer_norm_eps', 1e-12), pad_id=hf.get('pad_token_id', 0))


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """{name: float32 array} from `model.safetensors`, with any leading 'bert.' stripped."""
  from safetensors.numpy import load_file  # optional dependency

  weights_file = os.path.join(path, 'model.safetensors')
  if not os.path.exists(weights_file):
    raise FileNotFoundError(f'{weights_file} not found (pytorch_model.bin is not read; '
                            'convert it to safetensors).')
  tensors = load_file(weights_file)
  return {k.removeprefix('bert.'): v for k, v in tensors.items()}


def bert_to_params(tensors: Mapping[str, np.ndarray], *, num_layers: int,
                   num_heads: int) -> dict:
  """Hugging Face BERT tensors -> a pure params dict shaped like TextEncoder's."""
  def get(name):
    if name not in tensors:
      raise KeyError(f'{name!r} is missing from the checkpoint; found e.g. '
                     f'{sorted(tensors)[:5]}.')
    return np.asarray(tensors[name], np.float32)

  def norm(prefix):
    return {'scale': get(f'{prefix}.weight'), 'bias': get(f'{prefix}.bias')}

  def qkv(prefix):  # torch Linear [N*H, D] -> [D, N, H]
    w, b = get(f'{prefix}.weight'), get(f'{prefix}.bias')
    d = w.shape[1]
    return {'kernel': w.T.reshape(d, num_heads, -1), 'bias': b.reshape(num_heads, -1)}

  params = {
      'word_embeddings': {'embedding': get('embeddings.word_embeddings.weight')},
      'position_embeddings': {'embedding': get('embeddings.position_embeddings.weight')},
      'embedding_norm': norm('embeddings.LayerNorm'),
      'layers': {},
  }
  if 'embeddings.token_type_embeddings.weight' in tensors:
    params['token_type_embeddings'] = {
        'embedding': get('embeddings.token_type_embeddings.weight')}
  for i in range(num_layers):
    p = f'encoder.layer.{i}'
    out_w = get(f'{p}.attention.output.dense.weight')  # [D, N*H]
    params['layers'][i] = {
        'attention': {
            'query': qkv(f'{p}.attention.self.query'),
            'key': qkv(f'{p}.attention.self.key'),
            'value': qkv(f'{p}.attention.self.value'),
            'out': {'kernel': out_w.T.reshape(num_heads, -1, out_w.shape[0]),
                    'bias': get(f'{p}.attention.output.dense.bias')},
        },
        'attention_norm': norm(f'{p}.attention.output.LayerNorm'),
        'ffn': {
            'wi': {'kernel': get(f'{p}.intermediate.dense.weight').T,
                   'bias': get(f'{p}.intermediate.dense.bias')},
            'wo': {'kernel': get(f'{p}.output.dense.weight').T,
                   'bias': get(f'{p}.output.dense.bias')},
        },
        'ffn_norm': norm(f'{p}.output.LayerNorm'),
    }
  return params


def _check_and_cast(expected: Mapping, loaded: Mapping, where: str) -> dict:
  """Same keys and shapes as `expected` (a pure params dict); arrays cast to its dtypes."""
  out = {}
  for key, value in expected.items():
    if key not in loaded:
      raise ValueError(f'{where}.{key} is not in the checkpoint; the encoder config '
                       'differs from the checkpoint (build it with hf_import.encoder_kwargs).')
    if isinstance(value, Mapping):
      out[key] = _check_and_cast(value, loaded[key], f'{where}.{key}')
      continue
    if tuple(value.shape) != tuple(loaded[key].shape):
      raise ValueError(f'{where}.{key}: the model has shape {tuple(value.shape)} but the '
                       f'checkpoint {tuple(loaded[key].shape)}; build the encoder with '
                       'hf_import.encoder_kwargs(path).')
    out[key] = jnp.asarray(loaded[key], value.dtype)
  return out


def replace_params(params: Mapping, path: str, *, key: str = 'text_encoder') -> dict:
  """A copy of a (trainer) params dict with params[key] replaced by the checkpoint's."""
  kwargs = encoder_kwargs(path)
  loaded = bert_to_params(read_tensors(path), num_layers=kwargs['num_layers'],
                          num_heads=kwargs['num_heads'])
  return {**params, key: _check_and_cast(params[key], loaded, key)}


def load_into(encoder: TextEncoder, path: str) -> TextEncoder:
  """Overwrites a built TextEncoder's parameters with the checkpoint's (in place)."""
  if encoder.norm_position != 'post':
    raise ValueError("BERT checkpoints need TextEncoder(norm_position='post').")
  state = nnx.state(encoder, nnx.Param)
  loaded = replace_params({'text_encoder': state.to_pure_dict()}, path)['text_encoder']
  nnx.replace_by_pure_dict(state, loaded)
  nnx.update(encoder, state)
  return encoder


def load_tokenizer(path: str):
  """A `tokenizers.Tokenizer` from tokenizer.json, or WordPiece from vocab.txt.

  Fixed padding saved in tokenizer.json (e.g. all-MiniLM's pad-to-128) is switched off:
  `encode` returns the real tokens; pad batches yourself.
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
