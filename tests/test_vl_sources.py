"""data/vl_sources.py: official and digits examples in one format, read from files in the
official formats (the digits written by `digits_official`, prepared by the official
builders); the not-prepared error; clean_text, answer_list and the official VL tokenizer."""
import pickle

import numpy as np
import pytest

from metalm_jax.data import datasets
from metalm_jax.data import digits
from metalm_jax.data import digits_official
from metalm_jax.data import images
from metalm_jax.data import vl_sources
from tests import vl_test_data


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
  return vl_test_data.official_digits_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return vl_test_data.digits_vl_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def rows():
  """(uint8 scans [1797, 8, 8, 1], labels, {split: the scikit-learn rows written})."""
  scans, labels = digits.load_digits()
  splits = {s: idx[:vl_test_data.PER_SPLIT] for s, idx in digits.split_indices(labels).items()}
  return scans, labels, splits


def written_image(scan, size):
  """What the adapter should give for a digit written as a 32 x 32 RGB file."""
  return images.resize_image(np.asarray(digits_official.rgb_image(scan)), size)


def test_captions_one_example_per_image_or_per_caption(official_dir, rows):
  scans, labels, splits = rows
  for split in digits.SPLITS:
    source = vl_sources.vl_source("coco_karpathy", split, official_dir, image_size=16)
    assert len(source) == vl_test_data.PER_SPLIT and source.task == "caption"
    for i, row in enumerate(splits[split]):
      ex = source[i]
      refs = digits_official.captions(int(labels[row]))
      assert (ex["task"], ex["question"], ex["answer"], ex["references"]) == (
          "caption", "", refs[0], refs)
      assert (ex["index"], ex["pair_id"], ex["id"], ex["num_images"]) == (
          i, i, digits_official.coco_id(row), 1)
      assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
      # JPEG, decoded at half scale (draft): close to the written digit, far from others
      assert np.abs(ex["image"].astype(float) - written_image(scans[row], 16)).mean() < 12
      assert not ex["image2"].any() and ex["image2"].shape == (16, 16, 3)
  train = vl_sources.vl_source("coco_karpathy", "train", official_dir, image_size=16,
                               per_caption=True)
  assert len(train) == vl_test_data.PER_SPLIT * vl_sources.CAPTIONS_PER_IMAGE
  for i in range(len(train)):
    record, k = divmod(i, vl_sources.CAPTIONS_PER_IMAGE)
    ex = train[i]
    assert ex["answer"] == digits_official.captions(int(labels[splits["train"][record]]))[k]
    assert ex["pair_id"] == ex["index"] == record  # an image's captions are positives
  np.testing.assert_array_equal(train[7]["image"], train[9]["image"])
  with pytest.raises(IndexError):
    train[len(train)]


