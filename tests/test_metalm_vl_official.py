"""experiments/metalm_vl_official.py: the METALM vision-language table on the official
datasets, end to end on micro files in the official formats (32x32 pattern images; COCO
Karpathy JSON, VQAv2 / OK-VQA question + annotation JSON with 10 answers, NLVR2 JSON lines
and image pairs), plus the adapter, the real-image preprocessor and the not-prepared error."""
import importlib.util
import json
import os

import numpy as np
from PIL import Image
import pytest

from metalm_jax.data import datasets
from metalm_jax.data import official
from tests.test_official_datasets import _json
from tests.test_official_datasets import _vqa_answers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "metalm_vl_official.py")


def _load_script():
  spec = importlib.util.spec_from_file_location("metalm_vl_official_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


mvo = _load_script()

# ------------------------------------------------------------------ micro official files
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
          "yellow": (230, 220, 30)}
PATTERNS = ("stripes", "checks", "halves")
# COCO image id -> (subset, Karpathy split, colour 1, colour 2, pattern): 12 images.
COCO_IMAGES = {
    1: ("train2014", "train", "red", "blue", "stripes"),
    2: ("train2014", "train", "green", "yellow", "checks"),
    3: ("train2014", "train", "blue", "red", "halves"),
    4: ("train2014", "train", "yellow", "green", "stripes"),
    5: ("train2014", "train", "red", "green", "checks"),
    6: ("train2014", "train", "blue", "yellow", "halves"),
    7: ("train2014", "restval", "green", "red", "stripes"),
    8: ("train2014", "restval", "yellow", "blue", "checks"),
    9: ("val2014", "val", "red", "yellow", "halves"),
    10: ("val2014", "val", "green", "blue", "stripes"),
    11: ("val2014", "test", "blue", "green", "checks"),
    12: ("val2014", "test", "yellow", "red", "halves"),
}
# NLVR2 identifier -> (image ids drawn as the left / right image, label).
NLVR2_PAIRS = {
    "train-1-0-0": (1, 4, "True"), "train-2-0-0": (1, 2, "False"),
    "train-3-0-0": (2, 5, "True"), "train-4-0-0": (3, 4, "False"),
    "train-5-0-0": (3, 6, "True"), "train-6-0-0": (5, 6, "False"),
    "dev-1-0-0": (7, 10, "True"), "dev-2-0-0": (7, 8, "False"),
    "dev-3-0-0": (8, 2, "True"), "dev-4-0-0": (9, 1, "False"),
    "test1-1-0-0": (11, 8, "True"), "test1-2-0-0": (12, 1, "False"),
}


