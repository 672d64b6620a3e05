r"""METALM vision-language table on the official datasets (VQAv2, OK-VQA, COCO, NLVR2).

    # once: put the official files under $DATA/downloads/manual (docs/reproducing.md,
    # Datasets), then
    for d in coco_karpathy vqav2 ok_vqa nlvr2; do
      python experiments/prepare_data.py --dataset=$d --data_dir=$DATA
    done
    python experiments/metalm_vl_official.py --data_dir=$DATA --size=paper \
        --workdir=workdirs/metalm_vl_official --pretrain_steps=350000 \
        --finetune_steps=20000 --shots=4 --threads=16
    python experiments/metalm_vl_official.py --data_dir=$DATA --size=tiny \
        --pretrain_steps=200 --finetune_steps=100 --eval_limit=200   # a quick look, any machine

(with --image_config=short_side_384, prepare `--dataset=<name>/short_side_384` instead.)

What it runs (`run_official`), on `configs/metalm_vl.py` (ViT encoder docked to a causal
decoder; `size=paper` is the paper's model) with the vision encoder set for real RGB images
(`SIZES`: 224 px, patch 16 at size=paper; 16 px, patch 4 at size=tiny):

  1. A SentencePiece tokenizer trained on COCO Karpathy train captions + VQAv2 train
     questions / answers (as prompt + target text), cached at
     `<data_dir>/tokenizers/metalm_vl_official_sp<vocab>.model`.
  2. Pretraining with `semi_causal_vl` (the encoder sees the image + a random-length text
     prefix, the decoder predicts the rest) on COCO Karpathy train, one row per
     (image, caption) pair. `pretrain_steps=0` starts the evaluations from scratch.
  3. Zero-shot and k-shot VQA on VQAv2 and OK-VQA validation (prompt "question: {q}
     answer:", demonstrations drawn from each dataset's train split, each demonstration its
     own encoder span), scored with the official VQA accuracy over the 10 annotators
     (`evaluation.vqa_score(..., official_references=True)`, vqaEval.py's rules); zero- and
     k-shot captioning on COCO Karpathy test ("Summarize this image:"), CIDEr-D against all
     the image's references (pycocoevalcap, Python PTB tokenisation).
  4. One finetune per task from the pretrained weights (`semi_causal_vl_finetune`: image +
     prompt in the encoder, the answer is the target): VQAv2 and OK-VQA train (target: the
     `multiple_choice_answer`, OK-VQA's most frequent answer), NLVR2 train (two images,
     "question: {statement} answer:" -> "true" / "false"), COCO train captions; each is
     evaluated as above (NLVR2: accuracy of the generated word on dev).

Results go to `<workdir>/results.json`; `rows(results, compute)` turns them into the rows of
`experiments/reproduce.py` (task, metric, paper, ours, config, data, compute).

The adapter. Each official example becomes the example dict the digits pipeline uses
(`metalm_jax/data/digits.py`: 'task' caption | vqa | nlvr2, 'question', 'answer', 'image',
'image2', 'num_images', 'index', 'index2'), plus 'answers' (VQA: all 10 human answers, for
the score) and 'references' (COCO: every caption of the image). Images are decoded and
resized once, in the adapter, to uint8 [S, S, 3] (`resize_image`: RGB, bicubic, the whole
image squeezed to a square, nothing cropped; JPEGs decode at reduced DCT scale first), and
`preprocess_real_image` scales them to float32 [0, 1], the range `vl_pipeline` feeds the
model (`vl_pipeline.preprocess_image` is for the 8x8 gray digits: nearest-neighbour
upscaling, channel 0 only). No mean / std normalisation: the ViT is trained here from
scratch on these pixels.

Deviations from the paper (Hao et al. 2022, METALM), all deliberate and shown in the table:
  - Pretraining data: COCO Karpathy train captions only (the paper's image-text corpora have
    no builder here), so zero-shot VQA is far below the paper's setting.
  - NLVR2 target: the word "true" / "false" after the VQA prompt (the digits convention,
    one token each); the paper's template is "it is [label]". Two images per row, each its
    own encoder span, in one decoder sequence.
  - Decoding: greedy, no KV cache, answer lengths capped (`MAX_NEW_TOKENS`); the paper uses
    beam search with a length penalty for captioning.
  - Finetuning: the pretraining optimizer settings of the config (lr, warmup) for
    `finetune_steps`; the paper's per-task finetuning hyper-parameters are not reproduced.
    VQA is finetuned as open-ended generation of the majority answer (no answer
    classifier, no VQAv2 train+val / Visual Genome augmentation).
  - Not run: E-SNLI-VE, Flickr30k captioning / retrieval, VQAv2 test-dev (its answers are
    on the evaluation server; `datasets.data_source('vqav2', 'test_dev')` exists), NLVR2
    test-P (the dev split is reported), COCO's CIDEr optimisation (SCST).

Expected compute at size=paper (the paper: 350k steps at batch 256). The model here has
~623M parameters (decoder 436M with the 16k vocabulary, encoder 98M, ViT-B/16 86M). A
pretraining row is 197 image + 64 text positions, so a step is ~2.4e14 FLOPs (6 x parameters
x positions, each part over the positions it sees) and 350k steps ~8.4e19: ~7 hours on 8 x
H100 at 40% of the bf16 peak, ~2.5 days on one H100, several times that in the config's
float32. At ~0.1 s per step the input side must decode and resize 256 images per step: use
--threads (16 or more) and the datasets' short_side_384 config (--image_config). Each
finetune adds its steps at the same cost; a full VQAv2 validation pass (214k questions,
greedy, 4-shot rows of ~1.1k positions, no KV cache) takes hours on one accelerator, so
`--eval_limit` scores a prefix of each split. Single process: the training batches are
built whole in this process (one host; its local devices share them).
"""
from __future__ import annotations

