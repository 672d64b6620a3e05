"""`config.model.<part>.init_from`: start a part of the model from a pretrained checkpoint.

    config.model.vision_encoder = {'init_from': 'hf:checkpoints/openai/clip-vit-base-patch16',
                                   'num_layers': 11}            # CLIP minus its last layer
    config.model.decoder = {'init_from': 'hf:checkpoints/gpt2'}
    config.model.text_encoder = {'init_from': 'workdirs/pretrain'}   # our own checkpoint

Parts: a METALM model's `decoder`, `text_encoder` and `vision_encoder`; an mPLUG model's
`vision_encoder` and `text_encoder`; a decoder-only model's `config.model.init_from` (the
whole model is the decoder).

'hf:<dir>' (a Hugging Face directory, `models.hf`): the part's architecture comes from the
directory's config.json; the part's own keys may add what the checkpoint does not fix
(dropout_rate, scan_layers, remat_policy, attention_impl, ...), repeat a value, import fewer
layers (`num_layers` below the checkpoint's: the first ones are kept; -k: all but the last
k, as mPLUG drops CLIP's last layer with num_layers=-1), fewer positions
(`max_len`: the table's first rows) or, for a vision encoder, another `image_size` (the
position table is resized bilinearly). Any other
disagreement is an error naming both values. mPLUG injects `vocab_size` / `d_model` /
`pad_id` into its text encoder from `config.model`; those must then equal the checkpoint's.

Anything else is a checkpoint of this project (a workdir, its checkpoints/ or a step
folder): its params under the same part name are loaded (`train.init_from` rules, shapes
checked), and the part's architecture keys must be given as usual.

Either way the weights are read when training starts from nothing (before the first step,
never on resume), after which `config.init_from` (a whole-model checkpoint), if set, is
applied on top. A directory that is missing stops the run before any compute, with the
list of what to download and where it goes (`check_available`); no code downloads anything.
By convention a directory ends in the Hub repo id (`.../openai/clip-vit-base-patch16`),
which the message then names.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from metalm_jax.models import hf
from metalm_jax.models.hf.common import HFImportError

HF_PREFIX = 'hf:'
# model name -> {part key -> (part kind, keys the parent injects from config.model, keys the
# parent sets itself)}.
PARTS = {
    'metalm': {'decoder': ('decoder', (), ()), 'text_encoder': ('text_encoder', (), ()),
               'vision_encoder': ('vision_encoder', (), ())},
    'mplug': {'vision_encoder': ('vision_encoder', (), ('use_cls',)),
              'text_encoder': ('text_encoder', ('vocab_size', 'd_model', 'pad_id'), ())},
    'decoder': {'': ('decoder', (), ())},
}
# Keys a part may set to a value other than the checkpoint's.
_TRUNCATABLE = ('num_layers', 'max_len')  # the first layers / positions are kept
# Learned position tables cut to a smaller max_len (their first rows are kept).
POSITION_TABLES = ('position_embeddings/embedding', 'position_table/embedding')
_RESIZABLE = ('image_size',)


@dataclasses.dataclass(frozen=True)
class Part:
  """One docked part: where its config is, where its params are, what it starts from."""
  key: str  # 'vision_encoder', ... ('' = the whole model)
  kind: str  # 'decoder' | 'text_encoder' | 'vision_encoder'
  source: str  # 'hf:<dir>' or a checkpoint path
  kwargs: dict  # the part's resolved module kwargs (after `resolve`)

  @property
  def where(self) -> str:
    return f'config.model.{self.key}.init_from' if self.key else 'config.model.init_from'

  @property
  def prefix(self) -> str:
    """The part's params path prefix ('' for the whole model)."""
    return f'{self.key}/' if self.key else ''

  @property
  def hf_dir(self) -> str | None:
    return self.source[len(HF_PREFIX):] if self.source.startswith(HF_PREFIX) else None


def _is_dict(value) -> bool:
  return isinstance(value, Mapping) or hasattr(value, 'to_dict')  # a dict or a ConfigDict


def _sources(name: str, kwargs: Mapping) -> dict[str, str]:
  """{part key: init_from} of a model's kwargs; an init_from where none is read is an error."""
  parts = PARTS.get(name, {})
  found = {}
  if kwargs.get('init_from'):
    if '' not in parts:
      raise HFImportError(f"config.model.init_from is read for config.model.name='decoder' only; "
                          f'for {name!r} set it on a part: '
                          f'{", ".join(f"config.model.{k}.init_from" for k in parts) or "none"}.')
    found[''] = kwargs['init_from']
  for key, value in kwargs.items():
    if _is_dict(value) and value.get('init_from'):
      if key not in parts:
        raise HFImportError(
            f'config.model.{key}.init_from={value["init_from"]!r}: the {name!r} model cannot dock '
            f'a pretrained {key}; parts that can: {sorted(k for k in parts if k) or "none"}.')
      found[key] = value['init_from']
  return found


def has_parts(model_config: Mapping) -> bool:
  """Whether any part of `config.model` has an init_from."""
  kwargs = dict(model_config)
  return bool(kwargs.get('init_from')) or any(
      _is_dict(v) and v.get('init_from') for v in kwargs.values())


