"""The digits written as official files (`data.digits_official`) read back through the
official builders: what `reproduce.py --table=metalm_vl|mplug --tiny` trains and scores on."""
import json
import os

import numpy as np
import pytest

from metalm_jax.data import datasets
from metalm_jax.data import digits
from metalm_jax.data import digits_official
from metalm_jax.evaluation import metrics

PER_SPLIT = 6  # images per digits split: a few seconds to write and prepare
NAMES = ("coco_karpathy", "vqav2", "ok_vqa", "nlvr2")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("digits_official"))
  manual = os.path.join(data_dir, "downloads", "manual")
  counts = digits_official.write_official_files(manual, max_images_per_split=PER_SPLIT)
  for name in NAMES:
    datasets.prepare(name, data_dir, manual_dir=manual)
  return data_dir, manual, counts


def read(name, split, data_dir):
  source = datasets.data_source(name, split, data_dir)
  return [source[i] for i in range(len(source))]


def expected_rows():
  images, labels = digits.load_digits()
  splits = {s: idx[:PER_SPLIT] for s, idx in digits.split_indices(labels).items()}
  return images, labels, splits


def assert_is_digit(image, scan):
  """A 32 x 32 RGB image that is the 8 x 8 scan repeated x4 (JPEG: within a few levels)."""
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  big = np.repeat(np.repeat(np.asarray(scan, np.float64)[..., 0], 4, 0), 4, 1)
  for c in range(3):
    assert np.abs(image[..., c].astype(np.float64) - big).mean() < 6


def test_counts_match_what_the_builders_read(written):
  data_dir, _, counts = written
  assert counts["coco_karpathy"] == {s: PER_SPLIT for s in digits.SPLITS}
  # VQAv2: 3 questions per image; validation = digits validation + test (both val2014)
  assert counts["vqav2"] == {"train": 3 * PER_SPLIT, "validation": 6 * PER_SPLIT}
  assert counts["ok_vqa"] == {"train": PER_SPLIT, "validation": 2 * PER_SPLIT}
  assert counts["nlvr2"] == {s: PER_SPLIT for s in digits.SPLITS}
  for name, splits in counts.items():
    for split, n in splits.items():
      assert len(datasets.data_source(name, split, data_dir)) == n, (name, split)


def test_coco_karpathy_holds_the_digit_images_and_five_captions(written):
  data_dir = written[0]
  images, labels, splits = expected_rows()
  for split in digits.SPLITS:
    rows = read("coco_karpathy", split, data_dir)
    assert [int(r["image_id"]) - 1 for r in rows] == list(splits[split])
    for r in rows:
      index = int(r["image_id"]) - 1
      captions = [c.decode() for c in r["captions"]]
      assert captions == digits_official.captions(int(labels[index]))
      assert captions[0] == digits.caption(int(labels[index]))
      assert_is_digit(r["image"], images[index])


def test_vqa_answers_score_the_right_answer_one_and_a_wrong_one_zero(written):
  data_dir = written[0]
  images, labels, splits = expected_rows()
  rows = read("vqav2", "validation", data_dir)
  val_images = sorted(list(splits["validation"]) + list(splits["test"]))  # by question id
  assert [int(r["image_id"]) - 1 for r in rows[::3]] == val_images
  for r in rows:
    index, question = int(r["image_id"]) - 1, r["question"].decode()
    answers = [a.decode() for a in r["answers"]]
    assert len(answers) == 10 and question in digits.VQA_QUESTIONS
    right = digits.vqa_answer(question, int(labels[index]))
    assert metrics.vqa_score(right, answers) == 1.0
    # the official normalisation maps the number word and the numeral together
    if question == digits.VQA_QUESTIONS[0]:
      assert metrics.vqa_score(str(int(labels[index])), answers) == 1.0
    assert metrics.vqa_score("banana", answers) == 0.0
    assert_is_digit(r["image"], images[index])
  okvqa = read("ok_vqa", "validation", data_dir)
  for r in okvqa:
    label = int(labels[int(r["image_id"]) - 1])
    answers = [a.decode() for a in r["answers"]]
    assert r["question"].decode() == digits_official.OKVQA_QUESTION
    assert metrics.vqa_score(digits_official.NUMBER_WORDS[label + 1], answers) == 1.0
    assert metrics.vqa_score(digits.DIGIT_WORDS[label], answers) == 0.0  # not the digit


def test_nlvr2_labels_are_the_statements_truth(written):
  data_dir = written[0]
  images, labels, splits = expected_rows()
  for split in digits.SPLITS:
    rows = read("nlvr2", split, data_dir)
    pairs = digits.nlvr2_pairs(splits[split], labels, split)
    assert len(rows) == len(pairs)
    for r, (left, right, statement, answer) in zip(rows, pairs):
      assert r["sentence"].decode() == statement
      truth = digits.NLVR2_STATEMENTS[statement](labels[left], labels[right])
      assert int(r["label"]) == int(truth) == int(answer == "true")
      assert_is_digit(r["image"], images[left])
      assert_is_digit(r["image2"], images[right])


def test_rewrites_its_own_dir_but_refuses_foreign_files(written, tmp_path):
  _, manual, counts = written
  assert digits_official.write_official_files(manual, max_images_per_split=PER_SPLIT) == counts
  with open(os.path.join(manual, digits_official.GENERATED_MARKER)) as f:
    assert json.load(f)["counts"] == counts
  real = tmp_path / "real_downloads"
  real.mkdir()
  (real / "v2_mscoco_train2014_annotations.json").write_text("{}")
  with pytest.raises(FileExistsError, match="not written by write_official_files"):
    digits_official.write_official_files(str(real))
  assert sorted(os.listdir(real)) == ["v2_mscoco_train2014_annotations.json"]  # untouched
  with pytest.raises(ValueError, match="at least 2 images"):
    digits_official.write_official_files(str(tmp_path / "new"), max_images_per_split=1)
