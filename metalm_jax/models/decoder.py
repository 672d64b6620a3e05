"""Causal Transformer decoder (pre-LN) with a functional KV cache.

Axis letters: B batch, L length, D d_model, V vocab, T new tokens, S cache length.

The decoder is the language-model backbone every family reuses:
  - METALM (semi-causal LM): `embed(tokens)` gives token embeddings; the caller replaces
    rows with encoder outputs and calls `decoder(embeddings=..., attention_mask=...)`.
  - mPLUG / hybrid decoders reuse `DecoderBlock` and the cache protocol
    (`init_cache` / `decode`), whose cache is an explicit pytree, so generation is jittable.

Dropout is deterministic unless `deterministic=False`, and then needs `rngs`: a jax PRNG
key (fresh per training step) or an `nnx.Rngs` with a 'dropout' stream. The model stores
no RNG state, so `nnx.split(model)` gives parameters only.

Scale options (config keys of the model):
  scan_layers   True: the N blocks are one `DecoderBlock` whose parameters carry a leading
                'layers' axis (built by `nnx.vmap`), run by `nnx.scan`: XLA compiles one
                block, so compile time stays flat in depth. `stack_layer_params` /
                `unstack_layer_params` convert parameters between the two layouts.
  remat_policy  what the backward pass keeps of each block's forward (REMAT_POLICIES):
                'none' keeps everything; 'full' keeps only the block input and recomputes
                the rest; 'dots_saveable' keeps matmul outputs and recomputes elementwise
                work; 'names' keeps the tensors tagged with `checkpoint_name` in
                each block (its attention or Mamba output and MLP output, SAVED_NAMES).

Activation sharding: the residual stream is pinned to RESIDUAL_AXES after the embedding and
after every block (inside the scan too), the logits to LOGITS_AXES, by
`sharding.constrain_activation`: a no-op unless a train / eval step traces the model inside
`sharding.activation_sharding(mesh, rules)`.

Checkpoint-layout options (defaults = the project's own layout; they let Hugging Face
GPT-2 / LLaMA / Qwen2 / Mistral weights load exactly, see `models.hf.decoders`):
  norm_epsilon       variance epsilon of every norm (1e-6; GPT-2 1e-5, LLaMA rms_norm_eps).
  attention_bias     ATTENTION_BIASES: 'none'; 'qkv' biases on the q / k / v projections
                     (Qwen2); 'all' also on the output projection (GPT-2).
  mlp_bias           biases on the MLP projections (GPT-2).
  rope_theta         the RoPE wavelength base (10000; Qwen2 1e6).
  scale_tied_logits  with tie_embeddings, logits = embed.attend(h) / sqrt(d_model) (True,
                     the project's own head) or embed.attend(h) (False: GPT-2, tied LLaMA).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from metalm_jax.layers.attention import (KVCache, MultiHeadAttention, RotaryFn,
                                         causal_segment_mask_fn)
from metalm_jax.layers.embeddings import Embed, LearnedPositions, rope, sinusoidal_positions
from metalm_jax.layers.masks import causal_mask, combine_masks, segment_mask
from metalm_jax.layers.mlp import Mlp
from metalm_jax.layers.norms import make_norm
from metalm_jax.sharding import constrain_activation

POSITIONS = ('rope', 'learned', 'sinusoidal')
ATTENTION_BIASES = ('none', 'qkv', 'all')
DEFAULT_ROPE_THETA = 10000.0
DropoutRngs = nnx.Rngs | jax.Array | None
SAVED_NAMES = ('mixer_out', 'mlp_out')  # checkpoint_name tags: attention / Mamba, MLP
# Logical axes of the residual stream [B, L, D] and of the logits [B, L, V] (sharding rules).
RESIDUAL_AXES = ('activation_batch', 'activation_length', 'activation_embed')
LOGITS_AXES = ('activation_batch', 'activation_length', 'activation_vocab')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'names': jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES),
}


def get_remat_policy(name: str):
  """The jax.checkpoint policy of a REMAT_POLICIES name ('none' -> None: no remat)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f'remat_policy={name!r} is not one of {sorted(REMAT_POLICIES)}.')
  return REMAT_POLICIES[name]


