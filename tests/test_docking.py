"""Docking a text encoder with its own vocabulary (`encoder_span_len`, `data.encoder_spans`):
the semi-causal guarantees hold through the pipeline, the model refuses what cannot work,
and `config.model.<part>.init_from` resolves and reports missing directories."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax import config as config_lib
from metalm_jax import masking, models
from metalm_jax.data.encoder_spans import EncoderSpans
from metalm_jax.data.tokenizers import ByteTokenizer
from metalm_jax.models.hf import docking
from metalm_jax.objectives import semi_causal_lm

L, CAP, CE = 48, 6, 10


class CharTokenizer:
  """An encoder-side vocabulary unlike the decoder's: a..z and space, ids 4.. (pad 0,
  cls 1, sep 2, unk 3); other characters are unk."""
  pad_id, cls_id, sep_id, bos_id, eos_id = 0, 1, 2, 1, 2
  chars = 'abcdefghijklmnopqrstuvwxyz '
  vocab_size = 4 + len(chars)

  def encode(self, text):
    return np.array([4 + self.chars.index(c) if c in self.chars else 3 for c in text.lower()],
                    np.int32)

  def decode(self, ids):
    return ''.join(self.chars[i - 4] for i in ids if i >= 4)


def docked_model():
  decoder = dict(vocab_size=259, d_model=24, num_layers=2, num_heads=2, d_ff=32)
  encoder = dict(vocab_size=CharTokenizer.vocab_size, d_model=16, num_layers=2, num_heads=2,
                 d_ff=24, max_len=CE)
  return models.build_model('metalm', rngs=nnx.Rngs(0), decoder=decoder, text_encoder=encoder,
                            connector={'kind': 'resampler', 'num_latents': CAP, 'num_layers': 1,
                                       'num_heads': 2},
                            max_span_len=CAP, encoder_span_len=CE)


def rows(seed):
  """Byte-tokenized text rows with semi-causal spans, and their encoder-vocabulary spans."""
  tok = ByteTokenizer()
  text = 'the quick brown fox jumps over the lazy dog and keeps running far away'
  ids = np.concatenate([[tok.bos_id], tok.encode(text)])[:L + 1].astype(np.int32)
  row = dict(inputs=ids[:-1], targets=ids[1:], segment_ids=np.ones(L, np.int32),
             positions=np.arange(L, dtype=np.int32), weights=np.ones(L, np.float32))
  prepare = EncoderSpans(tok, CharTokenizer(), CE, semi_causal_lm.make_prepare(
      ratio=0.3, min_len=3, max_len=CAP, max_spans=4, max_span_len=CAP))
  return prepare, prepare(row, np.random.default_rng(seed))


@nnx.jit
def forward(model, batch):
  return model(batch['inputs'][None], positions=batch['positions'][None],
               segment_ids=batch['segment_ids'][None], span_starts=batch['span_starts'][None],
               span_lengths=batch['span_lengths'][None],
               span_encoder_ids=batch['span_encoder_ids'][None])[0][0]


def test_encoder_spans_are_each_spans_own_text_in_the_encoders_tokens():
  prepare, row = rows(0)
  enc, tok = CharTokenizer(), ByteTokenizer()
  assert row['span_encoder_ids'].shape == (4, CE)
  for m, (s, n) in enumerate(zip(row['span_starts'], row['span_lengths'])):
    ids = row['span_encoder_ids'][m]
    if n == 0:
      np.testing.assert_array_equal(ids[:3], [enc.cls_id, enc.sep_id, enc.pad_id])
      continue
    body = enc.encode(tok.decode(row['inputs'][s:s + n]))[:CE - 2]
    np.testing.assert_array_equal(ids[:len(body) + 2], np.r_[enc.cls_id, body, enc.sep_id])
    assert (ids[len(body) + 2:] == enc.pad_id).all()


def test_docked_pair_with_different_vocabularies_does_not_leak():
  """Changing decoder token j (and so, through the pipeline, its span's encoder ids) changes
  no logit before j, or before its span's start for a span token; and it does change later
  ones."""
  model = docked_model()
  prepare, row = rows(1)
  base = np.asarray(forward(model, {k: jnp.asarray(v) for k, v in row.items()}))
  span_of = masking.span_ids_from_spans(row['span_starts'], row['span_lengths'], L)
  assert (span_of > 0).any() and (span_of == 0).any()
  for j in range(1, L - 1):
    changed = dict(row, inputs=row['inputs'].copy())
    changed['inputs'][j] = ord('z') + 3 if row['inputs'][j] != ord('z') + 3 else ord('q') + 3
    changed = dict(changed, span_encoder_ids=prepare.span_ids(
        changed['inputs'], row['span_starts'], row['span_lengths']))
    logits = np.asarray(forward(model, {k: jnp.asarray(v) for k, v in changed.items()}))
    first_seen = (row['span_starts'][span_of[j] - 1] if span_of[j] else j)
    np.testing.assert_allclose(logits[:first_seen], base[:first_seen], atol=1e-5)
    assert not np.allclose(logits[j:], base[j:], atol=1e-6)


def test_docked_pair_loss_is_on_causal_positions_and_span_ends():
  model = docked_model()
  _, row = rows(2)
  batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
  value, metrics = semi_causal_lm.loss(model, batch)
  assert np.isfinite(value)
  weights = masking.span_loss_weights(batch['span_ids'])[0]
  span = np.asarray(batch['span_ids'][0])
  ends = np.r_[span[1:] != span[:-1], True] & (span > 0)
  np.testing.assert_array_equal(np.asarray(weights) > 0, (span == 0) | ends)


def test_own_vocabulary_needs_a_resampler_and_the_ids():
  decoder = dict(vocab_size=259, d_model=24, num_layers=1, num_heads=2, d_ff=32)
  encoder = dict(vocab_size=31, d_model=16, num_layers=1, num_heads=2, d_ff=24, max_len=CE)
  with pytest.raises(ValueError, match='encoder_span_len'):  # other vocab, no own-vocab mode
    models.build_model('metalm', rngs=nnx.Rngs(0), decoder=decoder, text_encoder=encoder,
                       max_span_len=CAP)
  with pytest.raises(ValueError, match="resampler"):
    models.build_model('metalm', rngs=nnx.Rngs(0), decoder=decoder, text_encoder=encoder,
                       max_span_len=CAP, encoder_span_len=CE)
  model = docked_model()
  _, row = rows(0)
  batch = {k: jnp.asarray(v)[None] for k, v in row.items() if k != 'span_encoder_ids'}
  with pytest.raises(ValueError, match='span_encoder_ids'):
    semi_causal_lm.loss(model, batch)


def test_missing_pretrained_directories_are_listed_before_anything_runs(tmp_path):
  config = config_lib.base_config()
  config.model = dict(name='metalm', decoder={'init_from': f'hf:{tmp_path}/openai-community/gpt2'},
                      vision_encoder={'init_from': f'hf:{tmp_path}/openai/clip-vit-base-patch16'},
                      text_encoder={'d_model': 8, 'num_layers': 1, 'num_heads': 2, 'd_ff': 8})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.model_kwargs(config.model)
  message = str(e.value)
  for repo in ('openai-community/gpt2', 'openai/clip-vit-base-patch16'):
    assert f'huggingface-cli download {repo} --local-dir {tmp_path}/{repo}' in message
  assert 'never downloads' in message


def test_init_from_on_a_part_the_model_cannot_dock_is_an_error():
  with pytest.raises(ValueError, match='cannot dock'):
    docking.resolve('mplug', {'decoder': {'init_from': 'hf:/nowhere'}})
  with pytest.raises(ValueError, match="config.model.init_from is read for"):
    docking.resolve('metalm', {'init_from': 'hf:/nowhere'})


def test_encoder_tokenizer_only_with_an_own_vocabulary_encoder():
  config = config_lib.base_config()
  config.model = dict(name='metalm', decoder={}, text_encoder={})
  config.data.encoder_tokenizer = 'hf:/somewhere'
  with pytest.raises(config_lib.ConfigError, match='encoder_span_len'):
    config_lib.encoder_tokenizer_kind(config)
  config.model.encoder_span_len = 16
  assert config_lib.encoder_tokenizer_kind(config) == 'hf:/somewhere'
  config.data.encoder_tokenizer = ''
  config.model.text_encoder.init_from = 'hf:/minilm'
  assert config_lib.encoder_tokenizer_kind(config) == 'hf:/minilm'
