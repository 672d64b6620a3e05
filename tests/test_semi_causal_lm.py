"""semi_causal_lm: span capacity is checked before training, never cut silently (issue 21)."""
import inspect

import numpy as np
import pytest

from metalm_jax import masking
from metalm_jax.models.metalm import MetaLM
from metalm_jax.objectives import semi_causal_lm


def _row(length=64):
  return dict(inputs=np.arange(length, dtype=np.int32), segment_ids=np.ones(length, np.int32))


def test_check_span_capacity_names_both_keys_and_the_fix():
  semi_causal_lm.check_span_capacity(8, 8)  # fits
  with pytest.raises(ValueError) as e:
    semi_causal_lm.check_span_capacity(9, 8, seq_len=144)
  message = str(e.value)
  for part in ('max_len=9', 'config.model.max_span_len=8', 'seq_len=144', '>= 9',
               'make_prepare(max_len=8'):
    assert part in message, part


def test_make_prepare_rejects_spans_longer_than_the_capacity():
  with pytest.raises(ValueError, match='config.model.max_span_len=4'):
    semi_causal_lm.make_prepare(min_len=2, max_len=6, max_span_len=4)
  # The default max_len is L / 16: known only per row, so checked there.
  prepare = semi_causal_lm.make_prepare(max_span_len=4)
  prepare(_row(64), np.random.default_rng(0))  # 64 / 16 = 4 fits
  with pytest.raises(ValueError, match='max_len=8 .* at seq_len=128'):
    prepare(_row(128), np.random.default_rng(0))


def test_capacity_is_a_prepare_time_check_not_a_silent_cut():
  """Before: a prepare with spans up to 6 tokens fed a max_span_len=4 model with nothing
  said. Now the check a trainer runs before training refuses it."""
  prepare = semi_causal_lm.make_prepare(ratio=0.25, min_len=5, max_len=6, max_spans=4)
  model = dict(name='metalm', mode='dual', max_span_len=4)
  with pytest.raises(ValueError, match='max_len=6 .*config.model.max_span_len=4'):
    semi_causal_lm.check_model_capacity(prepare, seq_len=64, model=model)
  semi_causal_lm.check_model_capacity(prepare, seq_len=64, model=dict(model, max_span_len=6))
  # Models that do not encode spans in a fixed buffer, and prepares without spans, pass.
  semi_causal_lm.check_model_capacity(prepare, seq_len=64, model=dict(model, mode='single'))
  semi_causal_lm.check_model_capacity(prepare, seq_len=64, model=dict(name='decoder'))
  semi_causal_lm.check_model_capacity(semi_causal_lm.vl_prepare, seq_len=64, model=model)
  semi_causal_lm.check_model_capacity(None, seq_len=64, model=model)
  # The registered default samples L / 16: 128 / 16 = 8 > 4.
  with pytest.raises(ValueError, match='max_len=8'):
    semi_causal_lm.check_model_capacity(semi_causal_lm.prepare, seq_len=128, model=model)


def test_span_settings_reads_what_prepare_samples():
  assert semi_causal_lm.span_settings(semi_causal_lm.prepare, 128) == \
      masking.default_span_settings(128)
  custom = semi_causal_lm.make_prepare(min_len=3, max_len=5, max_span_len=5)
  assert semi_causal_lm.span_settings(custom, 128) == dict(ratio=0.25, min_len=3, max_len=5,
                                                           max_spans=8)
  assert semi_causal_lm.span_settings(semi_causal_lm.vl_prepare, 128) is None


def test_default_capacity_matches_the_model():
  default = inspect.signature(MetaLM.__init__).parameters['max_span_len'].default
  assert semi_causal_lm._METALM_DEFAULT_MAX_SPAN_LEN == default