def apply_blocks(blocks, x: jax.Array, call, *, scan: bool, remat: str,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
  """Runs `call(block, x, rngs) -> x` over a block stack, scanned or unrolled, with remat.

  Unrolled, `blocks` is a sequence of modules; scanned, one module whose parameters have a
  leading layer axis, run by `jax.lax.scan` (one traced and compiled block). Each layer
  gets its own dropout stream, split from one draw of `rngs` (None: no dropout). Blocks
  run as pure functions of their split state (`nnx.split` outside, `nnx.merge` inside), so
  this also works where the module was merged at an outer trace level. Each block's output
  [B, L, D] is pinned to RESIDUAL_AXES (a no-op outside `sharding.activation_sharding`).
  """
  policy = get_remat_policy(remat)
  if scan:
    graphdef, state = nnx.split(blocks)
    num_layers = jax.tree.leaves(state)[0].shape[0]
  else:
    num_layers = len(blocks)
  keys = jax.random.split(rngs.dropout(), num_layers) if rngs is not None else None

  def run(graphdef, state, x, key):
    layer_rngs = None if key is None else nnx.Rngs(dropout=key)
    return call(nnx.merge(graphdef, state), x, layer_rngs)

  if remat != 'none':  # under scan, the loop already keeps XLA from merging recomputation
    run = jax.checkpoint(run, policy=policy, static_argnums=(0,), prevent_cse=not scan)
  if scan:
    def body(x, inputs):
      layer_state, key = inputs
      return constrain_activation(run(graphdef, layer_state, x, key), RESIDUAL_AXES), None
    return jax.lax.scan(body, x, (state, keys))[0]
  for i, block in enumerate(blocks):
    graphdef, state = nnx.split(block)
    x = run(graphdef, state, x, None if keys is None else keys[i])
    x = constrain_activation(x, RESIDUAL_AXES)
  return x


def decode_stacked(blocks, x: jax.Array, layers_cache: dict, step) -> tuple[jax.Array, dict]:
  """`step(block, x, layer_cache) -> (x, layer_cache)` over a scanned block stack.

  The cache leaves are [B, num_layers, ...] (batch first); the scan carries them whole and
  reads / writes layer i in place with dynamic slices.
  """
  graphdef, state = nnx.split(blocks)
  num_layers = jax.tree.leaves(state)[0].shape[0]

  def body(carry, inputs):
    x, cache = carry
    layer_state, i = inputs
    layer_cache = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 1, False), cache)
    x, layer_cache = step(nnx.merge(graphdef, layer_state), x, layer_cache)
    cache = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, i, 1),
                         cache, layer_cache)
    return (x, cache), None

  (x, layers_cache), _ = jax.lax.scan(body, (x, layers_cache),
                                      (state, jnp.arange(num_layers)))
  return x, layers_cache


def stack_layer_params(params: dict) -> dict:
  """Pure params of an unscanned Decoder -> the scan_layers=True layout.

  {'blocks': {0: tree, 1: tree, ...}, ...} -> {'blocks': tree with a leading layer axis}.
  """
  blocks = params['blocks']
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[i] for i in range(len(blocks))))
  return dict(params, blocks=stacked)


def unstack_layer_params(params: dict) -> dict:
  """The inverse of `stack_layer_params`."""
  stacked = params['blocks']
  n = jax.tree.leaves(stacked)[0].shape[0]
  return dict(params, blocks={i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)})


class DecoderBlock(nnx.Module):
  """Pre-LN block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x))). [B, L, D] -> same.

  `norm_epsilon`, `attention_bias` (ATTENTION_BIASES) and `mlp_bias` as in `Decoder`.
  """

  def __init__(self, d_model: int, num_heads: int, d_ff: int, *,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               mlp_activation: str = 'swiglu', norm: str = 'rmsnorm',
               norm_epsilon: float = 1e-6, attention_bias: str = 'none',
               mlp_bias: bool = False,
               dropout_rate: float = 0.0, attention_impl: str = 'reference',
               blockwise_threshold: int | None = None, block_size: int = 512,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if attention_bias not in ATTENTION_BIASES:
      raise ValueError(f'attention_bias={attention_bias!r} is not one of {ATTENTION_BIASES}.')
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attn_norm = make_norm(norm, d_model, epsilon=norm_epsilon, **kw)
    self.attention = MultiHeadAttention(d_model, num_heads, num_kv_heads=num_kv_heads,
                                        head_dim=head_dim, use_bias=attention_bias != 'none',
                                        out_bias=attention_bias == 'all',
                                        implementation=attention_impl,
                                        blockwise_threshold=blockwise_threshold,
                                        block_size=block_size, rngs=rngs, **kw)
    self.mlp_norm = make_norm(norm, d_model, epsilon=norm_epsilon, **kw)
    self.mlp = Mlp(d_model, d_ff, activation=mlp_activation, use_bias=mlp_bias, rngs=rngs, **kw)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               positions: jax.Array | None = None, rotary: RotaryFn | None = None,
               deterministic: bool = True, rngs: DropoutRngs = None) -> jax.Array:
    """x [B, L, D], mask bool [B|1, N|1, L, L], positions int [B, L] -> [B, L, D]."""
    h = self.attention(self.attn_norm(x), mask=mask, positions=positions, rotary=rotary)
    h = checkpoint_name(h, 'mixer_out')
    x = x + self.dropout(h, deterministic=deterministic, rngs=rngs)
    h = checkpoint_name(self.mlp(self.mlp_norm(x)), 'mlp_out')
    return x + self.dropout(h, deterministic=deterministic, rngs=rngs)

  def decode(self, x: jax.Array, cache: KVCache, *, index: jax.Array,
             mask: jax.Array | None, positions: jax.Array,
             rotary: RotaryFn | None = None) -> tuple[jax.Array, KVCache]:
    """KV-cached step: x [B, T, D] written at cache slot `index` -> ([B, T, D], cache)."""
    h, cache = self.attention.decode(self.attn_norm(x), cache, index=index, mask=mask,
                                     positions=positions, rotary=rotary)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