def check_available(model_config: Mapping) -> None:
  """Raises HFImportError listing every 'hf:' directory that is missing or incomplete (no
  config.json or no safetensors weights), with what to download and where it goes."""
  kwargs = dict(model_config)
  name = kwargs.get('name')
  missing = []
  for key, source in _sources(name, kwargs).items():
    if not source.startswith(HF_PREFIX):
      continue
    path = source[len(HF_PREFIX):]
    where = f'config.model.{key}.init_from' if key else 'config.model.init_from'
    lacks = [f for f in ('config.json',) if not os.path.isfile(os.path.join(path, f))]
    try:
      hf.common.weight_files(path)
    except HFImportError:
      lacks.append('model.safetensors')
    if lacks:
      parts = os.path.normpath(path).split(os.sep)
      repo = '/'.join(parts[-2:]) if len(parts) >= 2 else parts[-1]
      missing.append(f'  {where}: {path} lacks {" and ".join(lacks)} ({hf.listing(path)}).\n'
                     f'    Download the Hugging Face repo {repo!r} there, e.g.\n'
                     f'    huggingface-cli download {repo} --local-dir {path}')
  if missing:
    raise HFImportError('pretrained weights are missing; nothing was computed. Fetch them on a '
                        'machine with network access (this code never downloads):\n'
                        + '\n'.join(missing))


def _merge_kwargs(where: str, imported: dict, given: Mapping, injected: Mapping) -> dict:
  """The checkpoint's architecture kwargs with the config's own keys (module docstring)."""
  out = dict(imported)
  for key, value in list(given.items()) + list(injected.items()):
    if key == 'init_from' or key not in imported or value == imported[key]:
      if key != 'init_from':
        out[key] = value
      continue
    if key == 'num_layers' and isinstance(value, int) and value < 0 < imported[key] + value:
      out[key] = imported[key] + value  # -k: all but the last k layers
      continue
    if key in _TRUNCATABLE and isinstance(value, int) and 1 <= value <= imported[key]:
      out[key] = value
      continue
    if key in _RESIZABLE:
      out[key] = value
      continue
    origin = ('config.model.' + key) if key in injected else f'{where.rsplit(".", 1)[0]}.{key}'
    raise HFImportError(f'{origin}={value!r} but the checkpoint of {where} has {key}='
                        f'{imported[key]!r}; remove the key (the checkpoint fixes it) or dock '
                        'another checkpoint.')
  return out


def resolve(name: str, kwargs: Mapping) -> tuple[dict, list[Part]]:
  """(model kwargs with every part's init_from removed and 'hf:' architectures filled in,
  the parts). Raises HFImportError for a missing directory or a disagreeing key."""
  kwargs = copy.deepcopy(dict(kwargs))
  sources = _sources(name, kwargs)
  if not sources:
    return kwargs, []
  check_available(dict(kwargs, name=name))
  parts = []
  for key, source in sources.items():
    kind, injected_keys, forced = PARTS[name][key]
    given = dict(kwargs) if key == '' else dict(kwargs[key])
    given.pop('init_from', None)
    where = f'config.model.{key}.init_from' if key else 'config.model.init_from'
    if source.startswith(HF_PREFIX):
      path = source[len(HF_PREFIX):]
      imported = hf.module_kwargs(path, kind)
      injected = {k: kwargs[k] for k in injected_keys if k in kwargs}
      # Keys the parent injects take the checkpoint's value unless the config sets them.
      merged = _merge_kwargs(where, imported, given, injected)
      part_kwargs = {k: v for k, v in merged.items() if k not in injected_keys + forced}
      for k in injected_keys:
        if k in imported and k not in kwargs:
          kwargs[k] = imported[k]
    else:
      part_kwargs = given
    if key == '':
      kwargs = part_kwargs
    else:
      kwargs[key] = part_kwargs
    parts.append(Part(key, kind, source, part_kwargs))
  kwargs.pop('init_from', None)
  return kwargs, parts


def hf_params(part: Part) -> dict:
  """The pure params of an 'hf:' part, in the layout its kwargs build (scanned decoder
  blocks stacked; a vision position table resized to the configured image size)."""
  path = part.hf_dir
  params = hf.import_params(path, part.kind, num_layers=part.kwargs['num_layers'])
  if part.kind == 'decoder' and part.kwargs.get('scan_layers'):
    blocks = params['blocks']
    params = dict(params, blocks=_stack([blocks[i] for i in range(len(blocks))]))
  if part.kind == 'vision_encoder':
    grid = part.kwargs['image_size'] // part.kwargs['patch_size']
    table = params['positions']
    if table.shape[:2] != (grid, grid):
      from metalm_jax.models.vision_encoder import interpolate_positions
      params = dict(params, positions=np.asarray(interpolate_positions(table, (grid, grid))))
  return params


def _stack(trees: list) -> Any:
  if isinstance(trees[0], Mapping):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


__all__ = ['HF_PREFIX', 'PARTS', 'POSITION_TABLES', 'Part', 'check_available', 'has_parts', 'hf_params', 'resolve']
