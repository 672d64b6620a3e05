"""MetaLM: the semi-causal invariants, the loss mask, static shapes, VL layout, freezing."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from metalm_jax import masking, models, objectives
from metalm_jax.train import optimizer as freeze
from metalm_jax.models.metalm import span_ids_from_starts
from metalm_jax.objectives import semi_causal_lm

VOCAB, L = 41, 64
DECODER = dict(vocab_size=VOCAB, d_model=28, num_layers=2, num_heads=2, d_ff=34)
ENCODER = dict(d_model=14, num_layers=2, num_heads=2, d_ff=18, norm_position='pre',
               relative_buckets=8)


def build(mode='dual', connector=None, **kw):
  extra = dict(text_encoder=ENCODER, connector=connector) if mode == 'dual' else {}
  return models.build_model('metalm', rngs=nnx.Rngs(0), decoder=DECODER, mode=mode,
                            max_span_len=4, **extra, **kw)


_BUILT = {}


def cached(mode='dual', connector=None):
  """One model per (mode, connector) for the whole file: building is the slow part."""
  key = (mode, str(connector))
  if key not in _BUILT:
    _BUILT[key] = build(mode, connector)
  return _BUILT[key]


def packed_batch(seed, batch=3):
  """Rows of two documents + padding, prepared by the semi_causal_lm objective."""
  rng = np.random.default_rng(seed)
  rows = []
  for b in range(batch):
    cut = int(rng.integers(20, 40))
    seg = np.r_[np.ones(cut), np.full(L - cut - 5, 2), np.zeros(5)].astype(np.int32)
    tokens = rng.integers(3, VOCAB, L + 1).astype(np.int32)
    row = dict(inputs=tokens[:-1], targets=tokens[1:], segment_ids=seg,
               positions=np.r_[np.arange(cut), np.arange(L - cut - 5), np.zeros(5)]
               .astype(np.int32), weights=(seg > 0).astype(np.float32))
    rows.append(semi_causal_lm.prepare(row, np.random.default_rng(seed * 10 + b)))
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


@nnx.jit
def forward(model, batch):
  return model(batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids'],
               span_ids=batch['span_ids'], span_starts=batch['span_starts'],
               span_lengths=batch['span_lengths'])[0]


@pytest.mark.parametrize('mode, connector', [('dual', None), ('dual', {'kind': 'mlp'}),
                                             ('single', None)])
def test_causal_positions_before_a_span_never_see_it(mode, connector):
  model = cached(mode, connector)
  batch = packed_batch(0)
  logits = forward(model, batch)
  assert logits.shape == (3, L, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))
  for b in range(3):
    m = int(np.argmax(np.asarray(batch['span_lengths'][b]) > 0))
    start, n = int(batch['span_starts'][b, m]), int(batch['span_lengths'][b, m])
    changed = dict(batch, inputs=batch['inputs'].at[b, start:start + n].set(
        (batch['inputs'][b, start:start + n] + 1) % VOCAB))
    new = forward(model, changed)
    np.testing.assert_allclose(new[b, :start], logits[b, :start], atol=1e-6)
    assert not np.allclose(new[b, start + n - 1:], logits[b, start + n - 1:], atol=1e-6)


def test_dual_stack_span_positions_get_encoder_outputs():
  """Inside a span, the decoder input is the connected encoding, not the token embedding."""
  model = cached()
  batch = packed_batch(1)
  emb, plain = nnx.jit(lambda m, b: (
      m.embed_inputs(b['inputs'], b['span_starts'], b['span_lengths']),
      m.decoder.embed(b['inputs'])))(model, batch)
  inside = np.asarray(batch['span_ids']) > 0
  assert np.allclose(np.asarray(emb)[~inside], np.asarray(plain)[~inside])
  assert not np.any(np.all(np.isclose(np.asarray(emb)[inside], np.asarray(plain)[inside]),
                           axis=-1))


@pytest.mark.parametrize('mode', ['dual', 'single'])
def test_predictions_inside_a_span_are_excluded_except_the_last(mode):
  model = cached(mode)
  batch = packed_batch(2)
  loss_fn = nnx.jit(lambda m, b: semi_causal_lm.loss(m, b))
  base, metrics = loss_fn(model, batch)
  base = float(base)
  span_ids = np.asarray(batch['span_ids'][0])
  m = int(span_ids[np.flatnonzero(span_ids)[0]])
  positions = np.flatnonzero(span_ids == m)
  if len(positions) > 1:  # a prediction inside the span: no effect
    inner = batch['targets'].at[0, positions[:-1]].set(0)
    inner_loss = float(loss_fn(model, dict(batch, targets=inner))[0])
    assert inner_loss == pytest.approx(base, abs=1e-6)
  last = batch['targets'].at[0, positions[-1]].set(0)  # the span's last prediction counts
  assert float(loss_fn(model, dict(batch, targets=last))[0]) != pytest.approx(base, abs=1e-6)
  expected = (np.asarray(batch['weights']) *
              np.asarray(masking.span_loss_weights(batch['span_ids']))).sum()
  assert float(metrics['tokens']) == expected < float(batch['weights'].sum())


def test_shapes_never_recompile_across_batches():
  model = cached()
  graphdef, state = nnx.split(model)
  objective = objectives.get('semi_causal_lm')

  @jax.jit
  def step(state, batch):
    def f(state):
      return objective.loss(nnx.merge(graphdef, state), batch)[0]
    return jax.value_and_grad(f)(state)

  layouts = set()
  for seed in range(4):
    batch = packed_batch(seed + 10)
    layouts.add(tuple(np.asarray(batch['span_starts']).ravel()))
    loss, _ = step(state, batch)
    assert np.isfinite(float(loss))
  assert len(layouts) == 4 and step._cache_size() == 1


def test_causal_baseline_trains_on_every_position():
  model = cached('causal')
  batch = packed_batch(3)
  _, metrics = nnx.jit(semi_causal_lm.loss)(model, batch)
  assert float(metrics['tokens']) == float(batch['weights'].sum())
  assert param_count(model) < param_count(cached())


def param_count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match='text_encoder'):
    models.build_model('metalm', rngs=nnx.Rngs(0), decoder=DECODER, mode='dual')
  with pytest.raises(ValueError, match='num_latents'):
    build(connector={'kind': 'resampler', 'num_latents': 3})
  with pytest.raises(ValueError, match='config.model.text_encoder'):
    models.build_model('metalm', rngs=nnx.Rngs(0), decoder=DECODER,
                       text_encoder=dict(ENCODER, width=3))
  with pytest.raises(ValueError, match='max_span_len'):
    too_short = nnx.eval_shape(lambda: models.build_model(
        'metalm', rngs=nnx.Rngs(0), decoder=DECODER, text_encoder=ENCODER, max_span_len=3))
    objectives.get('semi_causal_lm').loss(too_short, packed_batch(0))


# ---------------------------------------------------------------- vision-language
def vl_model():
  if 'vl' not in _BUILT:
    _BUILT['vl'] = _vl_model()
  return _BUILT['vl']


def _vl_model():
  return models.build_model(
      'metalm', rngs=nnx.Rngs(0), decoder=DECODER, text_encoder=ENCODER, max_span_len=13,
      vision_encoder=dict(image_size=8, patch_size=4, d_model=10, num_layers=1, num_heads=2,
                          d_ff=12, channels=1),
      connector={'kind': 'mlp', 'num_layers': 3})


def vl_batch(seed=0):
  rng = np.random.default_rng(seed)
  b, n, text = 3, 2, 12
  return dict(
      images=jnp.asarray(rng.random((b, n, 8, 8, 1)), jnp.float32),
      image_mask=jnp.array([[True, False], [True, True], [True, False]]),
      inputs=jnp.asarray(rng.integers(3, VOCAB, (b, text)), jnp.int32),
      targets=jnp.asarray(rng.integers(3, VOCAB, (b, text)), jnp.int32),
      weights=jnp.ones((b, text), jnp.float32),
      segment_ids=jnp.asarray(np.arange(text)[None] < np.array([[12], [9], [12]]), jnp.int32),
      prefix_length=jnp.array([3, 0, 5], jnp.int32))


def test_vl_layout_puts_images_before_text_and_prefix_in_the_last_span():
  model = vl_model()
  layout = nnx.jit(lambda m, b: m.vl_layout(b, jnp.array([3, 0, 5])))(model, vl_batch())
  t = model.vision_encoder.num_tokens()  # 5 = 4 patches + CLS
  assert layout['inputs'].shape == (3, 2 * t + 12)
  np.testing.assert_array_equal(layout['span_starts'], [[0, t]] * 3)
  np.testing.assert_array_equal(layout['span_lengths'], [[0, t + 3], [t, t], [0, t + 5]])
  np.testing.assert_array_equal(layout['segment_ids'][0, :t], 0)  # the empty slot
  np.testing.assert_array_equal(layout['positions'][0, t:2 * t + 3], np.arange(t + 3))
  np.testing.assert_array_equal(layout['weights'][:, :2 * t], 0.0)


def test_vl_text_logits_depend_on_the_image_only_through_its_span():
  model = vl_model()
  batch = vl_batch()
  @nnx.jit
  def loss_and_logits(m, b):
    lay = m.vl_layout(b, b['prefix_length'])
    logits, _ = m(lay['inputs'], positions=lay['positions'], segment_ids=lay['segment_ids'],
                  span_starts=lay['span_starts'], span_lengths=lay['span_lengths'],
                  images=lay['images'])
    return semi_causal_lm.vl_loss(m, b)[0], logits

  loss, logits = loss_and_logits(model, batch)
  assert np.isfinite(float(loss))
  other = dict(batch, images=batch['images'].at[0, 0].set(0.5))
  _, logits2 = loss_and_logits(model, other)
  assert not np.allclose(logits2[0, -12:], logits[0, -12:])  # row 0's image matters
  np.testing.assert_allclose(logits2[1:], logits[1:], atol=1e-6)  # other rows do not
  unused = dict(batch, images=batch['images'].at[0, 1].set(0.7))  # row 0 has one image
  np.testing.assert_allclose(loss_and_logits(model, unused)[1][0], logits[0], atol=1e-6)


# ---------------------------------------------------------------- NLVR2: image-text pairs
def old_vl_layout(model, batch, prefix_lengths):
  """MetaLM.vl_layout before rows could pair text with each image, copied: unpaired rows
  must still be laid out exactly so."""
  images, image_mask = batch['images'], batch['image_mask'].astype(bool)
  batch_size, num_slots = image_mask.shape
  num_tokens = model.vision_encoder.num_tokens(tuple(images.shape[2:4]))
  count = image_mask.sum(-1).astype(jnp.int32)
  first = num_slots - count
  slot = jnp.arange(num_slots)[None, :]
  real = slot >= first[:, None]
  source = jnp.clip(slot - first[:, None], 0, num_slots - 1)
  images = jnp.take_along_axis(images, source[:, :, None, None, None], axis=1)
  images = jnp.where(real[:, :, None, None, None], images, 0.0)
  starts = jnp.broadcast_to(slot * num_tokens, (batch_size, num_slots)).astype(jnp.int32)
  lengths = jnp.where(real, num_tokens, 0)
  prefix = jnp.clip(prefix_lengths, 0, model.max_span_len - num_tokens)
  lengths = lengths.at[:, -1].add(jnp.where(count > 0, prefix, 0)).astype(jnp.int32)
  image_len = num_slots * num_tokens
  image_seg = jnp.repeat(real.astype(jnp.int32), num_tokens, axis=1)
  zeros = jnp.zeros((batch_size, image_len), jnp.int32)
  text_seg = (batch['segment_ids'] > 0).astype(jnp.int32)
  segment_ids = jnp.concatenate([image_seg, text_seg], axis=1)
  positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0) * segment_ids
  pad = jnp.full((batch_size, image_len), model.pad_id, batch['inputs'].dtype)
  out = dict(
      inputs=jnp.concatenate([pad, batch['inputs']], axis=1),
      targets=jnp.concatenate([pad, batch['targets']], axis=1),
      weights=jnp.concatenate([zeros.astype(jnp.float32), batch['weights']], axis=1),
      segment_ids=segment_ids, positions=positions.astype(jnp.int32),
      span_starts=starts, span_lengths=lengths, images=images)
  out['span_ids'] = span_ids_from_starts(starts, lengths,
                                         image_len + batch['inputs'].shape[1])
  return out


@pytest.mark.parametrize('max_images', [1, 2])
def test_vl_layout_of_unpaired_digits_rows_is_bit_identical_to_before_pairing(
    tmp_path_factory, max_images):
  """Captions and VQA rows of the digits pipeline (pair_length 0), with and without the
  pair_length feature, get exactly the arrays the layout gave before pairing existed."""
  from metalm_jax.data import datasets, tokenizers, vl_pipeline
  from tests import vl_test_data
  source = datasets.data_source('digits_vl', 'validation',
                                vl_test_data.digits_vl_dir(tmp_path_factory))
  tok = tokenizers.ByteTokenizer()
  rng = np.random.default_rng(0)
  rows = []
  for i in range(0, 200, 3):
    if source[i]['task'] in (b'nlvr2', 'nlvr2'):
      continue
    row = vl_pipeline.encode_example(source[i], tok, seq_len=73, max_images=max_images)
    rows.append(semi_causal_lm.vl_prepare(row, rng))
  assert len(rows) > 20 and not any(r['pair_length'] for r in rows)
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  model = vl_model()
  want = old_vl_layout(model, batch, batch['prefix_length'])
  no_pair = {k: v for k, v in batch.items() if k != 'pair_length'}
  for b in (batch, no_pair):
    got = nnx.jit(lambda m, b: m.vl_layout(b, b['prefix_length']))(model, b)
    assert got.keys() == want.keys()
    for key in want:
      assert got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def paired_batch(prefix):
  """vl_batch with row 1 (two images, 9 text tokens) paired: its first 4 text tokens are
  image 1's; row 0 has one image, so its pair_length is ignored; row 2 is unpaired."""
  batch = vl_batch()
  return dict(batch, weights=(batch['segment_ids'] > 0).astype(jnp.float32),
              pair_length=jnp.array([4, 4, 0], jnp.int32),
              prefix_length=jnp.array([3, prefix, 5], jnp.int32))


