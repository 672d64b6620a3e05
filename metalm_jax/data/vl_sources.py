"""Vision-language examples from any prepared VL dataset, in one format; and what they need.

    source = vl_source("vqav2", "validation", data_dir, image_size=224)
    source[0]  # {'task': 'vqa', 'question': 'what is ...?', 'answer': 'yes', 'answers': [...],
               #  'image': uint8 [224, 224, 3], ...}

`vl_source(dataset, split, data_dir, *, image_size=None, per_caption=False)` gives random
access (`len`, `source[i]`, picklable for grain workers) to the examples of one split of
'digits_vl' or of an official dataset ('coco_karpathy', 'flickr30k_karpathy', 'vqav2',
'ok_vqa', 'nlvr2', each also as '<name>/short_side_384'), as the digits-style dicts every
pipeline, prompt and evaluator of this project reads (`data/digits.py`, `data/prompts.py`):

  task        str      'caption' | 'vqa' | 'nlvr2'
  question    str      the question / NLVR2 statement; '' for captions
  answer      str      the training target: the caption (COCO: caption k, see
                       per_caption), VQAv2's multiple_choice_answer (OK-VQA: its most frequent
                       answer), NLVR2 'true' / 'false' (label 1 / 0)
  answers     [str]    VQA: every human answer (10; the VQA accuracy averages over them);
                       otherwise [answer]
  references  [str]    captions: every reference caption of the image; otherwise [answer]
  image       uint8 [S, S, 3] when image_size=S (resized by `images.resize_image` here, at
              read time, so batches stay cheap); else as stored: digits uint8 [8, 8, 1],
              official images decoded to uint8 [H, W, 3]; None with images=False
  image2      the right NLVR2 image; zeros of image's shape for single-image examples
  num_images  int      1, or 2 for NLVR2
  index       int      the image: digits its scikit-learn row; captions its record index in
                       the split; VQA its COCO image id; NLVR2 the record index
  index2      int      digits: the right image's row; -1 otherwise
  pair_id     int      examples with equal pair_id show the same thing (ITC positives):
                       digits the digit label; captions the image's record index; VQA the
                       image id; NLVR2 the record index
  id                   an identifier for outputs: question_id, COCO / Flickr image id, the
                       NLVR2 identifier, the digits record index
  digits also keep 'label', 'label2' and 'caption'; official captions / VQA keep 'image_id'.

`per_caption=True` (caption datasets; a no-op for digits, whose images have one caption)
gives one example per (image, caption k < CAPTIONS_PER_IMAGE): example i is record
i // 5 with caption i % 5 as its answer (a record with fewer captions repeats them), for
training; its pair_id is the image's record index, so an image's captions are positives.

Also here: `clean_text` (BLIP / mPLUG's pre_caption), `answer_list` (the most frequent
answers, for VQA ranking) and `vl_tokenizer` (the SentencePiece model of the official VL
datasets, trained once per data_dir).

This module must stay importable on its own: grain worker processes re-import it.
"""
import collections
import io
import itertools
import os
import re
from typing import Iterator, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from metalm_jax.data import datasets
from metalm_jax.data import images as images_lib
from metalm_jax.data import prompts
from metalm_jax.data import tokenizers

DIGITS = "digits_vl"
CAPTION_DATASETS = ("coco_karpathy", "flickr30k_karpathy")
VQA_DATASETS = ("vqav2", "ok_vqa")
VL_DATASETS = (DIGITS,) + CAPTION_DATASETS + VQA_DATASETS + ("nlvr2",)
IMAGE_FEATURES = {DIGITS: ("image", "image2"), "nlvr2": ("image", "image2"),
                  **{d: ("image",) for d in CAPTION_DATASETS + VQA_DATASETS}}
NLVR2_ANSWERS = ("false", "true")  # label 0 / 1
# Training examples per caption image with per_caption: (image, caption k) for k < 5 (every
# Karpathy image has >= 5; the few 6th / 7th COCO captions are references only).
CAPTIONS_PER_IMAGE = 5
# BLIP / mPLUG cut captions and questions to 30 words.
MAX_WORDS = 30


def base_name(dataset: str) -> str:
  """'vqav2/short_side_384' -> 'vqav2'."""
  return dataset.partition("/")[0]


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


