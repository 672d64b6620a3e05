"""Connectors: encoder outputs [N, S, E] -> decoder-width vectors [N, S' , D].

Axis letters: N encoded spans (batch * max_spans), S encoder positions, E encoder width,
D decoder width, F hidden width, Q latent queries.

  'linear':    x W + b                                            S' = S
  'mlp':       num_layers Linear layers (width d_hidden, default D)  S' = S
               with GELU between (2 = Linear-GELU-Linear; METALM's VL model used 3)
  'resampler': Q learned latent queries cross-attend to the       S' = Q
               (projected) encoder outputs, num_layers pre-LN blocks of cross-attention +
               MLP (width d_hidden, default 4 D), then a LayerNorm (the Perceiver-resampler / Kosmos latent-query
               connector; 64 queries by default in that lineage)

MetaLM scatters output row j to span position j, so with a resampler Q must be at least
the span capacity (`max_span_len`); queries past a span's length are dropped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from metalm_jax.layers.attention import MultiHeadAttention
from metalm_jax.layers.norms import LayerNorm
from metalm_jax.models.text_encoder import GeluFfn

KINDS = ('linear', 'mlp', 'resampler')


def _linear(d_in, d_out, names, *, dtype, param_dtype, rngs):
  return nnx.Einsum(
      'NSE,ED->NSD', (d_in, d_out), (d_out,),
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
      dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ResamplerBlock(nnx.Module):
  """latents + xattn(LN(latents), LN(inputs)); then + MLP(LN(.)). [N, Q, D] -> [N, Q, D]."""

  def __init__(self, d_model: int, num_heads: int, d_ff: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.latent_norm = LayerNorm(d_model, **kw)
    self.input_norm = LayerNorm(d_model, **kw)
    self.attention = MultiHeadAttention(d_model, num_heads, use_bias=True, rngs=rngs, **kw)
    self.mlp_norm = LayerNorm(d_model, **kw)
    self.mlp = GeluFfn(d_model, d_ff, rngs=rngs, **kw)

  def __call__(self, latents, inputs, mask):
    latents = latents + self.attention(self.latent_norm(latents),
                                       context=self.input_norm(inputs), mask=mask)
    return latents + self.mlp(self.mlp_norm(latents))


class Connector(nnx.Module):
  """Maps encoder outputs to the decoder's embedding width (see the module docstring)."""

  def __init__(self, *, kind: str, d_in: int, d_out: int, num_layers: int = 2,
               d_hidden: int | None = None, num_latents: int = 64, num_heads: int = 4,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if kind not in KINDS:
      raise ValueError(f'connector kind={kind!r} is not one of {KINDS}.')
    if num_layers < 1:
      raise ValueError(f'connector num_layers={num_layers} must be >= 1.')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.kind, self.num_latents = kind, num_latents
    resampler_ff = 4 * d_out if d_hidden is None else d_hidden
    d_hidden = d_out if d_hidden is None else d_hidden
    latents = blocks = final_norm = None
    if kind == 'linear':
      layers = [_linear(d_in, d_out, ('encoder_embed', 'embed'), **kw)]
    elif kind == 'mlp':
      widths = [d_in] + [d_hidden] * (num_layers - 1) + [d_out]
      names = ([('encoder_embed', 'embed')] if num_layers == 1 else
               [('encoder_embed', 'mlp')] + [('mlp', 'mlp')] * (num_layers - 2) + [('mlp', 'embed')])
      layers = [_linear(a, b, n, **kw) for a, b, n in zip(widths[:-1], widths[1:], names)]
    else:
      layers = [_linear(d_in, d_out, ('encoder_embed', 'embed'), **kw)]
      latents = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (num_latents, d_out), param_dtype),
          out_sharding=('latents', 'embed'))
      blocks = nnx.List([ResamplerBlock(d_out, num_heads, resampler_ff, dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs)
                         for _ in range(num_layers)])
      final_norm = LayerNorm(d_out, dtype=dtype, param_dtype=param_dtype)
    self.layers = nnx.List(layers)
    self.latents, self.blocks, self.final_norm = latents, blocks, final_norm

  def num_outputs(self, num_inputs: int) -> int:
    """S' for S = num_inputs encoder positions."""
    return self.num_latents if self.kind == 'resampler' else num_inputs

  def __call__(self, x: jax.Array, *, valid: jax.Array | None = None) -> jax.Array:
    """x [N, S, E]; valid bool [N, S] (resampler: padding keys ignored) -> [N, S', D]."""
    if self.kind == 'resampler':
      inputs = self.layers[0](x)
      latents = jnp.broadcast_to(self.latents[...].astype(inputs.dtype),
                                 (x.shape[0],) + self.latents.shape)
      mask = None if valid is None else valid[:, None, None, :]
      for block in self.blocks:
        latents = block(latents, inputs, mask)
      return self.final_norm(latents)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i + 1 < len(self.layers):
        x = jax.nn.gelu(x, approximate=False)
    return x
