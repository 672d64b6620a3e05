"""What every Hugging Face importer shares: the directory, its config, its tensors.

A Hugging Face model directory holds `config.json` and the weights as `model.safetensors`
(or shards listed in `model.safetensors.index.json`). The weights are read by a small
safetensors reader of our own (NumPy + ml_dtypes, memory-mapped; no PyTorch), which also
reads bfloat16 checkpoints (NumPy alone has no bfloat16).

Every importer turns a directory into a *pure params dict* shaped like one of our modules
(`nnx.state(module, nnx.Param).to_pure_dict()` layout, float32 NumPy leaves); the trainer
(`config.model.<part>.init_from = 'hf:<dir>'`) and the `load_*` helpers cast and place it.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

from metalm_jax import checks

# safetensors dtype names -> NumPy dtypes.
_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


class HFImportError(ValueError):
  """A Hugging Face directory cannot be imported; the message says what was found and why."""


def listing(path: str) -> str:
  """A short description of what a directory holds (for error messages)."""
  if not os.path.isdir(path):
    return f'{path} does not exist' if not os.path.exists(path) else f'{path} is not a directory'
  return f'{path} holds: {checks.dir_listing(path, limit=12)}'


def read_config(path: str) -> dict:
  """The directory's `config.json` as a dict (HFImportError naming the contents if absent)."""
  config_file = os.path.join(path, 'config.json')
  if not os.path.isfile(config_file):
    raise HFImportError(f'{config_file} not found ({listing(path)}): pass a Hugging Face model '
                        'directory (config.json + model.safetensors + tokenizer files), e.g. '
                        'the folder `save_pretrained` writes.')
  with open(config_file) as f:
    return json.load(f)


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
  """{name: array} of one .safetensors file, memory-mapped (read-only views)."""
  with open(file, 'rb') as f:
    (header_len,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(header_len))
  data = np.memmap(file, dtype=np.uint8, mode='r', offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _DTYPES:
      raise HFImportError(f'{file}: tensor {name!r} has dtype {info["dtype"]}, which is not '
                          f'read here (readable: {sorted(_DTYPES)}).')
    start, end = info['data_offsets']
    out[name] = data[start:end].view(_DTYPES[info['dtype']]).reshape(info['shape'])
  return out


def weight_files(path: str) -> list[str]:
  """The safetensors files of a directory (one file, or the shards of the index)."""
  single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(path, s) for s in shards]
  raise HFImportError(f'no {WEIGHTS_FILE} or {INDEX_FILE} in {path} ({listing(path)}); '
                      'pytorch_model.bin is not read: save the model with '
                      '`save_pretrained(dir, safe_serialization=True)` or convert it.')


class Tensors(Mapping):
  """The checkpoint's tensors by name, float32 on access, with leading `prefixes` stripped
  (e.g. 'bert.', 'model.'); a missing name is an HFImportError listing what is there."""

  def __init__(self, tensors: Mapping[str, np.ndarray], *, where: str,
               prefixes: Iterable[str] = ()):
    prefixes = tuple(prefixes)
    def strip(name):
      for p in prefixes:
        if name.startswith(p):
          return name[len(p):]
      return name
    self._tensors = {strip(k): v for k, v in tensors.items()}
    self.where = where
    self.used: set[str] = set()

  @classmethod
  def from_dir(cls, path: str, *, prefixes: Iterable[str] = ()) -> 'Tensors':
    tensors = {}
    for file in weight_files(path):
      tensors.update(_read_safetensors(file))
    return cls(tensors, where=path, prefixes=prefixes)

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      near = sorted(k for k in self._tensors if k.split('.')[0] == name.split('.')[0])[:6]
      raise HFImportError(f'{name!r} is missing from the checkpoint in {self.where} '
                          f'({len(self._tensors)} tensors; e.g. {near or sorted(self._tensors)[:6]}).')
    self.used.add(name)
    return np.asarray(self._tensors[name], np.float32)

  def __contains__(self, name) -> bool:
    return name in self._tensors

  def __iter__(self):
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)


def linear(tensors: Mapping, prefix: str, *, bias: bool = True) -> dict:
  """torch Linear `prefix.weight` [out, in] (+ bias [out]) -> {'kernel': [in, out], 'bias'}."""
  out = {'kernel': tensors[f'{prefix}.weight'].T}
  if bias:
    out['bias'] = tensors[f'{prefix}.bias']
  return out


def norm(tensors: Mapping, prefix: str, *, bias: bool = True) -> dict:
  """LayerNorm / RMSNorm `prefix.weight` (+ `.bias`) -> {'scale', 'bias'}."""
  out = {'scale': tensors[f'{prefix}.weight']}
  if bias:
    out['bias'] = tensors[f'{prefix}.bias']
  return out


def heads_in(kernel: np.ndarray, num_heads: int) -> np.ndarray:
  """[D, N*H] -> [D, N, H] (a q / k / v projection)."""
  return kernel.reshape(kernel.shape[0], num_heads, -1)


def heads_out(kernel: np.ndarray, num_heads: int) -> np.ndarray:
  """[N*H, D] -> [N, H, D] (the output projection)."""
  return kernel.reshape(num_heads, -1, kernel.shape[-1])


def check_and_cast(expected: Mapping, loaded: Mapping, where: str, *, hint: str) -> dict:
  """`loaded` restricted to `expected`'s tree (a pure params dict of the model), every leaf
  checked for shape and cast to the expected dtype (jnp arrays). Errors name the path."""
  import jax.numpy as jnp

  out = {}
  for key, value in expected.items():
    if key not in loaded:
      raise HFImportError(f'{where}/{key} is not in the imported weights; {hint}')
    if isinstance(value, Mapping):
      out[key] = check_and_cast(value, loaded[key], f'{where}/{key}', hint=hint)
      continue
    if tuple(value.shape) != tuple(np.shape(loaded[key])):
      raise HFImportError(f'{where}/{key}: the model has shape {tuple(value.shape)} but the '
                          f'imported weights {tuple(np.shape(loaded[key]))}; {hint}')
    out[key] = jnp.asarray(loaded[key], value.dtype)
  extra = sorted(set(loaded) - set(expected))
  if extra:
    raise HFImportError(f'{where}: the imported weights have {extra} that the model lacks; {hint}')
  return out
