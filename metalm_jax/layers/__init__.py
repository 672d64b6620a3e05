"""metalm_jax.layers: attention, masks, MLP, norms, embeddings and positions (Flax NNX)."""
from metalm_jax.layers.attention import (
    MultiHeadAttention,
    dot_product_attention,
    reference_attention,
)
from metalm_jax.layers.embeddings import Embed, LearnedPositions, rope, sinusoidal_positions
from metalm_jax.layers.masks import causal_mask, combine_masks, padding_mask, segment_mask
from metalm_jax.layers.mlp import Mlp
from metalm_jax.layers.norms import LayerNorm, RMSNorm, make_norm

__all__ = [
    'Embed', 'LayerNorm', 'LearnedPositions', 'Mlp', 'MultiHeadAttention', 'RMSNorm',
    'causal_mask', 'combine_masks', 'dot_product_attention', 'make_norm', 'padding_mask',
    'reference_attention', 'rope', 'segment_mask', 'sinusoidal_positions',
]