def output_head(d_model: int, vocab_size: int, *, rngs: nnx.Rngs, **kw) -> nnx.Einsum:
  """The untied output projection [B, L, D] -> [B, L, V], kernel ('embed', 'vocab')."""
  return nnx.Einsum(
      'BLD,DV->BLV', (d_model, vocab_size),
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ('embed', 'vocab')),
      rngs=rngs, **kw)


class TokenLM:
  """What the decoder families share: tokens or embeddings in, positions, masks, logits out.

  Mixed into `Decoder` and `HybridDecoder`, which set `embedder`, `position`,
  `position_table`, `head`, `d_model`, `dtype` and `blockwise_threshold` (and may set
  `rope_theta` / `scale_tied_logits`, whose class defaults are the project's own layout).
  """

  rope_theta: float = DEFAULT_ROPE_THETA
  scale_tied_logits: bool = True

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int tokens [B, L] -> token embeddings [B, L, D] (no positions).

    The semi-causal insertion point: replace rows with encoder outputs, then pass the
    result as `embeddings=` to `__call__` or `decode`.
    """
    return self.embedder(tokens)

  @property
  def rotary(self) -> RotaryFn | None:
    """The rotary function applied to queries / keys in attention, if positions are RoPE."""
    if self.position != 'rope':
      return None
    return rope if self.rope_theta == DEFAULT_ROPE_THETA else functools.partial(
        rope, base=self.rope_theta)

  def add_positions(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Adds learned / sinusoidal positions to embeddings [B, L, D] (RoPE: unchanged)."""
    if self.position == 'learned':
      return x + self.position_table(positions)
    if self.position == 'sinusoidal':
      return x + sinusoidal_positions(positions, self.d_model).astype(x.dtype)
    return x  # rope: inside attention; none: order comes from elsewhere (Mamba layers)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final normed hidden states [B, L, D] -> float32 logits [B, L, V] (LOGITS_AXES)."""
    if self.head is None:
      out = self.embedder.attend(hidden)
      if self.scale_tied_logits:
        out = out / np.sqrt(self.d_model)
    else:
      out = self.head(hidden)
    return constrain_activation(out, LOGITS_AXES).astype(jnp.float32)

  def _embed_inputs(self, tokens, embeddings, positions, deterministic: bool,
                    rngs: DropoutRngs) -> tuple[jax.Array, jax.Array, nnx.Rngs | None]:
    """Inputs of a parallel forward: (embeddings + positions after dropout [B, L, D],
    positions [B, L] (default arange), the dropout rngs for the layers or None when no
    dropout runs)."""
    x = self._inputs(tokens, embeddings)
    batch, length = x.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    train = not deterministic and self.dropout_rate > 0.0
    if train and rngs is None:
      raise ValueError('deterministic=False with dropout_rate='
                       f'{self.dropout_rate} needs rngs= (a PRNG key or nnx.Rngs(dropout=...)).')
    if isinstance(rngs, jax.Array):
      rngs = nnx.Rngs(dropout=rngs)
    x = self.embed_dropout(self.add_positions(x, positions),
                           deterministic=deterministic, rngs=rngs)
    return constrain_activation(x, RESIDUAL_AXES), positions, rngs if train else None

  def _inputs(self, tokens, embeddings) -> jax.Array:
    if (tokens is None) == (embeddings is None):
      raise ValueError('Pass exactly one of tokens= or embeddings= '
                       f'(got tokens={tokens is not None}, embeddings={embeddings is not None}).')
    return self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)

  def _blockwise(self, kv_len: int) -> bool:
    return self.blockwise_threshold is not None and kv_len > self.blockwise_threshold

  def _mask(self, length: int, segment_ids, attention_mask):
    """Self-attention mask: causal (or `attention_mask`) AND same segment; past the
    blockwise threshold a lazy mask function, so no L x L array is built at all."""
    if attention_mask is None and self._blockwise(length):
      return causal_segment_mask_fn(segment_ids)
    mask = causal_mask(length) if attention_mask is None else attention_mask
    if segment_ids is not None:
      mask = combine_masks(mask, segment_mask(segment_ids))
    return mask


