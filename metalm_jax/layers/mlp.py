"""Position-wise feed-forward block: GELU MLP or SwiGLU.

Axis letters: B batch, L length, D d_model, F d_ff.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = ('gelu', 'swiglu')


def _dense(einsum_str, shape, names, use_bias, dtype, param_dtype, rngs):
  return nnx.Einsum(
      einsum_str, shape, (shape[1],) if use_bias else None,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
      dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Mlp(nnx.Module):
  """[B, L, D] -> [B, L, D] feed-forward block.

  `gelu` is the tanh approximation (jax.nn.gelu default), i.e. Hugging Face's
  'gelu_new' / 'gelu_pytorch_tanh' (GPT-2).

  'gelu':   wo(gelu(wi(x)))
  'swiglu': wo(silu(wi_gate(x)) * wi(x))   (Shazeer 2020, "GLU Variants Improve Transformer")

  Kernels: wi / wi_gate [D, F] ('embed', 'mlp'), wo [F, D] ('mlp', 'embed').
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: str = 'gelu',
               use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f'activation={activation!r} is not one of {ACTIVATIONS}.')
    self.activation = activation
    args = (use_bias, dtype, param_dtype, rngs)
    self.wi = _dense('BLD,DF->BLF', (d_model, d_ff), ('embed', 'mlp'), *args)
    self.wi_gate = (_dense('BLD,DF->BLF', (d_model, d_ff), ('embed', 'mlp'), *args)
                    if activation == 'swiglu' else None)
    self.wo = _dense('BLF,FD->BLD', (d_ff, d_model), ('mlp', 'embed'), *args)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, L, D] -> [B, L, D]."""
    h = self.wi(x)
    if self.activation == 'swiglu':
      h = jax.nn.silu(self.wi_gate(x)) * h
    else:
      h = jax.nn.gelu(h)
    return self.wo(h)
