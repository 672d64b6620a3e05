"""The bundled digits written as official dataset files: COCO Karpathy, VQAv2, OK-VQA, NLVR2.

`write_official_files(manual_dir)` turns scikit-learn's 1,797 real handwritten digits (the
data behind `digits_vl`, `metalm_jax/data/digits.py`) into files in the official formats and
layout that `metalm_jax/data/official.py` reads from a manual dir, so that
`datasets.prepare("vqav2", data_dir, manual_dir=manual_dir)` and the official-data configs
(`configs/metalm_vl.py` / `configs/mplug.py` with `data=official`) run on them with exactly
the code they run on the real downloads. This is what
`experiments/reproduce.py --table=metalm_vl|mplug --tiny` trains and evaluates on: the
paper tables' whole path, minutes on a CPU.

    coco/{train2014,val2014}/COCO_<subset>_<cocoid:012d>.jpg   the digit, RGB, 32 x 32
    karpathy/dataset_coco.json                                 5 captions per image
    vqav2/v2_OpenEnded_mscoco_{train,val}2014_questions.json   the 3 `digits.VQA_QUESTIONS`
    vqav2/v2_mscoco_{train,val}2014_annotations.json           10 answers each
    okvqa/OpenEnded_mscoco_{train,val}2014_questions.json      "what number comes after this
    okvqa/mscoco_{train,val}2014_annotations.json              one?" (arithmetic the captions
                                                               never state), 10 answers
    nlvr2/{train,dev,test1}.json                               `digits.nlvr2_pairs`, balanced
    nlvr2/images/{train/<d>,dev,test1}/<id>-img{0,1}.png       the left / right digit

Splits follow `digits.split_of` (image i is in one split only): digits train -> Karpathy
'train' and COCO train2014 (so VQAv2 / OK-VQA train), digits validation -> Karpathy 'val',
digits test -> Karpathy 'test'; both of those are val2014 images, so VQAv2 / OK-VQA
validation hold the questions on both (COCO's real layout: the Karpathy test images are
val2014 images too), in question-id order, i.e. by image. NLVR2: train / dev / test1 from the digits
train / validation / test splits. COCO id = scikit-learn row + 1.

Answers are in the VQA annotation format with 10 human answers each: the digit word eight
times and the numeral twice ("seven" x 8, "7" x 2 — one answer to the official
normalisation, which maps number words to digits), the other questions' answers ten times.

Images: the 8x8 scan's 17 levels as `digits.to_uint8`, upscaled x4 by pixel repetition to
32 x 32 (so nothing is invented) and stored as RGB (JPEG quality 95 for COCO, PNG for
NLVR2), since the official images are RGB files.

Deterministic (no global random state). To protect real downloads, files are written only
into an empty directory or one this function wrote before (it leaves `GENERATED_MARKER`).
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from metalm_jax.data import digits
from metalm_jax.data import official

GENERATED_MARKER = "GENERATED_FROM_DIGITS.json"
IMAGE_SIZE = 32  # 8 x 8 scans repeated x4
SUBSET = {"train": "train2014", "validation": "val2014", "test": "val2014"}
KARPATHY_SPLIT = {"train": "train", "validation": "val", "test": "test"}
NLVR2_SPLIT = {"train": "train", "validation": "dev", "test": "test1"}
NLVR2_TRAIN_DIRECTORIES = 10  # the official train images sit in numbered subdirectories
OKVQA_QUESTION = "what number comes after this one?"
NUMBER_WORDS = digits.DIGIT_WORDS + ("ten",)


def captions(label: int) -> list[str]:
  """The 5 reference captions of a digit (the first is `digits.caption`)."""
  word = digits.DIGIT_WORDS[label]
  return [digits.caption(label), f"the digit {word}, written by hand.",
          f"a scan of a handwritten {word}.", f"a handwritten number {word}.",
          f"an image of the digit {word}."]


def vqa_human_answers(question: str, label: int) -> list[str]:
  """The 10 annotators' answers to one of `digits.VQA_QUESTIONS`."""
  answer = digits.vqa_answer(question, label)
  return [answer] * 8 + [str(label)] * 2 if question == digits.VQA_QUESTIONS[0] else [answer] * 10


def okvqa_human_answers(label: int) -> list[str]:
  """The 10 answers to `OKVQA_QUESTION`: the next number, as a word (x7) and numeral (x3)."""
  return [NUMBER_WORDS[label + 1]] * 7 + [str(label + 1)] * 3


def coco_id(index: int) -> int:
  return int(index) + 1


def coco_filename(index: int, split: str) -> str:
  subset = SUBSET[split]
  return f"COCO_{subset}_{coco_id(index):012d}.jpg"


