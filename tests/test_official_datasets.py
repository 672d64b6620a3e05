"""The official-benchmark builders (metalm_jax.data.official) on tiny files in the official
formats: each dataset is built once from a few questions / captions / pairs and read back
through `datasets.data_source`."""
import io
import json
import os
import zlib

import numpy as np
from PIL import Image
import pytest

from metalm_jax.data import datasets
from metalm_jax.data import official

# COCO image id -> (subset, size (w, h), PIL mode). 42 is grayscale, as ~1% of COCO is.
COCO = {9: ("train2014", (6, 4), "RGB"), 25: ("train2014", (5, 7), "RGB"),
        42: ("val2014", (4, 4), "L"), 73: ("val2014", (6, 4), "RGB"),
        1: ("test2015", (3, 5), "RGB")}
FLICKR = {1000092795: "train", 10002456: "val", 1001465944: "test"}
BIG_FLICKR = 10002456  # 500 x 400: shrinks to 480 x 384 in config short_side_384


def color(key) -> tuple[int, int, int]:
  """A distinct solid colour per image, so tests can tell which image an example holds."""
  h = zlib.crc32(str(key).encode())
  return (40 + h % 180, 40 + (h >> 8) % 180, 40 + (h >> 16) % 180)


def _image(path, size, key, mode="RGB", fmt="JPEG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rgb = color(key)
  image = Image.new("RGB", size, rgb).convert(mode)
  image.save(path, format=fmt)


def _json(path, obj, lines=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    if lines:
      f.write("".join(json.dumps(o) + "\n" for o in obj))
    else:
      json.dump(obj, f)


def _vqa_answers(answers, confidence="yes"):
  return [{"answer": a, "answer_confidence": confidence, "answer_id": i + 1}
          for i, a in enumerate(answers)]


VQA_ANSWERS = {
    90: ["red"] * 8 + ["dark red", "maroon"],
    91: ["2"] * 6 + ["3"] * 4,
    250: ["yes"] * 10,
    420: ["cat"] * 9 + ["kitten"],
    730: ["tennis"] * 10,
}
VQA_IMAGE = {90: 9, 91: 9, 250: 25, 420: 42, 730: 73}
OKVQA_ANSWERS = {251: ["race", "race", "racing", "racing", "racing", "racing", "horse",
                       "horse", "derby", "derby"],
                 731: ["tennis", "tennis"] * 5}
OKVQA_IMAGE = {251: 25, 731: 73}
CAPTIONS = {9: 5, 25: 5, 42: 5, 73: 7}  # cocoid -> number of captions (some COCO have 7)
COCO_SPLIT = {9: "train", 25: "restval", 42: "val", 73: "test"}
NLVR2 = [  # (split file, identifier, label, train directory)
    ("train", "train-10171-0-0", "True", 3),
    ("train", "train-10171-0-1", "False", 3),
    ("dev", "dev-850-0-0", "False", None),
    ("test1", "test1-12-1-0", "True", None),
]


def write_official_tree(root: str) -> None:
  """A miniature manual dir in the official formats and layout of every dataset."""
  for image_id, (subset, size, mode) in COCO.items():
    _image(f"{root}/coco/{subset}/COCO_{subset}_{image_id:012d}.jpg", size, image_id, mode)
  # VQAv2
  for subset in ("train2014", "val2014"):
    qids = [q for q in VQA_ANSWERS if COCO[VQA_IMAGE[q]][0] == subset]
    _json(f"{root}/vqav2/v2_OpenEnded_mscoco_{subset}_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
        "data_subtype": subset, "license": {},
        "questions": [{"image_id": VQA_IMAGE[q], "question": f"question {q}?",
                       "question_id": q} for q in qids]})
    _json(f"{root}/vqav2/v2_mscoco_{subset}_annotations.json", {
        "info": {}, "license": {}, "data_subtype": subset, "annotations": [
            {"question_id": q, "image_id": VQA_IMAGE[q], "question_type": "what color is the",
             "answer_type": "other", "multiple_choice_answer": VQA_ANSWERS[q][0],
             "answers": _vqa_answers(VQA_ANSWERS[q], "maybe" if q == 91 else "yes")}
            for q in reversed(qids)]})  # order differs from the questions file on purpose
  _json(f"{root}/vqav2/v2_OpenEnded_mscoco_test-dev2015_questions.json", {
      "questions": [{"image_id": 1, "question": "what is this?", "question_id": 10}]})
  # OK-VQA: no multiple_choice_answer; answers carry raw_answer
  for q, image_id in OKVQA_IMAGE.items():
    subset = COCO[image_id][0]
    _json(f"{root}/okvqa/OpenEnded_mscoco_{subset}_questions.json", {
        "questions": [{"image_id": image_id, "question": f"ok question {q}?",
                       "question_id": q}]})
    _json(f"{root}/okvqa/mscoco_{subset}_annotations.json", {"annotations": [{
        "image_id": image_id, "answer_type": "other", "question_type": "four",
        "question_id": q, "confidence": 3,
        "answers": [{"answer_id": i + 1, "raw_answer": a + "s", "answer_confidence": "yes",
                     "answer": a} for i, a in enumerate(OKVQA_ANSWERS[q])]}]})
  # Karpathy COCO and Flickr30k
  _json(f"{root}/karpathy/dataset_coco.json", {"dataset": "coco", "images": [
      {"filepath": COCO[c][0], "filename": f"COCO_{COCO[c][0]}_{c:012d}.jpg", "imgid": i,
       "split": COCO_SPLIT[c], "cocoid": c, "sentids": list(range(n)),
       "sentences": [{"tokens": ["caption", str(k)], "raw": f"Caption {k} of {c}.",
                      "imgid": i, "sentid": k} for k in range(n)]}
      for i, (c, n) in enumerate(CAPTIONS.items())]})
  _json(f"{root}/karpathy/dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
      {"filename": f"{f}.jpg", "imgid": i, "split": split, "sentids": list(range(5)),
       "sentences": [{"tokens": ["a"], "raw": f"Flickr {f} caption {k}.", "imgid": i,
                      "sentid": k} for k in range(5)]}
      for i, (f, split) in enumerate(FLICKR.items())]})
  for f in FLICKR:
    _image(f"{root}/flickr30k/flickr30k-images/{f}.jpg",
           (500, 400) if f == BIG_FLICKR else (4, 3), f)
  # NLVR2: JSON lines; train images in numbered subdirectories
  for name in ("train", "dev", "test1"):
    rows = [{"validation": {}, "sentence": f"sentence {ident}", "left_url": "http://x/l.jpg",
             "writer": 1, "label": label, "right_url": "http://x/r.jpg", "synset": "n1",
             "query": "dogs 1", "identifier": ident,
             **({"directory": directory} if directory is not None else {})}
            for split, ident, label, directory in NLVR2 if split == name]
    _json(f"{root}/nlvr2/{name}.json", rows, lines=True)
    for split, ident, _, directory in NLVR2:
      if split != name:
        continue
      folder = f"{root}/nlvr2/images/{name}" + (f"/{directory}" if directory else "")
      for k, image_name in enumerate(official.nlvr2_image_names(ident)):
        # dev's left image is a JPEG named .png and its right one RGBA, as in the real data
        fmt = "JPEG" if (name, k) == ("dev", 0) else "PNG"
        mode = "RGBA" if (name, k) == ("dev", 1) else "RGB"
        _image(f"{folder}/{image_name}", (5, 3), image_name, mode, fmt)


