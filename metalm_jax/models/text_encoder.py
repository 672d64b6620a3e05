"""Bidirectional text encoder: the BERT layout and the METALM layout in one module.

Axis letters: B batch, S length, D d_model, N heads, H head_dim, F d_ff, V vocab, R buckets.

  norm_position='post' (BERT): x = LN(word + position + token_type); per layer
      x = LN(x + attn(x)), x = LN(x + ffn(x)).
  norm_position='pre' (METALM / DeepNorm-free pre-LN): x = word + position; per layer
      x = x + attn(LN(x)), x = x + ffn(LN(x)); a final LN.

Common to both: learned absolute positions, biases on every projection, GELU with the exact
erf (as BERT), LayerNorm with `layer_norm_eps`. Optional: token-type embeddings
(`type_vocab_size` > 0) and a T5-style bucketed relative position bias shared by all layers
(`relative_buckets` > 0), added to the attention logits.

`metalm_jax.models.hf_import` maps Hugging Face BERT checkpoints onto the 'post' layout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalm_jax.layers.attention import MultiHeadAttention
from metalm_jax.layers.embeddings import Embed, LearnedPositions
from metalm_jax.layers.norms import LayerNorm

NORM_POSITIONS = ('post', 'pre')
DropoutRngs = nnx.Rngs | jax.Array | None


def _dense(einsum_str, shape, names, *, dtype, param_dtype, rngs):
  return nnx.Einsum(
      einsum_str, shape, (shape[-1],),
      kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[-1],)),
      dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class GeluFfn(nnx.Module):
  """wo(act(wi(x) + bi)) + bo: [..., S, D] -> [..., S, D]. wi ('embed','mlp'), wo ('mlp','embed').

  `activation` (ACTIVATIONS): 'gelu' GELU with the exact erf (BERT, the default);
  'quick_gelu' x * sigmoid(1.702 x) (OpenAI CLIP); 'gelu_tanh' the tanh approximation
  (GPT-2's 'gelu_new'). The choice has no parameters: the tree is the same for all.
  """

  ACTIVATIONS = {
      'gelu': lambda x: jax.nn.gelu(x, approximate=False),
      'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
      'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
  }

  def __init__(self, d_model: int, d_ff: int, *, activation: str = 'gelu', dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if activation not in self.ACTIVATIONS:
      raise ValueError(f'activation={activation!r} is not one of {sorted(self.ACTIVATIONS)}.')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.activation = activation
    self.wi = _dense('BSD,DF->BSF', (d_model, d_ff), ('embed', 'mlp'), **kw)
    self.wo = _dense('BSF,FD->BSD', (d_ff, d_model), ('mlp', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.wo(self.ACTIVATIONS[self.activation](self.wi(x)))


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of (key - query) distances: int32 [q_len, k_len] in [0, R).

  Half the buckets per direction; within a direction, half of those are exact distances,
  the rest logarithmically spaced up to max_distance (farther distances share the last).
  """
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  half = num_buckets // 2
  bucket = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  exact = max(half // 2, 1)
  log_part = exact + (np.log(np.maximum(dist, 1) / exact) / np.log(max_distance / exact)
                      * (half - exact)).astype(np.int64)
  log_part = np.minimum(log_part, half - 1)
  return (bucket + np.where(dist < exact, dist, log_part)).astype(np.int32)


class EncoderLayer(nnx.Module):
  """One bidirectional layer (pre- or post-LN). [B, S, D] -> [B, S, D].

  `activation` is the FFN's (`GeluFfn.ACTIVATIONS`; default 'gelu', the exact erf).
  """

  def __init__(self, d_model: int, num_heads: int, d_ff: int, *, norm_position: str,
               layer_norm_eps: float, dropout_rate: float, activation: str = 'gelu',
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm_position = norm_position
    self.attention = MultiHeadAttention(d_model, num_heads, use_bias=True, rngs=rngs, **kw)
    self.attention_norm = LayerNorm(d_model, epsilon=layer_norm_eps, **kw)
    self.ffn = GeluFfn(d_model, d_ff, activation=activation, rngs=rngs, **kw)
    self.ffn_norm = LayerNorm(d_model, epsilon=layer_norm_eps, **kw)
    self.dropout = nnx.Dropout(dropout_rate)

  def _attend(self, x, mask, bias):
    q = self.attention.queries(x)
    k, v = self.attention.keys_values(x)
    if bias is None:
      return self.attention.attend(q, k, v, mask)
    return self.attention.out(_biased_attention(q, k, v, mask, bias))

  def __call__(self, x: jax.Array, *, mask: jax.Array, bias: jax.Array | None = None,
               deterministic: bool = True, rngs: DropoutRngs = None) -> jax.Array:
    """x [B, S, D]; mask bool [B, 1, S|1, S]; bias float [1|B, N, S, S] or None."""
    drop = lambda h: self.dropout(h, deterministic=deterministic, rngs=rngs)
    if self.norm_position == 'post':
      x = self.attention_norm(x + drop(self._attend(x, mask, bias)))
      return self.ffn_norm(x + drop(self.ffn(x)))
    x = x + drop(self._attend(self.attention_norm(x), mask, bias))
    return x + drop(self.ffn(self.ffn_norm(x)))


def _biased_attention(q, k, v, mask, bias):
  """Softmax(q k^T / sqrt(H) + bias) v in float32: q, k, v [B, S, N, H] -> [B, S, N, H]."""
  head_dim = q.shape[-1]
  logits = jnp.einsum('BTNH,BSNH->BNTS', q.astype(jnp.float32), k.astype(jnp.float32))
  logits = logits / jnp.sqrt(head_dim) + bias.astype(jnp.float32)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
  return jnp.einsum('BNTS,BSNH->BTNH', probs, v.astype(jnp.float32)).astype(q.dtype)


class TextEncoder(nnx.Module):
  """Bidirectional Transformer encoder over token ids (BERT / METALM layouts).

  Parameters: word table ('vocab', 'embed'); positions ('length', 'embed'); token types
  ('vocab', 'embed') if type_vocab_size > 0; embedding LayerNorm (post) or final LayerNorm
  (pre); per layer attention (q/k/v/o with biases), FFN, two LayerNorms; relative bias
  table ('relpos_buckets', 'heads') if relative_buckets > 0.

  `position_offset` (default 0) shifts the positions read from the table: token i reads row
  position_offset + i, so inputs hold at most max_len - position_offset tokens; it adds no
  parameter. RoBERTa / XLM-R number positions from padding_idx + 1 (fairseq), so
  `metalm_jax.models.hf.bert` builds them with position_offset = pad_token_id + 1 over the
  saved table (max_len = max_position_embeddings). Rows are taken as right-padded: Hugging
  Face gives padding tokens position padding_idx, here they continue the count, which
  changes only the hidden states at padding positions (never attended as keys).
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               d_ff: int, max_len: int = 512, type_vocab_size: int = 2,
               norm_position: str = 'post', layer_norm_eps: float = 1e-12,
               relative_buckets: int = 0, relative_max_distance: int = 128,
               dropout_rate: float = 0.0, pad_id: int = 0, position_offset: int = 0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if norm_position not in NORM_POSITIONS:
      raise ValueError(f'norm_position={norm_position!r} is not one of {NORM_POSITIONS}.')
    if relative_buckets < 0 or relative_buckets == 1:
      raise ValueError(f'relative_buckets={relative_buckets}: use 0 (off) or >= 2.')
    if position_offset < 0 or (position_offset and position_offset >= max_len):
      raise ValueError(f'position_offset={position_offset} must be in [0, max_len={max_len}): '
                       'token i reads row position_offset + i of the max_len-row table.')
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.d_model, self.num_layers, self.max_len = d_model, num_layers, max_len
    self.norm_position, self.pad_id, self.dtype = norm_position, pad_id, dtype
    self.position_offset = position_offset
    self.relative_buckets, self.relative_max_distance = relative_buckets, relative_max_distance
    self.word_embeddings = Embed(vocab_size, d_model, rngs=rngs, **kw)
    self.position_embeddings = LearnedPositions(max_len, d_model, rngs=rngs, **kw)
    self.token_type_embeddings = (Embed(type_vocab_size, d_model, rngs=rngs, **kw)
                                  if type_vocab_size > 0 else None)
    self.embedding_norm = (LayerNorm(d_model, epsilon=layer_norm_eps, **kw)
                           if norm_position == 'post' else None)
    self.relative_bias = (nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (relative_buckets, num_heads), param_dtype),
        out_sharding=('relpos_buckets', 'heads')) if relative_buckets else None)
    self.layers = nnx.List([
        EncoderLayer(d_model, num_heads, d_ff, norm_position=norm_position,
                     layer_norm_eps=layer_norm_eps, dropout_rate=dropout_rate, rngs=rngs, **kw)
        for _ in range(num_layers)])
    self.final_norm = (LayerNorm(d_model, epsilon=layer_norm_eps, **kw)
                       if norm_position == 'pre' else None)
    self.embed_dropout = nnx.Dropout(dropout_rate)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """int tokens [B, S] -> word embeddings [B, S, D] (no positions): rows may be replaced
    (e.g. by image tokens) before `encode`."""
    return self.word_embeddings(tokens)

  def encode(self, embeddings: jax.Array, *, valid: jax.Array | None = None,
             token_types: jax.Array | None = None, deterministic: bool = True,
             rngs: DropoutRngs = None) -> tuple[jax.Array, dict]:
    """Adds positions (+ token types), runs every layer bidirectionally.

    Args:
      embeddings: [B, S, D] word embeddings (from `embed_tokens`, rows possibly replaced).
      valid: bool [B, S], False = padding key (never attended); default all True.
        Padding queries still attend to the valid keys (as in BERT).
      token_types: int [B, S]; default 0.
      deterministic / rngs: dropout, as in `Decoder.__call__`.

    Returns:
      (hidden [B, S, D], {'hidden_states': [embedding output, layer 1, ..., layer n]}).
    """
    batch, length = embeddings.shape[:2]
    if length + self.position_offset > self.max_len:
      offset = f' - position_offset={self.position_offset}' if self.position_offset else ''
      raise ValueError(f'encoder input length {length} exceeds max_len={self.max_len}{offset}; '
                       'build the TextEncoder with a larger max_len or shorten the spans.')
    if isinstance(rngs, jax.Array):
      rngs = nnx.Rngs(dropout=rngs)
    positions = jnp.broadcast_to(jnp.arange(length) + self.position_offset, (batch, length))
    x = embeddings.astype(self.dtype) + self.position_embeddings(positions)
    if self.token_type_embeddings is not None:
      types = jnp.zeros((batch, length), jnp.int32) if token_types is None else token_types
      x = x + self.token_type_embeddings(types)
    if self.embedding_norm is not None:
      x = self.embedding_norm(x)
    x = self.embed_dropout(x, deterministic=deterministic, rngs=rngs)
    valid = jnp.ones((batch, length), bool) if valid is None else valid.astype(bool)
    mask = valid[:, None, None, :]  # keys only
    bias = None
    if self.relative_bias is not None:
      buckets = relative_position_buckets(length, length, self.relative_buckets,
                                          self.relative_max_distance)
      bias = jnp.einsum('TSR,RN->NTS', jax.nn.one_hot(buckets, self.relative_buckets),
                        self.relative_bias[...].astype(jnp.float32))[None]
    states = [x]
    for layer in self.layers:
      x = layer(x, mask=mask, bias=bias, deterministic=deterministic, rngs=rngs)
      states.append(x)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return x, {'hidden_states': states}

  def __call__(self, tokens: jax.Array, *, valid: jax.Array | None = None,
               token_types: jax.Array | None = None, deterministic: bool = True,
               rngs: DropoutRngs = None) -> tuple[jax.Array, dict]:
    """int tokens [B, S] -> (hidden [B, S, D], {'hidden_states'}); valid defaults to
    tokens != pad_id."""
    valid = tokens != self.pad_id if valid is None else valid
    return self.encode(self.embed_tokens(tokens), valid=valid, token_types=token_types,
                       deterministic=deterministic, rngs=rngs)


__all__ = ['EncoderLayer', 'GeluFfn', 'TextEncoder',
           'relative_position_buckets']