import collections
import functools
import io
import itertools
import json
import os
import re
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from metalm_jax import config as config_lib
from metalm_jax import evaluation
from metalm_jax import objectives
from metalm_jax.data import datasets
from metalm_jax.data import digits
from metalm_jax.data import tokenizers
from metalm_jax.data import vl_pipeline
from metalm_jax.evaluation import caption_metrics
from metalm_jax.data import prompts as prompts_lib
from metalm_jax.train import loop
from metalm_jax.train import state as state_lib

metalm_vl = config_lib.config_module("metalm_vl")

# task -> its official dataset (a key of datasets.DATASETS).
DATASETS = {"vqav2": "vqav2", "ok_vqa": "ok_vqa", "coco": "coco_karpathy", "nlvr2": "nlvr2"}
TASKS = tuple(DATASETS)
TASK_KIND = {"vqav2": "vqa", "ok_vqa": "vqa", "coco": "caption", "nlvr2": "nlvr2"}
EVAL_SPLIT = {"vqav2": "validation", "ok_vqa": "validation", "coco": "test",
              "nlvr2": "validation"}
EVAL_SPLIT_NAME = {"vqav2": "VQAv2 validation", "ok_vqa": "OK-VQA validation (the official "
                   "test set)", "coco": "COCO Karpathy test", "nlvr2": "NLVR2 dev"}
IMAGE_FEATURES = {"vqav2": ("image",), "ok_vqa": ("image",), "coco_karpathy": ("image",),
                  "nlvr2": ("image", "image2")}
IMAGE_CONFIGS = ("original", "short_side_384")
NLVR2_ANSWERS = ("false", "true")  # label 0 / 1
# Training rows per COCO image: (image, caption k) for k < 5 (every Karpathy image has >= 5;
# the few 6th / 7th captions are used as references only).
CAPTIONS_PER_IMAGE = 5
# Greedy decoding caps (answer tokens incl. EOS); NLVR2's is its longer label word + EOS.
MAX_NEW_TOKENS = {"vqa": 12, "caption": 32}
TOKENIZER_NAME = "metalm_vl_official"
# Real-image model and data settings per configs/metalm_vl.py size: the vision encoder's
# image size / patch, the text positions per row, the text tokens an encoder span holds
# after the image tokens, the SentencePiece vocabulary (the decoder's vocab is set to the
# tokenizer's), the characters it trains on, the k-shot demonstration pool per task.
SIZES = {
    "tiny": dict(image_size=16, patch_size=4, seq_len=48, prefix=32, vocab=512,
                 tokenizer_chars=tokenizers.SENTENCEPIECE_MAX_TRAIN_CHARS, support=256,
                 eval_batch=32),
    "paper": dict(image_size=224, patch_size=16, seq_len=64, prefix=64, vocab=16384,
                  tokenizer_chars=8_000_000, support=2048, eval_batch=32),
}
PAPER = {  # the paper's numbers where they are known (METALM, Table: zero-shot VQA)
    ("vqav2", "zero_shot"): "41.1 (VQAv2, zero-shot)",
    ("ok_vqa", "zero_shot"): "11.4 (OK-VQA, zero-shot)",
}
DOCS = "docs/reproducing.md (section Datasets)"


class DatasetsNotPreparedError(datasets.DatasetNotPreparedError):
  """Official datasets this experiment reads are not prepared in the data directory."""


# ------------------------------------------------------------------ images
def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def resize_image(image, image_size: int) -> np.ndarray:
  """An image (encoded bytes, or uint8 [H, W], [H, W, 1 | 3 | 4]) -> uint8 RGB [S, S, 3].

  Bicubic resize of the whole image to S x S (the aspect ratio is not kept, so nothing is
  cropped away: a question may be about any part of the image). Encoded JPEGs are decoded at
  the smallest DCT scale that still covers S x S (PIL's `draft`), which is much faster for
  224 px from COCO's ~640 x 480 and changes the result only marginally.
  """
  if isinstance(image, (bytes, bytearray)):
    pil = Image.open(io.BytesIO(image))
    if pil.format == "JPEG":
      pil.draft("RGB", (image_size, image_size))
  else:
    array = np.asarray(image)
    if array.dtype != np.uint8:
      raise ValueError(f"resize_image needs uint8 pixels, got {array.dtype}.")
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
      raise ValueError(f"image of shape {array.shape}: expected [H, W] or [H, W, 1|3|4].")
    pil = Image.fromarray(array)
  pil = pil.convert("RGB")
  if pil.size != (image_size, image_size):
    pil = pil.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(pil, np.uint8)


def preprocess_real_image(image, *, image_size: int) -> np.ndarray:
  """An image (as `resize_image` takes) -> float32 [S, S, 3] in [0, 1], the model's input.

  The real-image counterpart of `vl_pipeline.preprocess_image` (8x8 gray digits): RGB,
  bicubic to S x S unless already that size, pixels / 255.
  """
  array = None if isinstance(image, (bytes, bytearray)) else np.asarray(image)
  if array is None or array.shape != (image_size, image_size, 3) or array.dtype != np.uint8:
    array = resize_image(image, image_size)
  return array.astype(np.float32) / 255.0


