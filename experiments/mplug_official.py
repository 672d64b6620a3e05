r"""mPLUG's table on the official datasets: COCO captioning and retrieval (Karpathy test) and
VQAv2, after image-text pretraining on COCO (Karpathy train) only.

    python experiments/mplug_official.py --data_dir=$DATA --workdir=workdirs/mplug_official
    python experiments/mplug_official.py --data_dir=$DATA --size=tiny --image_size=32 \
        --pretrain_steps=200 --caption_steps=100 --vqa_steps=100 --eval_limit=500  # smoke run

Needs `coco_karpathy` and `vqav2` prepared in --data_dir from their official files (the files,
where to get them and the prepare command: docs/reproducing.md, section Datasets):

    python experiments/prepare_data.py --dataset=coco_karpathy --data_dir=$DATA
    python experiments/prepare_data.py --dataset=vqav2 --data_dir=$DATA   # or vqav2/short_side_384

Steps (`run_official`):
  0. a SentencePiece tokenizer (`config.model.vocab_size - 1` pieces: the top model id is
     mPLUG's [MASK]) trained on the Karpathy train captions and the VQAv2 train questions and
     answers, cached as {data_dir}/tokenizers/mplug_official_sp{V}.model;
  1. pretrain `configs/mplug.py` (--size) with ITC + ITM + MLM + PrefixLM on every Karpathy
     train (image, caption) pair; pair_ids = the image, so an image's 5 captions are positives
     of each other in ITC (batch and queue) and never ITM negatives;
  2. retrieval on Karpathy test (5,000 images, 25,010 captions): ITC similarities rank
     everything, the top --rerank_k candidates of each query are re-ranked by ITM's P(match)
     (as `inference.mplug.retrieve`, with the unimodal features computed once); i2t is a hit
     when any of the image's captions is in the top k, t2i when the caption's image is;
  3. captioning: finetune the pretrained model with the seq2seq loss (encoder: the image and
     [CLS] alone, decoder: the caption) on Karpathy train, beam-search a caption for each test
     image and score BLEU-4 / CIDEr-D / ROUGE-L (`caption_metrics.caption_scores`) against all
     of its references;
  4. VQA: finetune the pretrained model on VQAv2 train (question to the encoder, answer from
     the decoder: each time a question is drawn, one of its 10 human answers at random, i.e.
     answers weighted by frequency as ALBEF / mPLUG weight them; --vqa_answers=majority uses
     multiple_choice_answer), then on VQAv2 validation report the official VQA accuracy
     (`evaluation.vqa_score` over the 10 answers, vqaEval.py's reference handling) of
     beam-search generation and of answer-list ranking: the --answer_list_size most frequent
     train answers (3,129 in the standard setup); each question's --answer_rank_k best
     answers by first-token probability are scored in full (ALBEF / mPLUG's k_test = 128).

Results go to {workdir}/results.json and results.md; `rows(results, compute)` gives the rows
of `experiments/reproduce.py`'s mplug table.

Deviations from the paper (also listed in results.json under 'deviations'):
  * pretraining data: COCO Karpathy train only (113k images, 567k captions), not the paper's
    14M pairs (CC3M, CC12M, SBU, VG, COCO); everything is trained from scratch (no CLIP ViT,
    no BERT), with a SentencePiece vocabulary of the config's size instead of BERT's WordPiece.
    Expect far lower numbers than the paper's: this measures the method on COCO-scale data.
  * retrieval is evaluated after the COCO pretraining (whose ITC + ITM losses on COCO train
    are the losses of the paper's COCO retrieval finetuning); no separate retrieval finetune.
  * VQA is finetuned on VQAv2 train only (paper: train + val + Visual Genome) and evaluated on
    validation (the paper's 79.79 is test-dev, scored by the evaluation server).
  * captioning is cross-entropy only (no SCST / CIDEr optimisation), with no text prompt.
  * images are resized (bicubic) to the config's image_size and CLIP-normalised; no random
    crops, flips or RandAugment.
  * not here: NLVR2, SNLI-VE, Flickr30K, visual grounding and video (size=large runs, but
    its paper numbers are not in the rows).

Limits: one process (the global batch is built on this host and sharded over its devices by
config.mesh); evaluation runs on the default device; training samples random batches (no
epochs) and saves no checkpoints.

Importing this module defines no absl flags (they are defined in `__main__`), so it can be
imported next to experiments/mplug_digits.py, whose flags (--workdir, --size, ...) would clash.
"""
from __future__ import annotations

import collections
import functools
import io
import json
import os
import queue
import re
import threading
import time
from concurrent import futures
from typing import Callable, Iterator, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
import tensorflow_datasets as tfds

from metalm_jax import config as config_lib
from metalm_jax import evaluation
from metalm_jax import objectives
from metalm_jax import sharding
from metalm_jax.data import datasets
from metalm_jax.data import tokenizers
from metalm_jax.evaluation import caption_metrics
from metalm_jax.inference import mplug as mplug_inference
from metalm_jax.models import mplug as mplug_model
from metalm_jax.objectives import mplug as mplug_objectives
from metalm_jax.train import mplug as mplug_train
from metalm_jax.train import state as state_lib
from metalm_jax.train import step as step_lib

mplug_config = config_lib.config_module("mplug")

CAPTION_DATASET = "coco_karpathy"
VQA_DATASET = "vqav2"
# CLIP's image normalisation (mPLUG's ViT is CLIP's).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
UNK_ID = 3  # SentencePieceTokenizer's unknown id
MAX_CAPTION_WORDS, MAX_QUESTION_WORDS = 30, 30  # texts are cut as BLIP / mPLUG's pre_caption
# SentencePiece training text (a shuffle of captions, questions and answers): enough for a
# 30k vocabulary; trained once per data_dir.
TOKENIZER_MAX_CHARS = 10_000_000
VQA_ANSWER_MODES = ("sample", "majority")
PAPER = {"captioning": "141.0 (COCO Karpathy test, CE)",
         "vqa": "79.79 (VQAv2 test-dev, base)",
         "retrieval": "- (COCO 5K test, see paper)"}
DEVIATIONS = (
    "pretraining on COCO Karpathy train pairs only (paper: 14M image-text pairs), from scratch "
    "(no CLIP / BERT initialisation), SentencePiece vocabulary",
    "retrieval evaluated after the COCO ITC + ITM pretraining, no separate retrieval finetune",
    "VQA finetuned on VQAv2 train only (paper: train + val + VG), evaluated on validation "
    "(paper: test-dev)",
    "captioning: cross-entropy only, no SCST",
    "images resized to the config's image_size, CLIP-normalised, no augmentation",
)