def test_vqa_examples_carry_every_human_answer(official_dir, rows):
  _, labels, splits = rows
  vqa = vl_sources.vl_source("vqav2", "train", official_dir, image_size=8)
  assert len(vqa) == 3 * vl_test_data.PER_SPLIT and vqa.task == "vqa"
  for i in range(len(vqa)):
    row, k = splits["train"][i // 3], i % 3
    question = digits.VQA_QUESTIONS[k]
    answers = digits_official.vqa_human_answers(question, int(labels[row]))
    ex = vqa[i]
    assert (ex["task"], ex["question"], ex["answer"], ex["answers"]) == (
        "vqa", question, answers[0], answers)
    cid = digits_official.coco_id(row)
    assert (ex["index"], ex["pair_id"], ex["image_id"], ex["id"]) == (cid, cid, cid,
                                                                      cid * 10 + k)
    assert ex["image"].shape == (8, 8, 3) and ex["num_images"] == 1
  # validation holds the questions on the digits validation and test images (val2014)
  assert len(vl_sources.vl_source("vqav2", "validation", official_dir)) == (
      6 * vl_test_data.PER_SPLIT)
  ok = vl_sources.vl_source("ok_vqa", "validation", official_dir, image_size=8)
  label = int(labels[splits["validation"][0]])
  assert ok[0]["answer"] == digits_official.NUMBER_WORDS[label + 1]  # the majority answer
  assert ok[0]["answers"] == digits_official.okvqa_human_answers(label)


def test_nlvr2_pairs_two_images_with_true_false(official_dir, rows):
  scans, labels, splits = rows
  source = vl_sources.vl_source("nlvr2", "validation", official_dir, image_size=16)
  pairs = digits.nlvr2_pairs(splits["validation"], labels, "validation")
  assert len(source) == len(pairs) and source.task == "nlvr2"
  for k, (left, right, statement, answer) in enumerate(pairs):
    ex = source[k]
    assert (ex["task"], ex["question"], ex["answer"], ex["num_images"], ex["id"]) == (
        "nlvr2", statement, answer, 2, f"dev-{k}-0-0")
    # PNG files: exactly the written digit, resized here
    np.testing.assert_array_equal(ex["image"], written_image(scans[left], 16))
    np.testing.assert_array_equal(ex["image2"], written_image(scans[right], 16))


def test_stored_sizes_and_text_only(official_dir):
  stored = vl_sources.vl_source("vqav2", "train", official_dir)[0]
  assert stored["image"].shape == (32, 32, 3) and stored["image"].dtype == np.uint8
  text = vl_sources.vl_source("nlvr2", "train", official_dir, images=False)[0]
  assert text["image"] is None and text["image2"] is None and text["answer"] in ("true",
                                                                                 "false")
  source = vl_sources.vl_source("coco_karpathy", "test", official_dir, image_size=8)
  clone = pickle.loads(pickle.dumps(source))  # grain worker processes get a copy
  np.testing.assert_array_equal(clone[1]["image"], source[1]["image"])
  assert "coco_karpathy" in repr(source) and "4 examples" in repr(source)


def test_digits_vl_examples_are_the_records_in_one_format(digits_dir):
  records = datasets.data_source("digits_vl", "validation", digits_dir)
  source = vl_sources.vl_source("digits_vl", "validation", digits_dir)
  assert len(source) == len(records) and source.task is None and not source.official
  for i in (0, 1, 4, 5, len(records) - 1):
    record, ex = records[i], source[i]
    np.testing.assert_array_equal(ex["image"], record["image"])  # stored 8 x 8 x 1
    np.testing.assert_array_equal(ex["image2"], record["image2"])
    for key in ("task", "question", "answer", "caption"):
      assert ex[key] == record[key].decode()
    for key in ("num_images", "index", "index2", "label", "label2"):
      assert ex[key] == int(record[key])
    assert ex["answers"] == ex["references"] == [ex["answer"]]
    assert ex["pair_id"] == int(record["label"]) and ex["id"] == i
  resized = vl_sources.vl_source("digits_vl", "validation", digits_dir, image_size=16)[0]
  assert resized["image"].shape == (16, 16, 3)
  assert len(vl_sources.vl_source("digits_vl", "validation", digits_dir,
                                  per_caption=True)) == len(records)


def test_missing_datasets_are_all_named_with_their_commands(tmp_path):
  empty = str(tmp_path / "empty")
  names = ["coco_karpathy", "vqav2/short_side_384", "ok_vqa", "nlvr2", "digits_vl"]
  with pytest.raises(datasets.DatasetNotPreparedError) as error:
    datasets.check_prepared(names, empty, what="The METALM VL table")
  message = str(error.value)
  assert message.startswith("The METALM VL table needs 5 dataset(s); 5 not prepared")
  for name in names:
    assert f"prepare_data.py --dataset={name} --data_dir={empty}" in message
  assert "downloads/manual" in message and "docs/reproducing.md" in message
  with pytest.raises(datasets.DatasetNotPreparedError, match="vqav2"):
    vl_sources.vl_source("vqav2", "train", empty)
  with pytest.raises(ValueError, match="Unknown dataset 'gqa'"):
    datasets.check_prepared(["gqa"], empty, what="x")


def test_only_the_missing_ones_are_named(official_dir):
  datasets.check_prepared(vl_test_data.OFFICIAL, official_dir, what="x")  # all there
  with pytest.raises(datasets.DatasetNotPreparedError) as error:
    datasets.check_prepared(["vqav2", "digits_vl", "flickr30k_karpathy"], official_dir,
                              what="y")
  message = str(error.value)
  assert "2 not prepared" in message and "--dataset=vqav2 " not in message
  assert "--dataset=digits_vl" in message and "--dataset=flickr30k_karpathy" in message


def test_bad_arguments_are_clear_errors(official_dir):
  with pytest.raises(ValueError, match="not a vision-language dataset"):
    vl_sources.vl_source("pydoc_topics", "train", official_dir)
  with pytest.raises(ValueError, match="per_caption"):
    vl_sources.vl_source("vqav2", "train", official_dir, per_caption=True)
  with pytest.raises(ValueError, match="Unknown split 'dev'"):
    vl_sources.vl_source("nlvr2", "dev", official_dir)
  with pytest.raises(ValueError, match="image_size=0"):
    vl_sources.vl_source("nlvr2", "train", official_dir, image_size=0)


def test_clean_text_and_answer_list():
  assert vl_sources.clean_text('A "red" square:  on (white)!', 3) == "a red square"
  assert vl_sources.clean_text(b"The digit SEVEN.") == "the digit seven"
  assert vl_sources.clean_text(" ".join(["w"] * 40)) == " ".join(["w"] * 30)
  assert vl_sources.answer_list([["a", "b", "b"], ["c", "b", "a"]], 2) == ["b", "a"]
  assert vl_sources.answer_list([["x", "y"]], 5) == ["x", "y"]  # ties: first seen
  with pytest.raises(ValueError, match=">= 1"):
    vl_sources.answer_list([["a"]], 0)


def test_official_tokenizer_is_trained_once_and_shrinks_to_fit(official_dir):
  texts = list(vl_sources.tokenizer_texts(official_dir))
  assert "Summarize this image: a handwritten digit zero." in texts
  assert any(t.startswith("question: which digit is this? answer: ") for t in texts)
  tok = vl_sources.vl_tokenizer(official_dir, 1024)
  assert tok.model_path.endswith("tokenizers/vl_official_sp1024.model")
  assert tok.vocab_size < 1024  # the largest vocabulary the few test texts allow
  cached = vl_sources.vl_tokenizer(official_dir, 1024, max_chars=1)
  assert cached.vocab_size == tok.vocab_size
  text = "question: what number comes after this one? answer: seven"
  assert tok.decode(tok.encode(text)) == text


def test_flickr30k_captions_from_micro_official_files(tmp_path):
  import json
  import os
  from PIL import Image
  data_dir, manual = str(tmp_path / "data"), tmp_path / "manual"
  photos = {1000092795: ("train", (200, 30, 30)), 10002456: ("val", (30, 200, 30)),
            1001465944: ("test", (30, 30, 200))}
  os.makedirs(manual / "karpathy")
  os.makedirs(manual / "flickr30k" / "flickr30k-images")
  with open(manual / "karpathy" / "dataset_flickr30k.json", "w") as f:
    json.dump({"dataset": "flickr30k", "images": [
        {"filename": f"{p}.jpg", "imgid": i, "split": split, "sentids": list(range(5)),
         "sentences": [{"tokens": ["a"], "raw": f"Photo {p}, caption {k}!", "imgid": i,
                        "sentid": k} for k in range(5)]}
        for i, (p, (split, _)) in enumerate(photos.items())]}, f)
  for p, (_, color) in photos.items():
    Image.new("RGB", (40, 30), color).save(manual / "flickr30k" / "flickr30k-images" /
                                           f"{p}.jpg", quality=95)
  datasets.prepare("flickr30k_karpathy", data_dir, manual_dir=str(manual))
  source = vl_sources.vl_source("flickr30k_karpathy", "validation", data_dir, image_size=8,
                                per_caption=True)
  assert len(source) == 5 and source.task == "caption"
  ex = source[3]
  assert ex["answer"] == "Photo 10002456, caption 3!" and len(ex["references"]) == 5
  assert (ex["id"], ex["pair_id"], ex["index"]) == (10002456, 0, 0)
  assert ex["image"].shape == (8, 8, 3)
  np.testing.assert_allclose(ex["image"].reshape(-1, 3).mean(0), (30, 200, 30), atol=6)
  assert vl_sources.clean_text(ex["answer"]) == "photo 10002456, caption 3"
