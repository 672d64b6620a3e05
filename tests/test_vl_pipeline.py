"""data/vl_pipeline.py over any VL source: digits batches bit-identical to those before the
image module and the official adapters existed (NLVR2 rows: with the statement paired with
image 1 in front of their text, as the METALM paper pairs it with each image); long answers
cut; official RGB rows."""
import grain
import numpy as np
import pytest

from metalm_jax.data import datasets
from metalm_jax.data import digits
from metalm_jax.data import images
from metalm_jax.data import prompts
from metalm_jax.data import tokenizers
from metalm_jax.data import vl_pipeline
from metalm_jax.data import vl_sources
from tests import vl_test_data

SEQ_LEN = 121  # byte tokens of the longest digits template, an NLVR2 row: 120


# ---------------------------------------------------------------- today's functions, copied
def old_preprocess_image(image, *, image_size=8, num_channels=1):
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  height, width = image.shape[:2]
  if max(height, width) > image_size:
    raise ValueError("larger")
  if height != width or image_size % height:
    raise ValueError("multiple")
  factor = image_size // height
  image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
  image = image.astype(np.float32) / 255.0
  return np.repeat(image[..., :1], num_channels, axis=-1)


def old_encode_example(example, tokenizer, *, seq_len, max_images=2, image_size=8,
                       num_channels=1):
  prompt = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompts.prompt_text(example))])
  prompt = prompt.astype(np.int32)
  answer = tokenizer.encode(prompts.target_text(example)).astype(np.int32)
  sequence = np.concatenate([prompt, answer, [tokenizer.eos_id]]).astype(np.int32)
  text_length = len(sequence) - 1
  if text_length > seq_len:
    raise ValueError("raise seq_len")
  inputs = np.full((seq_len,), tokenizer.pad_id, np.int32)
  targets = np.full((seq_len,), tokenizer.pad_id, np.int32)
  inputs[:text_length], targets[:text_length] = sequence[:-1], sequence[1:]
  positions = np.arange(seq_len)
  weights = ((positions >= len(prompt) - 1) & (positions < text_length)).astype(np.float32)
  image_list = prompts.images_of(example)
  images_ = np.zeros((max_images, image_size, image_size, num_channels), np.float32)
  for n, image in enumerate(image_list):
    images_[n] = old_preprocess_image(image, image_size=image_size, num_channels=num_channels)
  return {
      "images": images_, "image_mask": np.arange(max_images) < len(image_list),
      "inputs": inputs, "targets": targets, "weights": weights,
      "segment_ids": (positions < text_length).astype(np.int32),
      "prompt_length": np.int32(len(prompt)), "text_length": np.int32(text_length),
      "task": np.int32(digits.TASKS.index(prompts.as_text(example["task"]))),
  }


def paired(row, example, tokenizer):
  """A row of the copied encoder with NLVR2's pairing: [BOS] statement (pair_length tokens,
  prompt, not answer) in front of the text; every other row gains pair_length 0 only."""
  row = dict(row, pair_length=np.int32(0))
  if prompts.as_text(example["task"]) != "nlvr2":
    return row
  pair = np.concatenate([[tokenizer.bos_id], tokenizer.encode(
      prompts.as_text(example["question"]))]).astype(np.int32)
  n, seq_len = len(pair), len(row["inputs"])
  def front(key, values):
    return np.concatenate([np.asarray(values, row[key].dtype), row[key]])[:seq_len]
  return dict(row, inputs=front("inputs", pair),
              targets=front("targets", np.append(pair[1:], tokenizer.bos_id)),
              weights=front("weights", np.zeros(n)), segment_ids=front("segment_ids", np.ones(n)),
              prompt_length=np.int32(row["prompt_length"] + n),
              text_length=np.int32(row["text_length"] + n), pair_length=np.int32(n))


def old_batches(source, tokenizer, *, seed, batch_size, tasks=None, **kw):
  """Today's vl_dataset (shuffle, repeat, filter, encode, batch) with the copied encoder."""
  examples = grain.MapDataset.source(source)[0::1].shuffle(seed).repeat(None)
  if tasks:
    examples = examples.filter(lambda ex: prompts.as_text(ex["task"]) in tasks)
  return iter(examples.to_iter_dataset().map(
      lambda ex: paired(old_encode_example(ex, tokenizer, seq_len=SEQ_LEN, **kw), ex,
                        tokenizer)).batch(batch_size, drop_remainder=True))


def assert_rows_equal(got, want):
  assert got.keys() == want.keys()
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return vl_test_data.digits_vl_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
  return vl_test_data.official_digits_dir(tmp_path_factory)


# ---------------------------------------------------------------- digits: bit-identical
@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3)])
def test_digits_rows_are_bit_identical_to_todays(digits_dir, size, channels):
  tok = tokenizers.ByteTokenizer()
  records = datasets.data_source("digits_vl", "validation", digits_dir)
  adapted = vl_sources.vl_source("digits_vl", "validation", digits_dir)
  tasks = set()
  for i in range(0, len(records), 7):
    want = paired(old_encode_example(records[i], tok, seq_len=SEQ_LEN, image_size=size,
                                     num_channels=channels), records[i], tok)
    tasks.add(prompts.as_text(records[i]["task"]))
    for ex in (records[i], adapted[i]):  # raw records and vl_source examples alike
      assert_rows_equal(vl_pipeline.encode_example(ex, tok, seq_len=SEQ_LEN, image_size=size,
                                                   num_channels=channels), want)
  assert tasks == set(digits.TASKS)


