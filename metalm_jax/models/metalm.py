"""METALM (Hao et al. 2022): a causal decoder as the interface, bidirectional encoders docked.

Axis letters: B batch, L decoder length, M spans per row, C span capacity (max_span_len),
N = B * M encoded spans, D decoder width, E encoder width, H/W/K image height/width/channels.

Three modes (`mode=`), all trained by the `semi_causal_lm` objective on the same batches:

  'dual'    The paper's semi-causal LM. Every span m of a row (positions
            starts[m] .. starts[m] + lengths[m] - 1, from `masking.sample_spans`) is gathered to
            [N, C], encoded on its own as `[BOS] + span` by the bidirectional TextEncoder,
            mapped by the Connector to D, and SCATTERED over the decoder's token embeddings at
            the span positions (the BOS output is dropped; output j -> position start + j).
            The decoder then runs causally; positions are added after the replacement.
  'single'  One stack, no encoder: the decoder runs with `masking.semi_causal_mask(span_ids)`,
            so a span token sees its whole span and everything before it.
  'causal'  The baseline: a plain causal decoder; spans are ignored.

Vision-language (mode 'dual' with a vision_encoder and `images` [B, M, H, W, K]): span m
starts with the ViT tokens of image m (T = vision_encoder.num_tokens() placeholder
positions in the decoder row, whatever their token ids) followed by a text prefix, and the
encoder sees `[BOS] + image tokens + prefix` jointly; the decoder predicts the rest. Several
image spans per row give interleaved (image, text, image, text) in-context sequences.

Everything is static-shaped: M and C come from the batch / config, never from the data,
so one compilation serves a run. Generation: `embed_inputs` builds the prefill embeddings,
`init_cache` is the decoder's and `decode` is the decoder's plus, for 'single', the span ids
of the prefill; `inference.metalm.generate` prefills left-padded span prompts this way.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from metalm_jax import checks
from metalm_jax.layers.masks import causal_mask
from metalm_jax.masking import semi_causal_mask
from metalm_jax.models.connector import Connector
from metalm_jax.models.decoder import Decoder
from metalm_jax.models.text_encoder import TextEncoder
from metalm_jax.models.vision_encoder import VisionEncoder

MODES = ('dual', 'single', 'causal')
DropoutRngs = nnx.Rngs | jax.Array | None


def span_ids_from_starts(starts: jax.Array, lengths: jax.Array, length: int) -> jax.Array:
  """jnp twin of masking.span_ids_from_spans: [B, M] x2 -> int32 [B, L] (0 = causal)."""
  pos = jnp.arange(length)[None, None, :]
  inside = (pos >= starts[..., None]) & (pos < (starts + lengths)[..., None])  # [B, M, L]
  ids = jnp.arange(1, starts.shape[1] + 1, dtype=jnp.int32)[None, :, None]
  return jnp.max(jnp.where(inside, ids, 0), axis=1).astype(jnp.int32)


def _split_rngs(rngs: DropoutRngs, n: int) -> list:
  if isinstance(rngs, jax.Array):
    return [jax.random.fold_in(rngs, i) for i in range(n)]
  return [rngs] * n


class MetaLM(nnx.Module):
  """Causal decoder + (optional) bidirectional text / vision encoders + connector.

  Args (the `config.model` keys; nested dicts are the sub-modules' kwargs):
    decoder: models.Decoder kwargs (vocab_size, d_model, num_layers, ...).
    text_encoder: models.TextEncoder kwargs ('dual' only); vocab_size defaults to the
      decoder's (the encoder reads the decoder's token ids), max_len to max_span_len + 1.
    vision_encoder: models.VisionEncoder kwargs, for vision-language ('dual' only).
    connector: models.Connector kwargs without d_in / d_out, e.g. {'kind': 'mlp',
      'num_layers': 2}; default linear.
    mode: 'dual' | 'single' | 'causal' (see the module docstring).
    max_span_len: C, the static span capacity; spans longer than C are an error upstream
      (the objective samples at most C tokens; vision spans hold T image tokens + prefix).
    bos_id, pad_id: the encoder's `[BOS]` and padding ids.
    trainable_encoder_layers: k >= 0 trains only the text encoder's last k layers (the
      paper: 2, for a docked pretrained encoder); -1 trains everything. Stored for the
      trainer, which applies `train.optimizer.trainable_mask(params, trainable_layers=k)`.
    encoder_span_len: 0 (default): the text encoder reads the decoder's token ids (one
      vocabulary). Ce > 0: the encoder has its own vocabulary (a docked pretrained encoder)
      and reads `span_encoder_ids` int [B, M, Ce], each span's text in the encoder's own
      tokens ([CLS] ... [SEP] included, `data.encoder_spans`); a 'resampler' connector with
      num_latents >= max_span_len then maps the encoder's outputs onto the span's decoder
      positions (query j -> position start + j).
  """

  SUBMODULES = {
      'decoder': checks.Submodule(Decoder),
      'text_encoder': checks.Submodule(TextEncoder, defaulted=('vocab_size', 'max_len', 'pad_id')),
      'vision_encoder': checks.Submodule(VisionEncoder),
      'connector': checks.Submodule(Connector, injected=('d_in', 'd_out')),
  }

  def __init__(self, *, decoder: Mapping, text_encoder: Mapping | None = None,
               vision_encoder: Mapping | None = None, connector: Mapping | None = None,
               mode: str = 'dual', max_span_len: int = 8, bos_id: int = 1, pad_id: int = 0,
               trainable_encoder_layers: int = -1, encoder_span_len: int = 0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if mode not in MODES:
      raise ValueError(f'config.model.mode={mode!r} is not one of {MODES}.')
    if max_span_len < 1:
      raise ValueError(f'config.model.max_span_len={max_span_len} must be >= 1.')
    if mode != 'dual' and (text_encoder or vision_encoder):
      raise ValueError(f"config.model.mode={mode!r} uses no encoder; remove "
                       "config.model.text_encoder / vision_encoder (or use mode='dual').")
    if mode == 'dual' and not text_encoder:
      raise ValueError("config.model.mode='dual' needs config.model.text_encoder (TextEncoder "
                       "kwargs, e.g. {'d_model': 64, 'num_layers': 2, 'num_heads': 4, "
                       "'d_ff': 128}).")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mode, self.max_span_len, self.bos_id, self.pad_id = mode, max_span_len, bos_id, pad_id
    self.trainable_encoder_layers = trainable_encoder_layers
    if encoder_span_len < 0 or (encoder_span_len and mode != 'dual'):
      raise ValueError(f"config.model.encoder_span_len={encoder_span_len}: use 0 (the encoder "
                       "reads the decoder's ids) or > 0 with mode='dual' (its own vocabulary).")
    self.encoder_span_len = encoder_span_len
    self.decoder = checks.build(Decoder, decoder, 'config.model.decoder', **kw)
    text, vision, projection, connect = self._build_encoders(
        text_encoder, vision_encoder, connector, **kw) if mode == 'dual' else (None,) * 4
    self.text_encoder, self.vision_encoder = text, vision
    self.vision_projection, self.connector = projection, connect

  def _build_encoders(self, text_encoder, vision_encoder, connector, *, dtype, param_dtype,
                      rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    max_span_len = self.max_span_len
    enc = dict(text_encoder)
    enc.setdefault('vocab_size', self.decoder.vocab_size)
    enc.setdefault('max_len', max_span_len + 1)
    enc.setdefault('pad_id', self.pad_id)
    text = checks.build(TextEncoder, enc, 'config.model.text_encoder', **kw)
    own_vocab = self.encoder_span_len > 0
    if not own_vocab and enc['vocab_size'] != self.decoder.vocab_size:
      raise ValueError(
          f"config.model.text_encoder.vocab_size={enc['vocab_size']} differs from the decoder's "
          f"{self.decoder.vocab_size}: an encoder with its own vocabulary reads its own token ids; "
          'set config.model.encoder_span_len (its tokens per span, e.g. 2 * max_span_len) and '
          "config.data.encoder_tokenizer ('hf:<dir>'), with a 'resampler' connector.")
    if own_vocab and text.max_len < self.encoder_span_len:
      raise ValueError(f'config.model.text_encoder.max_len={text.max_len} < '
                       f'config.model.encoder_span_len={self.encoder_span_len}.')
    if not own_vocab and text.max_len < max_span_len + 1:
      raise ValueError(f'config.model.text_encoder.max_len={text.max_len} cannot '
                       f'hold [BOS] + max_span_len={max_span_len} tokens; raise it to '
                       f'>= {max_span_len + 1}.')
    d_enc = text.d_model
    vision = projection = None
    if vision_encoder:
      vision = checks.build(VisionEncoder, vision_encoder, 'config.model.vision_encoder', **kw)
      if vision.num_tokens() > max_span_len:
        raise ValueError(f'an image gives {vision.num_tokens()} tokens but '
                         f'config.model.max_span_len={max_span_len}; raise max_span_len to hold '
                         'the image tokens plus the text prefix.')
      if vision.d_model != d_enc:
        projection = nnx.Einsum(
            'NTV,VE->NTE', (vision.d_model, d_enc), (d_enc,),
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                              ('vision_embed', 'encoder_embed')),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('encoder_embed',)),
            **kw)
    connect = checks.build(Connector, dict(connector or {'kind': 'linear'}), 'config.model.connector',
                     d_in=d_enc, d_out=self.decoder.d_model, **kw)
    if own_vocab and connect.kind != 'resampler':
      raise ValueError(f"config.model.encoder_span_len={self.encoder_span_len} (an encoder with "
                       f"its own vocabulary) needs config.model.connector.kind='resampler' "
                       f"(got {connect.kind!r}): its outputs are not aligned with decoder "
                       'positions, so learned queries, one per span position, read them.')
    if connect.num_outputs(max_span_len) < max_span_len:
      raise ValueError(f'the resampler connector has num_latents={connect.num_latents} '
                       f'< max_span_len={max_span_len}; every span position needs an output, '
                       'raise config.model.connector.num_latents.')
    return text, vision, projection, connect

  # ------------------------------------------------------------------ encoding spans
  def encode_spans(self, tokens: jax.Array, span_starts: jax.Array, span_lengths: jax.Array,
                   images: jax.Array | None = None, *, deterministic: bool = True,
                   rngs: DropoutRngs = None,
                   span_encoder_ids: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gathers, encodes and connects every span.

    Args:
      tokens: int [B, L] decoder tokens.
      span_starts, span_lengths: int [B, M]; length 0 = unused slot.
      images: float [B, M, H, W, K] or None; image m fills span m's first T positions.
      span_encoder_ids: int [B, M, Ce], an own-vocabulary encoder's ids of each span
        (`encoder_span_len` > 0 only; padding = the encoder's pad_id).

    Returns:
      (connected [B, M, C, D], span positions int [B, M, C], valid bool [B, M, C]).
    """
    batch, length = tokens.shape
    num_spans, cap = span_starts.shape[1], self.max_span_len
    offsets = jnp.arange(cap)
    valid = offsets < span_lengths[..., None]  # [B, M, C]
    index = span_starts[..., None] + offsets  # [B, M, C]
    if self.encoder_span_len:
      connected = self._encode_own_vocab(span_encoder_ids, images, (batch, num_spans),
                                         deterministic=deterministic, rngs=rngs)
      return connected, index, valid
    if span_encoder_ids is not None:
      raise ValueError('span_encoder_ids were given but config.model.encoder_span_len=0 (the '
                       "encoder reads the decoder's ids); set encoder_span_len.")
    gathered = jnp.take_along_axis(tokens, jnp.clip(index, 0, length - 1).reshape(batch, -1),
                                   axis=1).reshape(batch, num_spans, cap)
    span_tokens = jnp.where(valid, gathered, self.pad_id)
    bos = jnp.full((batch, num_spans, 1), self.bos_id, tokens.dtype)
    n = batch * num_spans
    enc_tokens = jnp.concatenate([bos, span_tokens], axis=-1).reshape(n, cap + 1)
    enc_valid = jnp.concatenate([jnp.ones_like(bos, bool), valid], axis=-1).reshape(n, cap + 1)
    enc_rngs, vis_rngs = _split_rngs(rngs, 2)
    x = self.text_encoder.embed_tokens(enc_tokens)  # [N, C + 1, E]
    if images is not None:
      if self.vision_encoder is None:
        raise ValueError('images were given but the model has no vision_encoder; add '
                         'config.model.vision_encoder.')
      pixels = images.reshape((n,) + images.shape[2:])
      image_tokens = self.vision_encoder(pixels, deterministic=deterministic, rngs=vis_rngs)
      if self.vision_projection is not None:
        image_tokens = self.vision_projection(image_tokens)
      num_image_tokens = image_tokens.shape[1]
      if num_image_tokens > cap:
        raise ValueError(f'images of shape {images.shape[2:]} give {num_image_tokens} tokens, '
                         f'more than max_span_len={cap}.')
      x = x.at[:, 1:1 + num_image_tokens].set(image_tokens.astype(x.dtype))
    hidden, _ = self.text_encoder.encode(x, valid=enc_valid, deterministic=deterministic,
                                         rngs=enc_rngs)
    hidden = hidden[:, 1:]  # drop [BOS]: row j is span position j
    connected = self.connector(hidden, valid=enc_valid[:, 1:])[:, :cap]
    connected = connected.reshape(batch, num_spans, cap, -1)
    return connected, index, valid

  def _encode_own_vocab(self, ids, images, shape, *, deterministic, rngs) -> jax.Array:
    """Own-vocabulary spans: ids [B, M, Ce] -> connected [B, M, C, D] (resampler queries)."""
    if ids is None:
      raise ValueError(f'config.model.encoder_span_len={self.encoder_span_len}: the encoder has '
                       'its own vocabulary and needs span_encoder_ids [B, M, Ce] (the data '
                       'pipeline adds them with config.data.encoder_tokenizer).')
    if images is not None:
      raise ValueError('images with an own-vocabulary text encoder (encoder_span_len > 0) are '
                       'not supported; dock the vision encoder on a shared-vocabulary encoder.')
    if ids.shape[:2] != shape or ids.shape[2] != self.encoder_span_len:
      raise ValueError(f'span_encoder_ids has shape {ids.shape}; expected {shape} + '
                       f'(encoder_span_len={self.encoder_span_len},).')
    enc_tokens = ids.reshape(-1, ids.shape[-1])
    # Unused span slots may be all padding: their first key stays valid (no empty softmax).
    enc_valid = (enc_tokens != self.text_encoder.pad_id).at[:, 0].set(True)
    hidden, _ = self.text_encoder(enc_tokens, valid=enc_valid, deterministic=deterministic,
                                  rngs=_split_rngs(rngs, 1)[0])
    connected = self.connector(hidden, valid=enc_valid)[:, :self.max_span_len]
    return connected.reshape(*shape, self.max_span_len, -1)

  def embed_inputs(self, tokens: jax.Array, span_starts: jax.Array | None = None,
                   span_lengths: jax.Array | None = None, images: jax.Array | None = None, *,
                   deterministic: bool = True, rngs: DropoutRngs = None,
                   span_encoder_ids: jax.Array | None = None) -> jax.Array:
    """Decoder input embeddings [B, L, D] with span rows replaced by connected encodings
    ('dual'; other modes and span-less calls return plain token embeddings)."""
    embeddings = self.decoder.embed(tokens)
    if self.mode != 'dual' or span_starts is None:
      if images is not None:
        raise ValueError(f"images need mode='dual' with spans (mode={self.mode!r}).")
      return embeddings
    connected, index, valid = self.encode_spans(tokens, span_starts, span_lengths, images,
                                                deterministic=deterministic, rngs=rngs,
                                                span_encoder_ids=span_encoder_ids)
    length = tokens.shape[1]
    rows = jnp.arange(tokens.shape[0])[:, None, None]
    target = jnp.where(valid, index, length)  # out of range -> dropped
    return embeddings.at[rows, target].set(connected.astype(embeddings.dtype), mode='drop')

  def vl_layout(self, batch: Mapping[str, jax.Array], prefix_lengths: jax.Array) -> dict:
    """Image-first rows (`data.vl_pipeline`) -> this model's span layout, all in jnp.

    The decoder row has R = N*T + L positions (T = vision_encoder.num_tokens()): N image slots
    of T positions, then the L text positions. A row's k real images (image_mask, real ones
    first) take the LAST k slots; the empty slots are padding (segment 0). Image n's span
    covers its slot, and the text that follows the slot joins it, up to
    max_span_len - T tokens (`prefix_lengths` says how many text tokens the encoder sees):

      unpaired (pair_length 0: captions, VQA; rows without the feature):
        [slot 1] ... [slot N-1] [slot N + text[:p]] [text[p:] ...]
        the last image's span takes the first p = prefix_lengths text tokens.
      paired (pair_length P > 0, k >= 2 images: NLVR2, `vl_pipeline`'s text
        [BOS] statement [BOS] prompt answer, P = the first [BOS] + statement):
        ... [slot N-1 + text[:p1]] [text[p1:P]] [slot N + text[P:P+p2]] [text[P+p2:] ...]
        the image before the last reads the first P text tokens with it (p1 = min(p, P)),
        the last image the rest (p2 = p - P): the statement paired with each image, each pair
        its own bidirectional span, as the METALM paper finetunes NLVR2. text[P - 1] is
        followed by an image, not text: its target is pad_id, its weight 0.

    Unpaired rows are laid out exactly as before pairing existed (the same arrays, bit for bit).

    Args:
      batch: images [B, N, H, W, K], image_mask bool [B, N], inputs / targets / weights /
        segment_ids [B, L]; optional pair_length int [B] (0 or absent = unpaired; used only
        in rows with >= 2 images).
      prefix_lengths: int [B], text tokens given to the encoder, counted from the first text
        token (0 = images only); each span takes at most max_span_len - T of them (the rest
        of its text stays causal).

    Returns:
      dict of inputs, targets, weights, segment_ids, positions [B, R],
      span_starts / span_lengths [B, N], span_ids [B, R], images [B, N, H, W, K]
      (moved to their slots).
    """
    if self.vision_encoder is None:
      raise ValueError("vision-language batches need mode='dual' and "
                       'config.model.vision_encoder.')
    images, image_mask = batch['images'], batch['image_mask'].astype(bool)
    batch_size, num_slots = image_mask.shape
    num_tokens = self.vision_encoder.num_tokens(tuple(images.shape[2:4]))
    count = image_mask.sum(-1).astype(jnp.int32)  # [B]
    first = num_slots - count  # first real slot
    slot = jnp.arange(num_slots)[None, :]
    real = slot >= first[:, None]  # [B, N]
    source = jnp.clip(slot - first[:, None], 0, num_slots - 1)
    images = jnp.take_along_axis(images, source[:, :, None, None, None], axis=1)
    images = jnp.where(real[:, :, None, None, None], images, 0.0)
    pair = jnp.zeros((batch_size,), jnp.int32)
    if 'pair_length' in batch:
      pair = jnp.where(count >= 2, batch['pair_length'], 0).astype(jnp.int32)  # [B]
    cap = self.max_span_len - num_tokens
    prefix = jnp.maximum(prefix_lengths, 0)
    first_text = jnp.minimum(jnp.minimum(prefix, pair), cap)  # joins image k - 1's span
    last_text = jnp.clip(prefix - pair, 0, cap)  # joins the last image's span
    starts = jnp.broadcast_to(slot * num_tokens, (batch_size, num_slots)).astype(jnp.int32)
    starts = starts.at[:, -1].add(pair)  # the paired text sits before the last slot
    lengths = jnp.where(real, num_tokens, 0)
    if num_slots >= 2:
      lengths = lengths.at[:, -2].add(first_text)
    lengths = lengths.at[:, -1].add(jnp.where(count > 0, last_text, 0)).astype(jnp.int32)
    image_len = num_slots * num_tokens
    text_len = batch['inputs'].shape[1]
    # Row position r reads unpaired position src[b, r]: the first P text tokens move in front
    # of the last slot (identity where P = 0).
    r = jnp.arange(image_len + text_len)[None, :]
    cut, p = image_len - num_tokens, pair[:, None]
    src = jnp.where((r >= cut) & (r < cut + p), image_len + r - cut,
                    jnp.where((r >= cut + p) & (r < cut + p + num_tokens), r - p, r))
    image_seg = jnp.repeat(real.astype(jnp.int32), num_tokens, axis=1)  # [B, N*T]
    zeros = jnp.zeros((batch_size, image_len), jnp.int32)
    text_seg = (batch['segment_ids'] > 0).astype(jnp.int32)
    pad = jnp.full((batch_size, image_len), self.pad_id, batch['inputs'].dtype)
    before_image = (p > 0) & (r == cut + p - 1)  # the paired text's last token
    def place(image_part, text_part):
      return jnp.take_along_axis(jnp.concatenate([image_part, text_part], axis=1), src, axis=1)
    segment_ids = place(image_seg, text_seg)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0) * segment_ids
    out = dict(
        inputs=place(pad, batch['inputs']),
        targets=jnp.where(before_image, self.pad_id, place(pad, batch['targets'])),
        weights=jnp.where(before_image, 0.0, place(zeros.astype(jnp.float32),
                                                   batch['weights'])),
        segment_ids=segment_ids, positions=positions.astype(jnp.int32),
        span_starts=starts, span_lengths=lengths, images=images)
    out['span_ids'] = span_ids_from_starts(starts, lengths, image_len + text_len)
    return out

  # ------------------------------------------------------------------ forward
  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, span_ids: jax.Array | None = None,
               span_starts: jax.Array | None = None, span_lengths: jax.Array | None = None,
               images: jax.Array | None = None, deterministic: bool = True,
               rngs: DropoutRngs = None,
               span_encoder_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Semi-causal forward.

    Args:
      tokens: int [B, L].
      positions, segment_ids: int [B, L] as for the Decoder (packed rows).
      span_ids: int [B, L] (0 = causal, m + 1 = span m): used by 'single' (derived from
        starts / lengths when None).
      span_starts, span_lengths: int [B, M]: used by 'dual'.
      images: float [B, M, H, W, K] for vision-language spans ('dual').
      deterministic / rngs: dropout.
      span_encoder_ids: int [B, M, Ce]: the spans in an own-vocabulary encoder's tokens
        ('dual' with encoder_span_len > 0).

    Returns:
      (logits [B, L, V] float32, {'hidden': [B, L, D]}).
    """
    dec_kw = dict(positions=positions, segment_ids=segment_ids, deterministic=deterministic)
    if self.mode == 'causal':
      return self.decoder(tokens, rngs=rngs, **dec_kw)
    if self.mode == 'single':
      if images is not None:
        raise ValueError("mode='single' has no vision encoder; use mode='dual' for images.")
      if span_ids is None:
        if span_starts is None:
          raise ValueError("mode='single' needs span_ids= (or span_starts= / span_lengths=).")
        span_ids = span_ids_from_starts(span_starts, span_lengths, tokens.shape[1])
      return self.decoder(tokens, attention_mask=semi_causal_mask(span_ids), rngs=rngs,
                          **dec_kw)
    if span_starts is None or span_lengths is None:
      raise ValueError("mode='dual' needs span_starts= and span_lengths= (int [B, M]; the "
                       'semi_causal_lm objective adds them to every batch).')
    enc_rngs, dec_rngs = _split_rngs(rngs, 2)
    embeddings = self.embed_inputs(tokens, span_starts, span_lengths, images,
                                   deterministic=deterministic, rngs=enc_rngs,
                                   span_encoder_ids=span_encoder_ids)
    return self.decoder(embeddings=embeddings, rngs=dec_rngs, **dec_kw)

  # ------------------------------------------------------------------ generation
  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    return self.decoder.init_cache(batch_size, max_len, dtype)

  def decode(self, tokens: jax.Array | None, cache: dict, *,
             embeddings: jax.Array | None = None, positions: jax.Array | None = None,
             attention_mask: jax.Array | None = None,
             span_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """The decoder's KV-cached step of T new tokens (see Decoder.decode), with spans.

    'dual' prefills spans through the embeddings:
    `decode(None, cache, embeddings=self.embed_inputs(tokens, starts, lengths, images))`.
    'single' takes `span_ids` int [B, T] of the T new tokens (0 = causal, m + 1 = span m):
    a span token also sees the rest of its own span, as `masking.semi_causal_mask` does in
    `__call__`, on top of `attention_mask` (default: causal over the cache slots). The T
    tokens sit at cache slots index .. index + T - 1, so a span must lie within one call
    (a prefill holds whole spans). 'dual' and 'causal' ignore span_ids, as `__call__` does.
    """
    if span_ids is not None and self.mode == 'single':
      attention_mask = self._span_cache_mask(span_ids, cache, attention_mask)
    return self.decoder.decode(tokens, cache, embeddings=embeddings, positions=positions,
                               attention_mask=attention_mask)

  def _span_cache_mask(self, span_ids: jax.Array, cache: dict,
                       attention_mask: jax.Array | None) -> jax.Array:
    """bool [B, 1, T, S]: `attention_mask` (or causal from the cache index) OR same-span
    pairs among the T new tokens, placed at their cache slots."""
    batch, length = span_ids.shape
    index = cache['index']
    slot_axis = 2 if self.decoder.scan_layers else 1  # cache k: [B, (layers,) S, K, H]
    cache_len = jax.tree.leaves(cache['layers'])[0].shape[slot_axis]
    if attention_mask is None:
      attention_mask = causal_mask(length, kv_length=cache_len, offset=index)
    q, k = span_ids[:, :, None], span_ids[:, None, :]
    same_span = ((q == k) & (q != 0))[:, None]  # [B, 1, T, T]
    block = jnp.zeros((batch, 1, length, cache_len), bool)
    block = jax.lax.dynamic_update_slice(block, same_span, (0, 0, 0, index))
    return attention_mask.astype(bool) | block
