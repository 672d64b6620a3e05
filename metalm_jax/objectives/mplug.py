"""mPLUG's pretraining objectives: ITC, ITM, MLM and PrefixLM (Li et al. 2022, after ALBEF).

Axis letters: B batch, T text length, E ITC feature size, Q queue length, V vocab.

A pretraining batch is image-caption pairs:
  images    float [B, H, W, C]
  text      int   [B, T]   [CLS] (= BOS) caption tokens [EOS] then pad_id
  pair_ids  int   [B]      optional, >= 0: examples with equal ids are positives of each other
                           (e.g. the same image, or in the digits data the same caption).
                           Default: each example is only its own positive.

ITC (image-text contrastive): unit-norm projections of the unimodal [CLS] features, scored
against the momentum encoders' features of the batch and of the queues (ring buffers of
earlier batches' momentum features). Targets: the positives' indicator, row-normalised,
mixed with the momentum model's own softmax (momentum distillation):
    targets = alpha * softmax(s_m / tau) + (1 - alpha) * positives / #positives.
ITM (image-text matching): a 2-way head on the fused [CLS] of B positive pairs, B (image,
hard negative text) and B (hard negative image, text) pairs; negatives are drawn with
probability softmax(in-batch ITC similarity) over non-positives only.
MLM: BERT corruption of 15% of the caption tokens (80% [MASK] = vocab_size - 1, 10% random,
10% kept), predicted from the fused text.
PrefixLM: the caption is split at a uniform point s in [0, n - 1] (n caption tokens): the
encoder gets [CLS] + the first s tokens, the decoder generates the rest and [EOS].

Every function here is pure and jittable; the train state that holds the momentum encoders and
queues, and the step that updates them, are in `metalm_jax.train.mplug`.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

OBJECTIVES = ('itc', 'itm', 'mlm', 'prefix_lm')
UNKNOWN_ID = -1  # queue id of an entry that is nobody's positive
FIRST_REAL_TOKEN = 4  # pad 0, bos 1, eos 2, unk 3: random MLM replacements avoid them


# ---------------------------------------------------------------- queues and momentum
def init_queues(size: int, dim: int, rng: jax.Array) -> dict:
  """Feature queues as ALBEF starts them: random unit vectors, ids UNKNOWN_ID, pointer 0.

  Returns {'image': [Q, E], 'text': [Q, E], 'ids': int32 [Q], 'ptr': int32 []}.
  """
  if size < 1:
    raise ValueError(f'queue size={size} must be >= 1 (the paper: 65,536).')
  k1, k2 = jax.random.split(rng)
  unit = lambda k: _normalize(jax.random.normal(k, (size, dim), jnp.float32))
  return {'image': unit(k1), 'text': unit(k2), 'ids': jnp.full((size,), UNKNOWN_ID, jnp.int32),
          'ptr': jnp.zeros((), jnp.int32)}


def enqueue(queues: Mapping, image_features: jax.Array, text_features: jax.Array,
            ids: jax.Array) -> dict:
  """Writes B new rows at the pointer, wrapping around the end: the queue always holds the
  newest Q rows. The pointer advances by B (mod Q)."""
  size, batch = queues['image'].shape[0], image_features.shape[0]
  if batch > size:
    raise ValueError(f'batch of {batch} features does not fit a queue of {size}; use '
                     'queue_size >= the global batch size.')
  rows = (queues['ptr'] + jnp.arange(batch)) % size
  return {'image': queues['image'].at[rows].set(image_features.astype(jnp.float32)),
          'text': queues['text'].at[rows].set(text_features.astype(jnp.float32)),
          'ids': queues['ids'].at[rows].set(ids.astype(jnp.int32)),
          'ptr': (queues['ptr'] + batch) % size}


def ema_update(momentum, params, decay: float):
  """momentum <- decay * momentum + (1 - decay) * params, leaf by leaf (same structure)."""
  return jax.tree.map(lambda m, p: (decay * m + (1.0 - decay) * p).astype(m.dtype),
                      momentum, params)


# ---------------------------------------------------------------- ITC
def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def positives(ids: jax.Array, other_ids: jax.Array) -> jax.Array:
  """bool [B, N]: ids[i] == other_ids[j] (UNKNOWN_ID never matches)."""
  return (ids[:, None] == other_ids[None, :]) & (other_ids[None, :] != UNKNOWN_ID)


def itc_loss(image: jax.Array, text: jax.Array, image_m: jax.Array, text_m: jax.Array,
             queues: Mapping, temperature: jax.Array, ids: jax.Array,
             alpha: float | jax.Array) -> tuple[jax.Array, dict]:
  """Contrastive loss with momentum distillation over batch + queue.

  Args:
    image, text: unit-norm features [B, E] of the model being trained.
    image_m, text_m: unit-norm momentum features [B, E] (no gradient flows into them).
    queues: {'image', 'text': [Q, E], 'ids': [Q]} from earlier batches.
    temperature: tau > 0 (scalar).
    ids: int [B] pair ids (>= 0).
    alpha: weight of the momentum model's soft targets.

  Returns:
    (loss = (i2t + t2i) / 2, {'i2t', 't2i', 'sim_i2t', 'sim_t2i'}) with the in-batch
    similarities sim [B, B] / tau (for hard negative mining).
  """
  image_m, text_m = jax.lax.stop_gradient(image_m), jax.lax.stop_gradient(text_m)
  image_all = jnp.concatenate([image_m, queues['image']], axis=0)  # [B + Q, E]
  text_all = jnp.concatenate([text_m, queues['text']], axis=0)
  pos = positives(ids, jnp.concatenate([ids, queues['ids']]))
  hard = pos / jnp.sum(pos, axis=1, keepdims=True)
  sim_i2t = image @ text_all.T / temperature
  sim_t2i = text @ image_all.T / temperature
  soft_i2t = jax.nn.softmax(image_m @ text_all.T / temperature, axis=1)
  soft_t2i = jax.nn.softmax(text_m @ image_all.T / temperature, axis=1)
  targets_i2t = jax.lax.stop_gradient(alpha * soft_i2t + (1 - alpha) * hard)
  targets_t2i = jax.lax.stop_gradient(alpha * soft_t2i + (1 - alpha) * hard)
  i2t = -jnp.mean(jnp.sum(jax.nn.log_softmax(sim_i2t, axis=1) * targets_i2t, axis=1))
  t2i = -jnp.mean(jnp.sum(jax.nn.log_softmax(sim_t2i, axis=1) * targets_t2i, axis=1))
  batch = image.shape[0]
  return (i2t + t2i) / 2, {'i2t': i2t, 't2i': t2i, 'sim_i2t': sim_i2t[:, :batch],
                           'sim_t2i': sim_t2i[:, :batch]}


# ---------------------------------------------------------------- ITM
def sample_hard_negatives(rng: jax.Array, similarity: jax.Array,
                          positive: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One negative per row, drawn with probability softmax(similarity) over the row's
  non-positive columns (a positive is never drawn).

  Args:
    similarity: [B, B] in-batch similarities (logits).
    positive: bool [B, B], True where column j is a positive of row i (the diagonal at least).

  Returns:
    (index int32 [B], has_negative bool [B]); a row with no negative column returns index 0
    and has_negative False (its ITM pair must be left out).
  """
  logits = jnp.where(positive, -jnp.inf, jax.lax.stop_gradient(similarity).astype(jnp.float32))
  has_negative = jnp.any(~positive, axis=1)
  index = jax.random.categorical(rng, jnp.where(has_negative[:, None], logits, 0.0), axis=1)
  return jnp.where(has_negative, index, 0).astype(jnp.int32), has_negative


