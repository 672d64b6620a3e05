"""Hybrid Transformer-Mamba decoder (Jamba, Lieber et al. 2024): a layer schedule of
attention ('A') and Mamba ('M') layers, each followed by an MLP.

Axis letters: B batch, L length, D d_model, V vocab, T new tokens, S cache length.

    schedule 'MMMMAMMM' (Jamba's 1:7 rule: attention every attn_period=8 layers at
    attn_offset=4); 'AAAA...' is a plain Transformer, 'MMMM...' a pure Mamba LM.

    A layer: x + attn(norm(x)),   x + mlp(norm(x))      (models.decoder.DecoderBlock)
    M layer: x + mamba(norm(x)),  x + mlp(norm(x))      (MambaLayer below)

Positions: Jamba uses none (the Mamba layers carry order), so `position='none'` is the
default; 'rope' rotates q / k of the A layers, 'learned' / 'sinusoidal' add to the input.

The interface is `models.Decoder`'s, so the trainer, the objectives and
`inference.generate` work unchanged: `__call__(tokens, *, embeddings, positions, segment_ids,
attention_mask, deterministic, rngs) -> (logits, {'hidden'})`, `embed`, `init_cache`,
`decode`. The cache mixes both kinds: {'index', 'layers': [{'k', 'v'} for A layers,
{'conv_state', 'ssm_state'} for M layers]}; only the A layers' part grows with max_len.

Long contexts: with `blockwise_threshold`, attention past that length runs blockwise
(online softmax) with a lazy causal/segment mask, so no L x L array exists.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from metalm_jax.layers.attention import causal_segment_mask_fn
from metalm_jax.layers.embeddings import Embed, LearnedPositions
from metalm_jax.layers.masks import causal_mask
from metalm_jax.layers.mlp import Mlp
from metalm_jax.layers.norms import make_norm
from metalm_jax.models.decoder import (DecoderBlock, DropoutRngs, TokenLM, apply_blocks,
                                      get_remat_policy, output_head)
from metalm_jax.ssm.mamba import MambaBlock

POSITIONS = ('none', 'rope', 'learned', 'sinusoidal')


def resolve_schedule(num_layers: int, schedule: str = 'jamba', *, attn_period: int = 8,
                     attn_offset: int = 4) -> str:
  """The layer schedule as a string of 'A' (attention) / 'M' (Mamba), one per layer.

  Args:
    num_layers: number of layers.
    schedule: 'jamba' (layer i is attention iff i % attn_period == attn_offset),
      'attention' (all A), 'mamba' (all M), or an explicit string such as 'MMMAMMMM'.
    attn_period, attn_offset: Jamba's rule (defaults 8 and 4: a 1:7 attention:Mamba ratio).
  """
  if num_layers < 1:
    raise ValueError(f'num_layers={num_layers} must be >= 1.')
  if schedule == 'jamba':
    if attn_period < 1 or not 0 <= attn_offset < attn_period:
      raise ValueError(f'Jamba schedule needs attn_period >= 1 and 0 <= attn_offset < '
                       f'attn_period; got attn_period={attn_period}, attn_offset={attn_offset}.')
    return ''.join('A' if i % attn_period == attn_offset else 'M' for i in range(num_layers))
  if schedule == 'attention':
    return 'A' * num_layers
  if schedule == 'mamba':
    return 'M' * num_layers
  bad = sorted(set(schedule) - set('AM'))
  if bad or not schedule:
    raise ValueError(f"schedule={schedule!r} must be 'jamba', 'attention', 'mamba' or a string "
                     f"of 'A' (attention) and 'M' (Mamba) layers; bad characters: {bad}.")
  if len(schedule) != num_layers:
    raise ValueError(f'schedule={schedule!r} has {len(schedule)} layers but num_layers='
                     f'{num_layers}; give one letter per layer.')
  return schedule


class MambaLayer(nnx.Module):
  """Pre-norm Mamba layer: x + drop(mamba(norm(x))), then x + drop(mlp(norm(x))).

  [B, L, D] -> [B, L, D]; segment_ids [B, L] reset the SSM state and conv between documents.
  """

  def __init__(self, d_model: int, d_ff: int, *, d_state: int = 16, d_conv: int = 4,
               expand: int = 2, scan_method: str = 'auto', chunk_size: int | None = None,
               mlp_activation: str = 'swiglu', norm: str = 'rmsnorm',
               dropout_rate: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.mixer_norm = make_norm(norm, d_model, **kw)
    self.mamba = MambaBlock(d_model, d_state=d_state, d_conv=d_conv, expand=expand,
                            scan_method=scan_method, chunk_size=chunk_size, rngs=rngs, **kw)
    self.mlp_norm = make_norm(norm, d_model, **kw)
    self.mlp = Mlp(d_model, d_ff, activation=mlp_activation, rngs=rngs, **kw)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               deterministic: bool = True, rngs: DropoutRngs = None) -> jax.Array:
    h = checkpoint_name(self.mamba(self.mixer_norm(x), segment_ids), 'mixer_out')
    x = x + self.dropout(h, deterministic=deterministic, rngs=rngs)
    h = checkpoint_name(self.mlp(self.mlp_norm(x)), 'mlp_out')
    return x + self.dropout(h, deterministic=deterministic, rngs=rngs)

  def decode(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """x [B, T, D] continuing the sequences in cache {'conv_state', 'ssm_state'}."""
    h, cache = self.mamba.decode(self.mixer_norm(x), cache)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class HybridDecoder(TokenLM, nnx.Module):
  """Decoder-only LM whose layers follow an 'A'/'M' schedule (see module docstring).

  Parameters: token table ('vocab', 'embed'); per layer norms, attention (A) or Mamba (M)
  mixer, MLP; final norm; output head ('embed', 'vocab') unless `tie_embeddings`.
  `remat_policy` as `Decoder`'s; the layers are heterogeneous, so they are never scanned.
  Activation sharding as `Decoder`'s (shared `TokenLM` / `apply_blocks`): the residual stream
  after the embedding and each layer, and the logits, are pinned by logical names inside a
  train / eval step (`sharding.activation_sharding`).
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               d_ff: int, schedule: str = 'jamba', attn_period: int = 8, attn_offset: int = 4,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               d_state: int = 16, d_conv: int = 4, expand: int = 2, scan_method: str = 'auto',
               chunk_size: int | None = None, mlp_activation: str = 'swiglu',
               position: str = 'none', max_len: int = 2048, dropout_rate: float = 0.0,
               tie_embeddings: bool = False, norm: str = 'rmsnorm',
               attention_impl: str = 'reference', blockwise_threshold: int | None = None,
               block_size: int = 512, remat_policy: str = 'none', dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if position not in POSITIONS:
      raise ValueError(f'position={position!r} is not one of {POSITIONS}.')
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'dropout_rate={dropout_rate} must be in [0, 1).')
    get_remat_policy(remat_policy)  # validates the name
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.remat_policy = remat_policy
    self.schedule = resolve_schedule(num_layers, schedule, attn_period=attn_period,
                                     attn_offset=attn_offset)
    self.vocab_size, self.d_model, self.position = vocab_size, d_model, position
    self.max_len, self.dropout_rate, self.dtype = max_len, dropout_rate, dtype
    self.blockwise_threshold = blockwise_threshold
    self.embedder = Embed(vocab_size, d_model, rngs=rngs, **kw)
    self.position_table = (LearnedPositions(max_len, d_model, rngs=rngs, **kw)
                           if position == 'learned' else None)
    layers = []
    for kind in self.schedule:
      if kind == 'A':
        block = DecoderBlock(d_model, num_heads, d_ff, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, mlp_activation=mlp_activation, norm=norm,
                             dropout_rate=dropout_rate, attention_impl=attention_impl,
                             blockwise_threshold=blockwise_threshold, block_size=block_size,
                             rngs=rngs, **kw)
        layers.append(block)
      else:
        layers.append(MambaLayer(d_model, d_ff, d_state=d_state, d_conv=d_conv, expand=expand,
                                 scan_method=scan_method, chunk_size=chunk_size,
                                 mlp_activation=mlp_activation, norm=norm,
                                 dropout_rate=dropout_rate, rngs=rngs, **kw))
    self.layers = nnx.List(layers)
    self.final_norm = make_norm(norm, d_model, **kw)
    self.head = None if tie_embeddings else output_head(d_model, vocab_size, rngs=rngs, **kw)
    self.embed_dropout = nnx.Dropout(dropout_rate)

  def __call__(self, tokens: jax.Array | None = None, *, embeddings: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None, deterministic: bool = True,
               rngs: DropoutRngs = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Full parallel forward pass; arguments and result as `Decoder.__call__`.

    segment_ids [B, L] mask attention across documents and reset the Mamba layers' state
    at document starts. `attention_mask` [B|1, N|1, L, L] replaces the causal mask of the
    A layers only (the M layers are causal by construction).
    """
    x, positions, rngs = self._embed_inputs(tokens, embeddings, positions, deterministic, rngs)
    mask = (self._mask(x.shape[1], segment_ids, attention_mask) if 'A' in self.schedule
            else None)
    rotary = self.rotary

    def call(layer, x, rngs):
      if isinstance(layer, DecoderBlock):
        return layer(x, mask=mask, positions=positions, rotary=rotary,
                     deterministic=deterministic, rngs=rngs)
      return layer(x, segment_ids=segment_ids, deterministic=deterministic, rngs=rngs)

    x = apply_blocks(self.layers, x, call, scan=False, remat=self.remat_policy, rngs=rngs)
    hidden = self.final_norm(x)
    return self.logits(hidden), {'hidden': hidden}

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """{'index': int32 0, 'layers': [{'k', 'v'} [B, max_len, K, H] per A layer,
    {'conv_state' [B, d_conv-1, d_inner], 'ssm_state' [B, d_inner, d_state]} per M layer]}."""
    if self.position == 'learned' and max_len > self.max_len:
      raise ValueError(f'cache max_len={max_len} exceeds the learned position table '
                       f'(max_len={self.max_len}); build the model with a larger max_len.')
    layers = [layer.attention.init_cache(batch_size, max_len, dtype) if kind == 'A'
              else layer.mamba.init_cache(batch_size, dtype)
              for kind, layer in zip(self.schedule, self.layers)]
    return {'index': jnp.zeros((), jnp.int32), 'layers': layers}

  def decode(self, tokens: jax.Array | None, cache: dict, *,
             embeddings: jax.Array | None = None, positions: jax.Array | None = None,
             attention_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Causal forward of T new tokens over the mixed cache; as `Decoder.decode`.

    The M layers continue from their (conv, ssm) state: one recurrence step for T = 1, the
    parallel scan from the cached state for a prefill (T > 1).
    """
    x = self._inputs(tokens, embeddings)
    batch, length = x.shape[:2]
    index = cache['index']
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(length), (batch, length))
    x = self.add_positions(x, positions)
    mask = attention_mask
    if mask is None and 'A' in self.schedule:
      cache_len = cache['layers'][self.schedule.index('A')]['k'].shape[1]
      mask = (causal_segment_mask_fn(offset=index) if self._blockwise(cache_len)
              else causal_mask(length, kv_length=cache_len, offset=index))
    new_layers = []
    for kind, layer, layer_cache in zip(self.schedule, self.layers, cache['layers']):
      if kind == 'A':
        x, layer_cache = layer.decode(x, layer_cache, index=index, mask=mask,
                                      positions=positions, rotary=self.rotary)
      else:
        x, layer_cache = layer.decode(x, layer_cache)
      new_layers.append(layer_cache)
    logits = self.logits(self.final_norm(x))
    return logits, {'index': index + length, 'layers': new_layers}

  # ------------------------------------------------------------------------------ pieces


def mamba_layer_extra_params(d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
                             d_state: int = 16, d_conv: int = 4, expand: int = 2) -> int:
  """Parameters of a Mamba mixer minus those of an attention mixer (no biases), per layer.

  Used to give a pure-attention twin the same parameter count (configs/hybrid_lm.py).
  """
  d_inner = expand * d_model
  dt_rank = -(-d_model // 16)
  mamba = (d_model * 2 * d_inner + d_conv * d_inner + d_inner + d_inner * (dt_rank + 2 * d_state)
           + dt_rank * d_inner + d_inner + d_inner * d_state + d_inner + d_inner * d_model)
  head_dim = d_model // num_heads
  kv = num_heads if num_kv_heads is None else num_kv_heads
  attention = 2 * d_model * num_heads * head_dim + 2 * d_model * kv * head_dim
  return mamba - attention