# ------------------------------------------------------------------ the adapter
def adapt(task: str, example: dict, *, image_size: int | None, caption: int = 0,
          index: int = -1) -> dict:
  """One official example -> the digits-style example dict the VL pipeline consumes.

  Args:
    task: 'vqav2' | 'ok_vqa' | 'coco' | 'nlvr2'.
    example: a record of the task's dataset (`datasets.data_source` or `OfficialSource`;
      images decoded arrays or encoded bytes).
    image_size: resize images to this square size (uint8 [S, S, 3]); None leaves them out
      (text only: 'image' / 'image2' are None), for the tokenizer.
    caption: COCO only: which caption is the 'answer' (modulo the number of captions).
    index: the example's position, for NLVR2 (its 'index'; VQA and COCO use the image id).

  Returns:
    {'task', 'question', 'answer', 'image', 'image2', 'num_images', 'index', 'index2'} plus
    'answers' (VQA: the human answers), 'references' (COCO: all captions) and 'id'.
  """
  image = lambda key: None if image_size is None else resize_image(example[key], image_size)
  blank = lambda: None if image_size is None else np.zeros((image_size,) * 2 + (3,), np.uint8)
  if task in ("vqav2", "ok_vqa"):
    answers = [_text(a) for a in example["answers"]]
    answer = _text(example["multiple_choice_answer"]) or (answers[0] if answers else "")
    return {"task": "vqa", "question": _text(example["question"]), "answer": answer,
            "answers": answers, "image": image("image"), "image2": blank(), "num_images": 1,
            "index": int(example["image_id"]), "index2": -1,
            "id": int(example["question_id"])}
  if task == "coco":
    references = [_text(c) for c in example["captions"]]
    if not references:
      raise ValueError(f"COCO image {int(example['image_id'])} has no captions.")
    return {"task": "caption", "question": "", "answer": references[caption % len(references)],
            "references": references, "image": image("image"), "image2": blank(),
            "num_images": 1, "index": int(example["image_id"]), "index2": -1,
            "id": int(example["image_id"])}
  if task == "nlvr2":
    return {"task": "nlvr2", "question": _text(example["sentence"]),
            "answer": NLVR2_ANSWERS[int(example["label"])], "image": image("image"),
            "image2": image("image2"), "num_images": 2, "index": index, "index2": -1,
            "id": _text(example["identifier"])}
  raise ValueError(f"task={task!r} is not one of {TASKS}.")


class OfficialSource:
  """Random access to adapted examples of one split of a task's official dataset.

  Records are read with their images still encoded (`tfds.decode.SkipDecoding`) and decoded
  + resized by `adapt` (or not at all with image_size=None). With `per_caption`, COCO gives
  one example per (image, caption k < CAPTIONS_PER_IMAGE), for training.
  """

  def __init__(self, task: str, split: str, data_dir: str, *, image_size: int | None,
               image_config: str = "original", per_caption: bool = False):
    if task not in TASKS:
      raise ValueError(f"task={task!r} is not one of {TASKS}.")
    self.task, self.split, self.image_size = task, split, image_size
    self.per_caption = per_caption and task == "coco"
    name = dataset_name(task, image_config)
    check_prepared([name], data_dir)
    builder = datasets.get_builder(name, data_dir)
    if split not in builder.info.splits:
      raise ValueError(f"Unknown split {split!r} of {name!r}; splits: "
                       f"{sorted(builder.info.splits)}.")
    decoders = {k: tfds.decode.SkipDecoding() for k in IMAGE_FEATURES[DATASETS[task]]}
    self._records = builder.as_data_source(split=split, decoders=decoders)
    self.num_records = len(self._records)
    if not self.num_records:
      raise ValueError(f"Split {split!r} of {name!r} in {data_dir!r} has no examples.")

  def __len__(self) -> int:
    return self.num_records * (CAPTIONS_PER_IMAGE if self.per_caption else 1)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    record, caption = divmod(i, CAPTIONS_PER_IMAGE) if self.per_caption else (i, 0)
    return adapt(self.task, self._records[record], image_size=self.image_size,
                 caption=caption, index=record)


def dataset_name(task: str, image_config: str = "original") -> str:
  """The `datasets` name of a task's dataset in an image config ('vqav2/short_side_384')."""
  if image_config not in IMAGE_CONFIGS:
    raise ValueError(f"image_config={image_config!r} is not one of {IMAGE_CONFIGS}.")
  base = DATASETS[task]
  return base if image_config == "original" else f"{base}/{image_config}"


def check_prepared(names: Sequence[str], data_dir: str) -> None:
  """Raises DatasetsNotPreparedError naming every dataset of `names` not in `data_dir`."""
  missing = [n for n in dict.fromkeys(names)
             if not datasets.get_builder(n, data_dir).is_prepared()]
  if not missing:
    return
  lines = [f"The METALM vision-language table needs {len(missing)} official dataset(s) that "
           f"are not prepared in data_dir={data_dir!r}: {', '.join(missing)}.",
           f"Put the official files under {os.path.join(data_dir, 'downloads', 'manual')} "
           f"(what to download and where: {DOCS}, or official.instructions(name)), then "
           "prepare each once:"]
  lines += [f"  {datasets.prepare_command(n, data_dir)}" for n in missing]
  raise DatasetsNotPreparedError("\n".join(lines))


