"""CLIP vision towers (Hugging Face `CLIPModel` / `CLIPVisionModel`) -> our `VisionEncoder`.

Axis letters: D hidden_size, C num_channels, p patch_size, G grid = image_size / p,
P = G * G patches, N heads, H head_dim = D / N, F intermediate_size.

Two directory kinds are read: model_type 'clip' (a whole CLIPModel: the tower's settings are
config.json's `vision_config`, its tensors are under 'vision_model.'; the text tower and the
projections are ignored) and 'clip_vision_model' (a CLIPVisionModel: settings at the top
level; tensors under 'vision_model.' as transformers 4 saves them, or unprefixed as
transformers 5 does). Settings absent from config.json take `CLIPVisionConfig`'s defaults
(VISION_DEFAULTS), as transformers does.

Weight mapping (HF name without 'vision_model.' -> our path):

  embeddings.class_embedding [D]                  -> cls
  embeddings.position_embedding.weight [1+P, D]   -> cls_position (row 0),
                                                     positions [G, G, D] (rows 1.., row-major)
  embeddings.patch_embedding.weight [D, C, p, p]  -> patch_embedding/kernel [p*p*C, D], rows in
                                                     `patchify`'s (row, col, channel) order (no bias)
  pre_layrnorm                                    -> pre_norm
  encoder.layers.i.self_attn.{q,k,v}_proj         -> layers/i/attention/{query,key,value}
                                                     kernel [D, N, H], bias [N, H]
  encoder.layers.i.self_attn.out_proj             -> layers/i/attention/out kernel [N, H, D]
  encoder.layers.i.layer_norm1 / layer_norm2      -> layers/i/attention_norm / ffn_norm
  encoder.layers.i.mlp.fc1 / fc2                  -> layers/i/ffn/wi / wo
  post_layernorm                                  -> final_norm

Differences to Hugging Face to know about:
  * `post_layernorm` is applied to every token here (HF: only to the pooled [CLS]); see
    `metalm_jax.models.vision_encoder`. Our output = post_layernorm(last_hidden_state).
  * At an image size other than `image_size` the position grid is resized bilinearly
    (`interpolate_positions`); HF's `interpolate_pos_encoding=True` resizes bicubically, so
    the two agree only at the checkpoint's own size.
  * `attention_dropout` (attention-probability dropout) has no counterpart; it is 0 in the
    released CLIP checkpoints and inert at inference.

Pixels: our images are [B, H, W, C] (HF's pixel_values are [B, C, H, W]) normalised with the
checkpoint's mean / std (`image_stats`).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from metalm_jax.models.hf.common import HFImportError, heads_in, heads_out, linear, norm

logger = logging.getLogger(__name__)

PART = 'vision_encoder'
PREFIXES = ('vision_model.',)
PREPROCESSOR_FILE = 'preprocessor_config.json'

# transformers' CLIPVisionConfig defaults (5.23.0), used for keys config.json leaves out.
VISION_DEFAULTS = {
    'hidden_size': 768, 'intermediate_size': 3072, 'num_hidden_layers': 12,
    'num_attention_heads': 12, 'num_channels': 3, 'image_size': 224, 'patch_size': 32,
    'hidden_act': 'quick_gelu', 'layer_norm_eps': 1e-5,
}
# config.json hidden_act -> GeluFfn activation (the tanh forms are the same function).
ACTIVATIONS = {
    'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
    'gelu_pytorch_tanh': 'gelu_tanh',
}


def vision_config(hf_config: dict) -> dict:
  """The vision tower's settings: `vision_config` of a 'clip' config, else the config itself,
  with CLIPVisionConfig's defaults filled in."""
  model_type = hf_config.get('model_type')
  if model_type == 'clip':
    vision = hf_config.get('vision_config') or {}
  elif model_type == 'clip_vision_model':
    vision = hf_config
  else:
    raise HFImportError(f"model_type={model_type!r} is not a CLIP checkpoint; this importer "
                        "reads 'clip' and 'clip_vision_model'.")
  return {**VISION_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}


def _int_setting(vision: dict, key: str) -> int:
  value = vision[key]
  if isinstance(value, bool) or not isinstance(value, int):
    raise HFImportError(f'CLIP vision config {key}={value!r}: only a single int (square '
                        'images / patches) is supported.')
  return value


