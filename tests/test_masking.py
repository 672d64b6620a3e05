"""Span sampling and semi-causal masks: properties (hypothesis) and loop references."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from metalm_jax import masking
from metalm_jax.models.metalm import span_ids_from_starts


@st.composite
def span_problems(draw):
  """(doc_ids [L], ratio, min_len, max_len, max_spans, seed): packed docs + padding tail."""
  doc_lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=6))
  pad = draw(st.integers(0, 10))
  doc_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(doc_lengths)] +
                           [np.zeros(pad, int)]).astype(np.int32)
  min_len = draw(st.integers(1, 6))
  max_len = draw(st.integers(min_len, 12))
  ratio = draw(st.floats(0.0, 0.6))
  max_spans = draw(st.integers(1, 12))
  return doc_ids, ratio, min_len, max_len, max_spans, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None)
@given(span_problems())
def test_sample_spans_properties(problem):
  doc_ids, ratio, min_len, max_len, max_spans, seed = problem
  kw = dict(ratio=ratio, min_len=min_len, max_len=max_len, max_spans=max_spans)
  starts, lengths = masking.sample_spans(doc_ids, np.random.default_rng(seed), **kw)
  assert starts.shape == lengths.shape == (max_spans,)
  assert starts.dtype == lengths.dtype == np.int32
  used = lengths > 0
  # Used slots first, sorted by start; unused slots are (0, 0).
  assert not np.any(used[1:] & ~used[:-1])
  assert np.all(starts[~used] == 0)
  assert np.all(np.diff(starts[used]) > 0)
  covered = np.zeros(len(doc_ids), int)
  for s, n in zip(starts[used], lengths[used]):
    assert min_len <= n <= max_len
    span_docs = doc_ids[s:s + n]
    assert len(span_docs) == n, 'span runs past the row'
    assert span_docs[0] != 0 and np.all(span_docs == span_docs[0]), 'crosses a document'
    covered[s:s + n] += 1
  assert covered.max(initial=0) <= 1, 'spans overlap'
  target = round(ratio * int((doc_ids != 0).sum()))
  total = int(covered.sum())
  assert total <= target + min_len - 1 or (target == 0 and total == 0)
  if total < target:  # stopped early: only for a reason
    free = (doc_ids != 0) & (covered == 0)
    no_room = masking.free_run_lengths(doc_ids, free).max(initial=0) < min_len
    assert used.sum() == max_spans or no_room
  again = masking.sample_spans(doc_ids, np.random.default_rng(seed), **kw)
  np.testing.assert_array_equal(again[0], starts)
  np.testing.assert_array_equal(again[1], lengths)


def test_coverage_near_ratio_on_long_documents():
  """Paper settings scaled to L=128 (lengths 4-8, 25%): coverage averages 25% +- 2%."""
  rng = np.random.default_rng(0)
  settings_ = masking.default_span_settings(128)
  assert settings_ == dict(ratio=0.25, min_len=4, max_len=8, max_spans=8)
  assert masking.default_span_settings(2048)['min_len'] == 64
  assert masking.default_span_settings(2048)['max_len'] == 128
  fractions = []
  for _ in range(200):
    cuts = np.sort(rng.choice(np.arange(20, 110), size=2, replace=False))
    doc_ids = np.searchsorted(cuts, np.arange(128), side='right') + 1
    starts, lengths = masking.sample_spans(doc_ids, rng, **settings_)
    fractions.append(lengths.sum() / 128)
  assert abs(np.mean(fractions) - 0.25) < 0.02


def test_free_run_lengths_matches_loop():
  rng = np.random.default_rng(1)
  for _ in range(50):
    doc_ids = np.sort(rng.integers(0, 4, 30))
    free = rng.random(30) < 0.7
    expected = np.zeros(30, int)
    for i in range(30):
      j = i
      while j < 30 and free[j] and doc_ids[j] == doc_ids[i]:
        j += 1
      expected[i] = j - i
    np.testing.assert_array_equal(masking.free_run_lengths(doc_ids, free), expected)


def _random_layout(rng, length=23, max_spans=4):
  doc_ids = np.ones(length, np.int32)
  starts, lengths = masking.sample_spans(doc_ids, rng, ratio=0.4, min_len=1, max_len=6,
                                         max_spans=max_spans)
  return starts, lengths, masking.span_ids_from_spans(starts, lengths, length)


def test_semi_causal_mask_equals_definition():
  rng = np.random.default_rng(2)
  layouts = [_random_layout(rng) for _ in range(12)]
  span_ids = np.stack([ids for *_, ids in layouts])
  mask = np.asarray(masking.semi_causal_mask(span_ids))
  assert mask.shape == (12, 1, 23, 23) and mask.dtype == bool
  for b in range(12):
    for i in range(23):
      for j in range(23):
        same_span = span_ids[b, i] != 0 and span_ids[b, i] == span_ids[b, j]
        assert mask[b, 0, i, j] == (j <= i or same_span), (b, i, j)


def test_span_loss_weights_keep_causal_and_last_span_position():
  rng = np.random.default_rng(3)
  for _ in range(20):
    starts, lengths, span_ids = _random_layout(rng)
    weights = np.asarray(masking.span_loss_weights(span_ids[None]))[0]
    expected = np.ones(23)
    for s, n in zip(starts[lengths > 0], lengths[lengths > 0]):
      expected[s:s + n - 1] = 0.0  # inside the span, except its last position
    np.testing.assert_array_equal(weights, expected)


def test_span_ids_numpy_and_jnp_agree():
  rng = np.random.default_rng(4)
  layouts = [_random_layout(rng) for _ in range(6)]
  starts = np.stack([s for s, _, _ in layouts])
  lengths = np.stack([n for _, n, _ in layouts])
  expected = np.stack([ids for *_, ids in layouts])
  np.testing.assert_array_equal(span_ids_from_starts(starts, lengths, 23), expected)


@pytest.mark.parametrize('bad, match', [
    (dict(ratio=1.0), 'ratio'), (dict(min_len=0), 'min_len'), (dict(min_len=5, max_len=4), 'min_len'),
    (dict(max_spans=0), 'max_spans')])
def test_sample_spans_rejects_bad_settings(bad, match):
  kw = {**dict(ratio=0.25, min_len=2, max_len=4, max_spans=4), **bad}
  with pytest.raises(ValueError, match=match):
    masking.sample_spans(np.ones(10, np.int32), np.random.default_rng(0), **kw)