class DatasetsNotPreparedError(datasets.DatasetNotPreparedError):
  """coco_karpathy / vqav2 are not prepared in the data dir; the message says how to."""


# ---------------------------------------------------------------- data
def check_prepared(data_dir: str, names: Sequence[str]) -> None:
  """Raises DatasetsNotPreparedError naming every dataset of `names` not prepared in data_dir,
  with the commands that prepare them."""
  missing = [n for n in names if not datasets.get_builder(n, data_dir).is_prepared()]
  if not missing:
    return
  commands = "\n".join(f"  {datasets.prepare_command(n, data_dir)}" for n in missing)
  raise DatasetsNotPreparedError(
      f"mPLUG's official table needs {' and '.join(names)} prepared in data_dir={data_dir!r}; "
      f"not prepared: {', '.join(missing)}. Put their official files (COCO train2014 / "
      f"val2014 images, karpathy/dataset_coco.json, the VQAv2 questions and annotations) "
      f"under {os.path.join(data_dir, 'downloads', 'manual')} (layout and download links: "
      f"docs/reproducing.md, section Datasets), then run once:\n{commands}\n"
      "(or pass --manual_dir=<where the files are> to prepare_data.py).")


def clean_text(text: str, max_words: int) -> str:
  """BLIP / mPLUG's pre_caption: lowercase, .!"()*#:;~ become spaces, whitespace collapsed,
  at most max_words words."""
  return " ".join(re.sub(r'[.!"()*#:;~]', " ", text.lower()).split()[:max_words])


def preprocess_image(image: bytes | np.ndarray, image_size: int) -> np.ndarray:
  """Encoded image bytes (or uint8 [H, W, C]) -> float32 [S, S, 3]: RGB, bicubic resize to
  S x S (aspect ratio not kept, as mPLUG's evaluation transform), CLIP mean / std."""
  if isinstance(image, (bytes, bytearray)):
    with Image.open(io.BytesIO(image)) as decoded:
      pil = decoded.convert("RGB")
  else:
    array = np.asarray(image, np.uint8)
    pil = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    pil = pil.convert("RGB")
  if pil.size != (image_size, image_size):
    pil = pil.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return (np.asarray(pil, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ImageReader:
  """Random access to one split of a prepared dataset: its records with the image left
  encoded (`records`), and batches of preprocessed images (`images`), decoded in a shared
  thread pool."""

  def __init__(self, name: str, split: str, data_dir: str, *, image_size: int,
               pool: futures.Executor):
    builder = datasets.get_builder(name, data_dir)
    if split not in builder.info.splits:
      raise ValueError(f"Dataset {name!r} in {data_dir!r} has no split {split!r} (splits: "
                       f"{sorted(builder.info.splits)}); prepare it again from the full "
                       "official files.")
    self.name, self.split, self.image_size, self.pool = name, split, image_size, pool
    self.source = builder.as_data_source(split=split,
                                         decoders={"image": tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self.source)

  def records(self, fields: Sequence[str], limit: int = 0,
              log_every: int = 50_000) -> list[dict]:
    """The `fields` of the first `limit` (0 = all) records, read in chunks."""
    n = min(limit, len(self)) if limit else len(self)
    out, start, chunk = [], time.time(), 1024
    for lo in range(0, n, chunk):
      indices = list(range(lo, min(lo + chunk, n)))
      rows = (self.source.__getitems__(indices) if hasattr(self.source, "__getitems__")
              else [self.source[i] for i in indices])
      out += [{f: r[f] for f in fields} for r in rows]
      if n > log_every and (lo // chunk) % max(1, log_every // chunk) == 0:
        logging.info("reading %s/%s: %d/%d records (%.0f s)", self.name, self.split,
                     len(out), n, time.time() - start)
    return out

  def image(self, index: int) -> np.ndarray:
    return preprocess_image(self.source[int(index)]["image"], self.image_size)

  def images(self, indices: Sequence[int]) -> np.ndarray:
    """float32 [len(indices), S, S, 3]."""
    return np.stack(list(self.pool.map(self.image, indices)))


def background(produce: Callable[[int], object], count: int, depth: int = 2) -> Iterator:
  """produce(0), ..., produce(count - 1), computed in order by a background thread at most
  `depth` items ahead (image decoding overlaps the device's work)."""
  out: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for i in range(count):
        if not put(("ok", produce(i))):
          return
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by the consumer)
      put(("error", e))

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    for _ in range(count):
      kind, item = out.get()
      if kind == "error":
        raise item
      yield item
  finally:
    stop.set()
    thread.join(timeout=10)


def encoder_tokens(tokenizer, texts: Sequence[str], max_len: int) -> np.ndarray:
  """[CLS] (= BOS) text [EOS] rows, int32 [N, L]: the text cut to fit max_len, padded to the
  longest row (L <= max_len)."""
  encoded = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(t)[:max_len - 2],
                             [tokenizer.eos_id]]) for t in texts]
  out = np.full((len(texts), max(len(ids) for ids in encoded)), tokenizer.pad_id, np.int32)
  for i, ids in enumerate(encoded):
    out[i, :len(ids)] = ids
  return out


def answer_tokens(tokenizer, texts: Sequence[str], max_len: int) -> np.ndarray:
  """Decoder targets: text [EOS] then pad, int32 [N, L] (L <= max_len, the decoder's
  positions: [BOS] + all but the last target)."""
  return encoder_tokens(tokenizer, texts, max_len + 1)[:, 1:]


def decoder_rows(targets: np.ndarray, bos_id: int, pad_id: int) -> dict:
  """Teacher forcing rows from targets [N, L] (text [EOS] pad): inputs [BOS] text, weights."""
  inputs = np.concatenate([np.full((len(targets), 1), bos_id, np.int32), targets[:, :-1]], 1)
  weights = (targets != pad_id).astype(np.float32)
  return {"decoder_inputs": np.where(weights > 0, inputs, pad_id).astype(np.int32),
          "decoder_targets": targets.astype(np.int32), "decoder_weights": weights}


def decode_texts(tokenizer, tokens) -> list[str]:
  """Generated ids -> texts; ids the tokenizer does not have (the model's [MASK] and any id
  above the tokenizer's vocabulary) decode as unknown."""
  tokens = np.asarray(tokens)
  return [tokenizer.decode(row) for row in np.where(tokens >= tokenizer.vocab_size, UNK_ID,
                                                    tokens)]


