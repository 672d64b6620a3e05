"""experiments/mplug_official.py on miniature official-format files: COCO-style JPEGs of
coloured shapes, karpathy/dataset_coco.json (5 captions each) and VQAv2 question /
annotation files (10 answers each), prepared with the official builders; then the whole
table (pretraining, retrieval, captioning, VQA) at tiny size for a few steps."""
import json
import os
import sys

import jax
import numpy as np
from PIL import Image, ImageDraw
import pytest

from metalm_jax.data import datasets
from metalm_jax.inference import mplug as mplug_inference
from metalm_jax.train import state as state_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import mplug_official  # noqa: E402  pylint: disable=g-import-not-at-top

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
          "yellow": (230, 210, 20)}
# 16 images, one per (colour, shape): (colour, shape, COCO subset, Karpathy split). Karpathy
# train = 8 train2014 images (each colour and shape twice) + 2 restval (val2014); val 2; test
# 4 unseen combinations of seen colours and shapes. VQAv2: train = the train2014 images'
# questions, validation = the val2014 images'.
IMAGES = [
    ("red", "square", "train2014", "train"), ("red", "circle", "train2014", "train"),
    ("green", "square", "train2014", "train"), ("green", "circle", "train2014", "train"),
    ("blue", "triangle", "train2014", "train"), ("blue", "cross", "train2014", "train"),
    ("yellow", "triangle", "train2014", "train"), ("yellow", "cross", "train2014", "train"),
    ("green", "cross", "val2014", "restval"), ("yellow", "circle", "val2014", "restval"),
    ("red", "triangle", "val2014", "val"), ("blue", "square", "val2014", "val"),
    ("red", "cross", "val2014", "test"), ("green", "triangle", "val2014", "test"),
    ("blue", "circle", "val2014", "test"), ("yellow", "square", "val2014", "test"),
]


def coco_id(i: int) -> int:
  return 100 + i