class Decoder(TokenLM, nnx.Module):
  """Decoder-only causal language model.

  Parameters: token table ('vocab', 'embed'); per block norms, attention and MLP; a final
  norm; an output head ('embed', 'vocab') unless `tie_embeddings` (then logits are
  `embed.attend(h) / sqrt(d_model)`, or `embed.attend(h)` with scale_tied_logits=False);
  a position table ('length', 'embed') for position='learned'. The checkpoint-layout
  options (norm_epsilon, attention_bias, mlp_bias, rope_theta, scale_tied_logits) are
  described in the module docstring; their defaults leave the parameter tree unchanged.
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               d_ff: int, num_kv_heads: int | None = None, head_dim: int | None = None,
               mlp_activation: str = 'swiglu', position: str = 'rope', max_len: int = 2048,
               dropout_rate: float = 0.0, tie_embeddings: bool = False,
               norm: str = 'rmsnorm', attention_impl: str = 'reference',
               blockwise_threshold: int | None = None, block_size: int = 512,
               scan_layers: bool = False, remat_policy: str = 'none',
               norm_epsilon: float = 1e-6, attention_bias: str = 'none',
               mlp_bias: bool = False, rope_theta: float = DEFAULT_ROPE_THETA,
               scale_tied_logits: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if position not in POSITIONS:
      raise ValueError(f'position={position!r} is not one of {POSITIONS}.')
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'dropout_rate={dropout_rate} must be in [0, 1).')
    get_remat_policy(remat_policy)  # validates the name
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.scan_layers, self.remat_policy, self.num_layers = scan_layers, remat_policy, num_layers
    self.vocab_size, self.d_model, self.position = vocab_size, d_model, position
    self.max_len, self.dropout_rate, self.dtype = max_len, dropout_rate, dtype
    if rope_theta <= 0:
      raise ValueError(f'rope_theta={rope_theta} must be > 0 (the RoPE wavelength base).')
    self.rope_theta, self.scale_tied_logits = float(rope_theta), scale_tied_logits
    self.embedder = Embed(vocab_size, d_model, rngs=rngs, **kw)
    self.position_table = (LearnedPositions(max_len, d_model, rngs=rngs, **kw)
                           if position == 'learned' else None)
    make_block = lambda r: DecoderBlock(
        d_model, num_heads, d_ff, num_kv_heads=num_kv_heads, head_dim=head_dim,
        mlp_activation=mlp_activation, norm=norm, norm_epsilon=norm_epsilon,
        attention_bias=attention_bias, mlp_bias=mlp_bias, dropout_rate=dropout_rate,
        attention_impl=attention_impl, blockwise_threshold=blockwise_threshold,
        block_size=block_size, rngs=r, **kw)
    if scan_layers:  # one block with stacked parameters, logical axes ('layers', ...)
      stack = nnx.vmap(lambda key: make_block(nnx.Rngs(key)), in_axes=0, out_axes=0,
                       transform_metadata={nnx.PARTITION_NAME: 'layers'})
      self.blocks = stack(jax.random.split(rngs.params(), num_layers))
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(num_layers)])
    self.blockwise_threshold = blockwise_threshold
    self.final_norm = make_norm(norm, d_model, epsilon=norm_epsilon, **kw)
    self.head = None if tie_embeddings else output_head(d_model, vocab_size, rngs=rngs, **kw)
    self.embed_dropout = nnx.Dropout(dropout_rate)

  def __call__(self, tokens: jax.Array | None = None, *, embeddings: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None, deterministic: bool = True,
               rngs: DropoutRngs = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Full parallel forward pass.

    Args:
      tokens: int [B, L]; exactly one of tokens / embeddings.
      embeddings: [B, L, D] input embeddings (e.g. `embed(tokens)` with rows replaced).
      positions: int [B, L]; default arange(L) (packed data: per-document positions).
      segment_ids: int [B, L] packed-document ids, 0 = padding; adds a same-segment mask.
      attention_mask: bool [B|1, N|1, L, L] replacing the causal mask (e.g. semi-causal);
        segment masking still applies.
      deterministic: False enables dropout (needs `rngs`).
      rngs: dropout randomness: a PRNG key (fresh per step) or nnx.Rngs(dropout=...).

    Returns:
      (logits [B, L, V] float32, {'hidden': final normed hidden state [B, L, D]}).
    """
    x, positions, rngs = self._embed_inputs(tokens, embeddings, positions, deterministic, rngs)
    mask = self._mask(x.shape[1], segment_ids, attention_mask)
    rotary = self.rotary

    def call(block, x, rngs):
      return block(x, mask=mask, positions=positions, rotary=rotary,
                   deterministic=deterministic, rngs=rngs)

    x = apply_blocks(self.blocks, x, call, scan=self.scan_layers, remat=self.remat_policy,
                     rngs=rngs)
    hidden = self.final_norm(x)
    return self.logits(hidden), {'hidden': hidden}

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Empty cache {'index': int32 0, 'layers': [{'k', 'v'} [B, max_len, K, H]] per block}.

    With scan_layers, 'layers' is one {'k', 'v'} [B, num_layers, max_len, K, H] (batch
    first, as the cache protocol of `inference` wants).
    """
    if self.position == 'learned' and max_len > self.max_len:
      raise ValueError(f'cache max_len={max_len} exceeds the learned position table '
                       f'(max_len={self.max_len}); build the Decoder with a larger max_len.')
    if self.scan_layers:
      one = self.blocks.attention.init_cache(batch_size, max_len, dtype)
      layers = jax.tree.map(lambda a: jnp.zeros(a.shape[:1] + (self.num_layers,) + a.shape[1:],
                                                a.dtype), one)
    else:
      layers = [b.attention.init_cache(batch_size, max_len, dtype) for b in self.blocks]
    return {'index': jnp.zeros((), jnp.int32), 'layers': layers}

  def decode(self, tokens: jax.Array | None, cache: dict, *,
             embeddings: jax.Array | None = None, positions: jax.Array | None = None,
             attention_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Causal forward of T new tokens over the KV cache (prefill: T > 1, step: T = 1).

    Args:
      tokens: int [B, T] (or None when `embeddings` [B, T, D] are given).
      cache: from `init_cache` or a previous `decode`; tokens go to slots
        index .. index + T - 1, which must fit in the cache (under jit an overflow
        cannot be detected: `dynamic_update_slice` would clamp the write).
      embeddings: [B, T, D] instead of tokens (e.g. a prefill with encoder outputs).
      positions: int [B, T]; default index + arange(T).
      attention_mask: bool [B|1, N|1, T, S_max] over cache slots, replacing the default
        `causal_mask(T, kv_length=S_max, offset=index)` (e.g. a bidirectional prefix-LM
        prefill); it must keep slots >= index + T masked.

    Returns:
      (logits [B, T, V] float32, new cache with index advanced by T).
    """
    x = self._inputs(tokens, embeddings)
    batch, length = x.shape[:2]
    index = cache['index']
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(length), (batch, length))
    x = self.add_positions(x, positions)
    cache_len = (cache['layers']['k'].shape[2] if self.scan_layers
                 else cache['layers'][0]['k'].shape[1])
    mask = (causal_mask(length, kv_length=cache_len, offset=index)
            if attention_mask is None else attention_mask)
    rotary = self.rotary

    def step(block, x, layer_cache):
      return block.decode(x, layer_cache, index=index, mask=mask, positions=positions,
                          rotary=rotary)

    if self.scan_layers:
      x, new_layers = decode_stacked(self.blocks, x, cache['layers'], step)
    else:
      new_layers = []
      for block, layer_cache in zip(self.blocks, cache['layers']):
        x, layer_cache = step(block, x, layer_cache)
        new_layers.append(layer_cache)
    logits = self.logits(self.final_norm(x))
    return logits, {'index': index + length, 'layers': new_layers}


def param_count(tree) -> int:
  """Number of parameters in an nnx.Module, nnx.State or pytree of arrays / shape structs."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def flops_per_token(num_params: int, *, num_layers: int, num_heads: int, head_dim: int,
                    seq_len: int) -> float:
  """Training FLOPs per token, 6 N + 12 L N_h H T (PaLM paper, appendix B).

  6N counts the matmuls of forward + backward over N parameters (pass the non-embedding
  count to follow PaLM exactly); the second term is attention's QK^T and AV products
  over a sequence of seq_len, without discounting the causal half. For MFU:
  mfu = tokens_per_second * flops_per_token / peak_flops.
  """
  return 6.0 * num_params + 12.0 * num_layers * num_heads * head_dim * seq_len
