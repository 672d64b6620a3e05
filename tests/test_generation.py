"""METALM generation over the KV cache (inference.metalm) against the full-forward reference,
the span prompt layouts (inference.metalm_prompts) and the decoding core (inference.decoding).

Tiny random models with prime-ish sizes, float32. Every comparison with the reference mixes
prompts of several lengths and span counts in one left-padded batch.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax import models
from metalm_jax.data import prompts as prompts_lib
from metalm_jax.data import text_task_pipeline
from metalm_jax.inference import decoding, metalm, metalm_prompts
from metalm_jax.inference.beam_search import beam_search_from_logits

VOCAB, SPAN, NEW = 37, 5, 6
DECODER = dict(vocab_size=VOCAB, d_model=30, num_layers=2, num_heads=3, d_ff=34)
ENCODER = dict(d_model=14, num_layers=1, num_heads=2, d_ff=18)
# 6x6 grey images in 3x3 patches: 4 patch tokens + [CLS] = T = 5 image tokens.
VISION = dict(image_size=6, patch_size=3, channels=1, d_model=14, num_layers=1, num_heads=2,
              d_ff=18)
IMAGE_TOKENS, VL_SPAN = 5, 9


class WordTokenizer:
  """Each whitespace-separated word -> one id in [3, VOCAB) (stable); 0 pad, 1 BOS, 2 EOS."""
  pad_id, bos_id, eos_id = 0, 1, 2

  def encode(self, text):
    return np.array([3 + sum(map(ord, w)) % (VOCAB - 3) for w in text.split()], np.int32)


TOKENIZER = WordTokenizer()
_MODELS = {}


def model(kind):
  """One tiny MetaLM per kind for the whole file (building is the slow part)."""
  if kind not in _MODELS:
    kw = {'dual': dict(mode='dual', text_encoder=ENCODER),
          'vl': dict(mode='dual', text_encoder=ENCODER, vision_encoder=VISION,
                     decoder=dict(DECODER, position='learned', max_len=96)),
          'single': dict(mode='single', decoder=dict(DECODER, position='sinusoidal')),
          'causal': dict(mode='causal')}[kind]
    kw.setdefault('decoder', DECODER)
    _MODELS[kind] = models.build_model(
        'metalm', rngs=nnx.Rngs(3), max_span_len=VL_SPAN if kind == 'vl' else SPAN, **kw)
  return _MODELS[kind]


def text_prompts(lengths=(1, 4, 9, 13), encode_input=True):
  rng = np.random.default_rng(sum(lengths))
  texts = [' '.join(f'w{i}' for i in rng.integers(0, 500, n)) for n in lengths]
  return [metalm_prompts.text_prompt(t, TOKENIZER, max_input_tokens=14, max_span_len=SPAN,
                                     encode_input=encode_input) for t in texts]


@nnx.jit
def forward(module, rows):
  """MetaLM.__call__ on a pad_right batch: logits [B, L, V]."""
  return module(rows['tokens'], positions=rows['positions'], segment_ids=rows['segment_ids'],
                span_ids=rows['span_ids'], span_starts=rows['span_starts'],
                span_lengths=rows['span_lengths'], images=rows['images'])[0]


def fast(module, prompts, **kw):
  kw = dict(dict(max_new_tokens=NEW, eos_id=2, pad_id=0), **kw)
  return metalm.generate(module, prompts, **kw)


def reference(module, prompts):
  return metalm.greedy_reference(module, prompts, max_new_tokens=NEW, eos_id=2, pad_id=0)


def assert_equal_to_reference(module, prompts, tokens, scores):
  """The same greedy tokens, and the same log-probs of them (so equal logits, not only equal
  argmaxes)."""
  ref_tokens, ref_scores = reference(module, prompts)
  np.testing.assert_array_equal(tokens[:, 0], ref_tokens)
  np.testing.assert_allclose(scores[:, 0], ref_scores, atol=2e-4, rtol=1e-5)


# ---------------------------------------------------------------- prompt layouts
def test_text_prompt_is_the_training_layout():
  ids = text_task_pipeline.input_ids('a b c d e f g h', TOKENIZER, 7)
  row = text_task_pipeline.prompt_row(ids, seq_len=12, max_span_len=3, max_spans=3)
  p = metalm_prompts.text_prompt('a b c d e f g h', TOKENIZER, max_input_tokens=7,
                                 max_span_len=3)
  right = metalm_prompts.pad_right([p], length=12, num_spans=3, pad_id=0)
  for key in ('span_starts', 'span_lengths', 'span_ids', 'segment_ids'):
    np.testing.assert_array_equal(right[key][0], row[key], err_msg=key)
  np.testing.assert_array_equal(right['positions'][0, :7], row['positions'][:7])
  np.testing.assert_array_equal(right['tokens'][0], row['inputs'])
  assert p.span_lengths.tolist() == [3, 3, 1]
  causal = metalm_prompts.text_prompt('a b', TOKENIZER, max_input_tokens=7, max_span_len=3,
                                      encode_input=False)
  assert causal.span_starts.size == 0 and causal.tokens.tolist() == [1] + list(
      TOKENIZER.encode('a b'))


def test_vl_prompt_layout_and_left_padding():
  images = [np.full((6, 6, 1), 10 * i, np.uint8) for i in range(3)]
  segments = [prompts_lib.Segment('image', images[0], 0),
              prompts_lib.Segment('text', 'q1 a1', 0),
              prompts_lib.Segment('image', images[1], 1),
              prompts_lib.Segment('image', images[2], 1),
              prompts_lib.Segment('text', 'q2 x y z', 1)]
  preprocess = lambda im: im.astype(np.float32) / 255.0
  p = metalm_prompts.vl_prompt(segments, TOKENIZER, num_image_tokens=2, max_span_len=5,
                               encode_text=True, preprocess=preprocess)
  q1, q2 = TOKENIZER.encode('q1 a1'), TOKENIZER.encode('q2 x y z')
  # demo: image (2) + [BOS] q1 a1 [EOS] (4); query: image, image, [BOS] q2 x y z (5).
  np.testing.assert_array_equal(p.tokens, [0, 0, 1, *q1, 2, 0, 0, 0, 0, 1, *q2])
  assert p.span_starts.tolist() == [0, 6, 8]
  assert p.span_lengths.tolist() == [2 + 3, 2, 2 + 3]  # text joins the shot's last image
  np.testing.assert_allclose(p.images[2], preprocess(images[2]))
  plain = metalm_prompts.vl_prompt(segments, TOKENIZER, num_image_tokens=2, max_span_len=5,
                                   encode_text=False, preprocess=preprocess)
  assert plain.span_lengths.tolist() == [2, 2, 2]
  left = metalm_prompts.pad_left([p, plain._replace(tokens=plain.tokens[:12])], length=20,
                                 num_spans=4, pad_id=0)
  assert left['valid'][0].tolist() == [False] * 5 + [True] * 15
  assert left['positions'][0, 5:].tolist() == list(range(15))
  assert left['span_starts'][1].tolist() == [8, 14, 16, 0]
  assert left['images'].shape == (2, 4, 6, 6, 1) and not left['images'][:, 3].any()
  with pytest.raises(ValueError, match='does not fit length=10'):
    metalm_prompts.pad_left([p], length=10, num_spans=4, pad_id=0)


# ---------------------------------------------------------------- KV cache == reference
@pytest.mark.parametrize('kind', ['dual', 'single', 'causal'])
def test_kv_cached_greedy_equals_full_forward_reference(kind):
  module = model(kind)
  prompts = text_prompts(encode_input=kind != 'causal')
  tokens, scores = fast(module, prompts)
  assert tokens.shape == (4, 1, NEW) and scores.shape == (4, 1)
  assert_equal_to_reference(module, prompts, tokens, scores)


def vl_prompts(shots_per_query):
  rng = np.random.default_rng(1)
  def example(i):
    return {'task': 'vqa', 'question': f'what is {i}?', 'answer': f'ans{i % 3}',
            'image': rng.integers(0, 256, (6, 6, 1), dtype=np.uint8), 'image2': None,
            'num_images': 1}
  out = []
  for q, shots in enumerate(shots_per_query):
    support = [example(10 * q + s) for s in range(shots)]
    segments = prompts_lib.few_shot_prompt(support, example(10 * q + 9))
    out.append(metalm_prompts.vl_prompt(
        segments, TOKENIZER, num_image_tokens=IMAGE_TOKENS, max_span_len=VL_SPAN,
        encode_text=q != 1, preprocess=lambda im: im.astype(np.float32) / 255.0))
  return out


def test_vision_language_zero_and_two_shot_equal_reference():
  module = model('vl')
  prompts = vl_prompts([0, 2, 1, 2])  # prompt 1 keeps its text causal (encode_text=False)
  assert_equal_to_reference(module, prompts, *fast(module, prompts))


def test_single_mode_decode_takes_the_span_mask():
  """MetaLM.decode with span_ids (a prefill) gives MetaLM.__call__'s semi-causal logits;
  without them the span tokens would only see their past."""
  module = model('single')
  p = text_prompts(lengths=(9,))[0]
  rows = metalm_prompts.pad_right([p], length=len(p.tokens), num_spans=4, pad_id=0)
  full = forward(module, rows)

  @nnx.jit
  def prefill(module, tokens, span_ids):
    cache = module.init_cache(1, tokens.shape[1] + 3)
    return module.decode(tokens, cache, span_ids=span_ids)[0], module.decode(tokens, cache)[0]

  spans, causal = prefill(module, rows['tokens'], rows['span_ids'])
  np.testing.assert_allclose(spans, full, atol=2e-5)
  assert not np.allclose(causal, full, atol=1e-3)


# ---------------------------------------------------------------- decoding settings
@functools.partial(jax.jit, static_argnames=('graphdef',))
def beam_of_one(graphdef, state, batch):
  """beam_search_from_logits with K = 1, alpha = 0 over the padded METALM cache."""
  module = nnx.merge(graphdef, state)
  logits, cache = metalm.prefill(module, batch, NEW)
  return beam_search_from_logits(metalm.padded_decode_fn(module), logits, cache, beam_size=1,
                                 max_new_tokens=NEW, length_penalty=0.0, eos_id=2, pad_id=0)


def test_beam_of_one_and_near_zero_temperature_are_greedy():
  module, prompts = model('dual'), text_prompts()
  greedy, _ = fast(module, prompts)  # == reference (test above)
  batch = metalm_prompts.pad_left(prompts, length=16, num_spans=4, pad_id=0)
  beam, _ = beam_of_one(*nnx.split(module), batch)
  np.testing.assert_array_equal(np.asarray(beam), greedy)
  cold, _ = fast(module, prompts, temperature=1e-4, rng=jax.random.key(5))
  np.testing.assert_array_equal(cold, greedy)


def test_full_top_p_and_top_k_change_no_sample():
  module, prompts = model('dual'), text_prompts()
  sample = functools.partial(fast, module, prompts, temperature=1.0)
  plain, _ = sample(rng=jax.random.key(7))
  for kw in (dict(top_p=1.0), dict(top_k=VOCAB), dict(top_k=VOCAB, top_p=1.0)):
    np.testing.assert_array_equal(sample(rng=jax.random.key(7), **kw)[0], plain)
  assert not np.array_equal(sample(rng=jax.random.key(8))[0], plain)  # the key matters
  logits = jax.random.normal(jax.random.key(0), (64, VOCAB))
  for seed in range(3):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(
        decoding.sample_logits(logits, key, temperature=0.8, top_k=VOCAB, top_p=1.0),
        decoding.sample_logits(logits, key, temperature=0.8))


def test_batching_and_padding_do_not_change_results():
  """Prompts split over several calls decode as the reference; a beam-searched prompt gives
  the same beams alone as beside others (its tiled cache carries the per-row padding)."""
  module = model('dual')
  prompts = text_prompts(lengths=(2, 13, 6, 3, 11))
  assert_equal_to_reference(module, prompts, *fast(module, prompts, batch_size=4))  # 4 + 1
  beams, beam_scores = fast(module, prompts[:4], beam_size=3, length_penalty=0.6)
  assert beams.shape == (4, 3, NEW)
  assert np.all(np.diff(beam_scores, axis=1) <= 0)  # best first
  alone, alone_scores = fast(module, prompts[:1], beam_size=3, length_penalty=0.6)
  np.testing.assert_array_equal(alone, beams[:1])
  np.testing.assert_allclose(alone_scores, beam_scores[:1], atol=1e-5)


# ---------------------------------------------------------------- sampling and errors
def test_top_p_samples_only_from_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  seen = set()
  for seed in range(40):
    token = np.asarray(decoding.sample_logits(logits, jax.random.key(seed), temperature=1.0,
                                              top_p=0.75))
    seen |= {(0, int(token[0])), (1, int(token[1]))}
  assert seen == {(0, 0), (0, 1), (1, 3), (1, 2)}  # 0.5 + 0.3 >= 0.75: two tokens each
  tiny = decoding.sample_logits(logits, jax.random.key(0), temperature=1.0, top_p=1e-3)
  np.testing.assert_array_equal(tiny, [0, 3])


def test_errors_name_the_bad_setting():
  module, prompts = model('causal'), text_prompts(encode_input=False)
  for kw, match in ((dict(beam_size=0), 'beam_size=0'), (dict(top_p=0.0), 'top_p=0.0'),
                    (dict(beam_size=2, temperature=0.5), 'beam_size=2 searches'),
                    (dict(temperature=0.5), 'pass rng='),
                    (dict(length_penalty=-1.0), 'length_penalty=-1.0')):
    with pytest.raises(ValueError, match=match):
      fast(module, prompts, **kw)
  with pytest.raises(ValueError, match='learned positions'):
    fast(model('vl'), vl_prompts([2]), max_new_tokens=90)


# ---------------------------------------------------------------- prompts == training rows
def _vl_layout_model(max_span_len):
  """An abstract MetaLM (no weights): vl_layout needs only T, max_span_len and pad_id."""
  vision = dict(image_size=8, patch_size=4, channels=1, d_model=14, num_layers=1,
                num_heads=2, d_ff=18)  # 4 patches + [CLS] = T = 5
  return nnx.eval_shape(lambda: models.build_model(
      'metalm', rngs=nnx.Rngs(0), mode='dual', decoder=DECODER, text_encoder=ENCODER,
      vision_encoder=vision, max_span_len=max_span_len))


def _digit_example(task, seed):
  rng = np.random.default_rng(seed)
  question = {'nlvr2': 'the left digit is larger than the right digit.',
              'vqa': 'is the digit even or odd?', 'caption': ''}[task]
  return {'task': task, 'question': question,
          'answer': {'nlvr2': 'true', 'vqa': 'odd', 'caption': 'a handwritten digit one.'}[task],
          'image': rng.integers(0, 256, (8, 8, 1), dtype=np.uint8),
          'image2': rng.integers(0, 256, (8, 8, 1), dtype=np.uint8),
          'num_images': 2 if task == 'nlvr2' else 1}


@pytest.mark.parametrize('task', ['nlvr2', 'vqa', 'caption'])
@pytest.mark.parametrize('encode_text', [True, False])
@pytest.mark.parametrize('max_span_len', [5 + 4, 5 + 12])
def test_vl_prompt_equals_the_training_row_layout_up_to_the_answer(task, encode_text,
                                                                   max_span_len):
  """A query prompt is the finetuning row (`vl_pipeline` + the objective's prepare +
  `MetaLM.vl_layout`) cut before the answer, token for token: NLVR2 pairs the statement
  with each image on both sides; captions / VQA keep images then text."""
  from metalm_jax.data import images as images_lib
  from metalm_jax.data import vl_pipeline
  from metalm_jax.objectives import semi_causal_lm
  module = _vl_layout_model(max_span_len)
  example = _digit_example(task, seed=len(task))
  num_images = 2 if task == 'nlvr2' else 1
  row = vl_pipeline.encode_example(example, TOKENIZER, seq_len=32, max_images=num_images)
  prepare = (semi_causal_lm.vl_finetune_prepare if encode_text
             else semi_causal_lm.vl_causal_finetune_prepare)
  row = prepare(row, np.random.default_rng(0))
  layout = module.vl_layout({k: jnp.asarray(v)[None] for k, v in row.items()},
                            jnp.asarray(row['prefix_length'])[None])
  preprocess = functools.partial(images_lib.preprocess_image, image_size=8, channels=1,
                                 kind='digits')
  prompt = metalm_prompts.vl_prompt(prompts_lib.zero_shot_prompt(example), TOKENIZER,
                                    num_image_tokens=5, max_span_len=max_span_len,
                                    encode_text=encode_text, preprocess=preprocess)
  n = len(prompt.tokens)
  assert n == num_images * 5 + int(row['prompt_length'])  # the answer starts at position n
  np.testing.assert_array_equal(layout['inputs'][0, :n], prompt.tokens)
  np.testing.assert_array_equal(layout['positions'][0, :n], np.arange(n))
  np.testing.assert_array_equal(layout['segment_ids'][0, :n], 1)
  np.testing.assert_array_equal(layout['span_starts'][0], prompt.span_starts)
  np.testing.assert_array_equal(layout['span_lengths'][0], prompt.span_lengths)
  np.testing.assert_array_equal(layout['span_ids'][0, :n],
                                masking_span_ids(prompt.span_starts, prompt.span_lengths, n))
  np.testing.assert_array_equal(layout['images'][0], prompt.images)
  answer = TOKENIZER.encode(prompts_lib.target_text(example))
  np.testing.assert_array_equal(layout['inputs'][0, n:n + len(answer)], answer)
  np.testing.assert_array_equal(layout['weights'][0, n - 1:n + len(answer)], 1.0)  # + EOS
  assert not layout['weights'][0, :n - 1].any()
  assert not layout['weights'][0, n + len(answer):].any()
  if task == 'nlvr2':  # [image 1 + [BOS] statement] [image 2 + [BOS] prompt]
    statement = TOKENIZER.encode(example['question'])
    assert prompt.span_starts.tolist() == [0, 5 + 1 + len(statement)]
    np.testing.assert_array_equal(prompt.tokens[5:6 + len(statement)],
                                  [TOKENIZER.bos_id, *statement])
    cap = max_span_len - 5
    assert prompt.span_lengths.tolist() == (
        [5 + min(1 + len(statement), cap), 5 + min(int(row['prompt_length'])
                                                   - 1 - len(statement), cap)]
        if encode_text else [5, 5])


def masking_span_ids(starts, lengths, length):
  from metalm_jax.masking import span_ids_from_spans
  return span_ids_from_spans(starts, lengths, length)


def nlvr2_prompts(shots_per_query):
  rng = np.random.default_rng(2)
  def example(i):
    return {'task': 'nlvr2', 'question': f'the left is {i} more than the right',
            'answer': ['true', 'false'][i % 2],
            'image': rng.integers(0, 256, (6, 6, 1), dtype=np.uint8),
            'image2': rng.integers(0, 256, (6, 6, 1), dtype=np.uint8), 'num_images': 2}
  out = []
  for q, shots in enumerate(shots_per_query):
    segments = prompts_lib.few_shot_prompt([example(10 * q + s) for s in range(shots)],
                                           example(10 * q + 9))
    out.append(metalm_prompts.vl_prompt(
        segments, TOKENIZER, num_image_tokens=IMAGE_TOKENS, max_span_len=VL_SPAN,
        encode_text=True, preprocess=lambda im: im.astype(np.float32) / 255.0))
  return out


def test_nlvr2_prompts_pair_the_statement_with_each_image_and_equal_reference():
  p = nlvr2_prompts([1])[0]
  # demo: [img1 + BOS s(8)] [img2 + BOS prompt answer EOS]; query: the same without answer
  assert len(p.span_starts) == 4
  statement = 1 + 8  # [BOS] + 8 words
  prompt_ids = 1 + 10 + 1 + 1  # [BOS] question: + 8 words + answer:, the answer, [EOS]
  assert p.span_starts.tolist() == [0, IMAGE_TOKENS + statement,
                                    2 * IMAGE_TOKENS + statement + prompt_ids,
                                    3 * IMAGE_TOKENS + 2 * statement + prompt_ids]
  assert p.span_lengths.tolist() == [VL_SPAN] * 4  # each image + the first 4 of its text
  assert p.tokens[2 * IMAGE_TOKENS + statement + prompt_ids - 1] == TOKENIZER.eos_id
  assert TOKENIZER.eos_id not in p.tokens[:IMAGE_TOKENS + statement]
  module = model('vl')
  prompts = nlvr2_prompts([0, 1])
  assert_equal_to_reference(module, prompts, *fast(module, prompts))
