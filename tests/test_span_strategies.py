"""Span selection strategies of the semi-causal objective (config.spans.strategy).

The shared guarantees are tested over every strategy in tests/test_masking.py (the same
adversarial layouts); here: 'random' is the original sampler draw for draw, what each other
strategy is for, the unigram table, the config key, the prepare and the no-leak property.
"""
import json
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from metalm_jax import config as config_lib
from metalm_jax import masking
from metalm_jax.data import unigram
from metalm_jax.objectives import semi_causal_lm
from tests.test_masking import span_problems


# ---------------------------------------------------------------- 'random' is unchanged
def _original_sample_spans(doc_ids: np.ndarray, rng: np.random.Generator, *, ratio: float,
                 min_len: int, max_len: int, max_spans: int) -> tuple[np.ndarray, np.ndarray]:
  """masking.sample_spans before strategies existed (frozen copy, commit c870820)."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f'ratio={ratio} must be in [0, 1).')
  if not 1 <= min_len <= max_len:
    raise ValueError(f'need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}.')
  if max_spans < 1:
    raise ValueError(f'max_spans={max_spans} must be >= 1.')
  doc_ids = np.asarray(doc_ids)
  free = doc_ids != 0
  target = int(round(ratio * int(free.sum())))
  covered, spans = 0, []
  while len(spans) < max_spans and target - covered > 0:
    runs = masking.free_run_lengths(doc_ids, free)
    room = int(runs.max(initial=0))  # the longest free stretch inside one document
    if room < min_len:
      break
    length = min(int(rng.integers(min_len, max_len + 1)), room)
    remaining = target - covered
    if remaining >= min_len:
      length = min(length, remaining)
      if 0 < remaining - length < min_len:  # a remainder no span could fill exactly
        if remaining <= min(max_len, room):
          length = remaining
        elif remaining - min_len >= min_len:
          length = remaining - min_len
    else:
      length = min_len
    start = int(rng.choice(np.flatnonzero(runs >= length)))
    free[start:start + length] = False
    spans.append((start, length))
    covered += length
  starts = np.zeros(max_spans, np.int32)
  lengths = np.zeros(max_spans, np.int32)
  for m, (start, length) in enumerate(sorted(spans)):
    starts[m], lengths[m] = start, length
  return starts, lengths




@settings(max_examples=200, deadline=None)
@given(problem=span_problems())
def test_random_strategy_is_the_original_sampler_draw_for_draw(problem):
  doc_ids, ratio, min_len, max_len, max_spans, seed = problem
  kw = dict(ratio=ratio, min_len=min_len, max_len=max_len, max_spans=max_spans)
  old_rng, new_rng = np.random.default_rng(seed), np.random.default_rng(seed)
  expected = _original_sample_spans(doc_ids, old_rng, **kw)
  for got in (masking.sample_spans(doc_ids, new_rng, **kw),
              masking.sample_spans(doc_ids, np.random.default_rng(seed), strategy='random',
                                   **kw)):
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
  # ... and leaves the generator in the same state (the next row's draws are unchanged).
  assert new_rng.integers(1 << 30) == old_rng.integers(1 << 30)


def test_random_prepare_is_the_original_prepare():
  """The registered prepare and make_prepare() (no strategy) give the old spans."""
  rng = np.random.default_rng(0)
  for trial in range(30):
    cuts = np.sort(rng.choice(np.arange(5, 120), size=3, replace=False))
    seg = (np.searchsorted(cuts, np.arange(128), side='right') + 1).astype(np.int32)
    seg[cuts[-1]:] = 0
    row = dict(inputs=rng.integers(3, 500, 128).astype(np.int32), segment_ids=seg)
    expected = _original_sample_spans(seg, np.random.default_rng(trial),
                                      **masking.default_span_settings(128))
    for prepare in (semi_causal_lm.prepare, semi_causal_lm.make_prepare()):
      out = prepare(row, np.random.default_rng(trial))
      np.testing.assert_array_equal(out['span_starts'], expected[0])
      np.testing.assert_array_equal(out['span_lengths'], expected[1])


# ---------------------------------------------------------------- length_aware
def _docs(lengths, pad=0):
  ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])
  return ids.astype(np.int32)


def _mean_length_by_document(doc_ids, strategy, rows=300, **kw):
  out = {d: [] for d in np.unique(doc_ids[doc_ids > 0])}
  rng = np.random.default_rng(0)
  for _ in range(rows):
    starts, lengths = masking.sample_spans(doc_ids, rng, strategy=strategy, **kw)
    for s, n in zip(starts[lengths > 0], lengths[lengths > 0]):
      out[doc_ids[s]].append(n)
  return {d: np.mean(v) for d, v in out.items()}


def test_length_aware_gives_longer_documents_longer_spans():
  """Documents of 16, 48 and 120 tokens in a 2048-token row... scaled: L=192, lengths 4-12.
  length_aware: the mean span length grows with the document; random: it does not (the
  16-token document's spans are as long as it allows)."""
  doc_ids = _docs([24, 48, 120])
  kw = dict(ratio=0.25, min_len=4, max_len=12, max_spans=16)
  aware = _mean_length_by_document(doc_ids, 'length_aware', **kw)
  assert aware[1] < aware[2] < aware[3]
  assert aware[3] - aware[1] > 3  # 120/192 vs 24/192 of the 8 extra tokens: ~4 tokens apart
  rand = _mean_length_by_document(doc_ids, 'random', **kw)
  assert abs(rand[3] - rand[1]) < 1.5


def test_length_aware_draws_scale_with_the_document_share():
  """A document filling the row draws lengths near max_len; a short one near min_len."""
  kw = dict(ratio=0.3, min_len=2, max_len=10, max_spans=64)
  whole = _mean_length_by_document(np.ones(256, np.int32), 'length_aware', rows=100, **kw)
  assert whole[1] > 9
  short = _mean_length_by_document(_docs([16] * 16), 'length_aware', rows=100, **kw)
  assert max(short.values()) < 3


# ---------------------------------------------------------------- saliency
def _zipf_row(rng, length=256, vocab=400):
  """Token ids with a Zipf-like frequency table (ids 3.. ; small ids common)."""
  ranks = np.arange(1, vocab - 2)
  p = 1.0 / ranks
  p /= p.sum()
  return 3 + rng.choice(vocab - 3, size=length, p=p), p


def test_saliency_spans_cover_rare_tokens_far_more_often_than_random():
  rng = np.random.default_rng(0)
  vocab = 400
  counts = np.zeros(vocab, np.int64)
  ids, p = _zipf_row(rng, 200_000, vocab)
  counts += np.bincount(ids, minlength=vocab)
  table = masking.unigram_scores(counts)
  # The rarest ~3% of token occurrences (~8 a row: fewer than the ~10 spans, so spans
  # centred on them can hold them all; each span holds one or two at most).
  rare = table > np.quantile(table[ids], 0.97)
  kw = dict(ratio=0.25, min_len=4, max_len=8, max_spans=16)
  doc_ids = _docs([100, 156])
  hits = {'random': [], 'saliency': []}
  coverage = {'random': [], 'saliency': []}
  for trial in range(100):
    row, _ = _zipf_row(np.random.default_rng(trial + 1), 256, vocab)
    scores = masking.saliency_scores(row, table)
    for strategy in hits:
      starts, lengths = masking.sample_spans(doc_ids, np.random.default_rng(trial),
                                             strategy=strategy, scores=scores, **kw)
      inside = masking.span_ids_from_spans(starts, lengths, 256) > 0
      hits[strategy].append(rare[row][inside].sum() / max(rare[row].sum(), 1))
      coverage[strategy].append(inside.mean())
  assert np.mean(coverage['saliency']) == pytest.approx(np.mean(coverage['random']), abs=0.01)
  # Random spans hold ~25% of the rare occurrences (the coverage); saliency far more.
  assert np.mean(hits['random']) < 0.35
  # Measured: random 0.21, saliency 0.77 at the default temperature 0.25.
  assert np.mean(hits['saliency']) > 3 * np.mean(hits['random'])


def test_saliency_centres_follow_the_scores_and_the_temperature():
  """One sharp peak: at a low temperature every first span holds it; spans never cross
  documents even when the peak sits at a document's edge."""
  doc_ids = _docs([30, 30], pad=4)
  for peak in (0, 29, 30, 45, 59):
    scores = np.zeros(64)
    scores[peak] = 50.0
    for seed in range(10):
      starts, lengths = masking.sample_spans(doc_ids, np.random.default_rng(seed),
                                             ratio=0.1, min_len=3, max_len=5, max_spans=4,
                                             strategy='saliency', scores=scores,
                                             temperature=0.1)
      ids = masking.span_ids_from_spans(starts, lengths, 64)
      assert ids[peak] > 0
  # A high temperature spreads the centres: the peak is covered far less often.
  covered = 0
  for seed in range(50):
    starts, lengths = masking.sample_spans(doc_ids, np.random.default_rng(seed), ratio=0.1,
                                           min_len=3, max_len=3, max_spans=4,
                                           strategy='saliency', scores=scores,
                                           temperature=1e6)
    covered += masking.span_ids_from_spans(starts, lengths, 64)[59] > 0
  assert covered < 25


def test_saliency_needs_well_formed_scores():
  kw = dict(ratio=0.25, min_len=2, max_len=4, max_spans=4, strategy='saliency')
  with pytest.raises(ValueError, match='needs scores'):
    masking.sample_spans(np.ones(10, np.int32), np.random.default_rng(0), **kw)
  with pytest.raises(ValueError, match='one score per position'):
    masking.sample_spans(np.ones(10, np.int32), np.random.default_rng(0), scores=np.ones(9),
                         **kw)
  with pytest.raises(ValueError, match='temperature'):
    masking.sample_spans(np.ones(10, np.int32), np.random.default_rng(0), scores=np.ones(10),
                         temperature=0.0, **kw)
  with pytest.raises(ValueError, match="strategy='nope' is not a span strategy"):
    masking.sample_spans(np.ones(10, np.int32), np.random.default_rng(0), ratio=0.2,
                         min_len=2, max_len=4, max_spans=4, strategy='nope')


def test_unigram_scores_and_counts():
  counts = unigram.count_tokens([np.array([1, 2, 2, 5]), np.array([2, 5])], 6)
  np.testing.assert_array_equal(counts, [0, 1, 3, 0, 0, 2])
  table = masking.unigram_scores(counts)
  assert table.shape == (6,) and table.dtype == np.float32
  # -log((c + 1) / (N + V)): rarer scores higher; unseen ids highest.
  np.testing.assert_allclose(table, -np.log((counts + 1) / (6 + 6)), rtol=1e-6)
  assert table[2] < table[5] < table[1] < table[0] == table[3]
  np.testing.assert_allclose(masking.saliency_scores(np.array([2, 9]), table),
                             [table[2], table.max()])
  with pytest.raises(ValueError, match='outside'):
    unigram.count_tokens([np.array([6])], 6)


# ---------------------------------------------------------------- prepare and config
def test_make_prepare_with_a_strategy_keeps_settings_and_pickles():
  table = masking.unigram_scores(np.arange(50))
  for strategy in masking.SPAN_STRATEGIES:
    prepare = semi_causal_lm.make_prepare(strategy=strategy, score_table=table,
                                          max_span_len=8)
    assert semi_causal_lm.span_settings(prepare, 128) == masking.default_span_settings(128)
    row = dict(inputs=np.arange(128, dtype=np.int32) % 50,
               segment_ids=np.r_[np.ones(100), np.zeros(28)].astype(np.int32))
    out = pickle.loads(pickle.dumps(prepare))(row, np.random.default_rng(3))
    again = prepare(row, np.random.default_rng(3))
    np.testing.assert_array_equal(out['span_ids'], again['span_ids'])
    assert out['span_lengths'].sum() == 25  # round(0.25 * 100)
  with pytest.raises(ValueError, match='needs score_table'):
    semi_causal_lm.make_prepare(strategy='saliency')
  with pytest.raises(ValueError, match='not a span strategy'):
    semi_causal_lm.make_prepare(strategy='salient')


def _metalm_config(spans='random'):
  return config_lib.config_module('metalm_lm').get_config(f'size=test,spans={spans}')


def test_config_key_selects_and_validates_the_strategy():
  for strategy in masking.SPAN_STRATEGIES:
    assert _metalm_config(strategy).spans.strategy == strategy
  config = _metalm_config()
  with config.unlocked():
    config.spans.strategy = 'rare_tokens'
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  for part in ("config.spans.strategy='rare_tokens'", "'length_aware'", "'saliency'",
               '--config.spans.strategy='):
    assert part in str(e.value), part
  with config.unlocked():
    config.spans.strategy = 'saliency'
    config.spans.temperature = 0.0
  with pytest.raises(config_lib.ConfigError, match='config.spans.temperature=0.0'):
    config_lib.validate(config)
  # A non-default strategy where no spans are sampled is an error, not ignored.
  decoder = config_lib.config_module('decoder_lm').get_config('size=test')
  with decoder.unlocked():
    decoder.spans.strategy = 'length_aware'
  with pytest.raises(config_lib.ConfigError, match="only read by objective 'semi_causal_lm'"):
    config_lib.validate(decoder)
  with pytest.raises(ValueError, match='spans='):
    config_lib.config_module('metalm_lm').get_config('size=test,spans=rare')


# ---------------------------------------------------------------- no leak, every strategy
@pytest.mark.parametrize('strategy', masking.SPAN_STRATEGIES)
def test_scored_predictions_never_see_their_target(strategy):
  """Semi-causal no-leak, whatever the spans: a prediction the loss counts (weight 1) at
  position i does not change when input i + 1 (its target) changes."""
  from tests import test_metalm as tm

  model = tm.cached('dual')
  prepare = semi_causal_lm.make_prepare(ratio=0.3, min_len=2, max_len=4, max_spans=8,
                                        strategy=strategy,
                                        score_table=masking.unigram_scores(
                                            np.arange(tm.VOCAB)[::-1]))
  rng = np.random.default_rng(7)
  seg = np.r_[np.ones(25), np.full(34, 2), np.zeros(5)].astype(np.int32)
  tokens = rng.integers(3, tm.VOCAB, tm.L + 1).astype(np.int32)
  row = dict(inputs=tokens[:-1], targets=tokens[1:], segment_ids=seg,
             positions=np.r_[np.arange(25), np.arange(34), np.zeros(5)].astype(np.int32),
             weights=(seg > 0).astype(np.float32))
  row = prepare(row, np.random.default_rng(1))
  assert row['span_lengths'].sum() > 0
  n = tm.L - 1
  batch = {k: jnp.asarray(np.repeat(v[None], n, axis=0)) for k, v in row.items()}
  changed = np.repeat(row['inputs'][None], n, axis=0)
  changed[np.arange(n), np.arange(1, n + 1)] = (changed[np.arange(n), np.arange(1, n + 1)]
                                                + 1) % tm.VOCAB
  base = np.asarray(tm.forward(model, batch))
  new = np.asarray(tm.forward(model, dict(batch, inputs=jnp.asarray(changed))))
  weights = np.asarray(masking.span_loss_weights(row['span_ids'])) * row['weights']
  scored = np.flatnonzero(weights[:n] > 0)
  assert scored.size > 30
  for i in scored:
    np.testing.assert_allclose(new[i, i], base[i, i], atol=1e-5, err_msg=f'position {i}')


# ---------------------------------------------------------------- the table from real data
def test_unigram_counts_of_the_train_split_are_cached_and_feed_the_family(pydoc_data_dir):
  from metalm_jax import families
  from metalm_jax.data import tokenizers

  tokenizer = tokenizers.get_tokenizer('sentencepiece', dataset='pydoc_topics',
                                       data_dir=pydoc_data_dir, vocab_size=512)
  path = unigram.cache_path(tokenizer, 'pydoc_topics', 'train', pydoc_data_dir)
  assert path.endswith('tokenizers/pydoc_topics_sp512.pydoc_topics_train.unigram.npy')
  counts = unigram.unigram_counts('pydoc_topics', tokenizer, data_dir=pydoc_data_dir)
  assert counts.shape == (512,) and counts.dtype == np.int64
  assert counts[tokenizer.bos_id] == counts[tokenizer.eos_id] > 0  # one each per document
  np.testing.assert_array_equal(np.load(path), counts)
  np.save(path, counts + 1)  # the cache is what is read next time
  np.testing.assert_array_equal(unigram.unigram_counts('pydoc_topics', tokenizer,
                                                       data_dir=pydoc_data_dir), counts + 1)
  np.save(path, counts)
  # config.spans.strategy='saliency' on the lm family: its training prepare uses the table.
  config = _metalm_config('saliency')
  with config.unlocked():
    config.data.data_dir = pydoc_data_dir
    config.data.vocab_size = 512
  family = families.build(config)
  prepare = family.prepare
  assert prepare.keywords['strategy'] == 'saliency'
  np.testing.assert_allclose(prepare.keywords['score_table'], masking.unigram_scores(counts))
  assert family.objective.prepare is semi_causal_lm.prepare  # held-out rows: random spans
  assert families.build(_metalm_config('random')).prepare is semi_causal_lm.prepare
  # The training batches carry saliency spans: they hold nearly all of the batch's rarest
  # tokens (measured 0.96; random spans hold ~their coverage, 0.25: measured 0.27).
  batch = next(iter(family.train_dataset(batch_size=8, process_index=0, process_count=1)))
  scores = masking.unigram_scores(counts)[batch['inputs']]
  inside, real = batch['span_ids'] > 0, batch['segment_ids'] > 0
  rare = real & (scores > np.quantile(scores[real], 0.95))
  assert (rare & inside).sum() / rare.sum() > 0.6


@pytest.mark.slow
def test_metalm_trains_with_saliency_spans(pydoc_data_dir, tmp_path):
  """configs/metalm_lm.py:spans=saliency trains (2 steps) end to end: the table is counted,
  the grain pipeline runs the saliency prepare, the loss sees ~25% of tokens in spans."""
  from metalm_jax.train import trainer

  config = config_lib.config_module('metalm_lm').get_config('size=test,spans=saliency')
  with config.unlocked():
    config.data.data_dir = pydoc_data_dir
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    config.log_every_steps = 1
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 2 and np.isfinite(result['train_loss'])
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  fractions = [r['span_fraction'] for r in rows if 'span_fraction' in r]
  assert fractions and all(0.2 < f <= 0.3 for f in fractions), fractions


# ---------------------------------------------------------------- vision-language prefixes
@pytest.mark.parametrize('strategy', masking.SPAN_STRATEGIES)
def test_vl_prefix_leaves_a_target_for_every_text_length(strategy):
  """Adversarial lengths (empty, one token, two, long): the prefix is in [0, n - 1], so the
  decoder always has a token to predict; 'random' is the draw vl_prepare always made."""
  for n in (0, 1, 2, 3, 5, 17, 64):
    rng, same = np.random.default_rng(n), np.random.default_rng(n)
    scores = np.random.default_rng(100 + n).random(max(n, 1))
    for _ in range(200):
      p = masking.prefix_length(n, rng, strategy=strategy, scores=scores)
      assert 0 <= p <= max(n - 1, 0), (n, p)
      if strategy == 'random':
        assert p == int(same.integers(0, max(n, 1)))


def test_vl_length_aware_prefix_is_a_fraction_of_the_text():
  rng = np.random.default_rng(0)
  for n in (9, 41, 201):
    draws = np.array([masking.prefix_length(n, rng, strategy='length_aware') for _ in range(400)])
    assert draws.min() >= round(0.25 * (n - 1)) - 1 and draws.max() <= round(0.75 * (n - 1)) + 1
    assert abs(draws.mean() / (n - 1) - 0.5) < 0.05


def test_vl_saliency_prefix_ends_after_the_rare_token():
  rng = np.random.default_rng(0)
  for n, rare in ((12, 4), (12, 0), (12, 11), (2, 1)):
    scores = np.zeros(n)
    scores[rare] = 3.0
    draws = [masking.prefix_length(n, rng, strategy='saliency', scores=scores, temperature=0.25)
             for _ in range(200)]
    assert np.mean(np.array(draws) == min(rare + 1, n - 1)) > 0.9, (n, rare)
  with pytest.raises(ValueError, match='needs scores'):
    masking.prefix_length(5, rng, strategy='saliency')
  with pytest.raises(ValueError, match='not a span strategy'):
    semi_causal_lm.make_vl_prepare(strategy='rare')


def test_metalm_vl_pretraining_rows_follow_the_strategy(family_data_dir):
  """The metalm_vl family reads config.spans.strategy for semi_causal_vl: saliency scores
  from the training rows' text; the held-out rows keep the objective's random prefix."""
  from metalm_jax import families
  from tests.conftest import runlocal_config

  config = runlocal_config('metalm_vl', 'size=test,spans=saliency', family_data_dir)
  family = families.build(config)
  prepare = family.prepare
  assert prepare.keywords['strategy'] == 'saliency'
  table = prepare.keywords['score_table']
  assert table.shape == (family.tokenizer.vocab_size,) and table.max() > table.min()
  batch = next(iter(family.train_dataset(batch_size=4, process_index=0, process_count=1)))
  assert ((batch['prefix_length'] >= 0) & (batch['prefix_length'] < batch['text_length'])).all()
  causal = runlocal_config('metalm_vl', 'size=test,model=causal', family_data_dir,
                           **{'spans.strategy': 'saliency'})
  with pytest.raises(config_lib.ConfigError, match="'semi_causal_vl' in family 'metalm_vl'"):
    config_lib.validate(causal)
