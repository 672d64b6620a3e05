"""Hybrid Transformer-Mamba decoder (Jamba, Lieber et al. 2024): a layer schedule of
attention ('A'), Mamba-1 ('M') and Mamba-2 ('M2') layers, each followed by an MLP.

Axis letters: B batch, L length, D d_model, V vocab, T new tokens, S cache length.

    schedule 'MMMMAMMM' (Jamba's 1:7 rule: attention every attn_period=8 layers at
    attn_offset=4); 'AAAA...' is a plain Transformer, 'MMMM...' a pure Mamba LM;
    'M2M2M2M2AM2M2M2' the same 1:7 hybrid with Mamba-2 layers (`mamba_version=2` turns the
    named schedules' 'M' into 'M2'); explicit strings may mix the three ('MM2AM').

    A layer:  x + attn(norm(x)),    x + mlp(norm(x))    (models.decoder.DecoderBlock)
    M layer:  x + mamba(norm(x)),   x + mlp(norm(x))    (MambaLayer: ssm.MambaBlock, S6 scan)
    M2 layer: x + mamba2(norm(x)),  x + mlp(norm(x))    (MambaLayer: ssm.Mamba2Block, SSD)

Mamba-1 vs Mamba-2: both keep a constant-size decoding state. Mamba-1 has a [d_state]
diagonal A per channel and runs a sequential scan (fastest on CPU at small state sizes);
Mamba-2 has one scalar A per head of `ssm_head_dim` channels, B / C shared by
`ssm_num_groups` groups, a gated RMSNorm, and runs as chunked matmuls (ssm.ssd), which lets
it afford larger states (d_state 64-128 in the paper) and uses the matrix units of GPU / TPU.
`d_state` and `chunk_size` apply to both kinds (chunk_size None: each one's default).

Positions: Jamba uses none (the Mamba layers carry order), so `position='none'` is the
default; 'rope' rotates q / k of the A layers, 'learned' / 'sinusoidal' add to the input.

The interface is `models.Decoder`'s, so the trainer, the objectives and
`inference.generate` work unchanged: `__call__(tokens, *, embeddings, positions, segment_ids,
attention_mask, deterministic, rngs) -> (logits, {'hidden'})`, `embed`, `init_cache`,
`decode`. The cache mixes both kinds: {'index', 'layers': [{'k', 'v'} for A layers,
{'conv_state', 'ssm_state'} for M / M2 layers]}; only the A layers' part grows with max_len.

Long contexts: with `blockwise_threshold`, attention past that length runs blockwise
(online softmax) with a lazy causal/segment mask, so no L x L array exists.
"""
from __future__ import annotations

import re

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
from metalm_jax.ssm.mamba2 import Mamba2Block, mamba2_params

POSITIONS = ('none', 'rope', 'learned', 'sinusoidal')
LAYER_KINDS = ('A', 'M', 'M2')  # attention, Mamba-1, Mamba-2
MAMBA_VERSIONS = {1: 'M', 2: 'M2'}
_TOKEN = re.compile(r'M2|M|A')


def schedule_layers(schedule: str) -> tuple[str, ...]:
  """'MM2AM' -> ('M', 'M2', 'A', 'M'): the kind of each layer of a resolved schedule."""
  return tuple(_TOKEN.findall(schedule))


def resolve_schedule(num_layers: int, schedule: str = 'jamba', *, attn_period: int = 8,
                     attn_offset: int = 4, mamba_version: int = 1) -> str:
  """The layer schedule as a string of 'A' (attention), 'M' (Mamba-1), 'M2' (Mamba-2) tokens.

  Args:
    num_layers: number of layers.
    schedule: 'jamba' (layer i is attention iff i % attn_period == attn_offset, Mamba
      elsewhere), 'attention' (all A), 'mamba' (all Mamba), or an explicit string of tokens
      such as 'MMMAMMMM' or 'M2M2AM2' (`schedule_layers` splits it).
    attn_period, attn_offset: Jamba's rule (defaults 8 and 4: a 1:7 attention:Mamba ratio).
    mamba_version: 1 or 2, the Mamba layer of the named schedules ('M' or 'M2').
  """
  if num_layers < 1:
    raise ValueError(f'num_layers={num_layers} must be >= 1.')
  if mamba_version not in MAMBA_VERSIONS:
    raise ValueError(f'mamba_version={mamba_version!r} must be 1 (Mamba) or 2 (Mamba-2).')
  m = MAMBA_VERSIONS[mamba_version]
  if schedule == 'jamba':
    if attn_period < 1 or not 0 <= attn_offset < attn_period:
      raise ValueError(f'Jamba schedule needs attn_period >= 1 and 0 <= attn_offset < '
                       f'attn_period; got attn_period={attn_period}, attn_offset={attn_offset}.')
    return ''.join('A' if i % attn_period == attn_offset else m for i in range(num_layers))
  if schedule == 'attention':
    return 'A' * num_layers
  if schedule == 'mamba':
    return m * num_layers
  bad = sorted(set(_TOKEN.sub('', schedule)))
  if bad or not schedule:
    raise ValueError(f"schedule={schedule!r} must be 'jamba', 'attention', 'mamba' or a string "
                     f"of 'A' (attention), 'M' (Mamba) and 'M2' (Mamba-2) layers; bad "
                     f"characters: {bad}.")
  layers = schedule_layers(schedule)
  if len(layers) != num_layers:
    raise ValueError(f'schedule={schedule!r} has {len(layers)} layers but num_layers='
                     f'{num_layers}; give one token (A, M or M2) per layer.')
  return schedule


