"""grain pipelines for mPLUG: image-text pairs (pretraining) and seq2seq rows (finetuning).

Sources are `vl_sources.vl_source(...)` examples (digits_vl, COCO / Flickr30k captions,
VQAv2, OK-VQA). One element is ONE PROCESS's batch (B = batch size, S = image_size,
C = channels, T = text_len, A = answer_len: the model's text_encoder.max_len and
decoder.max_len); every shape is static, so one compilation serves a run.

task='pretrain' (ITC + ITM + MLM + PrefixLM), from the source's caption examples:

    images           float32 [B, S, S, C]  `images.preprocess_image(kind=image_kind)`
    text             int32   [B, T]        [CLS] caption [EOS], then PAD ([CLS] = BOS)
    pair_ids         int32   [B]           rows with equal ids are positives of each other
                                           (digits: the digit label, so the duplicates of
                                           the 10 captions are; COCO: the image's record
                                           index, so an image's 5 captions are)

task='caption' / 'vqa' (seq2seq finetuning; the encoder reads the image and `text`, the
decoder is teacher-forced on the target):

    images           float32 [B, S, S, C]
    text             int32   [B, T]        caption: [CLS] alone, then PAD;
                                           vqa: [CLS] question [EOS], then PAD
    decoder_inputs   int32   [B, A]        [BOS] target, then PAD
    decoder_targets  int32   [B, A]        target [EOS], then PAD
    decoder_weights  float32 [B, A]        1.0 on the target tokens and its EOS

The caption target is the example's caption (read the source with per_caption=True to
visit every caption of an image); the VQA target is, with vqa_answers='sample', one of the
question's human answers drawn afresh at every visit (answers weighted by how many
annotators gave them, as ALBEF / mPLUG train), with 'majority' the multiple_choice_answer.
Too long a text is cut (its first tokens, then EOS), never an error. Official texts are
cleaned as BLIP / mPLUG do (`vl_sources.clean_text`: lowercase, punctuation dropped, at
most 30 words; answers are kept as given); the digits templates are used as they are
(`clean=None` decides by `source.official`).

Order: source -> examples process_index::process_count -> shuffle(seed), a new order every
epoch -> repeat(num_epochs) -> the task's examples -> (vqa 'sample': the answer drawn by
`random_map`, seeded by `seed` and the example's position) -> rows -> batch(drop_remainder)
[-> worker processes]. All randomness is seeded, so `iter(ds)`'s `get_state()` /
`set_state()` resume with exactly the same batches (also with `worker_count` workers; store
the worker count with the state).

`image_text_eval_batches` is one unshuffled pass, the last batch padded with empty rows:
all zeros (decoder_weights 0), with pair_ids -1.
"""
import functools
from typing import Iterator

import grain
import numpy as np

from metalm_jax.data import images as images_lib
from metalm_jax.data import prompts
from metalm_jax.data import tokenizers
from metalm_jax.data import vl_pipeline
from metalm_jax.data import vl_sources

TASKS = ("pretrain", "caption", "vqa")
VQA_ANSWER_MODES = ("sample", "majority")
# The examples each task reads (digits_vl sources mix every task).
SOURCE_TASK = {"pretrain": "caption", "caption": "caption", "vqa": "vqa"}
FEATURE_DTYPES = {
    "pretrain": {"images": np.float32, "text": np.int32, "pair_ids": np.int32},
    "seq2seq": {"images": np.float32, "text": np.int32, "decoder_inputs": np.int32,
                "decoder_targets": np.int32, "decoder_weights": np.float32},
}


def feature_shapes(task: str, *, text_len: int, answer_len: int | None = None,
                   image_size: int, channels: int) -> dict[str, tuple[int, ...]]:
  """The shape of each feature of one row of `task` (prepend B for a batch)."""
  _check_task(task)
  shapes = {"images": (image_size, image_size, channels), "text": (text_len,)}
  if task == "pretrain":
    return dict(shapes, pair_ids=())
  return dict(shapes, decoder_inputs=(answer_len,), decoder_targets=(answer_len,),
              decoder_weights=(answer_len,))


def feature_dtypes(task: str) -> dict[str, type]:
  """The dtype of each feature of `task`'s rows."""
  _check_task(task)
  return FEATURE_DTYPES["pretrain" if task == "pretrain" else "seq2seq"]


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"task={task!r}; image-text tasks: {list(TASKS)}.")


# ---------------------------------------------------------------------------- text -> ids
def encoder_text(tokenizer: tokenizers.Tokenizer, text: str | None,
                 length: int) -> np.ndarray:
  """[CLS] (= BOS) text [EOS], then PAD: int32 [length]; text None gives [CLS] alone.

  Too long a text keeps its first length - 2 tokens.
  """
  if length < 2:
    raise ValueError(f"text length={length} must be >= 2 ([CLS] and [EOS]).")
  ids = [tokenizer.bos_id]
  if text is not None:
    ids = np.concatenate([ids, tokenizer.encode(text)[:length - 2], [tokenizer.eos_id]])
  out = np.full((length,), tokenizer.pad_id, np.int32)
  out[:len(ids)] = ids
  return out


