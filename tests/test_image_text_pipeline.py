"""data/image_text_pipeline.py: mPLUG's pretraining pairs and seq2seq rows, static shapes,
exact resume, process sharding, padded evaluation; on digits_vl and on the digits written as
official COCO / VQAv2 files."""
import collections

import numpy as np
import pytest

from metalm_jax.data import digits
from metalm_jax.data import digits_official
from metalm_jax.data import image_text_pipeline as itp
from metalm_jax.data import images
from metalm_jax.data import tokenizers
from metalm_jax.data import vl_sources
from tests import grain_workers
from tests import vl_test_data

TOK = tokenizers.ByteTokenizer()
T, A = 24, 12  # text_len, answer_len: shorter than the longer texts, so cuts happen


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return vl_test_data.digits_vl_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
  return vl_test_data.official_digits_dir(tmp_path_factory)


def coco(official_dir, split="train"):
  return vl_sources.vl_source("coco_karpathy", split, official_dir, image_size=8,
                              per_caption=True)


def vqa(official_dir):
  return vl_sources.vl_source("vqav2", "train", official_dir, image_size=8)


def dataset(source, task, **kw):
  settings = dict(task=task, text_len=T, answer_len=A, batch_size=4, seed=0, image_size=8,
                  channels=3, image_kind="clip")
  return itp.image_text_dataset(source, TOK, **dict(settings, **kw))


def text_of(ids) -> str:
  return TOK.decode(ids)


def assert_static(batch, task, batch_size=4, image_size=8, channels=3, text_len=T):
  shapes = itp.feature_shapes(task, text_len=text_len, answer_len=A, image_size=image_size,
                              channels=channels)
  assert {k: v.shape for k, v in batch.items()} == {k: (batch_size,) + s
                                                    for k, s in shapes.items()}
  assert {k: v.dtype for k, v in batch.items()} == itp.feature_dtypes(task)


# ---------------------------------------------------------------- rows
def test_digits_pretraining_pairs_use_the_label_as_pair_id(digits_dir):
  source = vl_sources.vl_source("digits_vl", "validation", digits_dir)
  batches = iter(dataset(source, "pretrain", image_kind="digits", channels=1, image_size=16,
                         text_len=32))
  captions = {digits.caption(label): label for label in range(10)}
  for _ in range(5):
    batch = next(batches)
    assert_static(batch, "pretrain", image_size=16, channels=1, text_len=32)
    for b in range(4):
      text = batch["text"][b]
      assert text[0] == TOK.bos_id  # [CLS]
      caption = text_of(text)
      assert captions[caption] == batch["pair_ids"][b]  # templates used as they are
      n = len(TOK.encode(caption)) + 2
      assert text[n - 1] == TOK.eos_id and not text[n:].any()


def test_coco_pretraining_pairs_are_cleaned_with_the_image_as_pair_id(official_dir):
  source = coco(official_dir)
  rows = [itp.encode_row(source[i], TOK, task="pretrain", text_len=T, image_size=8,
                         channels=3, image_kind="clip", clean=True) for i in range(len(source))]
  for i, row in enumerate(rows):
    ex = source[i]
    assert row["pair_ids"] == i // vl_sources.CAPTIONS_PER_IMAGE == ex["index"]
    want = vl_sources.clean_text(ex["answer"])
    assert text_of(row["text"]) == want[:T - 2]  # cut to T - 2 tokens, [EOS] kept
    assert TOK.eos_id in row["text"]
    np.testing.assert_array_equal(row["images"], images.preprocess_image(
        ex["image"], image_size=8, channels=3, kind="clip"))
  assert any(len(vl_sources.clean_text(source[i]["answer"])) > T - 2 for i in range(20))
  batch = next(iter(dataset(source, "pretrain")))  # official: cleaned by default
  assert_static(batch, "pretrain")
  assert all("." not in text_of(t) and text_of(t) == text_of(t).lower() for t in batch["text"])


