"""GPT-2 and LLaMA-family (LLaMA, Mistral, Qwen2) causal LMs <-> our `Decoder`.

Axis letters: V vocab, D d_model, N query heads, K key/value heads, H head_dim, F d_ff,
P positions. Hugging Face `nn.Linear` weights are [out, in]; GPT-2's `Conv1D` weights are
already [in, out]. Our kernels are [in, out] with the head axes split out.

LLaMA / Mistral / Qwen2 (prefix 'model.' stripped; `Decoder(norm='rmsnorm',
position='rope', mlp_activation='swiglu', scale_tied_logits=False)`):
  embed_tokens.weight [V, D]                    -> embedder.embedding [V, D]
  layers.i.input_layernorm.weight [D]           -> blocks[i].attn_norm.scale
  layers.i.self_attn.q_proj.weight [N*H, D]     -> blocks[i].attention.query.kernel [D, N, H]
  layers.i.self_attn.{k,v}_proj.weight [K*H, D] -> blocks[i].attention.{key,value}.kernel [D, K, H]
  layers.i.self_attn.o_proj.weight [D, N*H]     -> blocks[i].attention.out.kernel [N, H, D]
    (biases: q/k/v [N*H] / [K*H] -> [N, H] / [K, H]; o [D]; Qwen2 q/k/v only,
     LLaMA all four when attention_bias, Mistral none)
  layers.i.post_attention_layernorm.weight [D]  -> blocks[i].mlp_norm.scale
  layers.i.mlp.gate_proj.weight [F, D]          -> blocks[i].mlp.wi_gate.kernel [D, F]
  layers.i.mlp.up_proj.weight [F, D]            -> blocks[i].mlp.wi.kernel [D, F]
  layers.i.mlp.down_proj.weight [D, F]          -> blocks[i].mlp.wo.kernel [F, D]
  norm.weight [D]                               -> final_norm.scale
  lm_head.weight [V, D] (absent when tie_word_embeddings) -> head.kernel [D, V]

GPT-2 (prefix 'transformer.' stripped; `Decoder(norm='layernorm', position='learned',
mlp_activation='gelu' (the tanh approximation = 'gelu_new'), attention_bias='all',
mlp_bias=True, tie_embeddings=True, scale_tied_logits=False)`):
  wte.weight [V, D] -> embedder.embedding;  wpe.weight [P, D] -> position_table.embedding
  h.i.ln_1 / h.i.ln_2 {weight, bias}            -> blocks[i].attn_norm / mlp_norm {scale, bias}
  h.i.attn.c_attn.weight [D, 3*N*H] (q | k | v) -> blocks[i].attention.{query,key,value}.kernel
  h.i.attn.c_proj.weight [N*H, D]               -> blocks[i].attention.out.kernel [N, H, D]
  h.i.mlp.c_fc.weight [D, F] / c_proj [F, D]    -> blocks[i].mlp.wi / wo .kernel (+ biases)
  ln_f {weight, bias}                           -> final_norm {scale, bias}

`export` writes the reverse: a trained `Decoder` (or its pure params + kwargs) as a
config.json + model.safetensors directory that `transformers.AutoModelForCausalLM` opens.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping

import numpy as np

from metalm_jax.models.hf.common import (WEIGHTS_FILE, HFImportError, heads_in, heads_out,
                                         linear, norm)

PART = 'decoder'
PREFIXES = ('transformer.', 'model.')
LLAMA_TYPES = ('llama', 'mistral', 'qwen2')
MODEL_TYPES = ('gpt2',) + LLAMA_TYPES
# hidden activations read as our Mlp 'gelu' (jax.nn.gelu, tanh approximation).
GPT2_ACTIVATIONS = ('gelu_new', 'gelu_pytorch_tanh')
# config.json tie_word_embeddings when the key is absent (each config class's default).
_TIE_DEFAULT = {'gpt2': True, 'llama': False, 'mistral': False, 'qwen2': False}
_ARCHITECTURES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM',
                  'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}


class HFExportError(ValueError):
  """A Decoder cannot be written as a Hugging Face checkpoint; the message names the option."""


# ----------------------------------------------------------------------------- import


def _unsupported(key: str, value, supported: str) -> HFImportError:
  return HFImportError(f'config.json {key}={value!r} is not supported: {supported}.')


def _rope_theta(hf_config: dict) -> float:
  """The RoPE base; any rope scaling / partial rotary setting -> HFImportError."""
  scaling = hf_config.get('rope_scaling')
  if scaling:
    kind = scaling.get('rope_type', scaling.get('type'))
    if kind != 'default':
      raise _unsupported('rope_scaling', scaling, "only None or rope_type 'default' (plain RoPE "
                         'as trained; scaled / extended-context RoPE variants are not built)')
  params = hf_config.get('rope_parameters') or {}
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind != 'default':
    raise _unsupported('rope_parameters', params, "only rope_type 'default' (plain RoPE; "
                       'linear / dynamic / yarn / llama3 scaling is not built)')
  for key, value in list(params.items()) + [('partial_rotary_factor',
                                             hf_config.get('partial_rotary_factor', 1.0))]:
    if key in ('rope_type', 'type', 'rope_theta'):
      continue
    if key == 'partial_rotary_factor' and value in (None, 1, 1.0):
      continue
    raise _unsupported(f'rope_parameters.{key}' if key in params else key, value,
                       'our RoPE rotates the whole head_dim with no extra parameters')
  return float(params.get('rope_theta', hf_config.get('rope_theta', 10000.0)))


def _tied(hf_config: dict) -> bool:
  return bool(hf_config.get('tie_word_embeddings', _TIE_DEFAULT[hf_config['model_type']]))


def _gpt2_kwargs(c: dict) -> dict:
  act = c.get('activation_function', 'gelu_new')
  if act not in GPT2_ACTIVATIONS:
    raise _unsupported('activation_function', act, f'supported: {GPT2_ACTIVATIONS} (the tanh '
                       "GELU approximation, our Mlp 'gelu'); exact 'gelu' differs by ~1e-3")
  for key, want in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                    ('add_cross_attention', False)):
    if c.get(key, want) != want:
      raise _unsupported(key, c[key], f'only {want} (our attention scales by 1/sqrt(head_dim) '
                         'in every layer and has no cross-attention)')
  d = c['n_embd']
  return dict(vocab_size=c['vocab_size'], d_model=d, num_layers=c['n_layer'],
              num_heads=c['n_head'], d_ff=c.get('n_inner') or 4 * d, mlp_activation='gelu',
              position='learned', max_len=c['n_positions'], norm='layernorm',
              norm_epsilon=float(c.get('layer_norm_epsilon', 1e-5)), attention_bias='all',
              mlp_bias=True, tie_embeddings=_tied(c), scale_tied_logits=False)


def _llama_kwargs(c: dict) -> dict:
  model_type = c['model_type']
  act = c.get('hidden_act', 'silu')
  if act != 'silu':
    raise _unsupported('hidden_act', act, "only 'silu' (the SwiGLU MLP, our mlp_activation "
                       "'swiglu')")
  if model_type == 'mistral':
    window, max_pos = c.get('sliding_window'), c.get('max_position_embeddings')
    if window is not None and (max_pos is None or window < max_pos):
      raise _unsupported('sliding_window', window, f'only None or >= max_position_embeddings='
                         f'{max_pos}: our attention is full causal, which equals sliding-window '
                         'attention only while no sequence is longer than the window')
  if model_type == 'qwen2':
    if c.get('use_sliding_window'):
      raise _unsupported('use_sliding_window', True, 'only False (full causal attention)')
    other = sorted({t for t in c.get('layer_types') or () if t != 'full_attention'})
    if other:
      raise _unsupported('layer_types', other, "only 'full_attention' layers")
  d, n = c['hidden_size'], c['num_attention_heads']
  if model_type == 'llama':
    bias, mlp_bias = ('all' if c.get('attention_bias') else 'none'), bool(c.get('mlp_bias'))
  else:
    bias, mlp_bias = ('qkv' if model_type == 'qwen2' else 'none'), False
  return dict(vocab_size=c['vocab_size'], d_model=d, num_layers=c['num_hidden_layers'],
              num_heads=n, num_kv_heads=c.get('num_key_value_heads') or n,
              head_dim=c.get('head_dim') or d // n, d_ff=c['intermediate_size'],
              mlp_activation='swiglu', position='rope',
              max_len=c.get('max_position_embeddings', 2048), norm='rmsnorm',
              norm_epsilon=float(c.get('rms_norm_eps', 1e-6)), attention_bias=bias,
              mlp_bias=mlp_bias, rope_theta=_rope_theta(c), tie_embeddings=_tied(c),
              scale_tied_logits=False)


def module_kwargs(hf_config: dict) -> dict:
  """`Decoder` kwargs for a GPT-2 / LLaMA / Mistral / Qwen2 config.json (HFImportError
  naming the key for settings our Decoder does not build)."""
  model_type = hf_config.get('model_type')
  if model_type == 'gpt2':
    return _gpt2_kwargs(hf_config)
  if model_type in LLAMA_TYPES:
    return _llama_kwargs(hf_config)
  raise HFImportError(f'model_type={model_type!r} is not a decoder read here; '
                      f'supported: {MODEL_TYPES}.')


def _bias_heads(tensors: Mapping, name: str, heads: int) -> np.ndarray:
  """[N*H] -> [N, H]."""
  return tensors[name].reshape(heads, -1)


def _llama_block(t: Mapping, i: int, kw: dict) -> dict:
  p = f'layers.{i}.'
  n, k = kw['num_heads'], kw['num_kv_heads']
  qkv_bias, out_bias = kw['attention_bias'] != 'none', kw['attention_bias'] == 'all'
  attention = {}
  for ours, theirs, heads in (('query', 'q_proj', n), ('key', 'k_proj', k),
                              ('value', 'v_proj', k)):
    attention[ours] = {'kernel': heads_in(t[f'{p}self_attn.{theirs}.weight'].T, heads)}
    if qkv_bias:
      attention[ours]['bias'] = _bias_heads(t, f'{p}self_attn.{theirs}.bias', heads)
  attention['out'] = {'kernel': heads_out(t[f'{p}self_attn.o_proj.weight'].T, n)}
  if out_bias:
    attention['out']['bias'] = t[f'{p}self_attn.o_proj.bias']
  mlp_bias = kw['mlp_bias']
  return {
      'attn_norm': norm(t, f'{p}input_layernorm', bias=False),
      'attention': attention,
      'mlp_norm': norm(t, f'{p}post_attention_layernorm', bias=False),
      'mlp': {'wi_gate': linear(t, f'{p}mlp.gate_proj', bias=mlp_bias),
              'wi': linear(t, f'{p}mlp.up_proj', bias=mlp_bias),
              'wo': linear(t, f'{p}mlp.down_proj', bias=mlp_bias)},
  }


def _gpt2_block(t: Mapping, i: int, kw: dict) -> dict:
  p, n = f'h.{i}.', kw['num_heads']
  kernels = np.split(t[f'{p}attn.c_attn.weight'], 3, axis=1)  # Conv1D: [D, 3 * N * H]
  biases = np.split(t[f'{p}attn.c_attn.bias'], 3)
  attention = {name: {'kernel': heads_in(w, n), 'bias': b.reshape(n, -1)}
               for name, w, b in zip(('query', 'key', 'value'), kernels, biases)}
  attention['out'] = {'kernel': heads_out(t[f'{p}attn.c_proj.weight'], n),
                      'bias': t[f'{p}attn.c_proj.bias']}
  return {
      'attn_norm': norm(t, f'{p}ln_1'),
      'attention': attention,
      'mlp_norm': norm(t, f'{p}ln_2'),
      'mlp': {'wi': {'kernel': t[f'{p}mlp.c_fc.weight'], 'bias': t[f'{p}mlp.c_fc.bias']},
              'wo': {'kernel': t[f'{p}mlp.c_proj.weight'], 'bias': t[f'{p}mlp.c_proj.bias']}},
  }


def _check_all_read(tensors, num_layers: int, layer_prefix: str) -> None:
  """Every tensor of the kept layers (and outside layers) was mapped; a leftover means the
  config and the weights disagree (e.g. biases config.json does not announce)."""
  used = getattr(tensors, 'used', None)
  if used is None:
    return
  left = []
  for name in tensors:
    if name in used or name == 'lm_head.weight':  # a tied head saved anyway
      continue
    if name.startswith(layer_prefix) and int(name.split('.')[1]) >= num_layers:
      continue  # a dropped layer
    if name.endswith(('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq')):
      continue  # buffers older transformers versions saved
    left.append(name)
  if left:
    raise HFImportError(f'{len(left)} tensors in {tensors.where} are not mapped onto the '
                        f'Decoder (e.g. {sorted(left)[:6]}): config.json and the weights '
                        'disagree (a bias or layer the config does not announce).')


def to_params(tensors: Mapping, hf_config: dict, *, num_layers: int) -> dict:
  """The pure params dict of `Decoder(**module_kwargs(hf_config))` with `num_layers` layers
  (unscanned layout: blocks keyed by int; `decoder.stack_layer_params` for scan_layers)."""
  kw = module_kwargs(hf_config)
  t = tensors
  if hf_config['model_type'] == 'gpt2':
    params = {'embedder': {'embedding': t['wte.weight']},
              'position_table': {'embedding': t['wpe.weight']},
              'blocks': {i: _gpt2_block(t, i, kw) for i in range(num_layers)},
              'final_norm': norm(t, 'ln_f')}
    layer_prefix = 'h.'
  else:
    params = {'embedder': {'embedding': t['embed_tokens.weight']},
              'blocks': {i: _llama_block(t, i, kw) for i in range(num_layers)},
              'final_norm': norm(t, 'norm', bias=False)}
    layer_prefix = 'layers.'
  if not kw['tie_embeddings']:
    params['head'] = {'kernel': t['lm_head.weight'].T}
  _check_all_read(t, num_layers, layer_prefix)
  return params


# ----------------------------------------------------------------------------- export


def _decoder_kwargs(kwargs: Mapping) -> dict:
  """`kwargs` completed with `Decoder`'s defaults; unknown names are an error."""
  from metalm_jax.models.decoder import Decoder

  signature = inspect.signature(Decoder.__init__)
  defaults = {name: p.default for name, p in signature.parameters.items()
              if p.default is not inspect.Parameter.empty}
  unknown = sorted(set(kwargs) - set(signature.parameters))
  if unknown:
    raise HFExportError(f'kwargs {unknown} are not Decoder arguments.')
  missing = [name for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'd_ff')
             if name not in kwargs]
  if missing:
    raise HFExportError(f'kwargs lack {missing}: pass the kwargs the Decoder was built with.')
  return dict(defaults, **kwargs)