def load_captions(reader: ImageReader, limit: int = 0) -> dict:
  """{'index': record index per image, 'image_id', 'captions': raw references per image,
  'pair_image': image position of each caption, 'pair_text': each caption, cleaned}."""
  rows = reader.records(("image_id", "captions"), limit)
  captions = [[_text(c) for c in r["captions"]] for r in rows]
  empty = [int(r["image_id"]) for r, c in zip(rows, captions) if not c]
  if empty:
    raise ValueError(f"{reader.name}/{reader.split}: image_id {empty[0]} (and "
                     f"{len(empty) - 1} more) has no caption; prepare the dataset again.")
  pair_image = np.array([i for i, cs in enumerate(captions) for _ in cs], np.int32)
  return {"index": np.arange(len(rows)), "image_id": [int(r["image_id"]) for r in rows],
          "captions": captions, "pair_image": pair_image,
          "pair_text": [clean_text(c, MAX_CAPTION_WORDS) for cs in captions for c in cs]}


def load_questions(reader: ImageReader, limit: int = 0) -> dict:
  """{'index', 'question' (cleaned), 'answers' (the human answers), 'majority'
  (multiple_choice_answer), 'answer_type'} per question."""
  rows = reader.records(("question_id", "question", "answers", "multiple_choice_answer",
                         "answer_type"), limit)
  answers = [[_text(a) for a in r["answers"]] for r in rows]
  unanswered = [int(r["question_id"]) for r, a in zip(rows, answers) if not a]
  if unanswered:
    raise ValueError(f"{reader.name}/{reader.split}: question_id {unanswered[0]} (and "
                     f"{len(unanswered) - 1} more) has no answers; use a split with "
                     "annotations (train / validation, not test_dev).")
  return {"index": np.arange(len(rows)),
          "question": [clean_text(_text(r["question"]), MAX_QUESTION_WORDS) for r in rows],
          "answers": answers,
          "majority": [_text(r["multiple_choice_answer"]) for r in rows],
          "answer_type": [_text(r["answer_type"]) for r in rows]}


def answer_list(answers: Sequence[Sequence[str]], size: int) -> list[str]:
  """The `size` most frequent of all human answers (ties: first seen). (The standard 3,129
  VQAv2 answers are those given >= 9 times in train + val; this is the train-only analogue.)"""
  if size < 1:
    raise ValueError(f"answer_list_size={size} must be >= 1 (3,129 in the standard setup).")
  counts = collections.Counter(a for row in answers for a in row)
  return [a for a, _ in counts.most_common(size)]


def get_tokenizer(data_dir: str, vocab_size: int, captions: Sequence[str],
                  questions: dict) -> tokenizers.SentencePieceTokenizer:
  """The cached SentencePiece model of the captions and VQA questions / answers (trained on
  first use, on a deterministic shuffle of them, at most TOKENIZER_MAX_CHARS characters)."""
  path = tokenizers.sentencepiece_model_path(data_dir, "mplug_official", vocab_size)
  if os.path.exists(path):
    return tokenizers.SentencePieceTokenizer(path)
  texts = list(captions) + list(questions["question"]) + list(questions["majority"])
  order = np.random.default_rng(0).permutation(len(texts))
  logging.info("Training a SentencePiece tokenizer (vocab_size=%d) on %d captions / questions "
               "/ answers -> %s", vocab_size, len(texts), path)
  try:
    return tokenizers.train_sentencepiece((texts[i] for i in order), path, vocab_size,
                                          max_chars=TOKENIZER_MAX_CHARS)
  except ValueError as e:
    raise ValueError(f"{e} The tokenizer's size is config.model.vocab_size - 1 unless "
                     "vocab_size= (--vocab_size) sets it.") from e


# ---------------------------------------------------------------- training
def _check_batch(batch_size: int, available: int, what: str):
  if batch_size > available:
    raise ValueError(f"batch_size={batch_size} is larger than the {available} {what}; "
                     "pass a smaller batch_size (--batch_size).")


def pretrain(config, model: state_lib.Model, make_batch: Callable[[np.random.Generator], dict],
             *, steps: int, seed: int, log_every: int) -> tuple[dict, object, dict]:
  """mPLUG pretraining (ITC + ITM + MLM + PrefixLM); returns (params, rest, log)."""
  if steps == 0:  # a randomly initialised model (one compiled init, not one op at a time)
    params, rest = jax.jit(model.init)(jax.random.key(seed))
    return params, rest, {"seconds": 0.0, "history": []}
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  tx = state_lib.make_optimizer(config.optimizer, steps)
  schedule = state_lib.learning_rate_schedule(config.optimizer, steps)
  state, shardings, rest = mplug_train.create_pretrain_state(
      model, tx, jax.random.key(seed), mesh, rules, queue_size=config.mplug.queue_size)
  rng = np.random.default_rng(seed)
  batches = background(lambda _: make_batch(rng), steps)
  start, history, step, batch_shardings = time.time(), [], None, None
  for i, batch in enumerate(batches):
    if step is None:
      batch_shardings = mplug_train.batch_shardings(mesh, rules, batch)
      step = mplug_train.make_pretrain_step(
          model, tx, schedule, shardings, rest, batch_shardings, mesh,
          loss_weights=dict(config.mplug.loss_weights), alpha=config.mplug.alpha,
          alpha_warmup_steps=config.mplug.alpha_warmup_steps,
          momentum_decay=config.mplug.momentum_decay, mask_rate=config.mplug.mask_rate)
    state, metrics = step(state, rest, jax.device_put(batch, batch_shardings))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      history.append(dict(m, step=i + 1))
      logging.info("pretrain %d/%d loss %.3f itc %.3f itm %.3f (acc %.2f) mlm %.3f (acc %.2f) "
                   "prefix_lm %.3f (acc %.2f) (%.0f s)", i + 1, steps, m["loss"],
                   m.get("itc", 0), m.get("itm", 0), m.get("itm_accuracy", 0), m.get("mlm", 0),
                   m.get("mlm_accuracy", 0), m.get("prefix_lm", 0),
                   m.get("prefix_lm_accuracy", 0), time.time() - start)
  jax.block_until_ready(state.params)
  return state.params, rest, {"seconds": time.time() - start, "history": history}


SEQ2SEQ = objectives.Objective("mplug_seq2seq", loss=mplug_objectives.seq2seq_loss)