def answer_targets(tokenizer: tokenizers.Tokenizer, texts, length: int) -> np.ndarray:
  """Decoder targets text [EOS], then PAD: int32 [len(texts), length] (for answer ranking).

  Too long a text keeps its first length - 1 tokens.
  """
  if length < 1:
    raise ValueError(f"answer length={length} must be >= 1.")
  out = np.full((len(texts), length), tokenizer.pad_id, np.int32)
  for i, text in enumerate(texts):
    ids = np.concatenate([tokenizer.encode(text)[:length - 1], [tokenizer.eos_id]])
    out[i, :len(ids)] = ids
  return out


def decoder_row(tokenizer: tokenizers.Tokenizer, text: str, length: int) -> dict:
  """Teacher forcing on one target, each [length]: 'decoder_inputs' [BOS] text, PAD;
  'decoder_targets' text [EOS], PAD; 'decoder_weights' 1.0 on the targets."""
  targets = answer_targets(tokenizer, [text], length)[0]
  n = int(np.sum(targets != tokenizer.pad_id))
  inputs = np.full((length,), tokenizer.pad_id, np.int32)
  inputs[0], inputs[1:n] = tokenizer.bos_id, targets[:n - 1]
  return {"decoder_inputs": inputs, "decoder_targets": targets,
          "decoder_weights": (np.arange(length) < n).astype(np.float32)}


# ---------------------------------------------------------------------------- rows
def _texts(example: dict, clean: bool) -> tuple[str, str]:
  """(question, answer) of an example, cleaned if asked (the answer of a VQA example is
  kept: answers are scored by the VQA normalisation, not by pre_caption)."""
  question = prompts.as_text(example["question"])
  answer = prompts.as_text(example["answer"])
  if clean:
    question = vl_sources.clean_text(question)
    if prompts.as_text(example["task"]) == "caption":
      answer = vl_sources.clean_text(answer)
  return question, answer


def encode_row(example: dict, tokenizer: tokenizers.Tokenizer, *, task: str, text_len: int,
               answer_len: int | None = None, image_size: int, channels: int,
               image_kind: str, clean: bool = False) -> dict[str, np.ndarray]:
  """One example -> one row of `task` (module docstring), no B axis."""
  image = images_lib.preprocess_image(example["image"], image_size=image_size,
                                      channels=channels, kind=image_kind)
  question, answer = _texts(example, clean)
  if task == "pretrain":
    if "pair_id" not in example:
      raise ValueError("Pretraining examples need a 'pair_id': read the dataset with "
                       "vl_sources.vl_source(...).")
    return {"images": image, "text": encoder_text(tokenizer, answer, text_len),
            "pair_ids": np.int32(example["pair_id"])}
  text = encoder_text(tokenizer, question if task == "vqa" else None, text_len)
  return {"images": image, "text": text, **decoder_row(tokenizer, answer, answer_len)}


def draw_answer(example: dict, rng: np.random.Generator) -> dict:
  """The example with one of its human answers ('answers') as its 'answer', uniformly."""
  answers = list(example.get("answers") or [example["answer"]])
  return dict(example, answer=answers[int(rng.integers(len(answers)))])


def _settings(source, *, task, text_len, answer_len, image_size, channels, image_kind,
              vqa_answers, clean, batch_size):
  """Checks the arguments; returns the row function's keyword arguments."""
  _check_task(task)
  images_lib.check_kind(image_kind, channels)
  if vqa_answers not in VQA_ANSWER_MODES:
    raise ValueError(f"vqa_answers={vqa_answers!r}; choose one of {list(VQA_ANSWER_MODES)}.")
  if task != "pretrain" and (answer_len is None or answer_len < 1):
    raise ValueError(f"task={task!r} needs answer_len >= 1 (the decoder's max_len), got "
                     f"{answer_len}.")
  if text_len < 2:
    raise ValueError(f"text_len={text_len} must be >= 2 ([CLS] and [EOS]).")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  source_task = getattr(source, "task", None)
  if source_task not in (None, SOURCE_TASK[task]):
    raise ValueError(f"task={task!r} reads {SOURCE_TASK[task]!r} examples, but the source "
                     f"{source!r} holds {source_task!r} examples only.")
  if clean is None:
    clean = bool(getattr(source, "official", False))
  return dict(task=task, text_len=text_len, answer_len=answer_len, image_size=image_size,
              channels=channels, image_kind=image_kind, clean=clean)


