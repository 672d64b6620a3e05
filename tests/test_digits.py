"""The digits_vl TFDS dataset (real scikit-learn digits) and its vision-language pipeline."""
import collections

import numpy as np
import pytest

from metalm_jax.data import datasets
from metalm_jax.data import digits
from metalm_jax.data import images
from metalm_jax.data import prompts
from metalm_jax.data import vl_pipeline

WORDS = "zero one two three four five six seven eight nine".split()
SEQ_LEN, BATCH = 73, 7  # byte tokens of the longest template: 72


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("digits_tfds"))
  datasets.prepare("digits_vl", data_dir)
  return data_dir


@pytest.fixture(scope="module")
def examples(data_dir):
  """Every example of every split, read once."""
  out = {}
  for split in digits.SPLITS:
    source = datasets.data_source("digits_vl", split, data_dir)
    out[split] = [source[i] for i in range(len(source))]
  return out


@pytest.fixture(scope="module")
def sklearn_digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  return d.images, d.target


def _by_task(split_examples):
  groups = collections.defaultdict(list)
  for ex in split_examples:
    groups[ex["task"].decode()].append(ex)
  return groups


def test_splits_are_fixed_disjoint_and_counted(examples, sklearn_digits):
  images = {s: {int(ex["index"]) for ex in examples[s]} for s in digits.SPLITS}
  assert {s: len(v) for s, v in images.items()} == {"train": 1453, "validation": 160,
                                                     "test": 184}
  assert set().union(*images.values()) == set(range(len(sklearn_digits[1])))
  for split, indices in images.items():
    assert all(digits.split_of(i) == split for i in indices)  # a pure function of the index
    groups = _by_task(examples[split])
    n = len(indices)
    assert {t: len(g) for t, g in groups.items()} == {"caption": n, "vqa": 3 * n, "nlvr2": n}
    # pairs are drawn within the split
    assert all(int(ex["index2"]) in indices for ex in groups["nlvr2"])
  assert digits.split_of(0) == digits.split_of(0) and digits.split_of(38) == "test"


def test_templates_answer_from_the_label(examples, sklearn_digits):
  labels = sklearn_digits[1]
  expected = {"which digit is this?": lambda d: WORDS[d],
              "is the digit even or odd?": lambda d: "odd" if d % 2 else "even",
              "is the digit greater than five?": lambda d: "yes" if d > 5 else "no"}
  truth = {"the left digit is larger than the right digit.": lambda a, b: a > b,
           "the left digit is smaller than the right digit.": lambda a, b: a < b,
           "the two digits are the same.": lambda a, b: a == b}
  for ex in (ex for split in examples.values() for ex in split):
    label, task = int(ex["label"]), ex["task"].decode()
    question, answer = ex["question"].decode(), ex["answer"].decode()
    assert label == labels[ex["index"]]
    assert ex["caption"].decode() == f"a handwritten digit {WORDS[label]}."
    if task == "caption":
      assert (question, answer, int(ex["num_images"])) == ("", ex["caption"].decode(), 1)
    elif task == "vqa":
      assert answer == expected[question](label) and int(ex["label2"]) == -1
    else:
      assert int(ex["num_images"]) == 2 and ex["index2"] != ex["index"]
      assert int(ex["label2"]) == labels[ex["index2"]]
      assert answer == ("true" if truth[question](label, int(ex["label2"])) else "false")


def test_nlvr2_is_balanced_and_varied(examples):
  for split in digits.SPLITS:
    pairs = _by_task(examples[split])["nlvr2"]
    answers = collections.Counter(ex["answer"].decode() for ex in pairs)
    assert abs(answers["true"] - answers["false"]) <= 1, (split, answers)
    assert len({ex["question"] for ex in pairs}) == 3
  labels = np.arange(1797) % 10
  indices = np.arange(100)
  assert digits.nlvr2_pairs(indices, labels, "x") == digits.nlvr2_pairs(indices, labels, "x")


