"""mPLUG (Li et al. 2022): a ViT and a text encoder joined by a cross-modal skip-connected
fusion network, and a seq2seq decoder over the fused features.

Axis letters: B batch, P image tokens, T text length, D d_model, E ITC feature size,
M memory length (P + T), V vocab.

    images [B, H, W, C] --ViT--> v [B, P, D]       (token 0 = image [CLS])
    text   [B, T]       --text encoder--> l [B, T, D]   (token 0 = [CLS] = BOS)
    (v, l) --SkipConnectedFusion--> (v', l')
    decoder: causal self-attention + cross-attention over concat[v'; l'] -> logits [B, L, V]

Skip-connected fusion: layers l = 0 .. F-1 with stride S. Layer l is

  'A' asymmetric co-attention (l == 0 or l % S != 0): text self-attention, text-to-image
      cross-attention, FFN on the text; the image features are returned untouched (the same
      array: no self-attention over the long visual sequence, the method's saving);
  'C' connected attention (l > 0 and l % S == 0): self-attention over concat[v; l], FFN,
      split back into image and text; both parts keep their residual stream, so the image
      part is the old image features plus the layer's update.

F = 6, S = 3 gives 'AAACAA' (mPLUG base); S >= F gives no connected layer (mPLUG large).
All layers are pre-LN (we train from scratch; the released model starts from BERT's post-LN
weights); the fusion ends with one LayerNorm per modality.

Heads for pretraining (`metalm_jax.objectives.mplug`): ITC projections of the unimodal
[CLS] features to E (256 in the paper) with a learned temperature, a 2-way ITM head on the
fused [CLS], an MLM head on the fused text; the decoder does PrefixLM, captioning and VQA.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from metalm_jax import checks
from metalm_jax.layers.attention import MultiHeadAttention
from metalm_jax.layers.embeddings import Embed, LearnedPositions
from metalm_jax.layers.masks import causal_mask
from metalm_jax.layers.norms import LayerNorm
from metalm_jax.models.decoder import output_head
from metalm_jax.models.text_encoder import GeluFfn, TextEncoder
from metalm_jax.models.vision_encoder import VisionEncoder

DropoutRngs = nnx.Rngs | jax.Array | None
ASYMMETRIC, CONNECTED = 'A', 'C'


def fusion_pattern(num_layers: int, stride: int) -> str:
  """The layer kinds of a skip-connected fusion network, e.g. (6, 3) -> 'AAACAA'.

  Layer l is connected ('C') when l > 0 and l % stride == 0, else asymmetric ('A').
  """
  if num_layers < 1:
    raise ValueError(f'fusion num_layers={num_layers} must be >= 1.')
  if stride < 1:
    raise ValueError(f'fusion stride={stride} must be >= 1 (S = stride of the connected '
                     'layers; S >= num_layers means no connected layer).')
  return ''.join(CONNECTED if l > 0 and l % stride == 0 else ASYMMETRIC
                 for l in range(num_layers))


def _key_mask(valid: jax.Array) -> jax.Array:
  """bool [B, S] valid keys -> attention mask [B, 1, 1, S]."""
  return valid.astype(bool)[:, None, None, :]


class AsymmetricCoAttentionLayer(nnx.Module):
  """Text self-attention, text-to-image cross-attention, FFN (pre-LN); the image is returned
  unchanged. (v [B, P, D], l [B, T, D]) -> (v, l')."""

  def __init__(self, d_model: int, num_heads: int, d_ff: int, *, layer_norm_eps: float = 1e-6,
               dropout_rate: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    norm = lambda: LayerNorm(d_model, epsilon=layer_norm_eps, **kw)
    self.self_attention_norm, self.cross_attention_norm = norm(), norm()
    self.image_norm, self.ffn_norm = norm(), norm()
    self.self_attention = MultiHeadAttention(d_model, num_heads, use_bias=True, rngs=rngs, **kw)
    self.cross_attention = MultiHeadAttention(d_model, num_heads, use_bias=True, rngs=rngs, **kw)
    self.ffn = GeluFfn(d_model, d_ff, rngs=rngs, **kw)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, image: jax.Array, text: jax.Array, *, text_valid: jax.Array,
               deterministic: bool = True,
               rngs: DropoutRngs = None) -> tuple[jax.Array, jax.Array]:
    drop = lambda h: self.dropout(h, deterministic=deterministic, rngs=rngs)
    text = text + drop(self.self_attention(self.self_attention_norm(text),
                                           mask=_key_mask(text_valid)))
    text = text + drop(self.cross_attention(self.cross_attention_norm(text),
                                            context=self.image_norm(image)))
    text = text + drop(self.ffn(self.ffn_norm(text)))
    return image, text


class ConnectedAttentionLayer(nnx.Module):
  """Self-attention over concat[v; l] and an FFN (pre-LN), split back into image and text.
  (v [B, P, D], l [B, T, D]) -> (v + update, l + update)."""

  def __init__(self, d_model: int, num_heads: int, d_ff: int, *, layer_norm_eps: float = 1e-6,
               dropout_rate: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attention_norm = LayerNorm(d_model, epsilon=layer_norm_eps, **kw)
    self.attention = MultiHeadAttention(d_model, num_heads, use_bias=True, rngs=rngs, **kw)
    self.ffn_norm = LayerNorm(d_model, epsilon=layer_norm_eps, **kw)
    self.ffn = GeluFfn(d_model, d_ff, rngs=rngs, **kw)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, image: jax.Array, text: jax.Array, *, text_valid: jax.Array,
               deterministic: bool = True,
               rngs: DropoutRngs = None) -> tuple[jax.Array, jax.Array]:
    drop = lambda h: self.dropout(h, deterministic=deterministic, rngs=rngs)
    num_image = image.shape[1]
    valid = jnp.concatenate([jnp.ones(image.shape[:2], bool), text_valid.astype(bool)], axis=1)
    x = jnp.concatenate([image, text], axis=1)
    x = x + drop(self.attention(self.attention_norm(x), mask=_key_mask(valid)))
    x = x + drop(self.ffn(self.ffn_norm(x)))
    return x[:, :num_image], x[:, num_image:]


class SkipConnectedFusion(nnx.Module):
  """mPLUG's cross-modal skip-connected network (module docstring).

  Args:
    num_layers: F, fusion layers.
    stride: S; layer l > 0 with l % S == 0 is a connected-attention layer.
    d_model, num_heads, d_ff: layer sizes (image and text widths must both be d_model).
    pattern: optional explicit layer kinds, a string of 'A' / 'C' of length num_layers that
      replaces the stride's (ablations: 'CCCCCC' = connected attention everywhere).

  Attributes:
    pattern: the layer kinds, e.g. 'AAACAA'.
  """

  def __init__(self, *, num_layers: int, stride: int, d_model: int, num_heads: int, d_ff: int,
               pattern: str | None = None, layer_norm_eps: float = 1e-6,
               dropout_rate: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.num_layers, self.stride = num_layers, stride
    self.pattern = fusion_pattern(num_layers, stride)
    if pattern is not None:
      if len(pattern) != num_layers or set(pattern) - {ASYMMETRIC, CONNECTED}:
        raise ValueError(f'fusion pattern={pattern!r} must be {num_layers} letters, each '
                         f"'{ASYMMETRIC}' (asymmetric) or '{CONNECTED}' (connected).")
      self.pattern = pattern
    kw = dict(layer_norm_eps=layer_norm_eps, dropout_rate=dropout_rate, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
    kinds = {ASYMMETRIC: AsymmetricCoAttentionLayer, CONNECTED: ConnectedAttentionLayer}
    self.layers = nnx.List([kinds[k](d_model, num_heads, d_ff, **kw) for k in self.pattern])
    self.image_norm = LayerNorm(d_model, epsilon=layer_norm_eps, dtype=dtype,
                                param_dtype=param_dtype)
    self.text_norm = LayerNorm(d_model, epsilon=layer_norm_eps, dtype=dtype,
                               param_dtype=param_dtype)

  def __call__(self, image: jax.Array, text: jax.Array, *, text_valid: jax.Array | None = None,
               deterministic: bool = True,
               rngs: DropoutRngs = None) -> tuple[jax.Array, jax.Array]:
    """image [B, P, D], text [B, T, D], text_valid bool [B, T] (default all) ->
    (image [B, P, D], text [B, T, D]), each after its final LayerNorm."""
    if image.shape[-1] != text.shape[-1] or image.shape[0] != text.shape[0]:
      raise ValueError(f'image features {image.shape} and text features {text.shape} need '
                       'the same batch and width; project the image features first.')
    if isinstance(rngs, jax.Array):
      rngs = nnx.Rngs(dropout=rngs)
    if text_valid is None:
      text_valid = jnp.ones(text.shape[:2], bool)
    for layer in self.layers:
      image, text = layer(image, text, text_valid=text_valid, deterministic=deterministic,
                          rngs=rngs)
    return self.image_norm(image), self.text_norm(text)


class CrossAttentionDecoderLayer(nnx.Module):
  """Pre-LN: causal self-attention, cross-attention over the memory, FFN. [B, L, D] -> same."""

  def __init__(self, d_model: int, num_heads: int, d_ff: int, *, layer_norm_eps: float = 1e-6,
               dropout_rate: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    norm = lambda: LayerNorm(d_model, epsilon=layer_norm_eps, **kw)
    self.self_attention_norm, self.cross_attention_norm, self.ffn_norm = norm(), norm(), norm()
    self.self_attention = MultiHeadAttention(d_model, num_heads, use_bias=True, rngs=rngs, **kw)
    self.cross_attention = MultiHeadAttention(d_model, num_heads, use_bias=True, rngs=rngs, **kw)
    self.ffn = GeluFfn(d_model, d_ff, rngs=rngs, **kw)
    self.dropout = nnx.Dropout(dropout_rate)

  def memory_keys_values(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cross-attention keys / values of a memory [B, M, D] (computed once per decode)."""
    return self.cross_attention.keys_values(memory)

  def __call__(self, x: jax.Array, *, memory_kv: tuple[jax.Array, jax.Array],
               memory_mask: jax.Array, self_mask: jax.Array, cache: dict | None = None,
               index: jax.Array | None = None, deterministic: bool = True,
               rngs: DropoutRngs = None) -> tuple[jax.Array, dict | None]:
    drop = lambda h: self.dropout(h, deterministic=deterministic, rngs=rngs)
    h = self.self_attention_norm(x)
    if cache is None:
      h = self.self_attention(h, mask=self_mask)
    else:
      h, cache = self.self_attention.decode(h, cache, index=index, mask=self_mask)
    x = x + drop(h)
    q = self.cross_attention.queries(self.cross_attention_norm(x))
    x = x + drop(self.cross_attention.attend(q, *memory_kv, memory_mask))
    return x + drop(self.ffn(self.ffn_norm(x))), cache


class CrossAttentionDecoder(nnx.Module):
  """Token embedding + learned positions, causal layers cross-attending to a memory, a final
  LayerNorm and an untied output head."""

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               d_ff: int, max_len: int = 64, layer_norm_eps: float = 1e-6,
               dropout_rate: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.vocab_size, self.max_len, self.num_layers = vocab_size, max_len, num_layers
    self.embed = Embed(vocab_size, d_model, rngs=rngs, **kw)
    self.positions = LearnedPositions(max_len, d_model, rngs=rngs, **kw)
    self.layers = nnx.List([
        CrossAttentionDecoderLayer(d_model, num_heads, d_ff, layer_norm_eps=layer_norm_eps,
                                   dropout_rate=dropout_rate, rngs=rngs, **kw)
        for _ in range(num_layers)])
    self.final_norm = LayerNorm(d_model, epsilon=layer_norm_eps, **kw)
    self.head = output_head(d_model, vocab_size, rngs=rngs, **kw)
    self.dropout = nnx.Dropout(dropout_rate)

  def _embed(self, tokens, offset):
    length = tokens.shape[1]
    if not isinstance(offset, jax.Array) and offset + length > self.max_len:
      raise ValueError(f'decoder input of {offset + length} positions exceeds max_len='
                       f'{self.max_len}; raise config.model.decoder.max_len.')
    positions = jnp.broadcast_to(offset + jnp.arange(length), tokens.shape)
    return self.embed(tokens) + self.positions(positions)

  def __call__(self, tokens: jax.Array, memory: jax.Array, memory_valid: jax.Array, *,
               deterministic: bool = True, rngs: DropoutRngs = None) -> jax.Array:
    """Teacher forcing: tokens int [B, L], memory [B, M, D], memory_valid bool [B, M] ->
    logits [B, L, V]."""
    if isinstance(rngs, jax.Array):
      rngs = nnx.Rngs(dropout=rngs)
    x = self.dropout(self._embed(tokens, 0), deterministic=deterministic, rngs=rngs)
    self_mask = causal_mask(tokens.shape[1])
    for layer in self.layers:
      x, _ = layer(x, memory_kv=layer.memory_keys_values(memory),
                   memory_mask=_key_mask(memory_valid), self_mask=self_mask,
                   deterministic=deterministic, rngs=rngs)
    return self.head(self.final_norm(x))

  def init_cache(self, memory: jax.Array, memory_valid: jax.Array, max_len: int) -> dict:
    """An empty decoding cache over a memory: per layer the self-attention KV cache and the
    memory's cross-attention keys / values (computed here once), the memory mask, and the
    write index. Non-scalar leaves are batch-first (`inference.beam_search` tiles them)."""
    if max_len > self.max_len:
      raise ValueError(f'decoding max_len={max_len} exceeds the decoder max_len={self.max_len}.')
    batch = memory.shape[0]
    layers = []
    for layer in self.layers:
      k, v = layer.memory_keys_values(memory)
      layers.append({'self': layer.self_attention.init_cache(batch, max_len, memory.dtype),
                     'memory_k': k, 'memory_v': v})
    return {'layers': layers, 'memory_valid': memory_valid.astype(bool),
            'index': jnp.zeros((), jnp.int32)}

  def decode(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """tokens int [B, T] at cache['index'] -> (logits [B, T, V], new cache)."""
    index, length = cache['index'], tokens.shape[1]
    max_len = cache['layers'][0]['self']['k'].shape[1]
    x = self._embed(tokens, index)
    self_mask = causal_mask(length, kv_length=max_len, offset=index)
    memory_mask = _key_mask(cache['memory_valid'])
    layers = []
    for layer, c in zip(self.layers, cache['layers']):
      x, self_cache = layer(x, memory_kv=(c['memory_k'], c['memory_v']), memory_mask=memory_mask,
                            self_mask=self_mask, cache=c['self'], index=index)
      layers.append(dict(c, self=self_cache))
    logits = self.head(self.final_norm(x))
    return logits, {'layers': layers, 'memory_valid': cache['memory_valid'],
                    'index': index + length}


class MPlug(nnx.Module):
  """ViT + text encoder + skip-connected fusion + seq2seq decoder + pretraining heads.

  Args (the `config.model` keys; nested dicts are the sub-modules' kwargs):
    vocab_size: shared by the text encoder, the MLM head and the decoder. The objectives use
      `mask_id` as [MASK], by default the top id, vocab_size - 1: then keep it above the
      tokenizer's ids.
    d_model: text encoder, fusion and decoder width.
    vision_encoder: VisionEncoder kwargs (use_cls is forced on: ITC reads the image [CLS]);
      a width other than d_model gets a linear projection.
    text_encoder: TextEncoder kwargs besides vocab_size / d_model (the paper: 6 layers).
    fusion: SkipConnectedFusion kwargs besides d_model (num_layers, stride, num_heads, d_ff).
    decoder: CrossAttentionDecoder kwargs besides vocab_size / d_model.
    itc_dim: E, the ITC feature size (256 in the paper).
    temperature: initial ITC temperature (0.07); learned, clamped to [min_temperature,
      max_temperature] in the parameter after every update (the trainer's mplug family).
    pad_id, bos_id, eos_id: token ids (the text encoder's [CLS] is bos_id).
    mask_id: the MLM [MASK] id; -1 (default) = vocab_size - 1. A docked BERT's tokenizer has
      its own (bert-base-uncased: 103); the mplug family checks it against the tokenizer.
  """

  SUBMODULES = {
      'vision_encoder': checks.Submodule(VisionEncoder, injected=('use_cls',)),
      'text_encoder': checks.Submodule(TextEncoder, injected=('vocab_size', 'd_model', 'pad_id')),
      'fusion': checks.Submodule(SkipConnectedFusion, injected=('d_model', 'dropout_rate')),
      'decoder': checks.Submodule(CrossAttentionDecoder,
                                  injected=('vocab_size', 'd_model', 'dropout_rate')),
  }

  def __init__(self, *, vocab_size: int, d_model: int, vision_encoder: Mapping,
               text_encoder: Mapping, fusion: Mapping, decoder: Mapping, itc_dim: int = 256,
               temperature: float = 0.07, min_temperature: float = 0.001,
               max_temperature: float = 0.5, dropout_rate: float = 0.0, pad_id: int = 0,
               bos_id: int = 1, eos_id: int = 2, mask_id: int = -1, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not min_temperature <= temperature <= max_temperature:
      raise ValueError(f'config.model.temperature={temperature} is outside '
                       f'[{min_temperature}, {max_temperature}].')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    common = dict(dropout_rate=dropout_rate, **kw)
    self.vocab_size, self.d_model, self.itc_dim = vocab_size, d_model, itc_dim
    self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
    self.mask_id = vocab_size - 1 if mask_id < 0 else mask_id
    self.min_temperature, self.max_temperature = min_temperature, max_temperature
    vit = dict(vision_encoder)
    vit.setdefault('dropout_rate', dropout_rate)
    self.vision_encoder = checks.build(VisionEncoder, vit, 'config.model.vision_encoder',
                                       use_cls=True, **kw)
    d_vision = self.vision_encoder.d_model
    self.vision_projection = None if d_vision == d_model else nnx.Einsum(
        'BPV,VD->BPD', (d_vision, d_model), (d_model,),
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          ('vision_embed', 'embed')),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('embed',)), **kw)
    text = dict(dict(norm_position='pre', layer_norm_eps=1e-6, type_vocab_size=0), **text_encoder)
    text.setdefault('dropout_rate', dropout_rate)
    self.text_encoder = checks.build(TextEncoder, text, 'config.model.text_encoder',
                                     vocab_size=vocab_size, d_model=d_model, pad_id=pad_id,
                                     **kw)
    self.fusion = checks.build(SkipConnectedFusion, dict(fusion), 'config.model.fusion',
                               d_model=d_model, **common)
    self.decoder = checks.build(CrossAttentionDecoder, dict(decoder), 'config.model.decoder',
                                vocab_size=vocab_size, d_model=d_model, **common)

    def dense(d_in, d_out, names, bias=True):
      return nnx.Einsum(
          '...D,DE->...E', (d_in, d_out), (d_out,) if bias else None,
          kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), names),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[-1],)), **kw)

    self.itc_image_projection = dense(d_model, itc_dim, ('embed', 'itc_embed'))
    self.itc_text_projection = dense(d_model, itc_dim, ('embed', 'itc_embed'))
    self.temperature = nnx.Param(jnp.full((), temperature, param_dtype))
    self.itm_head = dense(d_model, 2, ('embed', None))
    self.mlm_transform = dense(d_model, d_model, ('embed', 'mlp'))
    self.mlm_norm = LayerNorm(d_model, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.mlm_head = output_head(d_model, vocab_size, **kw)

  # ------------------------------------------------------------------ unimodal encoders
  def encode_image(self, images: jax.Array, *, deterministic: bool = True,
                   rngs: DropoutRngs = None) -> jax.Array:
    """images [B, H, W, C] -> image features [B, P, D] (token 0 = [CLS])."""
    v = self.vision_encoder(images, deterministic=deterministic, rngs=rngs)
    return v if self.vision_projection is None else self.vision_projection(v)

  def encode_text(self, tokens: jax.Array, *, deterministic: bool = True,
                  rngs: DropoutRngs = None) -> jax.Array:
    """tokens int [B, T] ([CLS] first, pad_id = padding) -> text features [B, T, D]."""
    return self.text_encoder(tokens, deterministic=deterministic, rngs=rngs)[0]

  def itc_features(self, image: jax.Array | None = None,
                   text: jax.Array | None = None) -> tuple[jax.Array | None, jax.Array | None]:
    """Unit-norm ITC features [B, E] of the image / text [CLS] features (either may be None)."""
    def project(proj, x):
      if x is None:
        return None
      z = proj(x[:, 0]).astype(jnp.float32)
      return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    return project(self.itc_image_projection, image), project(self.itc_text_projection, text)

  def itc_temperature(self) -> jax.Array:
    """The learned ITC temperature, float32. Kept in [min_temperature, max_temperature] by
    clamping the parameter after each update (`families.mplug`), as ALBEF clamps it in
    place: clipping here would freeze its gradient once it overshoots."""
    return self.temperature[...].astype(jnp.float32)

  # ------------------------------------------------------------------ fusion and heads
  def fuse(self, image: jax.Array, text: jax.Array, text_valid: jax.Array, *,
           deterministic: bool = True, rngs: DropoutRngs = None) -> tuple[jax.Array, jax.Array]:
    """(image [B, P, D], text [B, T, D], text_valid [B, T]) -> fused (image, text)."""
    return self.fusion(image, text, text_valid=text_valid, deterministic=deterministic,
                       rngs=rngs)

  def itm_logits(self, fused_text: jax.Array) -> jax.Array:
    """Fused text [B, T, D] -> match logits [B, 2] from the fused [CLS] (1 = match)."""
    return self.itm_head(fused_text[:, 0]).astype(jnp.float32)

  def mlm_logits(self, fused_text: jax.Array) -> jax.Array:
    """Fused text [B, T, D] -> logits [B, T, V]."""
    h = self.mlm_norm(jax.nn.gelu(self.mlm_transform(fused_text), approximate=False))
    return self.mlm_head(h)

  @staticmethod
  def memory(image: jax.Array, text: jax.Array, text_valid: jax.Array):
    """The decoder's memory concat[image; text] [B, P + T, D] and its valid mask [B, P + T]."""
    valid = jnp.concatenate([jnp.ones(image.shape[:2], bool), text_valid.astype(bool)], axis=1)
    return jnp.concatenate([image, text], axis=1), valid

  def encode(self, images: jax.Array, tokens: jax.Array, *, deterministic: bool = True,
             rngs: DropoutRngs = None) -> tuple[jax.Array, jax.Array]:
    """images + encoder tokens -> the decoder memory (features [B, M, D], valid [B, M])."""
    rngs = _split(rngs, 3)
    valid = tokens != self.pad_id
    image = self.encode_image(images, deterministic=deterministic, rngs=rngs[0])
    text = self.encode_text(tokens, deterministic=deterministic, rngs=rngs[1])
    image, text = self.fuse(image, text, valid, deterministic=deterministic, rngs=rngs[2])
    return self.memory(image, text, valid)

  def __call__(self, images: jax.Array, tokens: jax.Array, decoder_tokens: jax.Array, *,
               deterministic: bool = True, rngs: DropoutRngs = None) -> jax.Array:
    """Seq2seq teacher forcing: images [B, H, W, C], encoder tokens [B, T], decoder tokens
    [B, L] ([BOS] first) -> logits [B, L, V]."""
    rngs = _split(rngs, 2)
    memory, valid = self.encode(images, tokens, deterministic=deterministic, rngs=rngs[0])
    return self.decoder(decoder_tokens, memory, valid, deterministic=deterministic,
                        rngs=rngs[1])


def _split(rngs: DropoutRngs, n: int) -> list:
  if isinstance(rngs, jax.Array):
    return [jax.random.fold_in(rngs, i) for i in range(n)]
  return [rngs] * n


__all__ = ['ASYMMETRIC', 'CONNECTED', 'AsymmetricCoAttentionLayer', 'ConnectedAttentionLayer',
           'CrossAttentionDecoder', 'CrossAttentionDecoderLayer', 'MPlug',
           'SkipConnectedFusion', 'fusion_pattern']