def finetune(config, model: state_lib.Model, init_params, rest,
             make_batch: Callable[[np.random.Generator], dict], *, steps: int, seed: int,
             log_every: int, name: str, cache: dict | None = None) -> tuple[dict, object, dict]:
  """Seq2seq finetuning (captioning, VQA) from `init_params`; returns (params, rest, log).

  The train state is built from the given params directly (no initialisation to compile).
  `cache` ({} shared between calls) keeps the compiled step per step count: finetunes of
  equal length whose batches have equal shapes compile once.
  """
  if steps == 0:
    return init_params, rest, {"seconds": 0.0, "history": []}
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  cache = {} if cache is None else cache
  if steps not in cache:
    tx = state_lib.make_optimizer(config.optimizer, steps)
    schedule = state_lib.learning_rate_schedule(config.optimizer, steps)
    # The params are copied: the step donates its state, and init_params serves more than
    # one finetune.
    init = lambda p, key: state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, p), opt_state=tx.init(p),
        rng=jax.random.key_data(key), nonfinite_skips=jnp.zeros((), jnp.int32))
    shardings = sharding.state_shardings(jax.eval_shape(init, init_params, jax.random.key(0)),
                                         model.logical_specs, mesh, rules)
    batch_shardings = sharding.batch_sharding(mesh, rules, ndim=1)
    cache[steps] = (jax.jit(init, out_shardings=shardings), batch_shardings,
                    step_lib.make_train_step(model, tx, SEQ2SEQ, schedule, shardings, rest,
                                             batch_shardings, mesh, rules=rules))
  init, batch_shardings, step = cache[steps]
  state = init(init_params, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  start, history = time.time(), []
  for i, batch in enumerate(background(lambda _: make_batch(rng), steps)):
    state, metrics = step(state, rest, jax.device_put(batch, batch_shardings))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      loss, accuracy = float(metrics["loss"]), float(metrics["token_accuracy"])
      history.append({"step": i + 1, "loss": loss, "token_accuracy": accuracy})
      logging.info("%s %d/%d loss %.4f token accuracy %.3f (%.0f s)", name, i + 1, steps, loss,
                   accuracy, time.time() - start)
  jax.block_until_ready(state.params)
  return state.params, rest, {"seconds": time.time() - start, "history": history}


# ---------------------------------------------------------------- evaluation
def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """x [m, ...] -> [n, ...] (m <= n) by repeating the last row: one compiled shape."""
  if len(x) == n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def _batches(n: int, batch_size: int) -> list[np.ndarray]:
  return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@nnx.jit
def _image_features(module, images):
  image = module.encode_image(images)
  return module.itc_features(image=image)[0], image


@nnx.jit
def _text_features(module, tokens):
  text = module.encode_text(tokens)
  return module.itc_features(text=text)[1], text


@nnx.jit
def _itm_match(module, image_h, text_h, text_valid, image_index, text_index):
  """P(match) of the pairs (image_h[image_index], text_h[text_index]): the unimodal features
  stay on the device, only the indices travel."""
  _, fused = module.fuse(image_h[image_index], text_h[text_index], text_valid[text_index])
  return jax.nn.softmax(module.itm_logits(fused), axis=-1)[:, 1]


def retrieval_scores(module, image_batches: Iterator[np.ndarray], num_images: int,
                     tokens: np.ndarray, *, k: int, batch_size: int = 64,
                     log_every: int = 100) -> dict:
  """`inference.mplug.retrieve`'s scores (ITC ranking, ITM P(match) for each query's top k,
  the rest below in ITC order), with each image and text encoded once (kept on the device:
  ~6 GB for COCO's 5k images and 25k captions at base size) and only the fusion run per pair.

  Args:
    image_batches: the images [b, H, W, C] in order, in batches of batch_size (the last may
      be smaller), num_images in all.
    tokens: [K, T] ([CLS] caption [EOS], pad).

  Returns {'itc_i2t' [N, K], 'itc_t2i' [K, N], 'i2t' [N, K], 't2i' [K, N]} (NumPy).
  """
  def encode(fn, batches):
    feats, hidden = [], []
    for x in batches:
      f, h = fn(module, _pad_rows(x, batch_size))
      feats.append(np.asarray(f)[:len(x)])
      hidden.append(h[:len(x)])
    return np.concatenate(feats), jnp.concatenate(hidden)

  image_f, image_h = encode(_image_features, image_batches)
  if len(image_f) != num_images:
    raise ValueError(f"got {len(image_f)} images, expected {num_images}.")
  text_f, text_h = encode(_text_features, (tokens[s] for s in _batches(len(tokens),
                                                                       batch_size)))
  valid = jnp.asarray(tokens != module.pad_id)
  sim = image_f @ text_f.T
  start = time.time()

  def rerank(scores, pair_of, name):
    out = scores - scores.max() - 2.0  # below every re-ranked candidate (ITM is in [0, 1])
    top = np.argsort(-scores, axis=1)[:, :min(k, scores.shape[1])]
    queries = np.repeat(np.arange(scores.shape[0]), top.shape[1])
    candidates = top.reshape(-1)
    image_idx, text_idx = pair_of(queries, candidates)
    p = []
    chunks = _batches(len(queries), batch_size)
    for c, s in enumerate(chunks):
      pairs = [_pad_rows(x[s].astype(np.int32), batch_size) for x in (image_idx, text_idx)]
      p.append(np.asarray(_itm_match(module, image_h, text_h, valid, *pairs))[:len(s)])
      if (c + 1) % log_every == 0:
        logging.info("retrieval %s ITM re-ranking: %d/%d batches (%.0f s)", name, c + 1,
                     len(chunks), time.time() - start)
    out[queries, candidates] = np.concatenate(p)
    return out

  return {"itc_i2t": sim, "itc_t2i": sim.T,
          "i2t": rerank(sim, lambda q, c: (q, c), "i2t"),
          "t2i": rerank(sim.T, lambda q, c: (c, q), "t2i")}


def evaluate_retrieval(module, reader: ImageReader, test: dict, tokens: np.ndarray, *, k: int,
                       batch_size: int, log_every: int) -> dict:
  """R@1/5/10 both directions on the test images and all their captions, ITC alone and
  ITC + ITM re-ranking. An image is a hit when any of its captions is in its top k."""
  n = len(test["index"])
  batches = _batches(n, batch_size)
  images = background(lambda b: reader.images(test["index"][batches[b]]), len(batches))
  out = retrieval_scores(module, images, n, tokens, k=k, batch_size=batch_size,
                         log_every=log_every)
  relevant = test["pair_image"][None, :] == np.arange(n)[:, None]  # [images, captions]
  result = {}
  for stage, (i2t, t2i) in {"itc": ("itc_i2t", "itc_t2i"), "itc+itm": ("i2t", "t2i")}.items():
    result[stage] = {"i2t": evaluation.retrieval_recall(out[i2t], relevant),
                     "t2i": evaluation.retrieval_recall(out[t2i], relevant.T)}
  result.update(num_images=n, num_texts=int(len(tokens)), rerank_k=k)
  return result


def evaluate_captioning(module, tokenizer, reader: ImageReader, test: dict, *, beam_size: int,
                        max_new: int, batch_size: int, log_every: int) -> dict:
  """Beam-search captions from the image and [CLS] alone; BLEU-4 / CIDEr-D / ROUGE-L against
  every reference of each image."""
  n = len(test["index"])
  batches = _batches(n, batch_size)
  cls = np.full((batch_size, 1), tokenizer.bos_id, np.int32)
  predictions, start = [], time.time()
  images = background(lambda b: reader.images(test["index"][batches[b]]), len(batches))
  for b, x in enumerate(images):
    tokens, _ = mplug_inference.generate(module, _pad_rows(x, batch_size), cls,
                                         max_new_tokens=max_new, beam_size=beam_size)
    predictions += decode_texts(tokenizer, np.asarray(tokens)[:len(x), 0])
    if (b + 1) % log_every == 0:
      logging.info("captioning: %d/%d images (%.0f s)", len(predictions), n, time.time() - start)
  scores = caption_metrics.caption_scores(test["captions"], predictions)
  return {"bleu4": scores["BLEU-4"], "cider_d": scores["CIDEr-D"], "rouge_l": scores["ROUGE-L"],
          "num_images": n, "num_references": int(len(test["pair_text"])),
          "beam_size": beam_size, "max_new_tokens": max_new,
          "samples": [{"image_id": i, "prediction": p, "references": r} for i, p, r in
                      zip(test["image_id"][:5], predictions[:5], test["captions"][:5])]}


@functools.partial(nnx.jit, static_argnames=("k",))
def _rank_answers(module, images, tokens, answers, *, k):
  """Each example's best answer of answers [A, L] (answer [EOS] pad): the k best by the
  first token's log-probability are scored in full, log p(answer | image, question)."""
  memory, valid = module.encode(images, tokens)
  bos = jnp.full((tokens.shape[0], 1), module.bos_id, jnp.int32)
  first = jax.nn.log_softmax(module.decoder(bos, memory, valid)[:, 0].astype(jnp.float32), -1)
  _, top = jax.lax.top_k(first[:, answers[:, 0]], k)  # [B, k]
  candidates = answers[top]  # [B, k, L]
  inputs = jnp.concatenate([jnp.full(candidates.shape[:2] + (1,), module.bos_id, jnp.int32),
                            candidates[..., :-1]], axis=-1)
  weights = (candidates != module.pad_id).astype(jnp.float32)

  def one(args):  # the k candidates against one example's memory
    mem, val, inp, cand, w = args
    logits = module.decoder(inp, jnp.broadcast_to(mem, (k,) + mem.shape),
                            jnp.broadcast_to(val, (k,) + val.shape))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.take_along_axis(logp, cand[..., None], axis=-1)[..., 0] * w, axis=-1)

  scores = jax.lax.map(one, (memory, valid, inputs, candidates, weights))  # [B, k]
  best = jnp.take_along_axis(top, jnp.argmax(scores, axis=1)[:, None], axis=1)[:, 0]
  return best, jnp.max(scores, axis=1)