def draw(color: str, shape: str, size: int = 32) -> Image.Image:
  image = Image.new("RGB", (size, size), (245, 245, 245))
  d, rgb, a, b = ImageDraw.Draw(image), COLORS[color], size // 5, size - size // 5
  if shape == "square":
    d.rectangle([a, a, b, b], fill=rgb)
  elif shape == "circle":
    d.ellipse([a, a, b, b], fill=rgb)
  elif shape == "triangle":
    d.polygon([(size // 2, a), (a, b), (b, b)], fill=rgb)
  else:
    d.rectangle([size // 2 - 3, a, size // 2 + 3, b], fill=rgb)
    d.rectangle([a, size // 2 - 3, b, size // 2 + 3], fill=rgb)
  return image


def captions(color: str, shape: str) -> list[str]:
  return [f"A {color} {shape}.", f"A {color} {shape} on a white background.",
          f"a picture of a {color} {shape}", f"The {shape} is {color}.",
          f"a small {color} {shape} in the middle"]


def questions(color: str, shape: str) -> list[tuple[str, list[str]]]:
  """(question, 10 human answers): mostly right, with some disagreement."""
  return [("What color is the shape?", [color] * 8 + [f"dark {color}", "orange"]),
          ("What shape is this?", [shape] * 9 + ["square" if shape != "square" else "box"]),
          ("Is the shape red?", ["yes" if color == "red" else "no"] * 10)]


def _json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def write_manual_dir(root: str) -> None:
  """COCO images, karpathy/dataset_coco.json and VQAv2 files in the official layout."""
  entries = []
  for i, (color, shape, subset, split) in enumerate(IMAGES):
    filename = f"COCO_{subset}_{coco_id(i):012d}.jpg"
    os.makedirs(f"{root}/coco/{subset}", exist_ok=True)
    draw(color, shape).save(f"{root}/coco/{subset}/{filename}", format="JPEG", quality=95)
    entries.append({"filepath": subset, "filename": filename, "imgid": i, "split": split,
                    "cocoid": coco_id(i), "sentids": list(range(5 * i, 5 * i + 5)),
                    "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": i,
                                   "sentid": 5 * i + k}
                                  for k, c in enumerate(captions(color, shape))]})
  _json(f"{root}/karpathy/dataset_coco.json", {"dataset": "coco", "images": entries})
  for subset in ("train2014", "val2014"):
    qs, anns = [], []
    for i, (color, shape, s, _) in enumerate(IMAGES):
      if s != subset:
        continue
      for k, (question, answers) in enumerate(questions(color, shape)):
        qid = coco_id(i) * 10 + k
        qs.append({"image_id": coco_id(i), "question": question, "question_id": qid})
        anns.append({"question_id": qid, "image_id": coco_id(i),
                     "question_type": "what", "answer_type": "yes/no" if k == 2 else "other",
                     "multiple_choice_answer": answers[0],
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j, a in enumerate(answers)]})
    _json(f"{root}/vqav2/v2_OpenEnded_mscoco_{subset}_questions.json", {"questions": qs})
    _json(f"{root}/vqav2/v2_mscoco_{subset}_annotations.json", {"annotations": anns})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("mplug_official"))
  manual = os.path.join(str(tmp_path_factory.mktemp("manual")), "official")
  write_manual_dir(manual)
  for name in ("coco_karpathy", "vqav2"):
    datasets.prepare(name, data_dir, manual_dir=manual)
  return data_dir


def test_not_prepared_names_the_datasets_and_the_commands(tmp_path):
  with pytest.raises(mplug_official.DatasetsNotPreparedError) as error:
    mplug_official.run_official(workdir=str(tmp_path / "w"), data_dir=str(tmp_path / "data"),
                                size="tiny", seed=0, pretrain_steps=1, caption_steps=1,
                                vqa_steps=1)
  message = str(error.value)
  for needle in ("coco_karpathy", "vqav2", "docs/reproducing.md", "downloads/manual",
                 "prepare_data.py --dataset=coco_karpathy", "prepare_data.py --dataset=vqav2"):
    assert needle in message, needle
  assert isinstance(error.value, datasets.DatasetNotPreparedError)
  assert not (tmp_path / "w").exists()


def test_preprocessing_and_tokens():
  image = np.asarray(draw("blue", "square", 32))
  x = mplug_official.preprocess_image(image, 8)
  assert x.shape == (8, 8, 3) and x.dtype == np.float32
  center = x[4, 4] * mplug_official.CLIP_STD + mplug_official.CLIP_MEAN  # back to [0, 1]
  np.testing.assert_allclose(center, np.array(COLORS["blue"]) / 255, atol=0.03)
  assert mplug_official.clean_text('A "red" square:  on (white)!', 3) == "a red square"
  assert mplug_official.answer_list([["a", "b", "b"], ["c", "b", "a"]], 2) == ["b", "a"]


def test_retrieval_scores_and_answer_ranking_match_the_library():
  """The memory-frugal retrieval and the top-k answer ranking give `inference.mplug`'s
  results (retrieve; the argmax of answer_scores when k covers every answer)."""
  model = state_lib.Model(dict(
      name="mplug", vocab_size=40, d_model=16, itc_dim=8,
      vision_encoder=dict(image_size=8, patch_size=4, channels=3, d_model=16, num_layers=1,
                          num_heads=2, d_ff=32),
      text_encoder=dict(num_layers=1, num_heads=2, d_ff=32, max_len=12),
      fusion=dict(num_layers=2, stride=1, num_heads=2, d_ff=32),
      decoder=dict(num_layers=1, num_heads=2, d_ff=32, max_len=12)))
  rng = np.random.default_rng(0)
  # Random weights straight from NumPy: initialising the model would compile every initialiser.
  params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(a.dtype),
                        model.abstract_params)
  module = model.merge(params, jax.jit(lambda key: model.init(key)[1])(jax.random.key(0)))
  # Sizes the batch divides (one compilation per function here and in the library).
  images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
  tokens = np.zeros((6, 6), np.int32)
  for i in range(6):
    n = 1 + i % 4
    tokens[i, 0], tokens[i, 1:1 + n], tokens[i, 1 + n] = 1, rng.integers(4, 39, n), 2
  ours = mplug_official.retrieval_scores(module, iter([images[:2], images[2:]]), 4, tokens,
                                         k=3, batch_size=2)
  reference = mplug_inference.retrieve(module, images, tokens, k=3, batch_size=2)
  for key in ("itc_i2t", "itc_t2i", "i2t", "t2i"):
    np.testing.assert_allclose(ours[key], reference[key], atol=1e-5, err_msg=key)

  answers = mplug_official.answer_tokens(_Tokenizer(), ["5", "6 7", "8", "9 10 11", "12"], 11)
  scores = np.asarray(mplug_inference.answer_scores(module, images[:3], tokens[:3], answers))
  best, best_score = mplug_official.rank_answers(module, images[:3], tokens[:3], answers, k=99)
  assert best.shape == (3,)
  np.testing.assert_array_equal(np.asarray(best), scores.argmax(1))
  np.testing.assert_allclose(np.asarray(best_score), scores.max(1), atol=1e-4)
  best, best_score = mplug_official.rank_answers(module, images[:3], tokens[:3], answers, k=2)
  np.testing.assert_allclose(np.asarray(best_score), scores[np.arange(3), np.asarray(best)],
                             atol=1e-4)


class _Tokenizer:
  """Space-separated integers as ids (for answer_tokens)."""
  pad_id, bos_id, eos_id = 0, 1, 2

  def encode(self, text):
    return np.array([int(t) for t in text.split()], np.int32)


# A smaller model than configs/mplug.py tiny's (one layer each, fusion 'AC': both kinds), to
# keep compilation, which dominates these runs, short.
SMALL = {"model.vision_encoder.num_layers": 1, "model.text_encoder.num_layers": 1,
         "model.fusion.num_layers": 2, "model.fusion.stride": 1, "model.decoder.num_layers": 1}


def run(data_dir, workdir, **kwargs):
  settings = dict(workdir=workdir, data_dir=data_dir, size="tiny", seed=0, pretrain_steps=4,
                  caption_steps=3, vqa_steps=3, batch_size=8, eval_limit=0, answer_list_size=8,
                  beam_size=2, rerank_k=4, answer_rank_k=4, image_size=16, vocab_size=300,
                  eval_batch_size=8, log_every=2, overrides=SMALL)
  return mplug_official.run_official(**dict(settings, **kwargs))


def check_results(r, workdir):
  """Every metric present and in range; results.json and the table rows."""
  assert r["data"] == {"pretrain_images": 10, "pretrain_pairs": 50, "vqa_train_questions": 24}
  assert r["vocab_size"] == 301 and r["image_size"] == 16 and r["fusion_pattern"] == "AC"
  ret = r["retrieval"]
  assert (ret["num_images"], ret["num_texts"], ret["rerank_k"]) == (4, 20, 4)
  for stage in ("itc", "itc+itm"):
    for direction in ("i2t", "t2i"):
      recall = [ret[stage][direction][f"R@{k}"] for k in (1, 5, 10)]
      assert all(0 <= v <= 1 for v in recall) and recall == sorted(recall)
    assert ret[stage]["t2i"]["R@5"] == 1.0  # 4 images: each caption's image is in its top 5
    assert ret[stage]["i2t"]["R@10"] >= 0.25  # 20 captions, 5 per image
  cap = r["captioning"]
  assert (cap["num_images"], cap["num_references"]) == (4, 20)
  assert 0 <= cap["bleu4"] <= 1 and 0 <= cap["rouge_l"] <= 1 and 0 <= cap["cider_d"] <= 10
  assert [len(s["references"]) for s in cap["samples"]] == [5] * 4
  vqa = r["vqa"]
  assert (vqa["num_questions"], vqa["answer_list_size"], vqa["rank_k"]) == (24, 8, 4)
  for mode in ("generate", "rank"):
    assert 0 <= vqa[mode]["accuracy"] <= 1
    assert set(vqa[mode]["per_answer_type"]) == {"yes/no", "other"}
  train_answers = [a for c, s, subset, _ in IMAGES if subset == "train2014"
                   for _, a in questions(c, s)]
  assert {s["ranked"] for s in vqa["samples"]} <= set(
      mplug_official.answer_list(train_answers, 8))
  assert 0 < vqa["answer_list_coverage"] <= 1
  assert any("COCO Karpathy train pairs only" in d for d in r["deviations"])
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["vqa"]["rank"]["accuracy"] == vqa["rank"]["accuracy"]
  assert saved["captioning"]["cider_d"] == cap["cider_d"]
  table = mplug_official.rows(r, "1 s on test")
  assert [row["task"] for row in table] == [
      "captioning", "captioning", "captioning", "VQA (generation)", "VQA (answer ranking)",
      "image-to-text retrieval", "text-to-image retrieval"]
  assert table[0]["paper"] == "141.0 (COCO Karpathy test, CE)"
  assert table[3]["paper"] == table[4]["paper"] == "79.79 (VQAv2 test-dev, base)"
  assert "COCO-only pretraining" in table[0]["config"]
  assert all(set(row) == {"task", "metric", "paper", "ours", "config", "data", "compute"}
             for row in table)
  with open(os.path.join(workdir, "results.md")) as f:
    assert "| captioning | CIDEr-D (x100) | 141.0" in f.read()


def test_run_official_without_pretraining(data_dir, tmp_path):
  """The whole path but the pretraining step (compiled in the slow test): fast."""
  workdir = str(tmp_path / "run")
  r = run(data_dir, workdir, pretrain_steps=0, caption_steps=2, vqa_steps=2, beam_size=1)
  check_results(r, workdir)
  assert r["pretrain"]["history"] == [] and len(r["vqa_finetune"]["history"]) == 1


@pytest.mark.slow
def test_run_official_end_to_end(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  r = run(data_dir, workdir)
  check_results(r, workdir)
  assert [h["step"] for h in r["pretrain"]["history"]] == [2, 4]
  assert [h["step"] for h in r["caption_finetune"]["history"]] == [2, 3]
  assert len(r["vqa_finetune"]["history"]) == 2
