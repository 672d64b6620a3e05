"""metalm_jax.models: model registry by name.

    model = build_model('decoder', rngs=nnx.Rngs(0), vocab_size=37, d_model=32, ...)
"""
from __future__ import annotations

import inspect

from flax import nnx

from metalm_jax.models.decoder import Decoder, DecoderBlock, flops_per_token, param_count
from metalm_jax.models.hybrid import HybridDecoder

MODELS = {'decoder': Decoder, 'hybrid': HybridDecoder}
from metalm_jax.models.metalm import MetaLM  # noqa: E402
MODELS['metalm'] = MetaLM
from metalm_jax.models.mplug import MPlug, SkipConnectedFusion, fusion_pattern  # noqa: E402
MODELS['mplug'] = MPlug


def build_model(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
  """Builds MODELS[name](**kwargs, rngs=rngs); unknown names and kwargs are errors."""
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; known models: {sorted(MODELS)}.')
  cls = MODELS[name]
  accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ('self', 'rngs')]
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise TypeError(f'Unknown argument(s) {unknown} for model {name!r}; '
                    f'accepted: {accepted}.')
  return cls(**kwargs, rngs=rngs)


__all__ = ['MODELS', 'Decoder', 'DecoderBlock', 'MPlug', 'MetaLM', 'SkipConnectedFusion',
           'build_model', 'flops_per_token', 'fusion_pattern', 'param_count']