class MambaLayer(nnx.Module):
  """Pre-norm Mamba layer: x + drop(mixer(norm(x))), then x + drop(mlp(norm(x))).

  The mixer is `self.mamba` (ssm.MambaBlock) for version 1, `self.mamba2` (ssm.Mamba2Block)
  for version 2. [B, L, D] -> [B, L, D]; segment_ids [B, L] reset the SSM state and conv
  between documents. `num_residuals` (residual branches in the whole network) rescales the
  mixer's out_proj init as the reference's rescale_prenorm_residual.
  """

  def __init__(self, d_model: int, d_ff: int, *, version: int = 1, d_state: int = 16,
               d_conv: int = 4, expand: int = 2, scan_method: str = 'auto',
               chunk_size: int | None = None, head_dim: int = 64, num_groups: int = 1,
               num_residuals: int = 1, mlp_activation: str = 'swiglu', norm: str = 'rmsnorm',
               dropout_rate: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.version = version
    self.mixer_norm = make_norm(norm, d_model, **kw)
    common = dict(d_state=d_state, d_conv=d_conv, expand=expand, chunk_size=chunk_size,
                  num_residuals=num_residuals, rngs=rngs, **kw)
    if version == 1:
      self.mamba = MambaBlock(d_model, scan_method=scan_method, **common)
    elif version == 2:
      self.mamba2 = Mamba2Block(d_model, head_dim=head_dim, num_groups=num_groups, **common)
    else:
      raise ValueError(f'MambaLayer version={version!r} must be 1 or 2.')
    self.mlp_norm = make_norm(norm, d_model, **kw)
    self.mlp = Mlp(d_model, d_ff, activation=mlp_activation, rngs=rngs, **kw)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               deterministic: bool = True, rngs: DropoutRngs = None) -> jax.Array:
    h = checkpoint_name(self.mixer(self.mixer_norm(x), segment_ids), 'mixer_out')
    x = x + self.dropout(h, deterministic=deterministic, rngs=rngs)
    h = checkpoint_name(self.mlp(self.mlp_norm(x)), 'mlp_out')
    return x + self.dropout(h, deterministic=deterministic, rngs=rngs)

  def decode(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """x [B, T, D] continuing the sequences in cache {'conv_state', 'ssm_state'}."""
    h, cache = self.mixer.decode(self.mixer_norm(x), cache)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache

  @property
  def mixer(self) -> MambaBlock | Mamba2Block:
    return self.mamba if self.version == 1 else self.mamba2


class HybridDecoder(TokenLM, nnx.Module):
  """Decoder-only LM whose layers follow an 'A'/'M'/'M2' schedule (see module docstring).

  Parameters: token table ('vocab', 'embed'); per layer norms, attention (A), Mamba (M) or
  Mamba-2 (M2) mixer, MLP; final norm; output head ('embed', 'vocab') unless `tie_embeddings`.
  `schedule` is the resolved string, `layer_kinds` its tokens, one per layer.
  `remat_policy` as `Decoder`'s; the layers are heterogeneous, so they are never scanned.
  Activation sharding as `Decoder`'s (shared `TokenLM` / `apply_blocks`): the residual stream
  after the embedding and each layer, and the logits, are pinned by logical names inside a
  train / eval step (`sharding.activation_sharding`).
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               d_ff: int, schedule: str = 'jamba', attn_period: int = 8, attn_offset: int = 4,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               d_state: int = 16, d_conv: int = 4, expand: int = 2, scan_method: str = 'auto',
               chunk_size: int | None = None, mamba_version: int = 1, ssm_head_dim: int = 64,
               ssm_num_groups: int = 1, mlp_activation: str = 'swiglu',
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
                                     attn_offset=attn_offset, mamba_version=mamba_version)
    self.layer_kinds = schedule_layers(self.schedule)
    self.vocab_size, self.d_model, self.position = vocab_size, d_model, position
    self.max_len, self.dropout_rate, self.dtype = max_len, dropout_rate, dtype
    self.blockwise_threshold = blockwise_threshold
    self.embedder = Embed(vocab_size, d_model, rngs=rngs, **kw)
    self.position_table = (LearnedPositions(max_len, d_model, rngs=rngs, **kw)
                           if position == 'learned' else None)
    layers = []
    for kind in self.layer_kinds:
      if kind == 'A':
        block = DecoderBlock(d_model, num_heads, d_ff, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, mlp_activation=mlp_activation, norm=norm,
                             dropout_rate=dropout_rate, attention_impl=attention_impl,
                             blockwise_threshold=blockwise_threshold, block_size=block_size,
                             rngs=rngs, **kw)
        layers.append(block)
      else:
        # 2 residual branches per layer (mixer, MLP), as the reference counts with an MLP.
        layers.append(MambaLayer(d_model, d_ff, version=1 if kind == 'M' else 2,
                                 d_state=d_state, d_conv=d_conv, expand=expand,
                                 scan_method=scan_method, chunk_size=chunk_size,
                                 head_dim=ssm_head_dim, num_groups=ssm_num_groups,
                                 num_residuals=2 * num_layers, mlp_activation=mlp_activation,
                                 norm=norm, dropout_rate=dropout_rate, rngs=rngs, **kw))
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
    {'conv_state' [B, d_conv-1, d_inner], 'ssm_state' [B, d_inner, d_state]} per M layer,
    {'conv_state' [B, d_conv-1, conv_dim], 'ssm_state' [B, H, P, d_state]} per M2 layer]}."""
    if self.position == 'learned' and max_len > self.max_len:
      raise ValueError(f'cache max_len={max_len} exceeds the learned position table '
                       f'(max_len={self.max_len}); build the model with a larger max_len.')
    layers = [layer.attention.init_cache(batch_size, max_len, dtype) if kind == 'A'
              else layer.mixer.init_cache(batch_size, dtype)
              for kind, layer in zip(self.layer_kinds, self.layers)]
    return {'index': jnp.zeros((), jnp.int32), 'layers': layers}

  def decode(self, tokens: jax.Array | None, cache: dict, *,
             embeddings: jax.Array | None = None, positions: jax.Array | None = None,
             attention_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Causal forward of T new tokens over the mixed cache; as `Decoder.decode`.

    The M / M2 layers continue from their (conv, ssm) state: one recurrence step for T = 1,
    the scan from the cached state for a prefill (T > 1).
    """
    x = self._inputs(tokens, embeddings)
    batch, length = x.shape[:2]
    index = cache['index']
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(length), (batch, length))
    x = self.add_positions(x, positions)
    mask = attention_mask
    if mask is None and 'A' in self.schedule:
      cache_len = cache['layers'][self.layer_kinds.index('A')]['k'].shape[1]
      mask = (causal_segment_mask_fn(offset=index) if self._blockwise(cache_len)
              else causal_mask(length, kv_length=cache_len, offset=index))
    new_layers = []
    for kind, layer, layer_cache in zip(self.layer_kinds, self.layers, cache['layers']):
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
                             d_state: int = 16, d_conv: int = 4, expand: int = 2,
                             mamba_version: int = 1, ssm_head_dim: int = 64,
                             ssm_num_groups: int = 1) -> int:
  """Parameters of a Mamba (version 1 or 2) mixer minus those of an attention mixer (no
  biases), per layer. Used to give a pure-attention twin the same parameter count
  (configs/hybrid_lm.py).
  """
  d_inner = expand * d_model
  dt_rank = -(-d_model // 16)
  if mamba_version == 2:
    mamba = mamba2_params(d_model, d_state=d_state, d_conv=d_conv, expand=expand,
                          head_dim=ssm_head_dim, num_groups=ssm_num_groups)
  else:
    mamba = (d_model * 2 * d_inner + d_conv * d_inner + d_inner
             + d_inner * (dt_rank + 2 * d_state) + dt_rank * d_inner + d_inner
             + d_inner * d_state + d_inner + d_inner * d_model)
  head_dim = d_model // num_heads
  kv = num_heads if num_kv_heads is None else num_kv_heads
  attention = 2 * d_model * num_heads * head_dim + 2 * d_model * kv * head_dim
  return mamba - attention
