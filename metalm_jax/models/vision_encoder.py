"""Vision Transformer (ViT, Dosovitskiy et al. 2021): images -> a sequence of image tokens.

Axis letters: B batch, Y/X patch-grid rows/columns, P patches (Y * X), C channels,
K patch_size * patch_size * C, D d_model.

  patches [B, P, K] (non-overlapping p x p tiles, row-major) -> linear patch embedding
  (equivalent to a stride-p convolution; bias optional) -> [CLS] prepended (optional) ->
  + learned 2-D positions -> LayerNorm (optional, `pre_norm`) -> pre-LN bidirectional layers
  -> final LayerNorm -> [B, (1 +) P, D].

The CLIP layout (`metalm_jax.models.hf.clip` imports OpenAI / Hugging Face CLIP towers) is
`pre_norm=True, patch_bias=False, activation='quick_gelu', layer_norm_eps=1e-5`, with
CLIP's `pre_layrnorm` as `pre_norm` and its `post_layernorm` as `final_norm`. Hugging Face
applies `post_layernorm` to the pooled [CLS] token only (`pooler_output`) and returns the
un-normed sequence as `last_hidden_state`; we apply it to every token, because the models
that read the image tokens (mPLUG, BLIP-style cross-attention) consume the normed sequence.
So our output is `post_layernorm(last_hidden_state)`, and its row 0 is HF's `pooler_output`.

The position table is a [grid, grid, D] image of embeddings learned at `image_size`; at
another resolution it is resized bilinearly to the new grid (`interpolate_positions`), so a
model trained on small images runs on larger ones. The [CLS] position is separate and never
resized.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from metalm_jax.layers.norms import LayerNorm
from metalm_jax.models.text_encoder import EncoderLayer

DropoutRngs = nnx.Rngs | jax.Array | None


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """images [B, H, W, C] -> patches [B, (H/p) * (W/p), p * p * C], row-major over the grid."""
  batch, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f'image size {height}x{width} is not a multiple of '
                     f'patch_size={patch_size}; resize or pad the images.')
  y, x = height // patch_size, width // patch_size
  p = images.reshape(batch, y, patch_size, x, patch_size, channels)
  return p.transpose(0, 1, 3, 2, 4, 5).reshape(batch, y * x, patch_size * patch_size * channels)


def interpolate_positions(table: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Learned 2-D position table [Y0, X0, D] -> [Y, X, D] (bilinear; identity at the same grid)."""
  if tuple(table.shape[:2]) == tuple(grid):
    return table
  return jax.image.resize(table.astype(jnp.float32), (*grid, table.shape[-1]),
                          method='bilinear').astype(table.dtype)