@pytest.mark.parametrize('prefix, first_text, last_text', [
    (6, 4, 2), (2, 2, 0), (0, 0, 0), (9, 4, 5)])  # 9: all the text (a span holds 13 - 5)
def test_vl_layout_pairs_the_statement_with_each_image(prefix, first_text, last_text):
  model = vl_model()
  t = model.vision_encoder.num_tokens()  # 5
  batch = paired_batch(prefix)
  layout = nnx.jit(lambda m, b: m.vl_layout(b, b['prefix_length']))(model, batch)
  unpaired = old_vl_layout(model, batch, batch['prefix_length'])
  for key in layout:  # rows 0 and 2: as before pairing
    np.testing.assert_array_equal(layout[key][::2], unpaired[key][::2], err_msg=key)
  text = np.asarray(batch['inputs'][1])
  # row 1: [image 1][text 0..3][image 2][text 4..]
  np.testing.assert_array_equal(layout['inputs'][1], [0] * t + list(text[:4]) + [0] * t
                                + list(text[4:]))
  np.testing.assert_array_equal(layout['span_starts'][1], [0, t + 4])
  np.testing.assert_array_equal(layout['span_lengths'][1], [t + first_text, t + last_text])
  np.testing.assert_array_equal(layout['positions'][1, :2 * t + 9], np.arange(2 * t + 9))
  np.testing.assert_array_equal(layout['segment_ids'][1], np.arange(2 * t + 12) < 2 * t + 9)
  np.testing.assert_array_equal(layout['images'][1], batch['images'][1])
  targets = np.asarray(batch['targets'][1])
  assert layout['targets'][1, t + 3] == 0 == layout['weights'][1, t + 3]  # before image 2
  np.testing.assert_array_equal(layout['targets'][1, t:t + 3], targets[:3])
  np.testing.assert_array_equal(layout['targets'][1, 2 * t + 4:], targets[4:])
  # Scored: causal text positions and span ends that predict text, never image placeholders.
  scored = np.asarray(layout['weights'] * masking.span_loss_weights(layout['span_ids']))[1]
  span2_end = 2 * t + 4 + last_text - 1
  want = {p for p in range(t + first_text, t + 3)}  # pair-1 text left causal
  if 0 < first_text < 4:
    want.add(t + first_text - 1)  # span 1 ends inside the statement: predicts its next token
  want |= {p for p in range(2 * t + 4 + last_text, 2 * t + 9)}  # pair-2 text left causal
  if last_text:
    want.add(span2_end)
  assert set(np.flatnonzero(scored).tolist()) == want