# ------------------------------------------------------------------ tokenizer and config
def tokenizer_texts(data_dir: str, image_config: str = "original", *,
                    max_chars: int = tokenizers.SENTENCEPIECE_MAX_TRAIN_CHARS):
  """Prompt + target texts of COCO Karpathy train captions (3/4 of `max_chars`) and VQAv2
  train questions + answers (1/4), each from records in a fixed random order, interleaved.

  No image is decoded, but every record read carries its image bytes: the budget, not the
  dataset size, bounds the bytes read (VQA records hold ~1 question per image copy).
  """
  def stream(task, budget, **kw):
    source = OfficialSource(task, "train", data_dir, image_size=None,
                            image_config=image_config, **kw)
    used = 0
    for i in np.random.default_rng(TASKS.index(task)).permutation(len(source)):
      if used >= budget:
        return
      ex = source[int(i)]
      text = prompts_lib.prompt_text(ex) + prompts_lib.target_text(ex)
      used += len(text)
      yield text

  streams = [stream("coco", max_chars - max_chars // 4, per_caption=True),
             stream("vqav2", max_chars // 4)]
  for text in itertools.chain.from_iterable(itertools.zip_longest(*streams)):
    if text is not None:
      yield text


def get_tokenizer(data_dir: str, vocab_size: int, *, max_chars: int,
                  image_config: str = "original") -> tokenizers.SentencePieceTokenizer:
  """The SentencePiece model of COCO train captions + VQAv2 train questions / answers,
  trained once and cached at `<data_dir>/tokenizers/metalm_vl_official_sp<vocab>.model`.

  On text too small for `vocab_size` (e.g. test files), it trains the largest vocabulary
  SentencePiece allows, cached under the requested size.
  """
  path = tokenizers.sentencepiece_model_path(data_dir, TOKENIZER_NAME, vocab_size)
  if os.path.exists(path):
    return tokenizers.SentencePieceTokenizer(path)
  logging.info("Training a SentencePiece tokenizer (vocab_size=%d) on COCO Karpathy train "
               "captions + VQAv2 train questions -> %s", vocab_size, path)
  try:
    return tokenizers.train_sentencepiece(
        tokenizer_texts(data_dir, image_config, max_chars=max_chars), path, vocab_size,
        max_chars=max_chars)
  except ValueError as e:
    fits = re.search(r"value <= (\d+)", str(e))
    if not fits:
      raise
    logging.warning("Only %s pieces fit the tokenizer text; training that many.", fits[1])
    return tokenizers.train_sentencepiece(
        tokenizer_texts(data_dir, image_config, max_chars=max_chars), path, int(fits[1]),
        max_chars=max_chars)


def experiment_config(size: str, *, vocab_size: int, batch_size: int | None = None):
  """configs/metalm_vl.py at `size`, its vision encoder set for real RGB images (`SIZES`)."""
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid sizes: {sorted(SIZES)}.")
  s = SIZES[size]
  config = metalm_vl.get_config(f"size={size}")
  with config.unlocked():
    vit = config.model.vision_encoder
    vit.image_size, vit.patch_size, vit.channels = s["image_size"], s["patch_size"], 3
    num_image_tokens = (vit.image_size // vit.patch_size) ** 2 + int(vit.use_cls)
    config.model.max_span_len = num_image_tokens + s["prefix"]
    config.model.text_encoder.max_len = config.model.max_span_len + 1
    config.model.decoder.vocab_size = vocab_size
    config.data.dataset = DATASETS["coco"]
    config.data.vocab_size = vocab_size
    config.data.seq_len = s["seq_len"]
    if batch_size:
      config.batch_size = batch_size
  return config


# ------------------------------------------------------------------ training rows
def encode_row(example: dict, tokenizer: tokenizers.Tokenizer, *, seq_len: int,
               image_size: int, max_images: int) -> dict[str, np.ndarray]:
  """An adapted example -> one row of `vl_pipeline`'s batch format (its module docstring),
  with RGB images (`preprocess_real_image`); an answer too long for seq_len is cut (its
  first tokens and the EOS kept), never an error."""
  prompt = vl_pipeline.prompt_tokens(example, tokenizer)
  answer = tokenizer.encode(prompts_lib.target_text(example)).astype(np.int32)
  room = seq_len + 1 - len(prompt) - 1  # the sequence is one longer than the row
  if room < 1:
    raise ValueError(f"The prompt {prompts_lib.prompt_text(example)!r} takes {len(prompt)} "
                     f"tokens, leaving no room for an answer in seq_len={seq_len}.")
  sequence = np.concatenate([prompt, answer[:room], [tokenizer.eos_id]]).astype(np.int32)
  text_length = len(sequence) - 1
  inputs = np.full((seq_len,), tokenizer.pad_id, np.int32)
  targets = np.full((seq_len,), tokenizer.pad_id, np.int32)
  inputs[:text_length], targets[:text_length] = sequence[:-1], sequence[1:]
  positions = np.arange(seq_len)
  image_list = prompts_lib.images_of(example)
  if len(image_list) > max_images:
    raise ValueError(f"Example has {len(image_list)} images but max_images={max_images}.")
  images = np.zeros((max_images, image_size, image_size, 3), np.float32)
  for n, image in enumerate(image_list):
    images[n] = preprocess_real_image(image, image_size=image_size)
  return {
      "images": images, "image_mask": np.arange(max_images) < len(image_list),
      "inputs": inputs, "targets": targets,
      "weights": ((positions >= len(prompt) - 1) & (positions < text_length)).astype(
          np.float32),
      "segment_ids": (positions < text_length).astype(np.int32),
      "prompt_length": np.int32(len(prompt)), "text_length": np.int32(text_length),
      "task": np.int32(digits.TASKS.index(prompts_lib.as_text(example["task"]))),
  }


def train_batches(source, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                  image_size: int, max_images: int, prepare, threads: int = 0):
  """Shuffled, repeated training batches of `source`'s adapted examples, prepared by the
  objective; decoding, resizing and tokenising run in `threads` reader threads (0: here)."""
  examples = grain.MapDataset.source(source).shuffle(seed).repeat(None)
  rows = examples.map(functools.partial(encode_row, tokenizer=tokenizer, seq_len=seq_len,
                                        image_size=image_size, max_images=max_images))
  rows = rows.random_map(prepare, seed=seed)
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * batch_size)
  return rows.to_iter_dataset(options if threads else None).batch(batch_size,
                                                                  drop_remainder=True)


# ------------------------------------------------------------------ prompts -> rows -> answers
def build_rows(prompt_batch, tokenizer, *, num_image_tokens: int, max_span_len: int,
               length: int, num_spans: int, image_size: int) -> dict:
  """Prompts -> decoder rows with every shot's images (+ its text) in its own encoder span.

  The layout of `metalm_digits.build_rows` with `encode_text=True` (METALM: each shot's text
  joins its last image's span, up to max_span_len), for RGB images of `image_size`.
  """
  batch = len(prompt_batch)
  rows = {"inputs": np.zeros((batch, length), np.int32),
          "segment_ids": np.zeros((batch, length), np.int32),
          "positions": np.zeros((batch, length), np.int32),
          "span_starts": np.zeros((batch, num_spans), np.int32),
          "span_lengths": np.zeros((batch, num_spans), np.int32),
          "images": np.zeros((batch, num_spans, image_size, image_size, 3), np.float32),
          "ends": np.zeros((batch,), np.int32)}
  for b, prompt in enumerate(prompt_batch):
    groups = prompts_lib.group_by_shot(prompt)
    cur, span = 0, 0
    for g, group in enumerate(groups):
      is_query = g == len(groups) - 1
      images = [s.value for s in group if s.kind == "image"]
      text = " ".join(s.value for s in group if s.kind == "text")
      ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text),
                            [] if is_query else [tokenizer.eos_id]]).astype(np.int32)
      if span + len(images) > num_spans:
        raise ValueError(f"prompt {b} has more than num_spans={num_spans} images.")
      for k, image in enumerate(images):
        rows["images"][b, span] = preprocess_real_image(image, image_size=image_size)
        rows["span_starts"][b, span] = cur
        rows["span_lengths"][b, span] = num_image_tokens
        if k == len(images) - 1:
          rows["span_lengths"][b, span] += min(len(ids), max_span_len - num_image_tokens)
        cur, span = cur + num_image_tokens, span + 1
      if cur + len(ids) > length:
        raise ValueError(f"prompt {b} needs more than length={length} positions.")
      rows["inputs"][b, cur:cur + len(ids)] = ids
      cur += len(ids)
    rows["segment_ids"][b, :cur] = 1
    rows["positions"][b, :cur] = np.arange(cur)
    rows["ends"][b] = cur
  return rows


