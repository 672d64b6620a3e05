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
                                                          max_spans=8, max_span_len=8))

Which spans. `config.spans.strategy` (`masking.SPAN_STRATEGIES`) picks how spans are chosen,
with the same settings and guarantees: 'random' (the default: uniform lengths and starts),
'length_aware' (longer documents get longer spans) or 'saliency' (spans centred on rare
tokens: -log unigram frequency of the training split, `data.unigram`; temperature
`config.spans.temperature`). The lm family builds `make_prepare(strategy=...)` for it;
`make_prepare(strategy=..., score_table=...)` does the same by hand.

Span capacity. A dual-mode MetaLM encodes each span in a static buffer of
`config.model.max_span_len` tokens; a longer span would be cut short there while the mask
and the loss still treat all of it as encoded. So a sampler whose spans can be longer than
the capacity is an error before any row is drawn:
  * `check_span_capacity(max_len, max_span_len)`: the check itself (a ValueError naming
    both keys and the fix);
  * `check_model_capacity(prepare, seq_len=..., model=config.model)`: what a trainer calls
    before training; it reads the longest span `prepare` can sample at that row length
    (`span_settings`) and checks it against the model (dual-mode METALM only);
  * `make_prepare(..., max_span_len=C)`: checks when it is built (and, for settings that
    depend on the row length, on every row);
  * `default_loss` (the registered 'semi_causal_lm' loss) checks the L-relative defaults
    against the model when it is traced.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from metalm_jax import masking
from metalm_jax import objectives
from metalm_jax.objectives.causal_lm import weighted_cross_entropy


def check_span_capacity(max_len: int, max_span_len: int, *, seq_len: int | None = None) -> None:
  """Raises ValueError if spans of up to `max_len` tokens do not fit a span capacity of
  `max_span_len` (a dual-mode MetaLM's `config.model.max_span_len`)."""
  if max_len > max_span_len:
    at = f' at seq_len={seq_len}' if seq_len is not None else ''
    raise ValueError(
        f'semi_causal_lm samples spans of up to max_len={max_len} tokens{at} but '
        f'config.model.max_span_len={max_span_len}: the encoder would see only the first '
        f'{max_span_len} tokens of a longer span while the mask and loss count all of it as '
        f'encoded. Raise config.model.max_span_len to >= {max_len} (and '
        f'config.model.text_encoder.max_len to >= {max_len + 1}), or sample shorter spans '
        f'(semi_causal_lm.make_prepare(max_len={max_span_len}, ...)).')


def _settings(length: int, given: dict) -> dict:
  settings = masking.default_span_settings(length)
  settings.update({k: v for k, v in given.items() if v is not None})
  return settings


def _prepare(row: dict, rng: np.random.Generator, *, ratio: float | None = None,
             min_len: int | None = None, max_len: int | None = None,
             max_spans: int | None = None, max_span_len: int | None = None,
             strategy: str = 'random', score_table: np.ndarray | None = None,
             temperature: float = 0.25) -> dict:
  length = row['inputs'].shape[0]
  settings = _settings(length, dict(ratio=ratio, min_len=min_len, max_len=max_len,
                                    max_spans=max_spans))
  if max_span_len is not None:
    check_span_capacity(settings['max_len'], max_span_len, seq_len=length)
  scores = None
  if strategy == 'saliency':
    scores = masking.saliency_scores(row['inputs'], score_table)
  starts, lengths = masking.sample_spans(row['segment_ids'], rng, strategy=strategy,
                                         scores=scores, temperature=temperature, **settings)
  return dict(row, span_ids=masking.span_ids_from_spans(starts, lengths, length),
              span_starts=starts, span_lengths=lengths)


def prepare(row: dict, rng: np.random.Generator) -> dict:
  """Adds span_ids [L], span_starts [M], span_lengths [M] with the L-relative defaults."""
  return _prepare(row, rng)


def make_prepare(*, ratio: float | None = None, min_len: int | None = None,
                 max_len: int | None = None, max_spans: int | None = None,
                 max_span_len: int | None = None, strategy: str = 'random',
                 score_table: np.ndarray | None = None, temperature: float = 0.25):
  """A picklable `prepare(row, rng)` with fixed span settings (None = the L-relative default).

  max_span_len: the model's span capacity (`config.model.max_span_len`). When given, spans
    that could be longer are an error: now if `max_len` is given, else on the first row (the
    default max_len is L / 16).
  strategy: which spans (`masking.SPAN_STRATEGIES`, `config.spans.strategy`): 'random'
    (the default, as `prepare`), 'length_aware' or 'saliency'.
  score_table: 'saliency' only, float [V]: token id -> saliency, e.g.
    `masking.unigram_scores(counts)` of `data.unigram.unigram_counts` (-log frequency). A row's
    scores are score_table[row['inputs']]. Extension point: per-token losses of a model (or
    any higher-is-salient score) can replace it by calling `masking.sample_spans(...,
    strategy='saliency', scores=...)` from a prepare of your own.
  temperature: 'saliency' only, > 0 (centres drawn with probability ~ exp(score / T)).
  """
  if strategy not in masking.SPAN_STRATEGIES:
    raise ValueError(f'strategy={strategy!r} is not a span strategy; valid: '
                     f'{list(masking.SPAN_STRATEGIES)}.')
  if strategy == 'saliency' and score_table is None:
    raise ValueError("strategy='saliency' needs score_table (float [V], e.g. "
                     'masking.unigram_scores(data.unigram.unigram_counts(...))).')
  if not temperature > 0:
    raise ValueError(f'temperature={temperature} must be > 0.')
  if max_span_len is not None and max_len is not None:
    check_span_capacity(max_len, max_span_len)
  extra = {}
  if strategy != 'random':  # the random prepare keeps its old keywords
    extra = dict(strategy=strategy, score_table=score_table, temperature=temperature)
  return functools.partial(_prepare, ratio=ratio, min_len=min_len, max_len=max_len,
                           max_spans=max_spans, max_span_len=max_span_len, **extra)