def test_caption_finetuning_rows_decode_the_caption_from_cls_alone(official_dir):
  batch = next(iter(dataset(coco(official_dir), "caption", shuffle=False)))
  assert_static(batch, "caption")
  assert (batch["text"][:, 0] == TOK.bos_id).all() and not batch["text"][:, 1:].any()
  source = coco(official_dir)
  for b in range(4):
    target = batch["decoder_targets"][b]
    n = int(batch["decoder_weights"][b].sum())
    assert text_of(target) == vl_sources.clean_text(source[b]["answer"])[:A - 1]
    assert target[n - 1] == TOK.eos_id and not target[n:].any()
    assert batch["decoder_inputs"][b, 0] == TOK.bos_id
    np.testing.assert_array_equal(batch["decoder_inputs"][b, 1:n], target[:n - 1])
    assert not batch["decoder_inputs"][b, n:].any()


def test_vqa_rows_sample_a_human_answer_per_visit_or_take_the_majority(official_dir):
  source = vqa(official_dir)
  questions = collections.defaultdict(collections.Counter)
  batches = iter(dataset(source, "vqa", batch_size=6))
  for _ in range(40):  # 240 rows: each of the 12 questions about 20 times
    batch = next(batches)
    assert_static(batch, "vqa", batch_size=6)
    for b in range(6):
      questions[text_of(batch["text"][b])][text_of(batch["decoder_targets"][b])] += 1
  which = questions["which digit is this?"]
  words = [w for w in which if not w.isdigit()]
  assert words and any(w.isdigit() for w in which)  # 'seven' x 8 and '7' x 2 both drawn
  assert sum(which[w] for w in words) > sum(which[w] for w in which if w.isdigit())
  assert set(questions["is the digit even or odd?"]) <= {"even", "odd"}
  majority = iter(dataset(source, "vqa", batch_size=6, vqa_answers="majority"))
  for _ in range(4):
    assert not any(text_of(t).isdigit() for t in next(majority)["decoder_targets"])