def test_digits_batches_are_bit_identical_to_todays(digits_dir):
  tok = tokenizers.ByteTokenizer()
  records = datasets.data_source("digits_vl", "validation", digits_dir)
  for source in (records, vl_sources.vl_source("digits_vl", "validation", digits_dir)):
    want = old_batches(records, tok, seed=3, batch_size=5, image_size=16, num_channels=3)
    got = iter(vl_pipeline.vl_dataset(source, tok, seq_len=SEQ_LEN, batch_size=5, seed=3,
                                      image_size=16, num_channels=3))
    for _ in range(4):
      assert_rows_equal(next(got), next(want))


def test_a_task_filter_picks_the_tasks_before_sharding_over_processes(digits_dir):
  """digits_vl interleaves its tasks (an image's caption, then its questions): sharding
  first would leave a process with no caption at all (it then waited forever). The task's
  examples are picked first, then shared, so every process gets half of them."""
  source = vl_sources.vl_source("digits_vl", "validation", digits_dir)
  captions = set(vl_pipeline.task_indices(source, ["caption"]).tolist())
  assert captions and all(source[i]["task"] == "caption" for i in list(captions)[:20])
  shares = []
  for p in range(2):
    examples = vl_pipeline.shard_examples(source, tasks=["caption"], shuffle=False,
                                          num_epochs=1, process_index=p, process_count=2)
    shares.append([ex["id"] for ex in examples])
    assert all(source[i]["task"] == "caption" for i in shares[-1])
  assert set(shares[0]).isdisjoint(shares[1]) and set(shares[0]) | set(shares[1]) == captions
  assert abs(len(shares[0]) - len(shares[1])) <= 1


# ---------------------------------------------------------------- text
def test_long_answers_are_cut_with_their_eos_kept():
  tok = tokenizers.ByteTokenizer()
  example = {"task": "caption", "question": "", "answer": "a very long caption " * 10,
             "image": np.zeros((8, 8, 1), np.uint8), "image2": np.zeros((8, 8, 1), np.uint8),
             "num_images": 1}
  row = vl_pipeline.encode_example(example, tok, seq_len=40)
  prompt = vl_pipeline.prompt_tokens(example, tok)
  assert row["text_length"] == 40 and row["targets"][-1] == tok.eos_id
  answer = row["targets"][row["weights"] > 0]
  assert len(answer) == 40 - len(prompt) + 1  # the answer's first tokens, then EOS
  assert tok.decode(answer) == prompts.target_text(example)[:40 - len(prompt)]
  np.testing.assert_array_equal(row["inputs"][1:], row["targets"][:-1])
  short = dict(example, answer="a digit.")  # rows that fit are unchanged by the cut
  assert_rows_equal(vl_pipeline.encode_example(short, tok, seq_len=40),
                    paired(old_encode_example(short, tok, seq_len=40), short, tok))
  with pytest.raises(ValueError, match="raise seq_len"):  # the prompt alone does not fit
    vl_pipeline.encode_example(example, tok, seq_len=len(prompt))


# ---------------------------------------------------------------- official RGB rows
def test_official_rows_have_the_digits_text_layout_and_rgb_images(official_dir):
  tok = tokenizers.ByteTokenizer()
  source = vl_sources.vl_source("nlvr2", "train", official_dir, image_size=16)
  ex = source[0]
  row = vl_pipeline.encode_example(ex, tok, seq_len=SEQ_LEN, image_size=16, num_channels=3,
                                   image_kind="rgb")
  gray = dict(ex, image=np.zeros((8, 8, 1), np.uint8), image2=np.zeros((8, 8, 1), np.uint8))
  reference = vl_pipeline.encode_example(gray, tok, seq_len=SEQ_LEN)
  for key in ("inputs", "targets", "weights", "segment_ids", "prompt_length", "text_length",
              "task", "image_mask"):
    np.testing.assert_array_equal(row[key], reference[key], err_msg=key)
  for n, key in enumerate(("image", "image2")):
    np.testing.assert_array_equal(row["images"][n], images.preprocess_image(
        ex[key], image_size=16, channels=3, kind="rgb"))
  batches = iter(vl_pipeline.vl_dataset(source, tok, seq_len=SEQ_LEN, batch_size=3, seed=0,
                                        image_size=16, num_channels=3, image_kind="rgb"))
  shapes = vl_pipeline.feature_shapes(seq_len=SEQ_LEN, image_size=16, num_channels=3)
  for _ in range(3):  # 9 rows: past the end of the 4 pairs
    batch = next(batches)
    assert {k: v.shape for k, v in batch.items()} == {k: (3,) + s for k, s in shapes.items()}
    assert batch["image_mask"].all() and 0 <= batch["images"].min() <= batch["images"].max() <= 1


def test_official_eval_pass_is_padded_and_kinds_are_checked(official_dir):
  tok = tokenizers.ByteTokenizer()
  source = vl_sources.vl_source("vqav2", "train", official_dir, image_size=8)
  batches = list(vl_pipeline.vl_eval_batches(source, tok, seq_len=SEQ_LEN, batch_size=5,
                                             max_images=1, image_size=8, num_channels=3,
                                             image_kind="clip"))
  assert len(batches) == 3  # 12 questions: 5 + 5 + 2 and 3 empty rows
  real = np.concatenate([b["text_length"] for b in batches]) > 0
  assert real.sum() == len(source) and not batches[-1]["weights"][2:].any()
  assert batches[0]["images"].min() < 0  # CLIP-normalised
  with pytest.raises(ValueError, match="channels=1 must be 3"):
    vl_pipeline.vl_dataset(source, tok, seq_len=SEQ_LEN, batch_size=2, seed=0,
                           image_kind="rgb")
  with pytest.raises(ValueError, match="kinds"):
    next(vl_pipeline.vl_eval_batches(source, tok, seq_len=SEQ_LEN, batch_size=2,
                                     image_kind="bilinear"))