def rank_answers(module, images, tokens, answers: np.ndarray, *, k: int):
  """(index into answers [B], its log-probability [B]) of each example's best answer;
  k >= len(answers) scores every answer (`inference.mplug.answer_scores`' argmax)."""
  return _rank_answers(module, images, tokens, answers, k=min(k, len(answers)))


def evaluate_vqa(module, tokenizer, reader: ImageReader, questions: dict, tokens: np.ndarray,
                 answers: Sequence[str], *, rank_k: int, beam_size: int, max_new: int,
                 batch_size: int, log_every: int) -> dict:
  """VQA accuracy (vqaEval.py: min(#matching humans / 3, 1), averaged over the 10
  leave-one-out subsets) of generation and of answer-list ranking, overall and per answer
  type."""
  n = len(questions["index"])
  batches = _batches(n, batch_size)
  answer_ids = answer_tokens(tokenizer, answers, module.decoder.max_len)
  generated, ranked, start = [], [], time.time()
  images = background(lambda b: reader.images(questions["index"][batches[b]]), len(batches))
  for b, (s, x) in enumerate(zip(batches, images)):
    x, q = _pad_rows(x, batch_size), _pad_rows(tokens[s], batch_size)
    out, _ = mplug_inference.generate(module, x, q, max_new_tokens=max_new, beam_size=beam_size)
    generated += decode_texts(tokenizer, np.asarray(out)[:len(s), 0])
    best, _ = rank_answers(module, x, q, answer_ids, k=rank_k)
    ranked += [answers[j] for j in np.asarray(best)[:len(s)]]
    if (b + 1) % log_every == 0:
      logging.info("VQA: %d/%d questions (%.0f s)", len(generated), n, time.time() - start)
  types = questions["answer_type"]
  result = {}
  for mode, predictions in (("generate", generated), ("rank", ranked)):
    scores = np.array([evaluation.vqa_score(p, a, official_references=True)
                       for p, a in zip(predictions, questions["answers"])])
    result[mode] = {"accuracy": float(scores.mean()), "per_answer_type": {
        t: float(scores[[u == t for u in types]].mean()) for t in sorted(set(types)) if t}}
  in_list = set(answers)
  result.update(
      num_questions=n, answer_list_size=len(answers), rank_k=min(rank_k, len(answers)),
      beam_size=beam_size,
      answer_list_coverage=float(np.mean([m in in_list for m in questions["majority"]])),
      samples=[{"question": q, "generated": g, "ranked": r, "answers": a} for q, g, r, a in
               zip(questions["question"][:6], generated[:6], ranked[:6],
                   questions["answers"][:6])])
  return result