def _pure_params(decoder_or_params) -> dict:
  """Float32 NumPy pure params, unscanned layout (blocks keyed by int)."""
  import jax
  from flax import nnx

  if isinstance(decoder_or_params, nnx.Module):
    params = nnx.state(decoder_or_params, nnx.Param).to_pure_dict()
  else:
    params = decoder_or_params
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  blocks = params['blocks']
  if not all(isinstance(key, int) for key in blocks):  # scan_layers: a leading layer axis
    n = jax.tree.leaves(blocks)[0].shape[0]
    params = dict(params, blocks={i: jax.tree.map(lambda x, i=i: x[i], blocks)
                                  for i in range(n)})
  return params


def infer_model_type(kw: Mapping) -> str:
  """The Hugging Face model_type a Decoder's kwargs correspond to (HFExportError if none)."""
  layout = (kw['norm'], kw['position'], kw['mlp_activation'])
  if layout == ('rmsnorm', 'rope', 'swiglu'):
    return 'qwen2' if kw['attention_bias'] == 'qkv' else 'llama'
  if layout == ('layernorm', 'learned', 'gelu'):
    return 'gpt2'
  if kw['position'] == 'sinusoidal':
    raise HFExportError("position='sinusoidal' has no counterpart in GPT-2 / LLaMA / Qwen2 "
                        "checkpoints: build the Decoder with position='rope' (LLaMA) or "
                        "'learned' (GPT-2).")
  raise HFExportError(f'(norm, position, mlp_activation)={layout} matches no exportable model: '
                      "llama / qwen2 / mistral need ('rmsnorm', 'rope', 'swiglu'), gpt2 "
                      "('layernorm', 'learned', 'gelu').")