# ---------------------------------------------------------------------------- text
def clean_text(text: str | bytes, max_words: int = MAX_WORDS) -> str:
  """BLIP / mPLUG's pre_caption: lowercase, each of .!"()*#:;~ a space, whitespace collapsed,
  at most max_words words."""
  return " ".join(re.sub(r'[.!"()*#:;~]', " ", _text(text).lower()).split()[:max_words])


def answer_list(answers: Sequence[Sequence[str]], size: int) -> list[str]:
  """The `size` most frequent of all answers (ties: first seen), for VQA answer ranking.

  The standard 3,129 VQAv2 answers are those given >= 9 times in train + val; this, over
  the train split's human answers, is the train-only analogue.
  """
  if size < 1:
    raise ValueError(f"answer list size={size} must be >= 1 (3,129 in the standard setup).")
  counts = collections.Counter(_text(a) for row in answers for a in row)
  return [a for a, _ in counts.most_common(size)]


# ---------------------------------------------------------------------------- the adapters
def _decode(data, image_size: int | None) -> np.ndarray:
  """Encoded bytes -> uint8 RGB [S, S, 3] (or [H, W, 3] as stored when image_size is None)."""
  if image_size is not None:
    return images_lib.resize_image(data, image_size)
  with Image.open(io.BytesIO(bytes(data))) as image:
    return np.asarray(image.convert("RGB"), np.uint8)