def module_kwargs(hf_config: dict) -> dict:
  """`VisionEncoder` kwargs for the checkpoint's vision tower (the CLIP layout)."""
  vision = vision_config(hf_config)
  act = vision['hidden_act']
  if act not in ACTIVATIONS:
    raise HFImportError(f'CLIP vision config hidden_act={act!r} is not supported; supported: '
                        f'{sorted(ACTIVATIONS)}.')
  image_size, patch_size = _int_setting(vision, 'image_size'), _int_setting(vision, 'patch_size')
  if image_size % patch_size:
    raise HFImportError(f'CLIP vision config image_size={image_size} is not a multiple of '
                        f'patch_size={patch_size}.')
  d_model, num_heads = vision['hidden_size'], vision['num_attention_heads']
  if d_model % num_heads:
    raise HFImportError(f'CLIP vision config hidden_size={d_model} is not a multiple of '
                        f'num_attention_heads={num_heads}.')
  return dict(image_size=image_size, patch_size=patch_size, d_model=d_model,
              num_layers=vision['num_hidden_layers'], num_heads=num_heads,
              d_ff=vision['intermediate_size'], channels=vision['num_channels'], use_cls=True,
              layer_norm_eps=float(vision['layer_norm_eps']), pre_norm=True, patch_bias=False,
              activation=ACTIVATIONS[act])


def _attention(tensors, prefix: str, num_heads: int) -> dict:
  out = {}
  for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
    p = linear(tensors, f'{prefix}.{theirs}')
    out[ours] = {'kernel': heads_in(p['kernel'], num_heads),
                 'bias': p['bias'].reshape(num_heads, -1)}
  p = linear(tensors, f'{prefix}.out_proj')
  out['out'] = {'kernel': heads_out(p['kernel'], num_heads), 'bias': p['bias']}
  return out


def to_params(tensors, hf_config: dict, *, num_layers: int) -> dict:
  """A pure `VisionEncoder` params dict (float32 NumPy) of the first `num_layers` layers."""
  kw = module_kwargs(hf_config)
  d, p, c, n = kw['d_model'], kw['patch_size'], kw['channels'], kw['num_heads']
  grid = kw['image_size'] // p
  patch = tensors['embeddings.patch_embedding.weight']  # [D, C, p, p]
  if patch.shape != (d, c, p, p):
    raise HFImportError(f'embeddings.patch_embedding.weight has shape {patch.shape}; the '
                        f'config says {(d, c, p, p)} (hidden_size, num_channels, patch_size^2).')
  positions = tensors['embeddings.position_embedding.weight']  # [1 + P, D]
  if positions.shape != (1 + grid * grid, d):
    raise HFImportError(f'embeddings.position_embedding.weight has shape {positions.shape}; '
                        f'image_size={kw["image_size"]} / patch_size={p} needs '
                        f'{(1 + grid * grid, d)}.')
  params = {
      # [D, C, y, x] -> [y, x, C, D] -> [p*p*C, D]: patchify's (row, col, channel) order.
      'patch_embedding': {'kernel': patch.transpose(2, 3, 1, 0).reshape(p * p * c, d)},
      'cls': tensors['embeddings.class_embedding'],
      'cls_position': positions[0],
      'positions': positions[1:].reshape(grid, grid, d),
      'pre_norm': norm(tensors, 'pre_layrnorm'),
      'final_norm': norm(tensors, 'post_layernorm'),
      'layers': {},
  }
  for i in range(num_layers):
    prefix = f'encoder.layers.{i}'
    params['layers'][i] = {
        'attention': _attention(tensors, f'{prefix}.self_attn', n),
        'attention_norm': norm(tensors, f'{prefix}.layer_norm1'),
        'ffn': {'wi': linear(tensors, f'{prefix}.mlp.fc1'),
                'wo': linear(tensors, f'{prefix}.mlp.fc2')},
        'ffn_norm': norm(tensors, f'{prefix}.layer_norm2'),
    }
  return params


def image_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) float32 [C] of the pixel normalisation, from the directory's
  preprocessor_config.json (`image_mean` / `image_std`); OpenAI CLIP's published values
  (`metalm_jax.data.images.CLIP_MEAN` / `CLIP_STD`) when the file or the keys are absent."""
  from metalm_jax.data.images import CLIP_MEAN, CLIP_STD

  file = os.path.join(path, PREPROCESSOR_FILE)
  stats = {}
  if os.path.isfile(file):
    with open(file) as f:
      stats = json.load(f)
  if 'image_mean' not in stats or 'image_std' not in stats:
    logger.info('%s: no image_mean / image_std in %s; using OpenAI CLIP\'s mean %s / std %s.',
                path, PREPROCESSOR_FILE, CLIP_MEAN.tolist(), CLIP_STD.tolist())
    return CLIP_MEAN.copy(), CLIP_STD.copy()
  mean = np.asarray(stats['image_mean'], np.float32).reshape(-1)
  std = np.asarray(stats['image_std'], np.float32).reshape(-1)
  if mean.shape != std.shape:
    raise HFImportError(f'{file}: image_mean {mean.tolist()} and image_std {std.tolist()} '
                        'have different lengths.')
  return mean, std


__all__ = ['ACTIVATIONS', 'PART', 'PREFIXES', 'VISION_DEFAULTS', 'image_stats', 'module_kwargs',
           'to_params', 'vision_config']