def test_paired_vl_rows_do_not_leak():
  """In a paired row a causal position never sees a later one, a span sees only itself and
  the past: changing any input changes no logit before it (before its span's start, for a
  span position), and image 2 changes nothing before its slot."""
  model = vl_model()
  t = model.vision_encoder.num_tokens()
  batch = paired_batch(6)

  @nnx.jit
  def logits_of(m, b):
    lay = m.vl_layout(b, b['prefix_length'])
    logits, _ = m(lay['inputs'], positions=lay['positions'], segment_ids=lay['segment_ids'],
                  span_starts=lay['span_starts'], span_lengths=lay['span_lengths'],
                  images=lay['images'])
    return logits

  base = logits_of(model, batch)
  # row 1 text j sits at t + j (j < 4, span 1 from 0) or 2t + j (span 2 from t + 4 up to
  # text 5, then causal)
  span_start = {0: 0, 1: 0, 2: 0, 3: 0, 4: t + 4, 5: t + 4}
  for j in range(9):
    position = t + j if j < 4 else 2 * t + j
    token = (batch['inputs'][1, j] + 1) % VOCAB
    changed = dict(batch, inputs=batch['inputs'].at[1, j].set(token))
    logits = logits_of(model, changed)
    first_seen = span_start.get(j, position)
    np.testing.assert_allclose(logits[1, :first_seen], base[1, :first_seen], atol=1e-6)
    assert not np.allclose(logits[1, position:], base[1, position:], atol=1e-6)
  image2 = logits_of(model, dict(batch, images=batch['images'].at[1, 1].set(0.3)))
  np.testing.assert_allclose(image2[1, :t + 4], base[1, :t + 4], atol=1e-6)  # image 1 + text
  assert not np.allclose(image2[1, t + 4:], base[1, t + 4:], atol=1e-6)
  image1 = logits_of(model, dict(batch, images=batch['images'].at[1, 0].set(0.3)))
  assert not np.allclose(image1[1, t:t + 4], base[1, t:t + 4], atol=1e-6)  # its statement