# ---------------------------------------------------------------- the experiment
def experiment_config(size: str, *, batch_size: int | None = None,
                      image_size: int | None = None, vocab_size: int | None = None,
                      overrides: Mapping[str, object] | None = None):
  """configs/mplug.py at `size` for RGB images.

  Args:
    size: 'tiny', 'base' or 'large'.
    batch_size, image_size: override the config's (image_size: a multiple of the patch size).
    vocab_size: the tokenizer's size; the model gets one more id, [MASK] (default: the
      config's model vocabulary minus 1).
    overrides: more settings by dotted path, e.g. {'model.fusion.num_layers': 3}; each path
      must exist in the config.
  """
  config = mplug_config.get_config(f"size={size}")
  with config.unlocked():
    for path, value in (overrides or {}).items():
      *parents, leaf = path.split(".")
      node = config
      for key in parents:
        node = node.get(key) if hasattr(node, "get") else None
      if node is None or not hasattr(node, "keys") or leaf not in node:
        raise ValueError(f"override {path!r} names no setting of configs/mplug.py "
                         f"(size={size}); e.g. 'model.fusion.num_layers'.")
      node[leaf] = value
    vit = config.model.vision_encoder
    vit.channels = 3
    if image_size:
      vit.image_size = image_size
    if vit.image_size % vit.patch_size:
      raise ValueError(f"image_size={vit.image_size} must be a multiple of the config's patch "
                       f"size {vit.patch_size}.")
    if vocab_size:
      config.model.vocab_size = vocab_size + 1
    if batch_size:
      config.batch_size = batch_size
    config.data.dataset = CAPTION_DATASET
    config.data.vocab_size = config.model.vocab_size - 1
  return config


def rows(results: dict, compute: str) -> list[dict]:
  """The mplug table's rows {task, metric, paper, ours, config, data, compute}, as
  `experiments/reproduce.py`'s `mplug()` returns them."""
  steps = results["steps"]
  config = (f"configs/mplug.py:size={results['size']} ({results['image_size']} px, batch "
            f"{results['batch_size']}; COCO-only pretraining {steps['pretrain']} steps, then "
            f"{steps['caption']} captioning / {steps['vqa']} VQA finetuning steps)")
  cap, vqa, ret = results["captioning"], results["vqa"], results["retrieval"]
  cap_data = (f"coco_karpathy test, {cap['num_images']} images, all {cap['num_references']} "
              "references")
  vqa_data = (f"vqav2 validation, {vqa['num_questions']} questions (paper: test-dev); answer "
              f"list {vqa['answer_list_size']}")
  ret_data = f"coco_karpathy test, {ret['num_images']} images x {ret['num_texts']} captions"
  x100 = lambda v: round(100 * v, 1)
  recall = lambda d: " / ".join(str(x100(d[f"R@{k}"])) for k in (1, 5, 10))
  row = lambda task, metric, paper, ours, data: dict(task=task, metric=metric, paper=paper,
                                                     ours=ours, config=config, data=data,
                                                     compute=compute)
  itm = ret["itc+itm"]
  return [
      row("captioning", "CIDEr-D (x100)", PAPER["captioning"], x100(cap["cider_d"]), cap_data),
      row("captioning", "BLEU-4 (x100)", "- (see paper)", x100(cap["bleu4"]), cap_data),
      row("captioning", "ROUGE-L (x100, rouge-score)", "- (see paper)", x100(cap["rouge_l"]),
          cap_data),
      row("VQA (generation)", "VQA acc", PAPER["vqa"], x100(vqa["generate"]["accuracy"]),
          vqa_data),
      row("VQA (answer ranking)", "VQA acc", PAPER["vqa"], x100(vqa["rank"]["accuracy"]),
          vqa_data),
      row("image-to-text retrieval", "R@1 / R@5 / R@10", PAPER["retrieval"], recall(itm["i2t"]),
          ret_data),
      row("text-to-image retrieval", "R@1 / R@5 / R@10", PAPER["retrieval"], recall(itm["t2i"]),
          ret_data),
  ]