def pattern_image(c1: str, c2: str, pattern: str, size: int = 32) -> np.ndarray:
  """uint8 [size, size, 3]: two colours as stripes, a checkerboard or two halves."""
  y, x = np.mgrid[:size, :size]
  first = {"stripes": (y // 4) % 2 == 0, "checks": ((y // 8) + (x // 8)) % 2 == 0,
           "halves": x < size // 2}[pattern]
  return np.where(first[..., None], COLORS[c1], COLORS[c2]).astype(np.uint8)


def _save(path: str, array: np.ndarray, fmt: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


def captions(c1, c2, pattern) -> list[str]:
  return [f"A {c1} and {c2} {pattern} pattern.", f"{c1.title()} and {c2} {pattern}.",
          f"a pattern of {pattern} in {c1} and {c2}", f"The image shows {c1} {pattern}.",
          f"{pattern} of {c1} and {c2} colour."]


def write_micro_tree(root: str) -> None:
  """A manual dir with the official layout of coco_karpathy, vqav2, ok_vqa and nlvr2."""
  for cid, (subset, _, c1, c2, pattern) in COCO_IMAGES.items():
    _save(f"{root}/coco/{subset}/COCO_{subset}_{cid:012d}.jpg", pattern_image(c1, c2, pattern),
          "JPEG")
  _json(f"{root}/karpathy/dataset_coco.json", {"dataset": "coco", "images": [
      {"filepath": subset, "filename": f"COCO_{subset}_{cid:012d}.jpg", "imgid": i,
       "split": split, "cocoid": cid, "sentids": list(range(5)),
       "sentences": [{"tokens": c.lower().split(), "raw": c, "imgid": i, "sentid": 5 * i + k}
                     for k, c in enumerate(captions(c1, c2, pattern))]}
      for i, (cid, (subset, split, c1, c2, pattern)) in enumerate(COCO_IMAGES.items())]})
  for subset in ("train2014", "val2014"):
    ids = [c for c, v in COCO_IMAGES.items() if v[0] == subset]
    # VQAv2: two questions per image, 10 answers each (annotators disagree a little).
    qs = [(100 * c + k, c, q, a) for c in ids for k, (q, a) in enumerate(
        [("what color is the first part?", COCO_IMAGES[c][2]),
         ("what pattern is this?", COCO_IMAGES[c][4])])]
    _json(f"{root}/vqav2/v2_OpenEnded_mscoco_{subset}_questions.json", {
        "questions": [{"image_id": c, "question": q, "question_id": qid}
                      for qid, c, q, _ in qs]})
    _json(f"{root}/vqav2/v2_mscoco_{subset}_annotations.json", {"annotations": [
        {"question_id": qid, "image_id": c, "question_type": "what", "answer_type": "other",
         "multiple_choice_answer": a, "answers": _vqa_answers([a] * 7 + ["pattern"] * 3)}
        for qid, c, _, a in qs]})
    # OK-VQA: one question per image, no multiple_choice_answer.
    _json(f"{root}/okvqa/OpenEnded_mscoco_{subset}_questions.json", {
        "questions": [{"image_id": c, "question": "what is this design called?",
                       "question_id": 5000 + c} for c in ids]})
    _json(f"{root}/okvqa/mscoco_{subset}_annotations.json", {"annotations": [
        {"question_id": 5000 + c, "image_id": c, "question_type": "other",
         "answer_type": "other", "answers": [
             {"answer": a, "raw_answer": a, "answer_confidence": "yes", "answer_id": k + 1}
             for k, a in enumerate([COCO_IMAGES[c][4]] * 6 + ["art"] * 4)]} for c in ids]})
  for name in ("train", "dev", "test1"):
    rows = {ident: v for ident, v in NLVR2_PAIRS.items() if ident.startswith(name + "-")}
    _json(f"{root}/nlvr2/{name}.json", [
        {"identifier": ident, "sentence": "both images show the same pattern.",
         "label": label, **({"directory": 1} if name == "train" else {})}
        for ident, (_, _, label) in rows.items()], lines=True)
    folder = f"{root}/nlvr2/images/{name}" + ("/1" if name == "train" else "")
    for ident, (left, right, _) in rows.items():
      for cid, image_name in zip((left, right), official.nlvr2_image_names(ident)):
        _save(f"{folder}/{image_name}", pattern_image(*COCO_IMAGES[cid][2:]), "PNG")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("vl_official"))
  write_micro_tree(os.path.join(data_dir, "downloads", "manual"))
  for name in mvo.DATASETS.values():
    datasets.prepare(name, data_dir)
  return data_dir


def _sources(data_dir, image_size=16):
  return {t: mvo.OfficialSource(t, s, data_dir, image_size=image_size)
          for t, s in mvo.EVAL_SPLIT.items()}


# ------------------------------------------------------------------ fast tests
def test_not_prepared_names_every_dataset_with_its_prepare_command(tmp_path):
  empty = str(tmp_path / "empty")
  with pytest.raises(mvo.DatasetsNotPreparedError) as error:
    mvo.run_official(workdir=str(tmp_path / "wd"), data_dir=empty, size="tiny", seed=0,
                     pretrain_steps=1, finetune_steps=1)
  message = str(error.value)
  for name in ("coco_karpathy", "vqav2", "ok_vqa", "nlvr2"):
    assert f"prepare_data.py --dataset={name} --data_dir={empty}" in message
  assert "docs/reproducing.md" in message and "downloads/manual" in message
  assert isinstance(error.value, datasets.DatasetNotPreparedError)
  assert not (tmp_path / "wd").exists()
  # Only what is needed: COCO + VQAv2 always (pretraining, tokenizer), then the tasks'.
  with pytest.raises(mvo.DatasetsNotPreparedError) as error:
    mvo.run_official(workdir=str(tmp_path / "wd"), data_dir=empty, size="tiny", seed=0,
                     pretrain_steps=1, finetune_steps=1, tasks=["coco"],
                     image_config="short_side_384")
  message = str(error.value)
  assert "--dataset=coco_karpathy/short_side_384" in message
  assert "--dataset=vqav2/short_side_384" in message and "nlvr2" not in message
  with pytest.raises(ValueError, match="subset"):
    mvo.run_official(workdir="x", data_dir=empty, size="tiny", seed=0, pretrain_steps=1,
                     finetune_steps=1, tasks=["gqa"])


def test_real_image_preprocessor_resizes_bicubic_rgb_to_unit_range():
  image = pattern_image("red", "blue", "halves", size=32)  # left red, right blue
  out = mvo.preprocess_real_image(image, image_size=16)
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0
  np.testing.assert_allclose(out[:, :6].reshape(-1, 3).mean(0), np.array(COLORS["red"]) / 255,
                             atol=0.02)
  np.testing.assert_allclose(out[:, 10:].reshape(-1, 3).mean(0),
                             np.array(COLORS["blue"]) / 255, atol=0.02)
  gray = mvo.resize_image(np.full((20, 30), 77, np.uint8), 8)  # any shape, gray -> RGB
  assert gray.shape == (8, 8, 3) and (gray == 77).all()
  rgba = np.concatenate([image, np.full((32, 32, 1), 255, np.uint8)], -1)
  np.testing.assert_array_equal(mvo.resize_image(rgba, 16), mvo.resize_image(image, 16))
  buffer = __import__("io").BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=95)  # encoded bytes work too
  np.testing.assert_allclose(mvo.preprocess_real_image(buffer.getvalue(), image_size=16), out,
                             atol=0.06)
  with pytest.raises(ValueError, match="uint8"):
    mvo.resize_image(image.astype(np.float32), 16)


def test_adapter_turns_official_examples_into_pipeline_examples(data_dir):
  src = _sources(data_dir)
  vqa = src["vqav2"][0]
  assert (vqa["task"], vqa["question"], vqa["answer"]) == (
      "vqa", "what color is the first part?", "red")
  assert vqa["answers"] == ["red"] * 7 + ["pattern"] * 3 and vqa["index"] == 9
  assert vqa["image"].shape == (16, 16, 3) and vqa["image"].dtype == np.uint8
  assert vqa["num_images"] == 1 and not vqa["image2"].any()
  ok = src["ok_vqa"][0]
  assert ok["answer"] == "halves" and len(ok["answers"]) == 10  # the majority answer
  coco = src["coco"]
  assert len(coco) == 2 and coco[0]["references"] == captions(*COCO_IMAGES[11][2:])
  assert coco[0]["task"] == "caption" and coco[0]["answer"] == coco[0]["references"][0]
  train = mvo.OfficialSource("coco", "train", data_dir, image_size=16, per_caption=True)
  assert len(train) == 8 * mvo.CAPTIONS_PER_IMAGE  # train + restval, one row per caption
  assert [train[i]["answer"] for i in range(5)] == captions(*COCO_IMAGES[1][2:])
  nlvr2 = src["nlvr2"]
  assert [ex["answer"] for ex in (nlvr2[i] for i in range(4))] == ["true", "false", "true",
                                                                    "false"]
  ex = nlvr2[0]
  assert ex["num_images"] == 2 and ex["question"] == "both images show the same pattern."
  np.testing.assert_array_equal(ex["image"], mvo.resize_image(pattern_image(
      *COCO_IMAGES[7][2:]), 16))  # the left image (img0), then the right one
  np.testing.assert_array_equal(ex["image2"], mvo.resize_image(pattern_image(
      *COCO_IMAGES[10][2:]), 16))
  text_only = mvo.OfficialSource("vqav2", "validation", data_dir, image_size=None)[0]
  assert text_only["image"] is None and text_only["answer"] == "red"


def test_rows_match_the_vl_pipeline_and_train_batches_have_static_shapes(data_dir):
  from metalm_jax import objectives
  from metalm_jax.data import vl_pipeline
  tok = mvo.get_tokenizer(data_dir, 512, max_chars=100_000)
  assert tok.model_path.endswith("metalm_vl_official_sp512.model")
  assert mvo.get_tokenizer(data_dir, 512, max_chars=1).vocab_size == tok.vocab_size  # cached
  assert tok.decode(tok.encode("Summarize this image: a red pattern")) == (
      "Summarize this image: a red pattern")
  ex = _sources(data_dir)["nlvr2"][0]
  row = mvo.encode_row(ex, tok, seq_len=40, image_size=16, max_images=2)
  gray = dict(ex, image=np.zeros((8, 8, 1), np.uint8), image2=np.zeros((8, 8, 1), np.uint8))
  ref = vl_pipeline.encode_example(gray, tok, seq_len=40)  # the same text layout
  for key in ("inputs", "targets", "weights", "segment_ids", "prompt_length", "text_length",
              "task", "image_mask"):
    np.testing.assert_array_equal(row[key], ref[key], err_msg=key)
  np.testing.assert_array_equal(row["images"][1], mvo.preprocess_real_image(ex["image2"],
                                                                           image_size=16))
  long = dict(ex, answer="red and blue " * 40)  # cut to fit, EOS kept
  cut = mvo.encode_row(long, tok, seq_len=40, image_size=16, max_images=2)
  assert cut["text_length"] == 40 and cut["targets"][-1] == tok.eos_id
  source = mvo.OfficialSource("coco", "train", data_dir, image_size=16, per_caption=True)
  batches = iter(mvo.train_batches(source, tok, seq_len=40, batch_size=4, seed=0,
                                   image_size=16, max_images=1, threads=2,
                                   prepare=objectives.get("semi_causal_vl").prepare))
  for _ in range(12):  # 48 rows: past the end of the 40 (image, caption) pairs
    batch = next(batches)
  assert batch["images"].shape == (4, 1, 16, 16, 3) and batch["inputs"].shape == (4, 40)
  assert (batch["prefix_length"] < batch["text_length"]).all()


def test_rows_of_the_table():
  result = lambda **kw: dict(kw, num_examples=7)
  results = {
      "size": "tiny", "image_size": 16, "pretrain_steps": 3, "finetune_steps": 2,
      "batch_size": 8,
      "zero_shot": {"vqav2": result(accuracy=0.25), "ok_vqa": result(accuracy=0.1),
                    "coco": result(cider_d=0.5)},
      "few_shot": {"shots": 2, "vqav2": result(accuracy=0.5)},
      "finetuned": {"nlvr2": result(accuracy=0.75), "coco": result(cider_d=1.234)}}
  rows = {r["task"]: r for r in mvo.rows(results, "1 s on cpu")}
  assert list(rows) == ["VQAv2 zero-shot", "OK-VQA zero-shot", "COCO captioning zero-shot",
                        "VQAv2 2-shot", "COCO captioning finetuned", "NLVR2 finetuned"]
  assert rows["VQAv2 zero-shot"]["ours"] == 25.0 and "41.1" in rows["VQAv2 zero-shot"]["paper"]
  assert "11.4" in rows["OK-VQA zero-shot"]["paper"]
  assert rows["COCO captioning finetuned"]["ours"] == 123.4
  assert rows["COCO captioning finetuned"]["metric"] == "CIDEr-D (x100)"
  assert rows["NLVR2 finetuned"]["data"] == "NLVR2 dev, 7 pairs"
  for r in rows.values():
    assert set(r) == {"task", "metric", "paper", "ours", "config", "data", "compute"}


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_run_official_end_to_end_on_micro_files(data_dir, tmp_path, monkeypatch):
  tiny_config = mvo.experiment_config

  def one_layer_config(*args, **kwargs):  # size=tiny with one layer per stack: compiles faster
    config = tiny_config(*args, **kwargs)
    with config.unlocked():
      for part in ("decoder", "text_encoder", "vision_encoder"):
        config.model[part].num_layers = 1
    return config

  monkeypatch.setattr(mvo, "experiment_config", one_layer_config)
  workdir = str(tmp_path / "run")
  results = mvo.run_official(workdir=workdir, data_dir=data_dir, size="tiny", seed=0,
                             pretrain_steps=4, finetune_steps=2, shots=2, eval_limit=3,
                             batch_size=8, log_every=2)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["finetuned"].keys() == results["finetuned"].keys()
  assert results["pretrain"]["final_loss"] > 0 and results["vocab_size"] <= 512
  for setting, tasks in (("zero_shot", ("vqav2", "ok_vqa", "coco")),
                         ("few_shot", ("vqav2", "ok_vqa", "coco")),
                         ("finetuned", mvo.TASKS)):
    assert set(results[setting]) - {"shots"} == set(tasks), setting
    for task in tasks:
      r = results[setting][task]
      if task == "coco":
        assert 0.0 <= r["cider_d"] <= 10.0 and 0.0 <= r["bleu4"] <= 1.0
        assert r["num_examples"] == 2  # the Karpathy test images
      else:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["num_examples"] == 3
      assert r["samples"] and all(isinstance(s["prediction"], str) for s in r["samples"])
  assert results["few_shot"]["shots"] == 2
  assert set(results["finetune"]) == set(mvo.TASKS)
  table = mvo.rows(results, "test")
  assert len(table) == 10 and all(isinstance(r["ours"], float) for r in table)