class VlSource:
  """Random access to one split of a VL dataset as digits-style examples (module docstring).

  Attributes:
    dataset, split: what it reads ('coco_karpathy/short_side_384', 'train').
    num_records: records of the split (len(self) is 5 x that with per_caption).
    official: False for digits_vl (its texts are templates), True for the official data.
    task: the task of every example ('caption', 'vqa', 'nlvr2'); None for digits_vl, which
      mixes them.
  """

  def __init__(self, dataset: str, split: str, data_dir: str | None = None, *,
               image_size: int | None = None, per_caption: bool = False, images: bool = True):
    base = base_name(dataset)
    if base not in VL_DATASETS:
      raise ValueError(f"dataset={dataset!r} is not a vision-language dataset; choose one of "
                       f"{list(VL_DATASETS)} (official ones also as '<name>/short_side_384').")
    if per_caption and base not in CAPTION_DATASETS + (DIGITS,):
      raise ValueError(f"per_caption=True gives one example per (image, caption) of a caption "
                       f"dataset {list(CAPTION_DATASETS)}; {dataset!r} has none.")
    if image_size is not None and image_size < 1:
      raise ValueError(f"image_size={image_size} must be >= 1 (or None: as stored).")
    data_dir = data_dir or datasets.default_data_dir()
    datasets.check_prepared([dataset], data_dir, what=f"vl_source({dataset!r}, {split!r})")
    builder = datasets.get_builder(dataset, data_dir)
    splits = sorted(builder.info.splits)
    for part in split.split("+"):
      if part.split("[")[0].strip() not in splits:
        raise ValueError(f"Unknown split {split!r} of dataset {dataset!r}; splits: {splits}.")
    self.dataset, self.split, self.base = dataset, split, base
    self.image_size, self.images, self._data_dir = image_size, images, data_dir
    self.per_caption = per_caption and base in CAPTION_DATASETS
    self.official = base != DIGITS
    self.task = (None if base == DIGITS else "caption" if base in CAPTION_DATASETS
                 else "vqa" if base in VQA_DATASETS else "nlvr2")
    # Official images stay encoded until the adapter resizes them; digits decode as stored.
    skip = self.official or not images
    decoders = {k: tfds.decode.SkipDecoding() for k in IMAGE_FEATURES[base]} if skip else None
    self._records = builder.as_data_source(split=split, decoders=decoders)
    self.num_records = len(self._records)
    if not self.num_records:
      raise ValueError(f"Split {split!r} of dataset {dataset!r} in {data_dir!r} has no "
                       "examples; choose a non-empty split.")

  def __len__(self) -> int:
    return self.num_records * (CAPTIONS_PER_IMAGE if self.per_caption else 1)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} examples of {self.dataset!r} "
                       f"{self.split!r}.")
    record, caption = divmod(i, CAPTIONS_PER_IMAGE) if self.per_caption else (i, 0)
    example = self._records[record]
    if self.base == DIGITS:
      return self._digits(example, record)
    if self.base in CAPTION_DATASETS:
      return self._caption(example, record, caption)
    if self.base in VQA_DATASETS:
      return self._vqa(example)
    return self._nlvr2(example, record)

  def task_names(self) -> list[str]:
    """Every example's task, in order, without decoding an image (a single-task dataset
    answers from `task`)."""
    if self.task is not None:
      return [self.task] * len(self)
    records = (self._records if not self.images else VlSource(
        self.dataset, self.split, self._data_dir, images=False)._records)
    return [_text(records[i]["task"]) for i in range(len(self))]

  def __repr__(self) -> str:
    return (f"VlSource({self.dataset!r}, {self.split!r}, image_size={self.image_size}, "
            f"per_caption={self.per_caption}, images={self.images}: {len(self)} examples)")

  # Images ---------------------------------------------------------------------
  def _image(self, data):
    return _decode(data, self.image_size) if self.images else None

  def _blank(self, like):
    return None if like is None else np.zeros_like(like)

  # One adapter per kind of dataset ------------------------------------------------
  def _digits(self, ex: dict, record: int) -> dict:
    answer = _text(ex["answer"])
    image, image2 = (ex["image"], ex["image2"]) if self.images else (None, None)
    if self.images and self.image_size is not None:
      image = images_lib.resize_image(image, self.image_size)
      image2 = images_lib.resize_image(image2, self.image_size)
    return {"task": _text(ex["task"]), "question": _text(ex["question"]), "answer": answer,
            "answers": [answer], "references": [answer], "image": image, "image2": image2,
            "num_images": int(ex["num_images"]), "index": int(ex["index"]),
            "index2": int(ex["index2"]), "pair_id": int(ex["label"]), "id": record,
            "label": int(ex["label"]), "label2": int(ex["label2"]),
            "caption": _text(ex["caption"])}

  def _caption(self, ex: dict, record: int, caption: int) -> dict:
    references = [_text(c) for c in ex["captions"]]
    if not references:
      raise ValueError(f"{self.dataset} {self.split}: image_id {int(ex['image_id'])} has no "
                       "captions; prepare the dataset again from the official files.")
    image = self._image(ex["image"])
    image_id = int(ex["image_id"])
    return {"task": "caption", "question": "", "answer": references[caption % len(references)],
            "answers": [references[caption % len(references)]], "references": references,
            "image": image, "image2": self._blank(image), "num_images": 1, "index": record,
            "index2": -1, "pair_id": record, "id": image_id, "image_id": image_id}

  def _vqa(self, ex: dict) -> dict:
    answers = [_text(a) for a in ex["answers"]]
    answer = _text(ex["multiple_choice_answer"]) or (answers[0] if answers else "")
    image = self._image(ex["image"])
    image_id = int(ex["image_id"])
    return {"task": "vqa", "question": _text(ex["question"]), "answer": answer,
            "answers": answers or [answer], "references": [answer], "image": image,
            "image2": self._blank(image), "num_images": 1, "index": image_id, "index2": -1,
            "pair_id": image_id, "id": int(ex["question_id"]), "image_id": image_id}

  def _nlvr2(self, ex: dict, record: int) -> dict:
    answer = NLVR2_ANSWERS[int(ex["label"])]
    return {"task": "nlvr2", "question": _text(ex["sentence"]), "answer": answer,
            "answers": [answer], "references": [answer], "image": self._image(ex["image"]),
            "image2": self._image(ex["image2"]), "num_images": 2, "index": record,
            "index2": -1, "pair_id": record, "id": _text(ex["identifier"])}


def vl_source(dataset: str, split: str, data_dir: str | None = None, *,
              image_size: int | None = None, per_caption: bool = False,
              images: bool = True) -> VlSource:
  """One split of a VL dataset as digits-style examples (see the module docstring).

  Args:
    dataset: 'digits_vl', 'coco_karpathy', 'flickr30k_karpathy', 'vqav2', 'ok_vqa' or
      'nlvr2'; the official ones also as '<name>/short_side_384'.
    split: a split name or expression ('train', 'validation', 'test', 'train[:10%]').
    data_dir: where it is prepared (default `datasets.default_data_dir()`).
    image_size: S: every image becomes uint8 RGB [S, S, 3] at read time (bicubic,
      `images.resize_image`); None keeps the stored size (digits: uint8 [8, 8, 1], for
      `images.preprocess_image(kind='digits')`).
    per_caption: caption datasets: one example per (image, caption k < 5), for training.
    images: False reads text only ('image' / 'image2' None, nothing decoded): for
      tokenizers, answer lists, references.

  Raises:
    datasets.DatasetNotPreparedError: the dataset is not prepared (the message says how).
    ValueError: an unknown dataset or split, an empty split, per_caption without captions.
  """
  return VlSource(dataset, split, data_dir, image_size=image_size, per_caption=per_caption,
                  images=images)