def _require(kw: Mapping, model_type: str, name: str, allowed: tuple, why: str = '') -> None:
  if kw[name] not in allowed:
    raise HFExportError(f'{name}={kw[name]!r} cannot be exported as model_type={model_type!r}'
                        f' (it needs {name} in {allowed}){why}.')


def _check_exportable(kw: Mapping, model_type: str) -> None:
  if model_type not in MODEL_TYPES:
    raise HFExportError(f'model_type={model_type!r}: exportable are {MODEL_TYPES}.')
  if kw['tie_embeddings'] and kw['scale_tied_logits']:
    raise HFExportError('scale_tied_logits=True (tied logits divided by sqrt(d_model)) has no '
                        'Hugging Face counterpart: tied heads there are plain embedding '
                        'products. Train with scale_tied_logits=False, or untie the head.')
  if model_type == 'gpt2':
    for name, value in (('norm', 'layernorm'), ('position', 'learned'),
                        ('mlp_activation', 'gelu')):
      _require(kw, model_type, name, (value,))
    n, d = kw['num_heads'], kw['d_model']
    _require(kw, model_type, 'num_kv_heads', (None, n), ' (GPT-2 has no grouped-query heads)')
    if d % n or kw['head_dim'] not in (None, d // n):
      raise HFExportError(f'head_dim={kw["head_dim"]} with d_model={d}, num_heads={n} cannot '
                          'be exported as gpt2 (GPT-2 needs head_dim = d_model / num_heads).')
    return
  for name, value in (('norm', 'rmsnorm'), ('position', 'rope'), ('mlp_activation', 'swiglu')):
    _require(kw, model_type, name, (value,))
  if model_type == 'qwen2':
    _require(kw, model_type, 'attention_bias', ('none', 'qkv'), ' (Qwen2 o_proj has no bias)')
    _require(kw, model_type, 'mlp_bias', (False,), ' (Qwen2 MLPs have no biases)')
  if model_type == 'mistral':
    _require(kw, model_type, 'attention_bias', ('none',), ' (Mistral has no biases)')
    _require(kw, model_type, 'mlp_bias', (False,), ' (Mistral has no biases)')


def _bias(tree: Mapping, size: int) -> np.ndarray:
  """A layer's bias flattened, or zeros where our layer has none (exact: no bias = 0)."""
  return tree['bias'].reshape(-1) if 'bias' in tree else np.zeros((size,), np.float32)


def _gpt2_tensors(params: dict, kw: dict) -> dict:
  d, f = kw['d_model'], kw['d_ff']
  out = {'transformer.wte.weight': params['embedder']['embedding'],
         'transformer.wpe.weight': params['position_table']['embedding'],
         'transformer.ln_f.weight': params['final_norm']['scale'],
         'transformer.ln_f.bias': params['final_norm']['bias']}
  for i, block in params['blocks'].items():
    p, a, m = f'transformer.h.{i}.', block['attention'], block['mlp']
    out[f'{p}ln_1.weight'], out[f'{p}ln_1.bias'] = (block['attn_norm']['scale'],
                                                   block['attn_norm']['bias'])
    out[f'{p}ln_2.weight'], out[f'{p}ln_2.bias'] = (block['mlp_norm']['scale'],
                                                   block['mlp_norm']['bias'])
    qkv = ('query', 'key', 'value')
    out[f'{p}attn.c_attn.weight'] = np.concatenate([a[x]['kernel'].reshape(d, d) for x in qkv], 1)
    out[f'{p}attn.c_attn.bias'] = np.concatenate([_bias(a[x], d) for x in qkv])
    out[f'{p}attn.c_proj.weight'] = a['out']['kernel'].reshape(d, d)
    out[f'{p}attn.c_proj.bias'] = _bias(a['out'], d)
    out[f'{p}mlp.c_fc.weight'], out[f'{p}mlp.c_fc.bias'] = m['wi']['kernel'], _bias(m['wi'], f)
    out[f'{p}mlp.c_proj.weight'], out[f'{p}mlp.c_proj.bias'] = m['wo']['kernel'], _bias(m['wo'], d)
  return out


def _llama_tensors(params: dict, kw: dict, model_type: str) -> dict:
  out = {'model.embed_tokens.weight': params['embedder']['embedding'],
         'model.norm.weight': params['final_norm']['scale']}
  qkv_bias = model_type == 'qwen2' or (model_type == 'llama' and kw['attention_bias'] != 'none')
  out_bias = model_type == 'llama' and kw['attention_bias'] != 'none'
  mlp_bias = model_type == 'llama' and kw['mlp_bias']
  for i, block in params['blocks'].items():
    p, a, m = f'model.layers.{i}.', block['attention'], block['mlp']
    out[f'{p}input_layernorm.weight'] = block['attn_norm']['scale']
    out[f'{p}post_attention_layernorm.weight'] = block['mlp_norm']['scale']
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      kernel = a[ours]['kernel']  # [D, N, H]
      out[f'{p}self_attn.{theirs}.weight'] = kernel.reshape(kernel.shape[0], -1).T
      if qkv_bias:
        out[f'{p}self_attn.{theirs}.bias'] = _bias(a[ours], kernel.shape[1] * kernel.shape[2])
    kernel = a['out']['kernel']  # [N, H, D]
    out[f'{p}self_attn.o_proj.weight'] = kernel.reshape(-1, kernel.shape[-1]).T
    if out_bias:
      out[f'{p}self_attn.o_proj.bias'] = _bias(a['out'], kernel.shape[-1])
    for ours, theirs in (('wi_gate', 'gate_proj'), ('wi', 'up_proj'), ('wo', 'down_proj')):
      out[f'{p}mlp.{theirs}.weight'] = m[ours]['kernel'].T
      if mlp_bias:
        out[f'{p}mlp.{theirs}.bias'] = _bias(m[ours], m[ours]['kernel'].shape[1])
  return out


def hf_config_for(kw: Mapping, model_type: str) -> dict:
  """config.json of the export (transformers reads it with AutoConfig)."""
  common = dict(architectures=[_ARCHITECTURES[model_type]], model_type=model_type,
                vocab_size=kw['vocab_size'], tie_word_embeddings=bool(kw['tie_embeddings']),
                dtype='float32', torch_dtype='float32')
  if model_type == 'gpt2':
    return dict(common, n_embd=kw['d_model'], n_layer=kw['num_layers'],
                n_head=kw['num_heads'], n_inner=kw['d_ff'], n_positions=kw['max_len'],
                activation_function='gelu_new', layer_norm_epsilon=kw['norm_epsilon'],
                resid_pdrop=kw['dropout_rate'], embd_pdrop=kw['dropout_rate'],
                attn_pdrop=0.0, scale_attn_weights=True)
  n = kw['num_heads']
  head_dim = kw['head_dim'] or kw['d_model'] // n
  theta = float(kw['rope_theta'])
  config = dict(common, hidden_size=kw['d_model'], intermediate_size=kw['d_ff'],
                num_hidden_layers=kw['num_layers'], num_attention_heads=n,
                num_key_value_heads=kw['num_kv_heads'] or n, head_dim=head_dim,
                hidden_act='silu', max_position_embeddings=kw['max_len'],
                rms_norm_eps=kw['norm_epsilon'], rope_theta=theta,
                rope_parameters={'rope_type': 'default', 'rope_theta': theta},
                attention_dropout=0.0)
  if model_type == 'llama':
    config.update(attention_bias=kw['attention_bias'] != 'none', mlp_bias=bool(kw['mlp_bias']))
  if model_type == 'mistral':
    config.update(sliding_window=None)
  if model_type == 'qwen2':
    config.update(use_sliding_window=False, sliding_window=None,
                  max_window_layers=kw['num_layers'],
                  layer_types=['full_attention'] * kw['num_layers'])
  return config


def write_safetensors(file: str, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes float32 / any-NumPy-dtype tensors as one .safetensors file (no PyTorch)."""
  names = {np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16',
           np.dtype(np.float64): 'F64', np.dtype(np.int64): 'I64', np.dtype(np.int32): 'I32'}
  header, offset, blobs = {'__metadata__': {'format': 'pt'}}, 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in names:
      raise HFExportError(f'tensor {name!r} has dtype {array.dtype}; writable: '
                          f'{sorted(str(d) for d in names)}.')
    data = array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes()
    header[name] = {'dtype': names[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # keep the data 8-byte aligned
  with open(file, 'wb') as f:
    f.write(struct.pack('<Q', len(encoded)))
    f.write(encoded)
    for data in blobs:
      f.write(data)


def export(decoder_or_params, kwargs: Mapping, out_dir: str, *, model_type: str | None = None,
           overwrite: bool = False) -> str:
  """Writes a Decoder as a Hugging Face checkpoint directory (config.json + model.safetensors).

  Args:
    decoder_or_params: a built `Decoder`, or its pure params dict
      (`nnx.state(decoder, nnx.Param).to_pure_dict()`; scan_layers params are unstacked).
    kwargs: the kwargs the Decoder was built with (missing ones take Decoder's defaults).
    out_dir: the directory to create; written in a temporary sibling and renamed into
      place, so it either holds the whole export or does not exist.
    model_type: 'gpt2' | 'llama' | 'qwen2' | 'mistral'; None infers it from kwargs
      (rmsnorm + rope + swiglu -> llama, or qwen2 with attention_bias='qkv'; layernorm +
      learned + gelu -> gpt2). Biases the target has and our layers lack are written as
      zeros (exact).
    overwrite: replace an existing non-empty out_dir (otherwise an error).

  Returns:
    out_dir. `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` opens it.

  Raises:
    HFExportError naming the option that has no counterpart in the target (e.g.
    scale_tied_logits=True, position='sinusoidal').
  """
  kw = _decoder_kwargs(kwargs)
  model_type = model_type or infer_model_type(kw)
  _check_exportable(kw, model_type)
  params = _pure_params(decoder_or_params)
  if len(params['blocks']) != kw['num_layers']:
    raise HFExportError(f'the params have {len(params["blocks"])} layers but kwargs '
                        f'num_layers={kw["num_layers"]}: pass the kwargs of this Decoder.')
  if model_type == 'gpt2':
    tensors = _gpt2_tensors(params, kw)
  else:
    tensors = _llama_tensors(params, kw, model_type)
  if not kw['tie_embeddings']:
    tensors['lm_head.weight'] = params['head']['kernel'].T
  config = hf_config_for(kw, model_type)

  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f'{out_dir} exists and is not empty; pass overwrite=True or pick '
                          'a new directory.')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)
  try:
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2)
    write_safetensors(os.path.join(tmp, WEIGHTS_FILE), tensors)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.old-', dir=parent)
      os.rename(out_dir, os.path.join(old, 'previous'))
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


__all__ = ['HFExportError', 'MODEL_TYPES', 'PART', 'PREFIXES', 'export', 'hf_config_for',
           'infer_model_type', 'module_kwargs', 'to_params', 'write_safetensors']