def _examples(source, *, task, seed, shuffle, num_epochs, process_index, process_count,
              vqa_answers) -> grain.MapDataset:
  examples = vl_pipeline.shard_examples(
      source, tasks=[SOURCE_TASK[task]], seed=seed, shuffle=shuffle, num_epochs=num_epochs,
      process_index=process_index, process_count=process_count)
  if task == "vqa" and vqa_answers == "sample":
    examples = examples.random_map(draw_answer, seed=seed)
  return examples


def image_text_dataset(source, tokenizer: tokenizers.Tokenizer, *, task: str, text_len: int,
                       batch_size: int, seed: int, image_size: int, channels: int,
                       image_kind: str, answer_len: int | None = None,
                       vqa_answers: str = "sample", clean: bool | None = None,
                       shuffle: bool = True, num_epochs: int | None = None,
                       process_index: int = 0, process_count: int = 1,
                       worker_count: int = 0) -> grain.IterDataset:
  """Training batches of mPLUG rows for one process (see the module docstring).

  Args:
    source: `vl_sources.vl_source(...)` examples; for 'pretrain' / 'caption' on COCO read
      with per_caption=True (one example per caption), images at image_size.
    tokenizer: any `tokenizers.Tokenizer` (its BOS is [CLS]).
    task: 'pretrain' | 'caption' | 'vqa'.
    text_len: T, the text encoder's positions.
    batch_size: B, this process's batch size.
    seed: the shuffling seed and the seed of the VQA answer draws.
    image_size, channels, image_kind: S, C and `images.preprocess_image`'s kind
      ('digits', 'rgb', 'clip').
    answer_len: A, the decoder's positions ('caption' and 'vqa').
    vqa_answers: 'sample' (a human answer per visit) or 'majority'.
    clean: clean texts as BLIP's pre_caption (None: for official sources only).
    shuffle, num_epochs: False reads in order; None repeats forever.
    process_index, process_count: this process takes examples process_index::process_count.
    worker_count: grain worker processes (0: in this process).

  Returns:
    A grain IterDataset of dicts of numpy arrays, `feature_shapes(task, ...)` with B first.
  """
  row = functools.partial(encode_row, tokenizer=tokenizer, **_settings(
      source, task=task, text_len=text_len, answer_len=answer_len, image_size=image_size,
      channels=channels, image_kind=image_kind, vqa_answers=vqa_answers, clean=clean,
      batch_size=batch_size))
  examples = _examples(source, task=task, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                       process_index=process_index, process_count=process_count,
                       vqa_answers=vqa_answers)
  batches = examples.to_iter_dataset(vl_pipeline.read_options(batch_size)).map(row).batch(
      batch_size, drop_remainder=True)
  if worker_count:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return batches


def image_text_eval_batches(source, tokenizer: tokenizers.Tokenizer, *, task: str,
                            text_len: int, batch_size: int, image_size: int, channels: int,
                            image_kind: str, answer_len: int | None = None,
                            vqa_answers: str = "majority", clean: bool | None = None,
                            process_index: int = 0, process_count: int = 1,
                            num_batches: int | None = None,
                            seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """One unshuffled pass over `task`'s examples (e.g. a validation loss), padded.

  The last batch is padded with empty rows: all zeros (decoder_weights 0), pair_ids -1.
  With several processes, pass the same `num_batches` to all (at least ceil(max examples
  per process / B)); processes that run out yield empty batches. Arguments as
  `image_text_dataset`; 'sample' answers are drawn with `seed`.
  """
  row = functools.partial(encode_row, tokenizer=tokenizer, **_settings(
      source, task=task, text_len=text_len, answer_len=answer_len, image_size=image_size,
      channels=channels, image_kind=image_kind, vqa_answers=vqa_answers, clean=clean,
      batch_size=batch_size))
  examples = _examples(source, task=task, seed=seed, shuffle=False, num_epochs=1,
                       process_index=process_index, process_count=process_count,
                       vqa_answers=vqa_answers)
  shapes = feature_shapes(task, text_len=text_len, answer_len=answer_len,
                          image_size=image_size, channels=channels)
  dtypes = feature_dtypes(task)
  empty = lambda: {k: np.zeros((batch_size,) + shapes[k], dtypes[k]) for k in shapes}
  pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
  count = 0
  for batch in examples.to_iter_dataset(vl_pipeline.read_options(batch_size)).map(row).batch(
      batch_size, batch_fn=pad):
    if count == num_batches:
      raise ValueError(f"num_batches={num_batches} is too small for process "
                       f"{process_index}'s evaluation examples.")
    count += 1
    yield _mark_padding(batch, task, tokenizer)
  for _ in range(count, num_batches or 0):
    yield _mark_padding(empty(), task, tokenizer)


def _mark_padding(batch: dict, task: str, tokenizer) -> dict:
  """pair_ids -1 on padding rows (their text does not start with [CLS])."""
  if task == "pretrain":
    batch = dict(batch, pair_ids=np.where(batch["text"][:, 0] == tokenizer.bos_id,
                                          batch["pair_ids"], -1).astype(np.int32))
  return batch
