"""Token embeddings and positional information.

Axis letters: B batch, L length, D d_model, V vocab, N heads, H head_dim.

- `Embed`: token table [V, D] ('vocab', 'embed'); `attend` is the tied output head.
- `rope`: rotary position embedding (Su et al. 2021), a pure function on q or k.
- `sinusoidal_positions`: fixed sin/cos table (Vaswani et al. 2017), a pure function.
- `LearnedPositions`: a trained table [max_len, D] ('length', 'embed').
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Embed(nnx.Module):
  """Token embedding table [vocab_size, d_model], init N(0, 1)."""

  def __init__(self, vocab_size: int, d_model: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.vocab_size, self.d_model, self.dtype = vocab_size, d_model, dtype
    init = nnx.initializers.normal(stddev=1.0)
    self.embedding = nnx.Param(init(rngs.params(), (vocab_size, d_model), param_dtype),
                               out_sharding=('vocab', 'embed'))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """int tokens [B, L] -> [B, L, D]."""
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output head: x [B, L, D] -> logits [B, L, V] = x @ embedding^T."""
    return jnp.einsum('BLD,VD->BLV', x, self.embedding[...].astype(self.dtype))


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding, "rotate half" convention.

  Feature pairs (i, i + H/2) are rotated by angle position * base^(-2i/H).

  Args:
    x: [B, L, N, H] queries or keys; H must be even.
    positions: int [B, L] (or [L]) absolute positions.
    base: wavelength base.

  Returns:
    [B, L, N, H], same dtype as x (computed in float32).
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f'rope needs an even head_dim, got head_dim={head_dim}.')
  half = head_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [B, L, H/2]
  sin = jnp.sin(angles)[..., None, :]  # [B, L, 1, H/2]
  cos = jnp.cos(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def sinusoidal_positions(positions: jax.Array, d: int, base: float = 10000.0) -> jax.Array:
  """Fixed sinusoidal embeddings: int positions [...] -> float32 [..., d].

  The first d/2 features are sin(position * base^(-2i/d)), the last d/2 the cosines.
  """
  if d % 2:
    raise ValueError(f'sinusoidal_positions needs an even d, got d={d}.')
  half = d // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class LearnedPositions(nnx.Module):
  """Learned absolute position table [max_len, d_model] ('length', 'embed'), init N(0, 0.02)."""

  def __init__(self, max_len: int, d_model: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.max_len, self.dtype = max_len, dtype
    init = nnx.initializers.normal(stddev=0.02)
    self.embedding = nnx.Param(init(rngs.params(), (max_len, d_model), param_dtype),
                               out_sharding=('length', 'embed'))

  def __call__(self, positions: jax.Array) -> jax.Array:
    """int positions [B, L] (each < max_len) -> [B, L, D]."""
    return jnp.take(self.embedding[...], positions, axis=0).astype(self.dtype)