def span_settings(prepare_fn, seq_len: int) -> dict | None:
  """The span settings (ratio, min_len, max_len, max_spans) that `prepare_fn` samples with
  at row length `seq_len`: for `prepare` and `make_prepare(...)` results; None for any
  other function (an objective that samples no semi-causal spans)."""
  if prepare_fn is prepare:
    return masking.default_span_settings(seq_len)
  if isinstance(prepare_fn, functools.partial) and prepare_fn.func is _prepare:
    given = {k: v for k, v in prepare_fn.keywords.items()
             if k in ('ratio', 'min_len', 'max_len', 'max_spans')}
    return _settings(seq_len, given)
  return None


# MetaLM's own default span capacity (models.metalm.MetaLM, max_span_len=8), used when a
# model config leaves the key out.
_METALM_DEFAULT_MAX_SPAN_LEN = 8


def check_model_capacity(prepare_fn, *, seq_len: int, model) -> None:
  """For the trainer, before training: the spans `prepare_fn` samples at `seq_len` must fit
  the model's span capacity.

  Args:
    prepare_fn: the objective's prepare (`objectives.get(name).prepare`; may be None).
    seq_len: the row length L (`config.data.seq_len`).
    model: `config.model` (a mapping). Only a METALM in mode 'dual' encodes spans in a
      fixed buffer; any other model, or a prepare that samples no spans, passes.

  Raises:
    ValueError from `check_span_capacity`.
  """
  model = dict(model)
  if model.get('name') != 'metalm' or model.get('mode', 'dual') != 'dual':
    return
  settings = span_settings(prepare_fn, seq_len)
  if settings is None:
    return
  check_span_capacity(settings['max_len'],
                      model.get('max_span_len', _METALM_DEFAULT_MAX_SPAN_LEN), seq_len=seq_len)


def loss(model, batch, *, deterministic: bool = True, rng=None):
  """Semi-causal next-token loss of a MetaLM on a prepared batch.

  Returns (loss, metrics) as `causal_lm.weighted_cross_entropy`, plus 'span_fraction'
  (the fraction of real tokens inside spans).
  """
  mode = getattr(model, 'mode', 'causal')
  logits, _ = model(batch['inputs'], positions=batch['positions'],
                    segment_ids=batch['segment_ids'], span_ids=batch['span_ids'],
                    span_starts=batch['span_starts'], span_lengths=batch['span_lengths'],
                    images=batch.get('images'), deterministic=deterministic, rngs=rng,
                    **({'span_encoder_ids': batch['span_encoder_ids']}
                       if 'span_encoder_ids' in batch else {}))
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
  if getattr(model, 'mode', None) == 'dual':
    seq_len = batch['inputs'].shape[1]
    check_span_capacity(masking.default_span_settings(seq_len)['max_len'], model.max_span_len,
                        seq_len=seq_len)
  return loss(model, batch, deterministic=deterministic, rng=rng)


# ---------------------------------------------------------------- vision-language
def vl_loss(model, batch, *, deterministic: bool = True, rng=None):
  """Semi-causal loss on image-first `digits_vl` rows (data.vl_pipeline format).

  `batch['prefix_length']` [B] text tokens join the last image's span (the encoder sees
  images + prefix bidirectionally); in NLVR2 rows (`pair_length` > 0) the first
  pair_length of them join image 1's span instead, the rest image 2's (`MetaLM.vl_layout`).
  The decoder predicts the rest, scored where `batch['weights']` and
  `masking.span_loss_weights` both allow.
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


def _vl_prepare(row: dict, rng: np.random.Generator, *, strategy: str,
                score_table: np.ndarray | None = None, temperature: float = 0.25) -> dict:
  text_length = int(row['text_length'])
  scores = (masking.saliency_scores(row['inputs'][:text_length], score_table)
            if strategy == 'saliency' else None)
  prefix = masking.prefix_length(text_length, rng, strategy=strategy, scores=scores,
                                 temperature=temperature)
  return dict(row, prefix_length=np.int32(prefix),
              weights=(row['segment_ids'] > 0).astype(np.float32))


def make_vl_prepare(*, strategy: str = 'random', score_table: np.ndarray | None = None,
                    temperature: float = 0.25):
  """A picklable VL pretraining `prepare` whose text prefix follows `strategy`
  (`masking.prefix_length`; 'random' is `vl_prepare` itself). 'saliency' needs score_table
  float [V] (e.g. `masking.unigram_scores` of the training rows' token counts)."""
  if strategy == 'random':
    return vl_prepare
  if strategy not in masking.SPAN_STRATEGIES:
    raise ValueError(f'strategy={strategy!r} is not a span strategy; valid: '
                     f'{list(masking.SPAN_STRATEGIES)}.')
  if strategy == 'saliency' and score_table is None:
    raise ValueError("strategy='saliency' needs score_table (float [V]).")
  if not temperature > 0:
    raise ValueError(f'temperature={temperature} must be > 0.')
  return functools.partial(_vl_prepare, strategy=strategy, score_table=score_table,
                           temperature=temperature)


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