def prompt_extent(prompt, tokenizer, num_image_tokens: int) -> tuple[int, int]:
  """(positions, images) a prompt takes in `build_rows`."""
  images = sum(s.kind == "image" for s in prompt)
  groups = prompts_lib.group_by_shot(prompt)
  text = sum(len(tokenizer.encode(" ".join(s.value for s in g if s.kind == "text"))) + 2
             for g in groups) - 1  # [BOS] each, [EOS] per demonstration
  return images * num_image_tokens + text, images


def make_next_tokens(model: state_lib.Model):
  """A jitted (params, rest, rows) -> the argmax next token at rows['ends'], int32 [B]; one
  per run, so that every evaluation with the same shapes shares its compilation."""

  def next_tokens(params, rest, rows):
    m = model.merge(params, rest)
    logits, _ = m(rows["inputs"], positions=rows["positions"], segment_ids=rows["segment_ids"],
                  span_starts=rows["span_starts"], span_lengths=rows["span_lengths"],
                  images=rows["images"], deterministic=True)
    last = jnp.take_along_axis(logits, (rows["ends"] - 1)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(last, axis=-1).astype(jnp.int32)

  return jax.jit(next_tokens)


def greedy_answers(next_tokens, params, rest, tokenizer, prompt_batch, *, batch_size: int,
                   num_image_tokens: int, max_span_len: int, image_size: int,
                   max_new_tokens: int, length: int, num_spans: int) -> list[str]:
  """Greedy continuations of up to `batch_size` prompts (padded to it: static shapes).

  Every step runs the whole row (no KV cache; spans exactly as in training) and appends
  the argmax token at `ends`; stops when every row has produced EOS.
  """
  n = len(prompt_batch)
  if not 0 < n <= batch_size:
    raise ValueError(f"got {n} prompts; between 1 and batch_size={batch_size}.")
  padded = list(prompt_batch) + [prompt_batch[-1]] * (batch_size - n)
  rows = build_rows(padded, tokenizer, num_image_tokens=num_image_tokens,
                    max_span_len=max_span_len, length=length, num_spans=num_spans,
                    image_size=image_size)
  ends = rows.pop("ends")
  index = np.arange(batch_size)
  out = np.full((batch_size, max_new_tokens), tokenizer.pad_id, np.int32)
  done = np.zeros(batch_size, bool)
  for i in range(max_new_tokens):
    if np.any(ends >= length):
      raise ValueError(f"length={length} leaves no room to generate token {i}.")
    tokens = np.asarray(next_tokens(params, rest, dict(rows, ends=ends)))
    tokens = np.where(done, tokenizer.pad_id, tokens)
    out[:, i] = tokens
    done |= tokens == tokenizer.eos_id
    rows["inputs"][index, ends] = tokens
    rows["segment_ids"][index, ends] = 1
    rows["positions"][index, ends] = ends
    ends = ends + 1
    if done.all():
      break
  return [tokenizer.decode(row).strip() for row in out[:n]]


def score(task: str, predictions: Sequence[str], examples: Sequence[dict]) -> dict:
  """The task's metric: VQA accuracy (10 annotators, vqaEval.py's rules), NLVR2 accuracy,
  or COCO CIDEr-D (library scale 0..10) and BLEU-4 against every reference."""
  if TASK_KIND[task] == "vqa":
    scores = [evaluation.vqa_score(p, ex["answers"] or [ex["answer"]],
                                   official_references=True)
              for p, ex in zip(predictions, examples)]
    return {"accuracy": float(np.mean(scores))}
  if task == "nlvr2":
    return {"accuracy": float(np.mean([evaluation.normalize_vqa_answer(p) == ex["answer"]
                                       for p, ex in zip(predictions, examples)]))}
  references = [ex["references"] for ex in examples]
  return {"cider_d": caption_metrics.cider_d(references, list(predictions)),
          "bleu4": caption_metrics.bleu4(references, list(predictions))}


def evaluate(task: str, queries, *, next_tokens, params, rest, tokenizer, model_info: dict,
             shots: int = 0, support: Sequence[dict] | None = None, seed: int = 0,
             batch_size: int = 32, log_every: int = 50) -> dict:
  """Zero-shot (shots=0) or k-shot greedy answers to `queries` (adapted examples, read in
  chunks so that a whole validation split never sits in memory), scored by `score`.

  Demonstrations for query i: `evaluation.select_shots` from `support` (same task, never the
  query's image), seeded by (seed, i); each demonstration is its own encoder span.
  """
  kind = TASK_KIND[task]
  if shots and not support:
    raise ValueError(f"shots={shots} needs support examples of {task!r}.")
  n = len(queries)
  if not n:
    raise ValueError(f"No {task} queries to evaluate.")
  batch_size = min(batch_size, n)
  max_new = (max(len(tokenizer.encode(" " + a)) for a in NLVR2_ANSWERS) + 1 if kind == "nlvr2"
             else MAX_NEW_TOKENS[kind])
  chunk = batch_size * 8
  start, predictions, examples = time.time(), [], []
  next_log = log_every
  for lo in range(0, n, chunk):
    part = [queries[i] for i in range(lo, min(n, lo + chunk))]
    if shots:
      prompts = [prompts_lib.few_shot_prompt(evaluation.select_shots(
          ex, support, shots, rng=np.random.default_rng([seed, lo + j])), ex)
                 for j, ex in enumerate(part)]
    else:
      prompts = [prompts_lib.zero_shot_prompt(ex) for ex in part]
    extents = [prompt_extent(p, tokenizer, model_info["num_image_tokens"]) for p in prompts]
    # Few lengths (multiples of 32): few compilations across chunks and evaluations.
    length = -(-(max(e[0] for e in extents) + max_new) // 32) * 32
    num_spans = max(e[1] for e in extents)
    for b in range(0, len(prompts), batch_size):
      predictions += greedy_answers(
          next_tokens, params, rest, tokenizer, prompts[b:b + batch_size],
          batch_size=batch_size, max_new_tokens=max_new, length=length, num_spans=num_spans,
          **model_info)
    for ex in part:  # keep what scoring needs, not the images
      examples.append({k: v for k, v in ex.items() if k not in ("image", "image2")})
    if len(predictions) >= next_log or len(predictions) == n:
      next_log = len(predictions) + log_every
      elapsed = time.time() - start
      logging.info("%s %d-shot: %d/%d queries, %.1f s (%.1f queries/s)", task, shots,
                   len(predictions), n, elapsed, len(predictions) / max(elapsed, 1e-9))
  result = {**score(task, predictions, examples), "num_examples": n, "shots": shots,
            "seconds": time.time() - start}
  if kind != "caption":  # a constant answer shows up as one key
    result["answer_counts"] = dict(collections.Counter(
        evaluation.normalize_vqa_answer(p) for p in predictions).most_common(5))
  result["samples"] = [
      {"id": ex["id"], "question": ex["question"], "prediction": p,
       "references": ex.get("answers") or ex.get("references") or [ex["answer"]]}
      for p, ex in zip(predictions[:5], examples[:5])]
  return result


class Limited:
  """The first `limit` items of a source (all when limit is 0)."""

  def __init__(self, source, limit: int = 0):
    self.source, self.n = source, len(source) if not limit else min(limit, len(source))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


def load_support(task: str, data_dir: str, *, size: int, seed: int, image_size: int,
                 image_config: str) -> list[dict]:
  """`size` random train examples of a task (its k-shot demonstration pool)."""
  source = OfficialSource(task, "train", data_dir, image_size=image_size,
                          image_config=image_config)
  picked = np.random.default_rng([seed, TASKS.index(task)]).permutation(len(source))[:size]
  return [source[int(i)] for i in sorted(picked)]


# ------------------------------------------------------------------ the experiment
def run_official(*, workdir: str, data_dir: str | None, size: str, seed: int,
                 pretrain_steps: int, finetune_steps: int, shots: int = 4, eval_limit: int = 0,
                 batch_size: int | None = None, log_every: int = 50,
                 tasks: Sequence[str] = TASKS, image_config: str = "original",
                 threads: int = 0) -> dict:
  """Pretrain on COCO, zero-/k-shot evaluate, finetune and evaluate per task (module doc).

  Args:
    workdir: where results.json goes.
    data_dir: where the official datasets are prepared (default: $METALM_DATA_DIR, else
      ~/.cache/metalm_jax/data).
    size: configs/metalm_vl.py size, 'tiny' or 'paper'.
    seed: initialisation, data order, dropout and demonstration seed.
    pretrain_steps: semi-causal pretraining steps on COCO captions (0: from scratch).
    finetune_steps: steps of each task's finetune (0: evaluate the pretrained model again).
    shots: demonstrations for the k-shot VQA / captioning evaluation (0 skips it).
    eval_limit: evaluate the first N examples of each evaluation split (0 = all).
    batch_size: training batch (default: the config's; 256 at size=paper).
    log_every: log training losses / evaluation progress every N steps / queries.
    tasks: a subset of ('vqav2', 'ok_vqa', 'coco', 'nlvr2'). COCO Karpathy and VQAv2 are
      needed in any case (pretraining and the tokenizer).
    image_config: 'original' or 'short_side_384': which prepared image config to read.
    threads: reader threads decoding / resizing training images (0: in the main thread).

  Returns:
    The results (also written to {workdir}/results.json): 'zero_shot', 'few_shot' (with
    'shots') and 'finetuned' map each task to its metrics ('accuracy' in 0..1 for VQA and
    NLVR2; 'cider_d' 0..10 and 'bleu4' 0..1 for COCO), plus 'pretrain' / 'finetune' losses.

  Raises:
    DatasetsNotPreparedError: naming every needed dataset that is not prepared.
  """
  tasks = tuple(dict.fromkeys(tasks))
  bad = [t for t in tasks if t not in TASKS]
  if bad or not tasks:
    raise ValueError(f"tasks={list(tasks)} must be a non-empty subset of {list(TASKS)}.")
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid sizes: {sorted(SIZES)}.")
  for name, value in (("pretrain_steps", pretrain_steps), ("finetune_steps", finetune_steps),
                      ("shots", shots), ("eval_limit", eval_limit)):
    if value < 0:
      raise ValueError(f"{name}={value} must be >= 0.")
  data_dir = data_dir or datasets.default_data_dir()
  needed = ["coco", "vqav2"] + [t for t in tasks if t not in ("coco", "vqav2")]
  check_prepared([dataset_name(t, image_config) for t in needed], data_dir)
  s = SIZES[size]
  start = time.time()
  tokenizer = get_tokenizer(data_dir, s["vocab"], max_chars=s["tokenizer_chars"],
                            image_config=image_config)
  config = experiment_config(size, vocab_size=tokenizer.vocab_size, batch_size=batch_size)
  model = state_lib.Model(config.model)
  image_size, seq_len = s["image_size"], s["seq_len"]
  source = lambda task, split, **kw: OfficialSource(task, split, data_dir, image_size=image_size,
                                                    image_config=image_config, **kw)

  def train(objective, task, *, steps, seed, init_params, name):
    batches = train_batches(source(task, "train", per_caption=True), tokenizer,
                            seq_len=seq_len, batch_size=config.batch_size, seed=seed,
                            image_size=image_size, max_images=2 if task == "nlvr2" else 1,
                            prepare=objective.prepare, threads=threads)
    return loop.train_on_batches(config, model, objective, batches, steps=steps, seed=seed,
                                 init_params=init_params, log_every=log_every, name=name)

  results = {"size": size, "seed": seed, "tasks": list(tasks), "params": model.param_count(),
             "image_size": image_size, "image_config": image_config, "seq_len": seq_len,
             "batch_size": config.batch_size, "vocab_size": tokenizer.vocab_size,
             "tokenizer": tokenizer.model_path, "pretrain_steps": pretrain_steps,
             "finetune_steps": finetune_steps, "eval_limit": eval_limit,
             "eval_splits": {t: EVAL_SPLIT[t] for t in tasks}}
  logging.info("METALM VL (official): size=%s, %s parameters, %dpx RGB, vocab %d, tasks %s",
               size, f"{model.param_count():,}", image_size, tokenizer.vocab_size, tasks)

  # 1. Pretraining (semi-causal VL) on COCO Karpathy train captions.
  if pretrain_steps:
    params, rest, pre = train(objectives.get("semi_causal_vl"), "coco", steps=pretrain_steps,
                              seed=seed, init_params=None, name="metalm_vl pretrain (COCO)")
    results["pretrain"] = {k: pre[k] for k in ("seconds", "final_loss", "losses")}
  else:
    params, rest = jax.jit(model.init)(jax.random.key(seed))
    results["pretrain"] = None
  module = model.merge(params, rest)
  model_info = {"num_image_tokens": module.vision_encoder.num_tokens(),
                "max_span_len": module.max_span_len, "image_size": image_size}
  next_tokens = make_next_tokens(model)
  queries = {t: Limited(source(t, EVAL_SPLIT[t]), eval_limit) for t in tasks}
  for t, q in queries.items():
    logging.info("%s: %d evaluation examples (%s)", t, len(q), EVAL_SPLIT_NAME[t])
  ev = functools.partial(evaluate, next_tokens=next_tokens, rest=rest, tokenizer=tokenizer,
                         model_info=model_info, seed=seed, batch_size=s["eval_batch"],
                         log_every=log_every)

  # 2. Zero- and k-shot: VQAv2, OK-VQA (validation), COCO captioning (Karpathy test).
  in_context = [t for t in tasks if t != "nlvr2"]
  results["zero_shot"] = {t: ev(t, queries[t], params=params) for t in in_context}
  results["few_shot"] = {"shots": shots}
  if shots:
    for t in in_context:
      support = load_support(t, data_dir, size=s["support"], seed=seed, image_size=image_size,
                             image_config=image_config)
      results["few_shot"][t] = ev(t, queries[t], params=params, shots=shots, support=support)
      del support
  for key in ("zero_shot", "few_shot"):
    logging.info("%s: %s", key, _headline(results[key]))

  # 3. One finetune per task from the pretrained weights, then its evaluation.
  results["finetune"], results["finetuned"] = {}, {}
  for t in tasks:
    tuned = params
    if finetune_steps:
      tuned, _, fine = train(objectives.get("semi_causal_vl_finetune"), t,
                             steps=finetune_steps, seed=seed + 1, init_params=params,
                             name=f"metalm_vl finetune {t}")
      results["finetune"][t] = {k: fine[k] for k in ("seconds", "final_loss", "losses")}
    results["finetuned"][t] = ev(t, queries[t], params=tuned)
    logging.info("finetuned %s: %s", t, _headline({t: results["finetuned"][t]}))
    del tuned
  results["wall_seconds"] = time.time() - start
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def _headline(by_task: dict) -> dict:
  return {t: {k: round(v, 4) for k, v in r.items() if k in ("accuracy", "cider_d")}
          for t, r in by_task.items() if isinstance(r, dict)}


# ------------------------------------------------------------------ the table
TASK_NAMES = {"vqav2": "VQAv2", "ok_vqa": "OK-VQA", "coco": "COCO captioning",
              "nlvr2": "NLVR2"}


def rows(results: dict, compute: str) -> list[dict]:
  """reproduce.py rows {task, metric, paper, ours, config, data, compute} of `results`
  (`run_official`'s): VQA accuracy and NLVR2 accuracy x100, CIDEr-D x100."""
  k = results["few_shot"]["shots"]
  config = (f"configs/metalm_vl.py:size={results['size']} ({results['image_size']}px RGB; "
            f"{results['pretrain_steps']} COCO semi-causal pretrain + "
            f"{results['finetune_steps']} finetune steps per task, batch "
            f"{results['batch_size']}; greedy)")
  out = []

  def add(task, setting, label, result):
    metric, key = (("CIDEr-D (x100)", "cider_d") if task == "coco" else
                   ("accuracy", "accuracy") if task == "nlvr2" else ("VQA acc", "accuracy"))
    paper = PAPER.get((task, setting), "- (see paper)")
    what = "images (all references)" if task == "coco" else (
        "pairs" if task == "nlvr2" else "questions (10 answers each)")
    out.append(dict(task=f"{TASK_NAMES[task]} {label}", metric=metric, paper=paper,
                    ours=round(100 * result[key], 1), config=config,
                    data=f"{EVAL_SPLIT_NAME[task]}, {result['num_examples']} {what}",
                    compute=compute))

  for setting, label in (("zero_shot", "zero-shot"), ("few_shot", f"{k}-shot")):
    for task in TASKS:
      if task in results[setting]:
        add(task, setting, label, results[setting][task])
  for task in TASKS:
    if task in results["finetuned"]:
      add(task, "finetuned", "finetuned", results["finetuned"][task])
  return out


# ------------------------------------------------------------------ command line
def _define_flags():
  """The command line's flags, defined only when this file runs as a script: importing it
  (reproduce.py, tests) defines none, so it never clashes with metalm_digits' flags."""
  f = flags
  return dict(
      workdir=f.DEFINE_string("workdir", "workdirs/metalm_vl_official", "Where results go."),
      data_dir=f.DEFINE_string("data_dir", None, "Data directory with the official datasets "
                               "prepared (default: $METALM_DATA_DIR, else "
                               "~/.cache/metalm_jax/data); " + DOCS + "."),
      size=f.DEFINE_enum("size", "tiny", sorted(SIZES), "configs/metalm_vl.py size."),
      seed=f.DEFINE_integer("seed", 0, "Initialisation, data order and demonstration seed."),
      pretrain_steps=f.DEFINE_integer("pretrain_steps", 1000, "Semi-causal COCO pretraining "
                                      "steps (the paper: 350000 on its corpora); 0 = none."),
      finetune_steps=f.DEFINE_integer("finetune_steps", 500, "Finetuning steps per task."),
      shots=f.DEFINE_integer("shots", 4, "Demonstrations for the k-shot evaluation (0: skip)."),
      eval_limit=f.DEFINE_integer("eval_limit", 0, "Evaluate the first N examples of each "
                                  "evaluation split (0 = all)."),
      batch_size=f.DEFINE_integer("batch_size", None, "Training batch (default: the "
                                  "config's)."),
      log_every=f.DEFINE_integer("log_every", 50, "Log every N steps / queries."),
      tasks=f.DEFINE_list("tasks", list(TASKS), f"A subset of {list(TASKS)}."),
      image_config=f.DEFINE_enum("image_config", "original", list(IMAGE_CONFIGS),
                                 "Which prepared image config of the datasets to read."),
      threads=f.DEFINE_integer("threads", 0, "Reader threads decoding training images."),
  )


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  start = time.time()
  results = run_official(**{k: v.value for k, v in flag_values.items()})
  device = jax.devices()[0]
  compute = (f"{time.time() - start:.0f} s on " +
             (f"{os.cpu_count()}-core CPU" if device.platform == "cpu"
              else f"{jax.device_count()} x {device.device_kind}"))
  table = rows(results, compute)
  for r in table:
    print(f"{r['task']:<28} {r['metric']:<15} ours {r['ours']:>6}  paper {r['paper']}")
  with open(os.path.join(flag_values["workdir"].value, "rows.json"), "w") as f:
    json.dump(table, f, indent=1)


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(functools.partial(main, flag_values=_flags))
