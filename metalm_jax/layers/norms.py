"""LayerNorm and RMSNorm over the last axis, with float32 statistics.

Scales (and the LayerNorm bias) are annotated ('embed',). Outputs are cast to `dtype`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ('rmsnorm', 'layernorm')


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale   (Zhang & Sennrich 2019). [..., D] -> [..., D]."""

  def __init__(self, dim: int, *, epsilon: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; accepted for a uniform layer signature
    self.epsilon, self.dtype = epsilon, dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias   (Ba et al. 2016). [..., D] -> [..., D]."""

  def __init__(self, dim: int, *, epsilon: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; accepted for a uniform layer signature
    self.epsilon, self.dtype = epsilon, dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('embed',))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return out.astype(self.dtype)


def make_norm(kind: str, dim: int, *, epsilon: float = 1e-6, dtype=jnp.float32,
              param_dtype=jnp.float32):
  """'rmsnorm' -> RMSNorm, 'layernorm' -> LayerNorm, with `epsilon` added to the variance
  (1e-6 by default; Hugging Face checkpoints: rms_norm_eps / layer_norm_epsilon)."""
  if kind == 'rmsnorm':
    return RMSNorm(dim, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)
  if kind == 'layernorm':
    return LayerNorm(dim, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)
  raise ValueError(f'norm={kind!r} is not one of {NORMS}.')