def rgb_image(image: np.ndarray) -> Image.Image:
  """uint8 [8, 8, 1] -> a 32 x 32 RGB PIL image (pixel repetition)."""
  gray = np.asarray(image, np.uint8).reshape(image.shape[:2])
  big = np.repeat(np.repeat(gray, IMAGE_SIZE // gray.shape[0], 0), IMAGE_SIZE // gray.shape[1], 1)
  return Image.fromarray(np.stack([big] * 3, -1), mode="RGB")


def _encoded(image: np.ndarray, fmt: str) -> bytes:
  out = io.BytesIO()
  rgb_image(image).save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return out.getvalue()


def _check_writable(manual_dir: str) -> None:
  if not os.path.isdir(manual_dir):
    return
  entries = set(os.listdir(manual_dir))
  if entries and GENERATED_MARKER not in entries:
    raise FileExistsError(
        f"{manual_dir!r} is not empty and was not written by write_official_files (no "
        f"{GENERATED_MARKER}): it may hold real downloads, which this would overwrite. "
        "Pass an empty or new directory.")


def _write(path: str, data: bytes | str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def _json(path: str, obj, lines: bool = False) -> None:
  _write(path, "".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj))


def write_official_files(manual_dir: str, *,
                         max_images_per_split: int | None = None) -> dict[str, dict[str, int]]:
  """Writes the digits as official coco_karpathy / vqav2 / ok_vqa / nlvr2 files (module doc).

  Args:
    manual_dir: the manual dir to write (created; empty or written by this function before).
    max_images_per_split: keep the first N images of each digits split (None: all 1,797:
      1,453 / 160 / 184).

  Returns:
    {dataset: {split: examples}} as the official builders will count them.

  Raises:
    FileExistsError: manual_dir holds files this function did not write.
  """
  _check_writable(manual_dir)
  images, labels = digits.load_digits()
  splits = digits.split_indices(labels)
  if max_images_per_split is not None:
    if max_images_per_split < 2:
      raise ValueError(f"max_images_per_split={max_images_per_split}: NLVR2 pairs need at "
                       "least 2 images per split.")
    splits = {s: idx[:max_images_per_split] for s, idx in splits.items()}
  root = manual_dir
  counts: dict[str, dict[str, int]] = {"coco_karpathy": {}, "vqav2": {}, "ok_vqa": {},
                                       "nlvr2": {}}
  karpathy, sentence_id = [], 0
  questions = {"vqav2": {"train2014": [], "val2014": []}, "okvqa": {"train2014": [],
                                                                   "val2014": []}}
  annotations = {"vqav2": {"train2014": [], "val2014": []}, "okvqa": {"train2014": [],
                                                                     "val2014": []}}
  for split in digits.SPLITS:  # validation before test: the order of val2014 below
    subset = SUBSET[split]
    for index in splits[split]:
      label, cid = int(labels[index]), coco_id(index)
      filename = coco_filename(index, split)
      _write(os.path.join(root, "coco", subset, filename), _encoded(images[index], "JPEG"))
      texts = captions(label)
      karpathy.append({
          "filepath": subset, "filename": filename, "imgid": len(karpathy),
          "split": KARPATHY_SPLIT[split], "cocoid": cid,
          "sentids": list(range(sentence_id, sentence_id + len(texts))),
          "sentences": [{"tokens": t.rstrip(".").replace(",", "").split(), "raw": t,
                         "imgid": len(karpathy), "sentid": sentence_id + k}
                        for k, t in enumerate(texts)]})
      sentence_id += len(texts)
      for k, question in enumerate(digits.VQA_QUESTIONS):
        qid = cid * 10 + k
        answers = vqa_human_answers(question, label)
        questions["vqav2"][subset].append({"image_id": cid, "question": question,
                                           "question_id": qid})
        annotations["vqav2"][subset].append({
            "question_id": qid, "image_id": cid,
            "question_type": question.split()[0] + (" the" if k else ""),
            "answer_type": ("number", "other", "yes/no")[k],
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                        for j, a in enumerate(answers)]})
      qid = cid * 10 + 5
      questions["okvqa"][subset].append({"image_id": cid, "question": OKVQA_QUESTION,
                                         "question_id": qid})
      annotations["okvqa"][subset].append({
          "question_id": qid, "image_id": cid, "question_type": "one", "answer_type": "other",
          "answers": [{"answer": a, "raw_answer": a, "answer_confidence": "yes",
                       "answer_id": j + 1} for j, a in enumerate(okvqa_human_answers(label))]})
    counts["coco_karpathy"][split] = len(splits[split])
  _json(os.path.join(root, "karpathy", "dataset_coco.json"),
        {"dataset": "coco", "images": karpathy})
  for subset in ("train2014", "val2014"):
    split = "train" if subset == "train2014" else "validation"
    _json(os.path.join(root, "vqav2", f"v2_OpenEnded_mscoco_{subset}_questions.json"),
          {"questions": questions["vqav2"][subset], "data_subtype": subset})
    _json(os.path.join(root, "vqav2", f"v2_mscoco_{subset}_annotations.json"),
          {"annotations": annotations["vqav2"][subset], "data_subtype": subset})
    _json(os.path.join(root, "okvqa", f"OpenEnded_mscoco_{subset}_questions.json"),
          {"questions": questions["okvqa"][subset], "data_subtype": subset})
    _json(os.path.join(root, "okvqa", f"mscoco_{subset}_annotations.json"),
          {"annotations": annotations["okvqa"][subset], "data_subtype": subset})
    counts["vqav2"][split] = len(questions["vqav2"][subset])
    counts["ok_vqa"][split] = len(questions["okvqa"][subset])

  for split, name in NLVR2_SPLIT.items():
    rows = []
    for k, (left, right, statement, answer) in enumerate(
        digits.nlvr2_pairs(splits[split], labels, split)):
      identifier = f"{name}-{k}-0-0"
      row = {"identifier": identifier, "sentence": statement,
             "label": "True" if answer == "true" else "False",
             "left_url": f"digits://{left}", "right_url": f"digits://{right}"}
      folder = os.path.join(root, "nlvr2", "images", name)
      if name == "train":
        row["directory"] = k % NLVR2_TRAIN_DIRECTORIES
        folder = os.path.join(folder, str(row["directory"]))
      for index, image_name in zip((left, right), official.nlvr2_image_names(identifier)):
        _write(os.path.join(folder, image_name), _encoded(images[index], "PNG"))
      rows.append(row)
    _json(os.path.join(root, "nlvr2", f"{name}.json"), rows, lines=True)
    counts["nlvr2"][{"train": "train", "dev": "validation", "test1": "test"}[name]] = len(rows)
  _json(os.path.join(root, GENERATED_MARKER),
        {"source": "sklearn.datasets.load_digits", "max_images_per_split":
         max_images_per_split, "counts": counts})
  return counts
