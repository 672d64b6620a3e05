"""Importing Hugging Face checkpoints into the project's own modules (no PyTorch).

    from metalm_jax.models import hf
    kwargs = hf.module_kwargs('/ckpt/clip-vit-base-patch16')          # VisionEncoder kwargs
    params = hf.import_params('/ckpt/clip-vit-base-patch16', num_layers=11)  # drop the last
    encoder = hf.load('/ckpt/clip-vit-base-patch16')                   # a built module

The directory's `config.json` `model_type` picks the importer (IMPORTERS) and the part of
our model it fills (PARTS): `VisionEncoder` (CLIP), `TextEncoder` (BERT / RoBERTa) or
`Decoder` (GPT-2, LLaMA-family). An importer module provides

    PART                      'vision_encoder' | 'text_encoder' | 'decoder'
    PREFIXES                  tensor-name prefixes stripped on reading ('bert.', 'model.')
    module_kwargs(hf_config)  our module's architecture kwargs, from config.json
    to_params(tensors, hf_config, *, num_layers)
                              a pure params dict of the module (first num_layers layers)

and the trainer docks it with `config.model.<part>.init_from = 'hf:<dir>'`
(`train.init_from`). Importing fewer layers than the checkpoint has keeps the first ones
(mPLUG drops CLIP's last layer: num_layers = 11 of 12).
"""
from __future__ import annotations

import importlib

from metalm_jax.models.hf.common import HFImportError, Tensors, listing, read_config

# model_type (config.json) -> importer module.
IMPORTERS = {
    'bert': 'metalm_jax.models.hf.bert',
    'roberta': 'metalm_jax.models.hf.bert',
    'xlm-roberta': 'metalm_jax.models.hf.bert',
    'clip': 'metalm_jax.models.hf.clip',
    'clip_vision_model': 'metalm_jax.models.hf.clip',
    'gpt2': 'metalm_jax.models.hf.decoders',
    'llama': 'metalm_jax.models.hf.decoders',
    'qwen2': 'metalm_jax.models.hf.decoders',
    'mistral': 'metalm_jax.models.hf.decoders',
}
PARTS = ('vision_encoder', 'text_encoder', 'decoder')


def importer(path: str, part: str | None = None):
  """(importer module, config.json dict) for a directory; HFImportError naming the
  model_type found if no importer reads it, or if it fills another part than `part`."""
  hf_config = read_config(path)
  model_type = hf_config.get('model_type')
  if model_type not in IMPORTERS:
    raise HFImportError(f'{path}/config.json has model_type={model_type!r}; importable: '
                        f'{sorted(IMPORTERS)}.')
  module = importlib.import_module(IMPORTERS[model_type])
  if part is not None and module.PART != part:
    raise HFImportError(f'{path} is a {model_type!r} checkpoint, which docks as '
                        f'config.model.{module.PART}, not config.model.{part}.')
  return module, hf_config


def module_kwargs(path: str, part: str | None = None) -> dict:
  """Our module's architecture kwargs from the directory's config.json."""
  module, hf_config = importer(path, part)
  return module.module_kwargs(hf_config)


def import_params(path: str, part: str | None = None, *, num_layers: int | None = None) -> dict:
  """A pure params dict (float32 NumPy leaves) of the module `module_kwargs` describes,
  with the first `num_layers` layers (default all)."""
  module, hf_config = importer(path, part)
  full = module.module_kwargs(hf_config)['num_layers']
  num_layers = full if num_layers is None else num_layers
  if not 1 <= num_layers <= full:
    raise HFImportError(f'num_layers={num_layers}: {path} has {full} layers; import 1..{full}.')
  tensors = Tensors.from_dir(path, prefixes=module.PREFIXES)
  return module.to_params(tensors, hf_config, num_layers=num_layers)


def load(path: str, part: str | None = None, *, num_layers: int | None = None, dtype=None,
         **overrides):
  """The module (`VisionEncoder` / `TextEncoder` / `Decoder`) built from config.json with
  the checkpoint's weights; `overrides` are extra module kwargs (dropout_rate, scan_layers,
  another image_size, ...)."""
  import jax.numpy as jnp
  from flax import nnx

  from metalm_jax.models.hf import docking
  from metalm_jax.models.hf.common import check_and_cast

  module, hf_config = importer(path, part)
  cls = module_class(module.PART)
  kwargs = dict(module.module_kwargs(hf_config), **overrides)
  if num_layers is not None:
    kwargs['num_layers'] = num_layers
  dtype = jnp.float32 if dtype is None else dtype
  built = nnx.eval_shape(lambda: cls(**kwargs, dtype=dtype, rngs=nnx.Rngs(0)))
  state = nnx.state(built, nnx.Param)
  # Scanned decoder blocks stacked, a vision position table resized to `image_size`.
  params = docking.hf_params(docking.Part('', module.PART, docking.HF_PREFIX + path, kwargs))
  loaded = check_and_cast(state.to_pure_dict(), params, module.PART,
                          hint=f'build the module with hf.module_kwargs({path!r})')
  nnx.replace_by_pure_dict(state, loaded)
  nnx.update(built, state)
  return built


def module_class(part: str):
  """The class a part is built from."""
  from metalm_jax.models.decoder import Decoder
  from metalm_jax.models.text_encoder import TextEncoder
  from metalm_jax.models.vision_encoder import VisionEncoder

  return {'vision_encoder': VisionEncoder, 'text_encoder': TextEncoder, 'decoder': Decoder}[part]


__all__ = ['HFImportError', 'IMPORTERS', 'PARTS', 'Tensors', 'import_params', 'importer', 'listing',
           'load', 'module_class', 'module_kwargs', 'read_config']