def itm_pairs(rng: jax.Array, sim_i2t: jax.Array, sim_t2i: jax.Array, ids: jax.Array):
  """Indices of ITM's 3B pairs: (image, text) rows for the positives, the hard negative texts
  of each image and the hard negative images of each text; labels (1 = match) and weights.

  Returns (image_index [3B], text_index [3B], labels int32 [3B], weights float32 [3B]).
  """
  batch = ids.shape[0]
  pos = positives(ids, ids)
  k_text, k_image = jax.random.split(rng)
  neg_text, has_text = sample_hard_negatives(k_text, sim_i2t, pos)
  neg_image, has_image = sample_hard_negatives(k_image, sim_t2i, pos)
  arange = jnp.arange(batch, dtype=jnp.int32)
  image_index = jnp.concatenate([arange, arange, neg_image])
  text_index = jnp.concatenate([arange, neg_text, arange])
  labels = jnp.concatenate([jnp.ones(batch, jnp.int32), jnp.zeros(2 * batch, jnp.int32)])
  weights = jnp.concatenate([jnp.ones(batch), has_text, has_image]).astype(jnp.float32)
  return image_index, text_index, labels, weights


# ---------------------------------------------------------------- MLM and PrefixLM
def mlm_mask(rng: jax.Array, tokens: jax.Array, *, mask_id: int, vocab_size: int,
             pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, mask_rate: float = 0.15,
             mask_fraction: float = 0.8,
             random_fraction: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """BERT corruption inside the step: each caption token (not [CLS], [EOS] or padding) is
  picked with probability mask_rate; a picked token becomes [MASK] with probability
  mask_fraction, a random token in [FIRST_REAL_TOKEN, mask_id) with random_fraction, else
  stays. Returns (corrupted int32 [B, T], picked bool [B, T])."""
  k_pick, k_kind, k_token = jax.random.split(rng, 3)
  maskable = (tokens != pad_id) & (tokens != bos_id) & (tokens != eos_id)
  picked = maskable & jax.random.bernoulli(k_pick, mask_rate, tokens.shape)
  u = jax.random.uniform(k_kind, tokens.shape)
  random_tokens = jax.random.randint(k_token, tokens.shape, FIRST_REAL_TOKEN,
                                     min(mask_id, vocab_size))
  corrupted = jnp.where(picked & (u < mask_fraction), mask_id,
                        jnp.where(picked & (u < mask_fraction + random_fraction),
                                  random_tokens, tokens))
  return corrupted.astype(jnp.int32), picked


def prefix_split(rng: jax.Array, tokens: jax.Array, *, pad_id: int = 0,
                 bos_id: int = 1) -> dict:
  """Splits each caption [CLS] c_1 .. c_n [EOS] at s ~ U{0, .., n - 1}.

  Returns {'encoder_tokens': [CLS] c_1 .. c_s then pad, 'decoder_inputs': [BOS] c_{s+1} ..
  c_n, 'decoder_targets': c_{s+1} .. c_n [EOS], 'decoder_weights': 1 on those targets},
  all [B, T].
  """
  batch, length = tokens.shape
  n = jnp.sum(tokens != pad_id, axis=1) - 2  # caption tokens between [CLS] and [EOS]
  s = jnp.floor(jax.random.uniform(rng, (batch,)) * jnp.maximum(n, 1)).astype(jnp.int32)
  pos = jnp.arange(length)[None, :]
  encoder_tokens = jnp.where(pos <= s[:, None], tokens, pad_id)
  take = lambda idx: jnp.take_along_axis(tokens, jnp.minimum(idx, length - 1), axis=1)
  decoder_inputs = jnp.where(pos == 0, bos_id, take(s[:, None] + pos))
  targets = take(s[:, None] + pos + 1)
  weights = (s[:, None] + pos + 1 <= (n + 1)[:, None]).astype(jnp.float32)
  return {'encoder_tokens': encoder_tokens.astype(jnp.int32),
          'decoder_inputs': jnp.where(weights > 0, decoder_inputs, pad_id).astype(jnp.int32),
          'decoder_targets': jnp.where(weights > 0, targets, pad_id).astype(jnp.int32),
          'decoder_weights': weights}


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted mean cross-entropy and accuracy over the weighted positions."""
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  total = jnp.maximum(jnp.sum(weights), 1e-8)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(losses * weights) / total, jnp.sum(correct * weights) / total


# ---------------------------------------------------------------- the pretraining loss
def pretrain_loss(model, momentum_model, batch: Mapping, queues: Mapping, rng: jax.Array, *,
                  loss_weights: Mapping[str, float], alpha: float | jax.Array,
                  mask_rate: float = 0.15,
                  deterministic: bool = False) -> tuple[jax.Array, tuple[dict, dict]]:
  """The weighted sum of the four objectives (an objective of weight 0 is not computed).

  Args:
    model: models.MPlug being trained.
    momentum_model: the same module with the momentum (EMA) weights of the unimodal encoders
      and ITC projections; only its ITC features are used, with no gradient.
    batch: {'images', 'text', optional 'pair_ids'} (module docstring).
    queues: {'image', 'text', 'ids', 'ptr'} from `init_queues` / `enqueue`.
    rng: dropout, masking and sampling key.
    loss_weights: {'itc', 'itm', 'mlm', 'prefix_lm'} -> weight.
    alpha: momentum-distillation weight (0.4 in the paper).

  Returns:
    (loss, (metrics, new queue rows {'image', 'text', 'ids'} to `enqueue` after the update)).
  """
  unknown = sorted(set(loss_weights) - set(OBJECTIVES))
  if unknown:
    raise ValueError(f'unknown mPLUG objective(s) {unknown} in loss_weights; known: {OBJECTIVES}')
  w = {k: float(loss_weights.get(k, 0.0)) for k in OBJECTIVES}
  images, text = batch['images'], batch['text']
  batch_size = text.shape[0]
  ids = batch.get('pair_ids')
  ids = jnp.arange(batch_size, dtype=jnp.int32) if ids is None else ids.astype(jnp.int32)
  keys = dict(zip(('image', 'text', 'itm', 'mlm_mask', 'prefix', 'fuse', 'decoder'),
                  jax.random.split(rng, 7)))
  drop = dict(deterministic=deterministic)
  valid = text != model.pad_id
  image = model.encode_image(images, rngs=keys['image'], **drop)

  # One text-encoder call and one fusion call serve every objective (fewer, larger ops:
  # faster to compile and to run): the encoder reads [caption; masked caption; prefix], the
  # fusion [ITM's 3B pairs; MLM's B; PrefixLM's B].
  names, texts = ['caption'], [text]
  if w['mlm']:
    corrupted, picked = mlm_mask(keys['mlm_mask'], text, mask_id=model.mask_id,
                                 vocab_size=model.vocab_size, pad_id=model.pad_id,
                                 bos_id=model.bos_id, eos_id=model.eos_id, mask_rate=mask_rate)
    names.append('mlm')
    texts.append(corrupted)
  if w['prefix_lm']:
    split = prefix_split(keys['prefix'], text, pad_id=model.pad_id, bos_id=model.bos_id)
    names.append('prefix_lm')
    texts.append(split['encoder_tokens'])
  encoded = model.encode_text(jnp.concatenate(texts), rngs=keys['text'], **drop)
  encoded = dict(zip(names, jnp.split(encoded, len(texts))))
  text_features = encoded['caption']
  metrics, losses = {}, {}

  image_f, text_f = model.itc_features(image, text_features)
  image_m, text_m = momentum_model.itc_features(momentum_model.encode_image(images),
                                                momentum_model.encode_text(text))
  image_m, text_m = jax.lax.stop_gradient(image_m), jax.lax.stop_gradient(text_m)
  temperature = model.itc_temperature()
  itc, itc_metrics = itc_loss(image_f, text_f, image_m, text_m, queues, temperature, ids, alpha)
  if w['itc']:
    losses['itc'] = itc
  metrics['temperature'] = temperature

  rows = []  # (name, image [n, P, D], text [n, T, D], text_valid [n, T])
  if w['itm']:
    image_index, text_index, labels, weights = itm_pairs(
        keys['itm'], itc_metrics['sim_i2t'], itc_metrics['sim_t2i'], ids)
    rows.append(('itm', image[image_index], text_features[text_index], valid[text_index]))
  if w['mlm']:
    rows.append(('mlm', image, encoded['mlm'], valid))
  if w['prefix_lm']:
    prefix_valid = split['encoder_tokens'] != model.pad_id
    rows.append(('prefix_lm', image, encoded['prefix_lm'], prefix_valid))
  if rows:
    fused_image, fused_text = model.fuse(*(jnp.concatenate([r[i] for r in rows]) for i in (1, 2, 3)),
                                         rngs=keys['fuse'], **drop)
    sizes = np.cumsum([r[1].shape[0] for r in rows])[:-1]
    fused = dict(zip((r[0] for r in rows), zip(jnp.split(fused_image, sizes),
                                                jnp.split(fused_text, sizes))))

  if w['itm']:
    logits = model.itm_logits(fused['itm'][1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    losses['itm'] = jnp.sum(ce * weights) / jnp.sum(weights)
    metrics['itm_accuracy'] = (jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
                               / jnp.sum(weights))

  if w['mlm']:
    losses['mlm'], metrics['mlm_accuracy'] = token_cross_entropy(
        model.mlm_logits(fused['mlm'][1]), text, picked.astype(jnp.float32))

  if w['prefix_lm']:
    memory, memory_valid = model.memory(*fused['prefix_lm'], prefix_valid)
    logits = model.decoder(split['decoder_inputs'], memory, memory_valid,
                           rngs=keys['decoder'], **drop)
    losses['prefix_lm'], metrics['prefix_lm_accuracy'] = token_cross_entropy(
        logits, split['decoder_targets'], split['decoder_weights'])

  if not losses:
    raise ValueError(f'every mPLUG loss weight is 0 ({loss_weights}); enable at least one of '
                     f'{OBJECTIVES}.')
  loss = sum(w[k] * v for k, v in losses.items())
  metrics.update(losses)
  metrics['loss'] = loss
  enqueue_ids = (batch['pair_ids'].astype(jnp.int32) if batch.get('pair_ids') is not None
                 else jnp.full((batch_size,), UNKNOWN_ID, jnp.int32))
  return loss, (metrics, {'image': image_m, 'text': text_m, 'ids': enqueue_ids})


def seq2seq_loss(model, batch: Mapping, rng: jax.Array | None = None, *,
                 deterministic: bool = False) -> tuple[jax.Array, dict]:
  """Finetuning (VQA, captioning): images + encoder tokens -> decoder targets.

  batch: {'images' [B, H, W, C], 'text' [B, T] (the question; [CLS] first),
  'decoder_inputs' / 'decoder_targets' / 'decoder_weights' [B, L]}.
  """
  logits = model(batch['images'], batch['text'], batch['decoder_inputs'],
                 deterministic=deterministic, rngs=rng)
  loss, accuracy = token_cross_entropy(logits, batch['decoder_targets'], batch['decoder_weights'])
  return loss, {'loss': loss, 'token_accuracy': accuracy}


__all__ = ['OBJECTIVES', 'UNKNOWN_ID', 'ema_update', 'enqueue', 'init_queues', 'itc_loss',
           'itm_pairs', 'mlm_mask', 'positives', 'prefix_split', 'pretrain_loss',
           'sample_hard_negatives', 'seq2seq_loss', 'token_cross_entropy']