# ---------------------------------------------------------------- freezing
def test_freeze_all_but_last_k_encoder_layers():
  params = nnx.state(cached(), nnx.Param).to_pure_dict()
  mask = freeze.trainable_mask(params, trainable_layers=1)
  enc = mask['text_encoder']
  assert not any(jax.tree.leaves(enc['layers'][0]))
  assert all(jax.tree.leaves(enc['layers'][1])) and all(jax.tree.leaves(enc['final_norm']))
  assert not any(jax.tree.leaves(enc['word_embeddings']))
  assert all(jax.tree.leaves(mask['decoder'])) and all(jax.tree.leaves(mask['connector']))
  tx = freeze.freeze(optax.adam(1e-1), mask)

  @jax.jit
  def update(params):
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    return optax.apply_updates(params, updates)

  new = update(params)
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new)
  assert jax.tree.leaves(moved) == jax.tree.leaves(mask)
  with pytest.raises(ValueError, match='no docked encoder'):
    freeze.trainable_mask(nnx.state(cached('causal'), nnx.Param).to_pure_dict(),
                          trainable_layers=2)


# ---------------------------------------------------------------- the trainer, end to end
@pytest.mark.slow
@pytest.mark.parametrize('mode', ['dual', 'single'])
def test_trains_with_the_trainer(pydoc_data_dir, tmp_path, mode):
  import ml_collections
  from metalm_jax.train import trainer
  from tests.test_config import load_config

  config = ml_collections.ConfigDict(
      load_config('metalm_lm', f'size=test,mode={mode}').to_dict())
  config.data.data_dir = pydoc_data_dir
  config.num_train_steps = 4
  config.eval_every_steps = config.checkpoint_every_steps = 4
  config.sample.max_new_tokens = 4
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 4 and np.isfinite(result['eval_loss'])
