"""BERT, RoBERTa and XLM-RoBERTa encoders -> `TextEncoder(norm_position='post')`.

Axis letters: V vocab, P positions (max_position_embeddings), T token types, D hidden_size,
N heads, H head_dim = D / N, F intermediate_size.

Tensor names once the prefix is stripped ('bert.' / 'roberta.': the *ForMaskedLM and
*ForSequenceClassification classes save the encoder under it; *Model saves none). torch
Linear weights are [out, in] and become kernels [in, out]:

  embeddings.word_embeddings.weight [V, D]        -> word_embeddings.embedding [V, D]
  embeddings.position_embeddings.weight [P, D]    -> position_embeddings.embedding [P, D]
  embeddings.token_type_embeddings.weight [T, D]  -> token_type_embeddings.embedding [T, D]
  embeddings.LayerNorm.{weight,bias}              -> embedding_norm.{scale,bias}
  encoder.layer.i.attention.self.{query,key,value}.weight [N*H, D], .bias [N*H]
                                                  -> layers[i].attention.{query,key,value}.
                                                     kernel [D, N, H], bias [N, H]
  encoder.layer.i.attention.output.dense.weight [D, N*H], .bias [D]
                                                  -> layers[i].attention.out.kernel [N, H, D]
  encoder.layer.i.attention.output.LayerNorm      -> layers[i].attention_norm
  encoder.layer.i.intermediate.dense [F, D]       -> layers[i].ffn.wi.kernel [D, F]
  encoder.layer.i.output.dense [D, F]             -> layers[i].ffn.wo.kernel [F, D]
  encoder.layer.i.output.LayerNorm                -> layers[i].ffn_norm

The pooler and the MLM / classification heads are not read.

RoBERTa and XLM-R differ from BERT only in their positions: fairseq numbers them from
padding_idx + 1, so the encoder is built with position_offset = pad_token_id + 1 over the
whole saved table (max_len = max_position_embeddings; at most max_len - position_offset
tokens per row, 512 for roberta-base), and rows are taken as right-padded (see
`TextEncoder`). Their single token type (type_vocab_size 1) is kept as a one-row table.

Supported config.json settings: hidden_act 'gelu' (exact erf), absolute positions, an
encoder (not is_decoder, no cross-attention); anything else raises HFImportError.
"""
from __future__ import annotations

from collections.abc import Mapping

from metalm_jax.models.hf.common import HFImportError, heads_in, heads_out, linear, norm

PART = 'text_encoder'
PREFIXES = ('bert.', 'roberta.')
MODEL_TYPES = ('bert', 'roberta', 'xlm-roberta')
# Model types whose positions start at pad_token_id + 1 (fairseq's numbering).
FAIRSEQ_POSITIONS = ('roberta', 'xlm-roberta')


def _unsupported(hf_config: dict, key: str, found, supported: str) -> HFImportError:
  return HFImportError(f'config.json of this {hf_config.get("model_type")!r} checkpoint has '
                       f'{key}={found!r}; the TextEncoder importer supports {supported}.')