# ---------------------------------------------------------------------------- tokenizer
def tokenizer_texts(data_dir: str, *, caption_dataset: str = "coco_karpathy",
                    vqa_dataset: str = "vqav2",
                    max_chars: int = tokenizers.SENTENCEPIECE_MAX_TRAIN_CHARS) -> Iterator[str]:
  """The SentencePiece training text of the official VL datasets, deterministic.

  Prompt + target texts (`prompts.prompt_text` + `prompts.target_text`: "Summarize this
  image: A man ...", "question: what is ...? answer: yes") of caption_dataset's train
  captions (3/4 of max_chars) and vqa_dataset's train questions / answers (1/4), each read
  in a fixed random order and interleaved. No image is decoded; the budget, not the
  dataset's size, bounds the records read.
  """
  def stream(dataset, budget, seed, **kw):
    source = vl_source(dataset, "train", data_dir, images=False, **kw)
    used = 0
    for i in np.random.default_rng(seed).permutation(len(source)):
      if used >= budget:
        return
      ex = source[int(i)]
      text = prompts.prompt_text(ex) + prompts.target_text(ex)
      used += len(text)
      yield text

  streams = [stream(caption_dataset, max_chars - max_chars // 4, 0, per_caption=True),
             stream(vqa_dataset, max_chars // 4, 1)]
  for text in itertools.chain.from_iterable(itertools.zip_longest(*streams)):
    if text is not None:
      yield text


def vl_tokenizer(data_dir: str | None, vocab_size: int, *, name: str = "vl_official",
                 caption_dataset: str = "coco_karpathy", vqa_dataset: str = "vqav2",
                 max_chars: int = tokenizers.SENTENCEPIECE_MAX_TRAIN_CHARS
                 ) -> tokenizers.SentencePieceTokenizer:
  """The SentencePiece model of the official VL datasets, trained once and cached.

  Trained on `tokenizer_texts(...)` (train captions + VQA train questions and answers) and
  cached at `<data_dir>/tokenizers/<name>_sp<vocab_size>.model`; later calls (and other
  processes) read the file. On text too small for vocab_size (e.g. test files) it trains the
  largest vocabulary SentencePiece allows, cached under the requested size, so
  `tokenizer.vocab_size <= vocab_size` always (mPLUG puts its [MASK] id above it).

  Raises:
    datasets.DatasetNotPreparedError: caption_dataset or vqa_dataset is not prepared.
  """
  data_dir = data_dir or datasets.default_data_dir()
  path = tokenizers.sentencepiece_model_path(data_dir, name, vocab_size)
  if os.path.exists(path):
    return tokenizers.SentencePieceTokenizer(path)
  datasets.check_prepared([caption_dataset, vqa_dataset], data_dir,
                 what="The official vision-language tokenizer")
  texts = lambda: tokenizer_texts(data_dir, caption_dataset=caption_dataset,
                                  vqa_dataset=vqa_dataset, max_chars=max_chars)
  logging.info("Training a SentencePiece tokenizer (vocab_size=%d) on %s train captions + %s "
               "train questions / answers -> %s", vocab_size, caption_dataset, vqa_dataset,
               path)
  try:
    return tokenizers.train_sentencepiece(texts(), path, vocab_size, max_chars=max_chars)
  except ValueError as e:
    fits = re.search(r"value <= (\d+)", str(e))
    if not fits or int(fits[1]) >= vocab_size:
      raise
    logging.warning("Only %s pieces fit the tokenizer text; training that many (cached as %s).",
                    fits[1], path)
    return tokenizers.train_sentencepiece(texts(), path, int(fits[1]), max_chars=max_chars)
