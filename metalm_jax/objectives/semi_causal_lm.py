"""Semi-causal language modelling (METALM) on packed batches.

prepare (NumPy, per packed row in grain): samples non-causal spans inside documents
(`segment_ids` are the document ids; padding is never covered) and adds
    span_ids      int32 [L]  0 = causal, m + 1 = inside span m
    span_starts   int32 [M]  first position of span m (0 for unused slots)
    span_lengths  int32 [M]  its length (0 = unused slot)
with M = max_spans fixed, so batches never change shape. The default settings scale with
the row length L (`masking.default_span_settings`: 25% of tokens, spans of L/32..L/16
tokens, the paper's 64-128 at L = 2048); `make_prepare(...)` builds other settings.

loss (JAX): runs the model with the spans and takes next-token cross-entropy on causal
positions plus each span's last position (`masking.span_loss_weights`); batches may also
carry `images` [B, M, H, W, K] (vision-language spans). A model with mode='causal' (the
baseline) is trained on every position, so it sees the same data with the plain LM loss.

  config.objective = 'semi_causal_lm'
  objectives.register('my_scl', loss=semi_causal_lm.loss,
                      prepare=semi_causal_lm.make_prepare(ratio=0.15, min_len=3, max_len=6,
                                                          max_spans=8))
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from metalm_jax import masking
from metalm_jax import objectives
from metalm_jax.objectives.causal_lm import weighted_cross_entropy


def _prepare(row: dict, rng: np.random.Generator, *, ratio: float | None = None,
             min_len: int | None = None, max_len: int | None = None,
             max_spans: int | None = None) -> dict:
  length = row['inputs'].shape[0]
  settings = masking.default_span_settings(length)
  given = dict(ratio=ratio, min_len=min_len, max_len=max_len, max_spans=max_spans)
  settings.update({k: v for k, v in given.items() if v is not None})
  starts, lengths = masking.sample_spans(row['segment_ids'], rng, **settings)
  return dict(row, span_ids=masking.span_ids_from_spans(starts, lengths, length),
              span_starts=starts, span_lengths=lengths)


def prepare(row: dict, rng: np.random.Generator) -> dict:
  """Adds span_ids [L], span_starts [M], span_lengths [M] with the L-relative defaults."""
  return _prepare(row, rng)


def make_prepare(*, ratio: float | None = None, min_len: int | None = None,
                 max_len: int | None = None, max_spans: int | None = None):
  """A picklable `prepare(row, rng)` with fixed span settings (None = the L-relative default)."""
  return functools.partial(_prepare, ratio=ratio, min_len=min_len, max_len=max_len,
                           max_spans=max_spans)


def loss(model, batch, *, deterministic: bool = True, rng=None):
  """Semi-causal next-token loss of a MetaLM on a prepared batch.

  Returns (loss, metrics) as `causal_lm.weighted_cross_entropy`, plus 'span_fraction'
  (the fraction of real tokens inside spans).
  """
  mode = getattr(model, 'mode', 'causal')
  logits, _ = model(batch['inputs'], positions=batch['positions'],
                    segment_ids=batch['segment_ids'], span_ids=batch['span_ids'],
                    span_starts=batch['span_starts'], span_lengths=batch['span_lengths'],
                    images=batch.get('images'), deterministic=deterministic, rngs=rng)
  weights = batch['weights']
  if mode != 'causal':
    weights = weights * masking.span_loss_weights(batch['span_ids'])
  value, metrics = weighted_cross_entropy(logits, batch['targets'], weights)
  real = (batch['segment_ids'] > 0).astype(jnp.float32)
  metrics['span_fraction'] = ((batch['span_ids'] > 0) * real).sum() / jnp.maximum(real.sum(), 1)
  return value, metrics


def default_loss(model, batch, *, deterministic: bool = True, rng=None):
  """`loss`, after checking (statically) that the model's span capacity holds the
  L-relative default spans that `prepare` samples."""
  seq_len = batch['inputs'].shape[1]
  longest = masking.default_span_settings(seq_len)['max_len']
  if getattr(model, 'mode', None) == 'dual' and longest > model.max_span_len:
    raise ValueError(
        f'semi_causal_lm samples spans of up to {longest} tokens at seq_len={seq_len} but '
        f'config.model.max_span_len={model.max_span_len} (the encoder would cut them); set '
        f'config.model.max_span_len >= {longest}.')
  return loss(model, batch, deterministic=deterministic, rng=rng)


# ---------------------------------------------------------------- vision-language
def vl_loss(model, batch, *, deterministic: bool = True, rng=None):
  """Semi-causal loss on image-first `digits_vl` rows (data.vl_pipeline format).

  `batch['prefix_length']` [B] text tokens join the last image's span (the encoder sees
  images + prefix bidirectionally); the decoder predicts the rest, scored where
  `batch['weights']` and `masking.span_loss_weights` both allow.
  """
  layout = model.vl_layout(batch, batch['prefix_length'])
  return loss(model, layout, deterministic=deterministic, rng=rng)


def vl_prepare(row: dict, rng: np.random.Generator) -> dict:
  """VL pretraining: a random prefix of 0 .. text_length - 1 tokens goes to the encoder;
  every later text token is a target (weights = real text)."""
  text_length = int(row['text_length'])
  prefix = int(rng.integers(0, max(text_length, 1)))
  return dict(row, prefix_length=np.int32(prefix),
              weights=(row['segment_ids'] > 0).astype(np.float32))


def vl_causal_prepare(row: dict, rng: np.random.Generator) -> dict:
  """The causal-only VL baseline: the encoder sees the images alone (prefix 0)."""
  del rng
  return dict(row, prefix_length=np.int32(0),
              weights=(row['segment_ids'] > 0).astype(np.float32))


def vl_finetune_prepare(row: dict, rng: np.random.Generator) -> dict:
  """Finetuning (captioning / VQA): the encoder sees images + the whole prompt; the row's
  own weights (the answer) are kept."""
  del rng
  return dict(row, prefix_length=np.asarray(row['prompt_length'], np.int32))


objectives.register('semi_causal_lm', loss=default_loss, prepare=prepare)
objectives.register('semi_causal_vl', loss=vl_loss, prepare=vl_prepare)
objectives.register('causal_vl', loss=vl_loss, prepare=vl_causal_prepare)
def vl_causal_finetune_prepare(row: dict, rng: np.random.Generator) -> dict:
  """The causal baseline's finetuning: images alone in the encoder (prefix 0); the row's own
  weights (the answer) are kept."""
  del rng
  return dict(row, prefix_length=np.int32(0))


objectives.register('semi_causal_vl_finetune', loss=vl_loss, prepare=vl_finetune_prepare)
objectives.register('causal_vl_finetune', loss=vl_loss, prepare=vl_causal_finetune_prepare)