def test_over_long_texts_are_cut_never_an_error():
  ids = itp.encoder_text(TOK, "x" * 50, 6)
  np.testing.assert_array_equal(ids, [TOK.bos_id] + [TOK.encode("x")[0]] * 4 + [TOK.eos_id])
  np.testing.assert_array_equal(itp.encoder_text(TOK, None, 4), [TOK.bos_id, 0, 0, 0])
  row = itp.decoder_row(TOK, "abcdef", 4)
  np.testing.assert_array_equal(row["decoder_targets"], list(TOK.encode("abc")) + [TOK.eos_id])
  np.testing.assert_array_equal(row["decoder_inputs"], [TOK.bos_id] + list(TOK.encode("abc")))
  np.testing.assert_array_equal(row["decoder_weights"], [1, 1, 1, 1])
  short = itp.decoder_row(TOK, "ab", 5)
  np.testing.assert_array_equal(short["decoder_weights"], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(itp.answer_targets(TOK, ["a", "bcd"], 3),
                                [[TOK.encode("a")[0], TOK.eos_id, 0],
                                 list(TOK.encode("bc")) + [TOK.eos_id]])


# ---------------------------------------------------------------- resume, sharding
@pytest.mark.parametrize("task", itp.TASKS)
def test_resume_gives_the_batches_of_an_uninterrupted_run(official_dir, task):
  source = vqa(official_dir) if task == "vqa" else coco(official_dir)
  ds = dataset(source, task, batch_size=3, seed=5)
  uninterrupted = iter(ds)
  for _ in range(4):
    next(uninterrupted)
  state = uninterrupted.get_state()
  expected = [next(uninterrupted) for _ in range(9)]  # past an epoch boundary
  resumed = iter(dataset(source, task, batch_size=3, seed=5))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  other_seed = next(iter(dataset(source, task, batch_size=3, seed=6)))
  first = next(iter(ds))
  assert any(not np.array_equal(first[k], other_seed[k]) for k in first)


@pytest.mark.parametrize("shuffle", [False, True])
def test_processes_read_disjoint_shards_that_cover_the_split(official_dir, shuffle):
  source = coco(official_dir)
  def rows(index, count):
    ds = dataset(source, "pretrain", batch_size=1, shuffle=shuffle, num_epochs=1,
                 process_index=index, process_count=count)
    return [(int(b["pair_ids"][0]), text_of(b["text"][0])) for b in ds]
  everything = rows(0, 1)
  assert len(set(everything)) == len(source) == 20
  shards = [rows(i, 2) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 10
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(everything)
  with pytest.raises(ValueError, match="process_index=2"):
    dataset(source, "pretrain", process_index=2, process_count=2)


# ---------------------------------------------------------------- evaluation, errors
def test_eval_pass_is_unshuffled_and_padded(official_dir):
  source = vl_sources.vl_source("coco_karpathy", "test", official_dir, image_size=8)
  kw = dict(task="pretrain", text_len=T, batch_size=3, image_size=8, channels=3,
            image_kind="rgb")
  batches = list(itp.image_text_eval_batches(source, TOK, **kw))
  assert len(batches) == 2  # 4 images: 3 + 1 and 2 empty rows
  np.testing.assert_array_equal(batches[0]["pair_ids"], [0, 1, 2])
  np.testing.assert_array_equal(batches[1]["pair_ids"], [3, -1, -1])
  assert not batches[1]["text"][1:].any() and not batches[1]["images"][1:].any()
  longer = list(itp.image_text_eval_batches(source, TOK, num_batches=4, **kw))
  assert len(longer) == 4 and (longer[-1]["pair_ids"] == -1).all()
  with pytest.raises(ValueError, match="num_batches=1 is too small"):
    list(itp.image_text_eval_batches(source, TOK, num_batches=1, **kw))
  answers = list(itp.image_text_eval_batches(vqa(official_dir), TOK, task="vqa", text_len=T,
                                             answer_len=A, batch_size=5, image_size=8,
                                             channels=3, image_kind="rgb"))
  assert len(answers) == 3 and not answers[-1]["decoder_weights"][2:].any()
  question = digits.VQA_QUESTIONS[0]
  assert text_of(answers[0]["text"][0]) == vl_sources.clean_text(question)
  _, labels = digits.load_digits()
  first = digits.split_indices(labels)["train"][0]
  assert text_of(answers[0]["decoder_targets"][0]) == digits_official.vqa_human_answers(
      question, int(labels[first]))[0]


def test_bad_arguments_are_clear_errors(official_dir):
  with pytest.raises(ValueError, match="holds 'caption' examples only"):
    dataset(coco(official_dir), "vqa")
  with pytest.raises(ValueError, match="image-text tasks"):
    dataset(coco(official_dir), "retrieval")
  with pytest.raises(ValueError, match="answer_len"):
    dataset(coco(official_dir), "caption", answer_len=None)
  with pytest.raises(ValueError, match="vqa_answers='all'"):
    dataset(vqa(official_dir), "vqa", vqa_answers="all")
  with pytest.raises(ValueError, match="channels=1 must be 3"):
    dataset(vqa(official_dir), "vqa", channels=1)
  with pytest.raises(ValueError, match="pair_id"):
    itp.encode_row({"task": "caption", "question": "", "answer": "x",
                    "image": np.zeros((8, 8, 1), np.uint8)}, TOK, task="pretrain",
                   text_len=T, image_size=8, channels=1, image_kind="digits")


@pytest.mark.slow
def test_worker_processes_resume_exactly(official_dir, tmp_path):
  """grain workers need absl flags parsed and importable code: run as a script."""
  grain_workers.assert_workers_resume(
      tmp_path, "from metalm_jax.data import image_text_pipeline, tokenizers, vl_sources",
      f"""image_text_pipeline.image_text_dataset(
      vl_sources.vl_source("vqav2", "train", {official_dir!r}, image_size=8),
      tokenizers.ByteTokenizer(), task="vqa", text_len=16, answer_len=8, batch_size=4, seed=1,
      image_size=8, channels=3, image_kind="clip", worker_count=2)""", skip=3, take=4)