def markdown(results: dict, compute: str) -> str:
  keys = ("task", "metric", "paper", "ours", "config", "data", "compute")
  lines = ["_Deviations from the paper: " + "; ".join(results["deviations"]) + "._", "",
           "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows(results, compute)]
  return "\n".join(lines)


def _device() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"{os.cpu_count()}-core CPU"
  return f"{jax.device_count()} x {device.device_kind}"


def run_official(*, workdir: str, data_dir: str | None, size: str, seed: int,
                 pretrain_steps: int, caption_steps: int, vqa_steps: int,
                 batch_size: int | None = None, eval_limit: int = 0,
                 answer_list_size: int = 3129, beam_size: int = 5, rerank_k: int = 256,
                 answer_rank_k: int = 128, vqa_answers: str = "sample",
                 image_size: int | None = None, vocab_size: int | None = None,
                 eval_batch_size: int = 64, num_workers: int | None = None,
                 caption_dataset: str = CAPTION_DATASET, vqa_dataset: str = VQA_DATASET,
                 overrides: Mapping[str, object] | None = None, log_every: int = 50) -> dict:
  """Pretraining on COCO, then retrieval, captioning and VQA on the official datasets.

  Args:
    workdir: where results.json and results.md go.
    data_dir: where coco_karpathy and vqav2 are prepared (default: datasets.default_data_dir).
    size: configs/mplug.py size ('tiny', 'base', 'large').
    seed: initialisation, data order and dropout seed.
    pretrain_steps, caption_steps, vqa_steps: training steps of each stage (0: skip it; 0
      pretraining steps evaluates a randomly initialised model).
    batch_size: global batch of every stage (default: the config's).
    eval_limit: evaluate the first N test images (captioning, retrieval) and validation
      questions (VQA) only; 0 = all.
    answer_list_size: VQA ranking's answer list, the most frequent train answers.
    beam_size: beams for captioning and VQA generation.
    rerank_k: retrieval candidates re-ranked by ITM per query (ALBEF / mPLUG COCO: 256).
    answer_rank_k: VQA answers scored in full per question, chosen by their first token.
    vqa_answers: 'sample' (one of the 10 human answers per draw) or 'majority'.
    image_size: overrides the config's image size (a multiple of its patch size).
    vocab_size: the tokenizer's size (default: the config's model vocabulary - 1); the model
      vocabulary becomes vocab_size + 1 ([MASK] on top).
    eval_batch_size: batch of every evaluation call.
    num_workers: image-decoding threads (default: min(16, CPU count)).
    caption_dataset, vqa_dataset: dataset names, e.g. 'vqav2/short_side_384'.
    overrides: more config settings by dotted path ({'model.fusion.num_layers': 3}).
    log_every: log training losses every N steps and evaluation progress every N batches.

  Returns:
    The results (also in {workdir}/results.json): 'retrieval' {'itc', 'itc+itm': {'i2t',
    't2i': {'R@1', 'R@5', 'R@10'}}}, 'captioning' {'bleu4', 'cider_d', 'rouge_l'} (0..1,
    CIDEr-D 0..10), 'vqa' {'generate', 'rank': {'accuracy', 'per_answer_type'}}, the run's
    settings, training logs and 'deviations' from the paper.

  Raises:
    DatasetsNotPreparedError: a dataset is not prepared in data_dir (the message says how).
  """
  start = time.time()
  if vqa_answers not in VQA_ANSWER_MODES:
    raise ValueError(f"vqa_answers={vqa_answers!r}; choose one of {VQA_ANSWER_MODES}.")
  if min(pretrain_steps, caption_steps, vqa_steps) < 0:
    raise ValueError("pretrain_steps, caption_steps and vqa_steps must be >= 0.")
  data_dir = data_dir or datasets.default_data_dir()
  check_prepared(data_dir, (caption_dataset, vqa_dataset))
  config = experiment_config(size, batch_size=batch_size, image_size=image_size,
                             vocab_size=vocab_size, overrides=overrides)
  vit, text_len = config.model.vision_encoder, config.model.text_encoder.max_len
  decoder_len, batch = config.model.decoder.max_len, config.batch_size
  pool = futures.ThreadPoolExecutor(num_workers or min(16, os.cpu_count() or 1))
  try:
    reader = lambda name, split: ImageReader(name, split, data_dir, image_size=vit.image_size,
                                             pool=pool)
    coco_train, coco_test = reader(caption_dataset, "train"), reader(caption_dataset, "test")
    vqa_train, vqa_val = reader(vqa_dataset, "train"), reader(vqa_dataset, "validation")
    train_caps, test_caps = load_captions(coco_train), load_captions(coco_test, eval_limit)
    train_qs, val_qs = load_questions(vqa_train), load_questions(vqa_val, eval_limit)
    logging.info("data: %d train images / %d captions, %d test images / %d captions; VQA %d "
                 "train / %d validation questions", len(train_caps["index"]),
                 len(train_caps["pair_text"]), len(test_caps["index"]),
                 len(test_caps["pair_text"]), len(train_qs["index"]), len(val_qs["index"]))
    tokenizer = get_tokenizer(data_dir, config.model.vocab_size - 1, train_caps["pair_text"],
                              train_qs)
    if tokenizer.vocab_size >= config.model.vocab_size:
      raise ValueError(f"the tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} ids but "
                       f"the model's vocabulary is {config.model.vocab_size}: [MASK] "
                       "(= vocab_size - 1) would collide with a text id; delete the file.")

    # Token arrays, once.
    train_text = encoder_tokens(tokenizer, train_caps["pair_text"], text_len)
    test_text = encoder_tokens(tokenizer, test_caps["pair_text"], text_len)
    caption_rows = decoder_rows(answer_tokens(tokenizer, train_caps["pair_text"], decoder_len),
                                tokenizer.bos_id, tokenizer.pad_id)
    question_text = encoder_tokens(tokenizer, train_qs["question"], text_len)
    val_text = encoder_tokens(tokenizer, val_qs["question"], text_len)
    vocabulary = sorted({a for row in train_qs["answers"] for a in row}
                        | set(train_qs["majority"]))
    answer_of = {a: i for i, a in enumerate(vocabulary)}
    answer_rows = decoder_rows(answer_tokens(tokenizer, vocabulary, decoder_len),
                               tokenizer.bos_id, tokenizer.pad_id)
    if vqa_answers == "majority":
      choices = np.array([[answer_of[m]] for m in train_qs["majority"]], np.int32)
    else:  # each question's 10 answers (repeats = weights)
      width = max(len(a) for a in train_qs["answers"])
      choices = np.array([[answer_of[a[j % len(a)]] for j in range(width)]
                          for a in train_qs["answers"]], np.int32)
    answers = answer_list(train_qs["answers"], answer_list_size)
    # Captioning's encoder text is [CLS] alone. Finetunes of equal length share one compiled
    # step when their batches have equal shapes: then both are padded alike (pads are masked
    # in the encoder and fusion and weigh 0 in the loss, so the losses are unchanged).
    caption_text = np.full((1, 1), tokenizer.bos_id, np.int32)
    if caption_steps and caption_steps == vqa_steps:
      caption_text = np.full((1, question_text.shape[1]), tokenizer.pad_id, np.int32)
      caption_text[:, 0] = tokenizer.bos_id
      width = max(caption_rows["decoder_targets"].shape[1],
                  answer_rows["decoder_targets"].shape[1])
      widen = lambda rows: {k: np.pad(v, ((0, 0), (0, width - v.shape[1])),
                                      constant_values=0 if k == "decoder_weights"
                                      else tokenizer.pad_id) for k, v in rows.items()}
      caption_rows, answer_rows = widen(caption_rows), widen(answer_rows)

    model = state_lib.Model(config.model)
    pattern = mplug_model.fusion_pattern(config.model.fusion.num_layers,
                                         config.model.fusion.stride)
    logging.info("mPLUG %s: %d parameters, fusion %s, %d px, vocabulary %d", size,
                 model.param_count(), pattern, vit.image_size, config.model.vocab_size)

    # 1. pretraining on every (image, caption) pair of Karpathy train.
    num_pairs = len(train_text)
    if pretrain_steps or caption_steps:
      _check_batch(batch, num_pairs, "Karpathy train captions")
    if vqa_steps:
      _check_batch(batch, len(question_text), "VQAv2 train questions")

    def pretrain_batch(rng):
      idx = rng.choice(num_pairs, batch, replace=False)
      image = train_caps["pair_image"][idx]
      return {"images": coco_train.images(train_caps["index"][image]),
              "text": train_text[idx], "pair_ids": image.astype(np.int32)}

    params, rest, pre = pretrain(config, model, pretrain_batch, steps=pretrain_steps,
                                 seed=seed, log_every=log_every)
    module = model.merge(params, rest)
    results = {
        "size": size, "params": model.param_count(), "fusion_pattern": pattern,
        "image_size": vit.image_size, "vocab_size": config.model.vocab_size,
        "tokenizer": tokenizer.model_path, "batch_size": batch, "seed": seed,
        "steps": {"pretrain": pretrain_steps, "caption": caption_steps, "vqa": vqa_steps},
        "datasets": {"captions": caption_dataset, "vqa": vqa_dataset},
        "data": {"pretrain_images": len(train_caps["index"]), "pretrain_pairs": num_pairs,
                 "vqa_train_questions": len(train_qs["index"])},
        "eval_limit": eval_limit, "vqa_answers": vqa_answers,
        "deviations": list(DEVIATIONS), "pretrain": pre}
    eval_kw = dict(batch_size=eval_batch_size, log_every=log_every)

    # 2. retrieval with the pretrained model.
    results["retrieval"] = evaluate_retrieval(module, coco_test, test_caps, test_text,
                                              k=rerank_k, **eval_kw)
    logging.info("retrieval %s", {s: results["retrieval"][s] for s in ("itc", "itc+itm")})

    # 3. captioning: finetune, then beam search on Karpathy test.
    steps_cache = {}  # finetune steps compiled once per step count
    def caption_batch(rng):
      idx = rng.choice(num_pairs, batch, replace=False)
      return dict({"images": coco_train.images(
          train_caps["index"][train_caps["pair_image"][idx]]),
                   "text": np.repeat(caption_text, batch, axis=0)},
                  **{k: v[idx] for k, v in caption_rows.items()})

    tuned, rest, log = finetune(config, model, params, rest, caption_batch, steps=caption_steps,
                                seed=seed + 1, log_every=log_every, name="caption finetune",
                                cache=steps_cache)
    results["caption_finetune"] = log
    longest = int(caption_rows["decoder_weights"].sum(1).max())
    results["captioning"] = evaluate_captioning(
        model.merge(tuned, rest), tokenizer, coco_test, test_caps, beam_size=beam_size,
        max_new=min(decoder_len - 1, longest), **eval_kw)
    logging.info("captioning %s", {k: results["captioning"][k]
                                   for k in ("bleu4", "cider_d", "rouge_l")})
    del tuned

    # 4. VQA: finetune on train, evaluate on validation.
    def vqa_batch(rng):
      idx = rng.choice(len(question_text), batch, replace=False)
      picked = choices[idx, rng.integers(0, choices.shape[1], batch)]
      return dict({"images": vqa_train.images(train_qs["index"][idx]),
                   "text": question_text[idx]},
                  **{k: v[picked] for k, v in answer_rows.items()})

    tuned, rest, log = finetune(config, model, params, rest, vqa_batch, steps=vqa_steps,
                                seed=seed + 2, log_every=log_every, name="VQA finetune",
                                cache=steps_cache)
    results["vqa_finetune"] = log
    longest = int(answer_tokens(tokenizer, answers, decoder_len).astype(bool).sum(1).max())
    results["vqa"] = evaluate_vqa(
        model.merge(tuned, rest), tokenizer, vqa_val, val_qs, val_text, answers,
        rank_k=answer_rank_k, beam_size=beam_size, max_new=min(decoder_len - 1, longest),
        **eval_kw)
    logging.info("VQA %s", {m: results["vqa"][m]["accuracy"] for m in ("generate", "rank")})
  finally:
    pool.shutdown(wait=False, cancel_futures=True)

  results["wall_seconds"] = time.time() - start
  compute = f"{results['wall_seconds']:.0f} s on {_device()}"
  results["compute"] = compute
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  table = markdown(results, compute)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return results


# ---------------------------------------------------------------- command line
def define_flags() -> dict:
  """The script's flags; defined only when it runs as a script (see the module docstring)."""
  return {
      "workdir": flags.DEFINE_string("workdir", "workdirs/mplug_official", "Where results go."),
      "data_dir": flags.DEFINE_string(
          "data_dir", None, "Where coco_karpathy and vqav2 are prepared (default: "
          "$METALM_DATA_DIR, else ~/.cache/metalm_jax/data)."),
      "size": flags.DEFINE_enum("size", "base", sorted(mplug_config.SIZES),
                                "configs/mplug.py size."),
      "seed": flags.DEFINE_integer("seed", 0, "Initialisation, data order and dropout seed."),
      "pretrain_steps": flags.DEFINE_integer(
          "pretrain_steps", 10_000, "COCO pretraining steps (10k x 1024 = ~18 epochs of the "
          "567k Karpathy train pairs)."),
      "caption_steps": flags.DEFINE_integer("caption_steps", 3_000,
                                            "Captioning finetuning steps (~5 epochs at 1024)."),
      "vqa_steps": flags.DEFINE_integer("vqa_steps", 4_000,
                                        "VQA finetuning steps (~9 epochs of VQAv2 train)."),
      "batch_size": flags.DEFINE_integer("batch_size", None, "Batch (default: the config's)."),
      "eval_limit": flags.DEFINE_integer("eval_limit", 0, "Evaluate the first N test images / "
                                         "validation questions only (0 = all)."),
      "answer_list_size": flags.DEFINE_integer("answer_list_size", 3129,
                                               "VQA ranking's answer list size."),
      "beam_size": flags.DEFINE_integer("beam_size", 5, "Beams (captioning, VQA generation)."),
      "rerank_k": flags.DEFINE_integer("rerank_k", 256, "Retrieval candidates re-ranked by ITM."),
      "answer_rank_k": flags.DEFINE_integer("answer_rank_k", 128,
                                            "VQA answers scored in full per question."),
      "vqa_answers": flags.DEFINE_enum("vqa_answers", "sample", list(VQA_ANSWER_MODES),
                                       "VQA training targets."),
      "image_size": flags.DEFINE_integer("image_size", None, "Image size (default: config's)."),
      "vocab_size": flags.DEFINE_integer("vocab_size", None, "Tokenizer size (default: the "
                                         "config's model vocabulary - 1)."),
      "eval_batch_size": flags.DEFINE_integer("eval_batch_size", 64, "Evaluation batch."),
      "num_workers": flags.DEFINE_integer("num_workers", None, "Image-decoding threads."),
      "caption_dataset": flags.DEFINE_string("caption_dataset", CAPTION_DATASET,
                                             "e.g. coco_karpathy/short_side_384"),
      "vqa_dataset": flags.DEFINE_string("vqa_dataset", VQA_DATASET,
                                         "e.g. vqav2/short_side_384"),
      "log_every": flags.DEFINE_integer("log_every", 50, "Log every N steps / batches."),
  }


def main(flag_values: dict):
  def run(argv):
    del argv
    run_official(**{k: v.value for k, v in flag_values.items()})
  return run


if __name__ == "__main__":
  app.run(main(define_flags()))
