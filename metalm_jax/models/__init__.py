"""metalm_jax.models: model registry by name.

    model = build_model('decoder', rngs=nnx.Rngs(0), vocab_size=37, d_model=32, ...)
"""
from __future__ import annotations

from flax import nnx

from metalm_jax import checks

from metalm_jax.models.decoder import Decoder, DecoderBlock, flops_per_token, param_count
from metalm_jax.models.hybrid import HybridDecoder

MODELS = {'decoder': Decoder, 'hybrid': HybridDecoder}
from metalm_jax.models.metalm import MetaLM  # noqa: E402
MODELS['metalm'] = MetaLM
from metalm_jax.models.mplug import MPlug, SkipConnectedFusion, fusion_pattern  # noqa: E402
MODELS['mplug'] = MPlug


def check_model(name: str, kwargs) -> None:
  """Raises checks.KwargsError for an unknown model name, or a key / value of `kwargs` (and
  of its sub-module dicts) that the model does not take: the one place model configs are
  checked (`config.validate` and `build_model` both call it)."""
  if name not in MODELS:
    raise checks.KwargsError(f'config.model.name={name!r} is not a known model; known: '
                             f'{sorted(MODELS)}')
  checks.check_kwargs(MODELS[name], kwargs, 'config.model')


def build_model(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
  """Builds MODELS[name](**kwargs, rngs=rngs) after `check_model`."""
  check_model(name, kwargs)
  return MODELS[name](**kwargs, rngs=rngs)


__all__ = ['MODELS', 'Decoder', 'DecoderBlock', 'MPlug', 'MetaLM', 'SkipConnectedFusion',
           'build_model', 'check_model', 'flops_per_token', 'fusion_pattern', 'param_count']