def test_png_round_trip_is_exact(examples, sklearn_digits):
  images = sklearn_digits[0]
  for ex in examples["validation"][:50]:
    assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"][..., 0], digits.to_uint8(images[ex["index"]]))
    # the 17 scan levels are recoverable from the stored pixels
    np.testing.assert_array_equal(np.round(ex["image"][..., 0].astype(float) * 16 / 255), images[ex["index"]])
    if ex["index2"] >= 0:
      np.testing.assert_array_equal(ex["image2"][..., 0], digits.to_uint8(images[ex["index2"]]))
    else:
      assert not ex["image2"].any()


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_pipeline_static_shapes_and_answer_only_weights(data_dir, kind):
  tokenizer = vl_pipeline.get_vl_tokenizer(kind, data_dir=data_dir)
  seq_len = vl_pipeline.max_text_length(tokenizer)
  assert seq_len == {"byte": 120, "sentencepiece": 68}[kind]  # NLVR2: the statement twice
  source = datasets.data_source("digits_vl", "validation", data_dir)
  shapes = vl_pipeline.feature_shapes(seq_len=seq_len, image_size=16, num_channels=3)
  batches = iter(vl_pipeline.vl_dataset(source, tokenizer, seq_len=seq_len, batch_size=BATCH,
                                        seed=0, image_size=16, num_channels=3))
  seen_tasks = set()
  for _ in range(6):
    batch = next(batches)
    assert {k: v.shape for k, v in batch.items()} == {k: (BATCH,) + s for k, s in shapes.items()}
    assert {k: v.dtype for k, v in batch.items()} == vl_pipeline.FEATURE_DTYPES
    for b in range(BATCH):
      task = digits.TASKS[batch["task"][b]]
      seen_tasks.add(task)
      n, p = batch["text_length"][b], batch["prompt_length"][b]
      assert batch["image_mask"][b].sum() == (2 if task == "nlvr2" else 1)
      assert not batch["images"][b][~batch["image_mask"][b]].any()
      assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
      np.testing.assert_array_equal(batch["segment_ids"][b], np.arange(seq_len) < n)
      np.testing.assert_array_equal(batch["inputs"][b, 1:n], batch["targets"][b, :n - 1])
      answer = batch["targets"][b][batch["weights"][b] > 0]
      assert answer[-1] == tokenizer.eos_id and len(answer) == n - p + 1
      pair = batch["pair_length"][b]
      assert (pair > 0) == (task == "nlvr2")
      if pair:  # [BOS] statement, paired with image 1; the prompt repeats it
        assert batch["inputs"][b, 0] == batch["inputs"][b, pair] == tokenizer.bos_id
        statement = tokenizer.decode(batch["inputs"][b, 1:pair])
        assert statement in digits.NLVR2_STATEMENTS
      question = tokenizer.decode(batch["inputs"][b, pair + 1:p])
      assert question.startswith("question: ") or question == "Summarize this image:"
      if pair:
        assert question == f"question: {statement} answer:"
      assert tokenizer.decode(answer).startswith(" ") and tokenizer.decode(answer).strip()
  assert seen_tasks == set(digits.TASKS)
  # images are the stored digits, upsampled by nearest neighbour (16 = 2 x 8)
  first = images.preprocess_image(np.arange(64, dtype=np.uint8).reshape(8, 8, 1),
                                  image_size=16, channels=3, kind="digits")
  assert first.shape == (16, 16, 3) and first[1, 1, 2] == 0 and first[2, 0, 0] == 8 / 255


def test_pipeline_task_filter_and_padded_eval(data_dir):
  tokenizer = vl_pipeline.get_vl_tokenizer("byte")
  source = datasets.data_source("digits_vl", "validation", data_dir)
  vqa = list(vl_pipeline.vl_eval_batches(source, tokenizer, seq_len=SEQ_LEN, batch_size=64,
                                         tasks=["vqa"]))
  assert len(vqa) == 8  # 480 VQA examples -> 7 full batches + 1 padded
  task = np.concatenate([b["task"] for b in vqa])
  real = np.concatenate([b["text_length"] for b in vqa]) > 0
  assert real.sum() == 480 and np.all(task[real] == digits.TASKS.index("vqa"))
  assert not vqa[-1]["weights"][real[-64:] == 0].any()
  extra = list(vl_pipeline.vl_eval_batches(source, tokenizer, seq_len=SEQ_LEN, batch_size=64,
                                           tasks=["vqa"], num_batches=10))
  assert len(extra) == 10 and not extra[-1]["image_mask"].any()
  with pytest.raises(ValueError, match="raise seq_len"):
    next(iter(vl_pipeline.vl_dataset(source, tokenizer, seq_len=20, batch_size=2, seed=0)))
  with pytest.raises(ValueError, match="subset of"):
    vl_pipeline.vl_dataset(source, tokenizer, seq_len=SEQ_LEN, batch_size=2, seed=0,
                           tasks=["ocr"])


def test_prompt_tokens_match_the_rows(data_dir):
  tokenizer = vl_pipeline.get_vl_tokenizer("byte")
  source = datasets.data_source("digits_vl", "test", data_dir)
  for i in range(5):
    ex = source[i]
    row = vl_pipeline.encode_example(ex, tokenizer, seq_len=SEQ_LEN)
    ids = vl_pipeline.prompt_tokens(ex, tokenizer)
    np.testing.assert_array_equal(row["inputs"][:len(ids)], ids)
    assert tokenizer.decode(ids) == prompts.prompt_text(ex)