class VisionEncoder(nnx.Module):
  """ViT over images [B, H, W, C] -> image tokens [B, num_tokens, D].

  Parameters: patch_embedding kernel ('patch', 'embed') + bias (if patch_bias); cls ('embed',)
  if use_cls; positions [Y0, X0, D] ('patch_rows', 'patch_cols', 'embed'); cls_position
  ('embed',); pre_norm (a LayerNorm) if pre_norm; per layer attention, FFN, two LayerNorms
  (pre-LN); a final LayerNorm.

  Options whose defaults are the METALM ViT (the parameter tree only changes when they do):
    pre_norm: a LayerNorm on the embeddings (after positions, before the first layer), as
      CLIP's `pre_layrnorm`.
    patch_bias: a bias on the patch embedding (CLIP's patch convolution has none).
    activation: the FFN activation, one of `GeluFfn.ACTIVATIONS` ('gelu' exact erf,
      'quick_gelu' x * sigmoid(1.702 x) as CLIP, 'gelu_tanh').
  """

  def __init__(self, *, image_size: int, patch_size: int, d_model: int, num_layers: int,
               num_heads: int, d_ff: int, channels: int = 3, use_cls: bool = True,
               layer_norm_eps: float = 1e-6, dropout_rate: float = 0.0,
               pre_norm: bool = False, patch_bias: bool = True, activation: str = 'gelu',
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f'image_size={image_size} is not a multiple of patch_size={patch_size}.')
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
    self.d_model, self.use_cls, self.dtype = d_model, use_cls, dtype
    grid = image_size // patch_size
    patch_dim = patch_size * patch_size * channels
    self.patch_embedding = nnx.Einsum(
        'BPK,KD->BPD', (patch_dim, d_model), (d_model,) if patch_bias else None,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ('patch', 'embed')),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('embed',)),
        rngs=rngs, **kw)
    init = nnx.initializers.normal(0.02)
    self.cls = (nnx.Param(init(rngs.params(), (d_model,), param_dtype), out_sharding=('embed',))
                if use_cls else None)
    self.cls_position = (nnx.Param(init(rngs.params(), (d_model,), param_dtype),
                                   out_sharding=('embed',)) if use_cls else None)
    self.positions = nnx.Param(init(rngs.params(), (grid, grid, d_model), param_dtype),
                               out_sharding=('patch_rows', 'patch_cols', 'embed'))
    self.pre_norm = LayerNorm(d_model, epsilon=layer_norm_eps, **kw) if pre_norm else None
    self.layers = nnx.List([
        EncoderLayer(d_model, num_heads, d_ff, norm_position='pre', activation=activation,
                     layer_norm_eps=layer_norm_eps, dropout_rate=dropout_rate, rngs=rngs, **kw)
        for _ in range(num_layers)])
    self.final_norm = LayerNorm(d_model, epsilon=layer_norm_eps, **kw)
    self.dropout = nnx.Dropout(dropout_rate)

  def num_tokens(self, image_size: int | tuple[int, int] | None = None) -> int:
    """Image tokens per image at `image_size` (default: the training size)."""
    h, w = ((self.image_size,) * 2 if image_size is None else
            (image_size,) * 2 if isinstance(image_size, int) else image_size)
    return (h // self.patch_size) * (w // self.patch_size) + int(self.use_cls)

  def __call__(self, images: jax.Array, *, deterministic: bool = True,
               rngs: DropoutRngs = None) -> jax.Array:
    """images float [B, H, W, C] (H, W multiples of patch_size) -> [B, num_tokens, D]."""
    return self.encode(images, deterministic=deterministic, rngs=rngs)[0]

  def encode(self, images: jax.Array, *, deterministic: bool = True,
             rngs: DropoutRngs = None) -> tuple[jax.Array, dict]:
    """images float [B, H, W, C] -> (tokens [B, num_tokens, D], {'hidden_states': [...]}).

    hidden_states are [embedding output (after pre_norm, if any), layer 1, ..., layer n],
    each [B, num_tokens, D], before the final norm (Hugging Face's `hidden_states` layout);
    tokens = final_norm(hidden_states[-1]).
    """
    if images.shape[-1] != self.channels:
      raise ValueError(f'images have {images.shape[-1]} channels (shape {images.shape}); the '
                       f'VisionEncoder was built with channels={self.channels}.')
    if isinstance(rngs, jax.Array):
      rngs = nnx.Rngs(dropout=rngs)
    batch, height, width = images.shape[:3]
    x = self.patch_embedding(patchify(images.astype(self.dtype), self.patch_size))
    grid = (height // self.patch_size, width // self.patch_size)
    pos = interpolate_positions(self.positions[...], grid).reshape(-1, self.d_model)
    x = x + pos.astype(self.dtype)
    if self.use_cls:
      cls = (self.cls[...] + self.cls_position[...]).astype(self.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.d_model)), x], axis=1)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    mask = jnp.ones((1, 1, 1, x.shape[1]), bool)
    states = [x]
    for layer in self.layers:
      x = layer(x, mask=mask, deterministic=deterministic, rngs=rngs)
      states.append(x)
    return self.final_norm(x), {'hidden_states': states}