def module_kwargs(hf_config: dict) -> dict:
  """TextEncoder kwargs (post-LN BERT layout) from a BERT / RoBERTa / XLM-R config.json.

  Args:
    hf_config: the parsed config.json.

  Returns:
    Keyword arguments of `TextEncoder` (all but dtype / rngs / dropout_rate).

  Raises:
    HFImportError: the model type or a setting cannot be imported (the message names the
      key, the value found and what is supported).
  """
  model_type = hf_config.get('model_type')
  if model_type not in MODEL_TYPES:
    raise _unsupported(hf_config, 'model_type', model_type, f'{list(MODEL_TYPES)}')
  act = hf_config.get('hidden_act', 'gelu')
  if act != 'gelu':
    raise _unsupported(hf_config, 'hidden_act', act,
                       "'gelu' only (the exact-erf GELU of GeluFfn)")
  positions = hf_config.get('position_embedding_type', 'absolute')
  if positions != 'absolute':
    raise _unsupported(hf_config, 'position_embedding_type', positions, "'absolute' only")
  for key in ('is_decoder', 'add_cross_attention'):
    if hf_config.get(key, False):
      raise _unsupported(hf_config, key, hf_config[key],
                         'bidirectional encoders only (False): a causal or cross-attending '
                         'BERT has no TextEncoder counterpart')
  d_model, num_heads = hf_config['hidden_size'], hf_config['num_attention_heads']
  if d_model % num_heads:
    raise _unsupported(hf_config, 'hidden_size', d_model,
                       f'a multiple of num_attention_heads={num_heads}')
  pad_id = hf_config.get('pad_token_id')
  if pad_id is None:
    pad_id = 1 if model_type in FAIRSEQ_POSITIONS else 0
  offset = pad_id + 1 if model_type in FAIRSEQ_POSITIONS else 0
  max_len = hf_config['max_position_embeddings']
  if offset >= max_len:
    raise _unsupported(hf_config, 'max_position_embeddings', max_len,
                       f'more rows than position_offset = pad_token_id + 1 = {offset}')
  return dict(vocab_size=hf_config['vocab_size'], d_model=d_model,
              num_layers=hf_config['num_hidden_layers'], num_heads=num_heads,
              d_ff=hf_config['intermediate_size'], max_len=max_len,
              type_vocab_size=hf_config.get('type_vocab_size', 2), norm_position='post',
              layer_norm_eps=hf_config.get('layer_norm_eps', 1e-12), pad_id=pad_id,
              position_offset=offset)


def _attention_projection(tensors: Mapping, prefix: str, num_heads: int) -> dict:
  """torch Linear [N*H, D] (+ [N*H]) -> {'kernel': [D, N, H], 'bias': [N, H]}."""
  p = linear(tensors, prefix)
  return {'kernel': heads_in(p['kernel'], num_heads), 'bias': p['bias'].reshape(num_heads, -1)}


def to_params(tensors: Mapping, hf_config: dict, *, num_layers: int) -> dict:
  """The checkpoint's tensors (prefix stripped) -> a pure TextEncoder params dict.

  Args:
    tensors: name -> float32 array (`common.Tensors`; a missing name is an HFImportError).
    hf_config: the parsed config.json.
    num_layers: how many layers to import (the first ones).

  Returns:
    {'word_embeddings', 'position_embeddings', ['token_type_embeddings'], 'embedding_norm',
    'layers': {i: ...}} with float32 NumPy leaves, as `nnx.state(encoder, nnx.Param)
    .to_pure_dict()` of `TextEncoder(**module_kwargs(hf_config))` holds them.
  """
  kwargs = module_kwargs(hf_config)
  num_heads = kwargs['num_heads']
  params = {
      'word_embeddings': {'embedding': tensors['embeddings.word_embeddings.weight']},
      'position_embeddings': {'embedding': tensors['embeddings.position_embeddings.weight']},
      'embedding_norm': norm(tensors, 'embeddings.LayerNorm'),
      'layers': {},
  }
  if kwargs['type_vocab_size'] > 0:
    params['token_type_embeddings'] = {
        'embedding': tensors['embeddings.token_type_embeddings.weight']}
  for i in range(num_layers):
    p = f'encoder.layer.{i}'
    out = linear(tensors, f'{p}.attention.output.dense')
    params['layers'][i] = {
        'attention': {
            name: _attention_projection(tensors, f'{p}.attention.self.{name}', num_heads)
            for name in ('query', 'key', 'value')
        } | {'out': {'kernel': heads_out(out['kernel'], num_heads), 'bias': out['bias']}},
        'attention_norm': norm(tensors, f'{p}.attention.output.LayerNorm'),
        'ffn': {'wi': linear(tensors, f'{p}.intermediate.dense'),
                'wo': linear(tensors, f'{p}.output.dense')},
        'ffn_norm': norm(tensors, f'{p}.output.LayerNorm'),
    }
  return params


__all__ = ['FAIRSEQ_POSITIONS', 'MODEL_TYPES', 'PART', 'PREFIXES', 'module_kwargs', 'to_params']