NAMES = ("vqav2", "ok_vqa", "coco_karpathy", "nlvr2", "flickr30k_karpathy")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Every dataset built once, from <data_dir>/downloads/manual (the default manual dir)."""
  data_dir = str(tmp_path_factory.mktemp("official"))
  write_official_tree(os.path.join(data_dir, "downloads", "manual"))
  for name in NAMES:
    datasets.prepare(name, data_dir)
  return data_dir


def read(name, split, data_dir):
  source = datasets.data_source(name, split, data_dir)
  return [source[i] for i in range(len(source))]


def assert_solid(image, key, shape=None, gray=False):
  """`image` is uint8 RGB [H, W, 3] (of `shape`) filled with `color(key)` (its gray level)."""
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
  if shape is not None:
    assert image.shape == shape
  expected = np.array(color(key), np.float64)
  if gray:
    expected[:] = expected @ [0.299, 0.587, 0.114]
  np.testing.assert_allclose(image.reshape(-1, 3).mean(0), expected, atol=4)


def text(values):
  return [v.decode() for v in values]


def test_vqav2_joins_questions_answers_and_images(data_dir):
  splits = {s: read("vqav2", s, data_dir) for s in ("train", "validation", "test_dev")}
  assert {s: [int(e["question_id"]) for e in ex] for s, ex in splits.items()} == {
      "train": [90, 91, 250], "validation": [420, 730], "test_dev": [10]}
  for ex in splits["train"] + splits["validation"]:
    q = int(ex["question_id"])
    assert int(ex["image_id"]) == VQA_IMAGE[q]
    assert ex["question"].decode() == f"question {q}?"
    assert text(ex["answers"]) == VQA_ANSWERS[q]  # all 10, in order
    assert text(ex["answer_confidences"]) == ["maybe" if q == 91 else "yes"] * 10
    assert ex["multiple_choice_answer"].decode() == VQA_ANSWERS[q][0]
    assert (ex["question_type"], ex["answer_type"]) == (b"what color is the", b"other")
    w, h = COCO[VQA_IMAGE[q]][1]
    assert_solid(ex["image"], VQA_IMAGE[q], (h, w, 3), gray=VQA_IMAGE[q] == 42)  # now RGB
  test = splits["test_dev"][0]
  assert int(test["image_id"]) == 1 and len(test["answers"]) == 0
  assert test["multiple_choice_answer"] == b""
  assert_solid(test["image"], 1, (5, 3, 3))


def test_ok_vqa_takes_the_processed_answers_and_their_majority(data_dir):
  train, validation = read("ok_vqa", "train", data_dir), read("ok_vqa", "validation", data_dir)
  assert [int(e["question_id"]) for e in train + validation] == [251, 731]
  ex = train[0]
  assert text(ex["answers"]) == OKVQA_ANSWERS[251]  # 'answer', not 'raw_answer'
  assert ex["multiple_choice_answer"] == b"racing"  # OK-VQA has none: the most frequent
  assert int(ex["image_id"]) == 25 and ex["question_type"] == b"four"
  assert_solid(ex["image"], 25, (7, 5, 3))
  assert validation[0]["multiple_choice_answer"] == b"tennis"


def test_coco_karpathy_puts_restval_in_train_with_every_caption(data_dir):
  splits = {s: read("coco_karpathy", s, data_dir) for s in ("train", "validation", "test")}
  assert {s: [int(e["image_id"]) for e in ex] for s, ex in splits.items()} == {
      "train": [9, 25], "validation": [42], "test": [73]}
  for ex in sum(splits.values(), []):
    c = int(ex["image_id"])
    assert text(ex["captions"]) == [f"Caption {k} of {c}." for k in range(CAPTIONS[c])]
    assert ex["karpathy_split"].decode() == COCO_SPLIT[c]
    assert ex["filename"].decode() == f"{COCO[c][0]}/COCO_{COCO[c][0]}_{c:012d}.jpg"
    assert_solid(ex["image"], c, gray=c == 42)


def test_flickr30k_karpathy_and_the_resized_config(data_dir):
  splits = {s: read("flickr30k_karpathy", s, data_dir) for s in ("train", "validation", "test")}
  assert {s: [int(e["image_id"]) for e in ex] for s, ex in splits.items()} == {
      "train": [1000092795], "validation": [10002456], "test": [1001465944]}
  for ex in sum(splits.values(), []):
    f = int(ex["image_id"])
    assert ex["filename"].decode() == f"{f}.jpg"
    assert text(ex["captions"]) == [f"Flickr {f} caption {k}." for k in range(5)]
    assert_solid(ex["image"], f)
  assert splits["validation"][0]["image"].shape == (400, 500, 3)  # stored as is
  datasets.prepare("flickr30k_karpathy/short_side_384", data_dir)
  small = read("flickr30k_karpathy/short_side_384", "validation", data_dir)[0]
  assert_solid(small["image"], BIG_FLICKR, (384, 480, 3))
  assert read("flickr30k_karpathy/short_side_384", "train", data_dir)[0]["image"].shape == (
      3, 4, 3)  # smaller images stay as they are


def test_nlvr2_pairs_two_images_with_a_label(data_dir):
  splits = {s: read("nlvr2", s, data_dir) for s in ("train", "validation", "test")}
  assert {s: [e["identifier"].decode() for e in ex] for s, ex in splits.items()} == {
      "train": ["train-10171-0-0", "train-10171-0-1"], "validation": ["dev-850-0-0"],
      "test": ["test1-12-1-0"]}
  labels = {ident: int(label == "True") for _, ident, label, _ in NLVR2}
  for ex in sum(splits.values(), []):
    ident = ex["identifier"].decode()
    assert int(ex["label"]) == labels[ident]
    assert ex["sentence"].decode() == f"sentence {ident}"
    left, right = official.nlvr2_image_names(ident)
    assert_solid(ex["image"], left, (3, 5, 3))  # dev's is a JPEG named .png: re-encoded
    assert_solid(ex["image2"], right, (3, 5, 3))  # dev's is RGBA: now RGB
  assert official.nlvr2_image_names("dev-850-0-0") == ("dev-850-0-img0.png",
                                                        "dev-850-0-img1.png")


def test_missing_manual_dir_says_what_to_download_and_where(tmp_path):
  sources = {"vqav2": ["visualqa.org", "v2_Questions_Train_mscoco.zip", "cocodataset.org"],
             "ok_vqa": ["okvqa.allenai.org", "mscoco_val2014_annotations.json.zip"],
             "coco_karpathy": ["cs.stanford.edu/people/karpathy/deepimagesent",
                               "caption_datasets.zip", "val2014.zip"],
             "nlvr2": ["lil-lab/nlvr", "lil.nlp.cornell.edu/nlvr"],
             "flickr30k_karpathy": ["shannon.cs.illinois.edu", "dataset_flickr30k.json"]}
  for name, needles in sources.items():
    with pytest.raises(official.ManualFilesMissingError) as error:
      datasets.prepare(name, str(tmp_path / "data"), manual_dir=str(tmp_path / "nowhere"))
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message and "prepare_data.py" in message
    for f in official.BUILDERS[name].REQUIRED:
      assert f"<manual_dir>/{f.path}" in message
    for needle in needles:
      assert needle in message, (name, needle)
  with pytest.raises(datasets.DatasetNotPreparedError, match="downloads/manual"):
    datasets.data_source("nlvr2", "train", str(tmp_path / "data"))


def test_incomplete_manual_dir_names_the_missing_files(tmp_path):
  manual = tmp_path / "manual"
  write_official_tree(str(manual))
  (manual / "vqav2" / "v2_mscoco_val2014_annotations.json").unlink()
  with pytest.raises(official.ManualFilesMissingError,
                     match=r"Missing:\n  vqav2/v2_mscoco_val2014_annotations.json\n"):
    datasets.prepare("vqav2", str(tmp_path / "data"), manual_dir=str(manual))
  (manual / "coco" / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
  with pytest.raises(official.ManualFilesMissingError,
                     match="1 images listed in karpathy/dataset_coco.json are missing.*\n"
                     "Missing:\n  coco/val2014/COCO_val2014_000000000073.jpg"):
    datasets.prepare("coco_karpathy", str(tmp_path / "data"), manual_dir=str(manual))
  assert not datasets.get_builder("coco_karpathy", str(tmp_path / "data")).is_prepared()


def test_encode_image_keeps_rgb_files_and_converts_the_rest(tmp_path):
  path = str(tmp_path / "x.jpg")
  _image(path, (8, 6), "x")
  data = open(path, "rb").read()
  assert official.encode_image(data, encoding="jpeg") is data
  assert official.encode_image(data, encoding="jpeg", short_side=6) is data
  small = official.encode_image(data, encoding="jpeg", short_side=3)
  assert Image.open(io.BytesIO(small)).size == (4, 3)
  png = official.encode_image(data, encoding="png")
  with Image.open(io.BytesIO(png)) as image:
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (8, 6))
  assert official.majority_answer(["b", "a", "a", "b", "c"]) == "b"  # ties: first seen
  assert official.majority_answer([]) == ""
