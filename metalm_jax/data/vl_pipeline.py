"""grain pipelines for vision-language examples -> static-shape batches (METALM).

Examples are the digits-style dicts of `digits_vl` or of any official dataset through
`vl_sources.vl_source` (COCO / Flickr30k captions, VQAv2, OK-VQA, NLVR2).

One element is ONE PROCESS's batch (B = batch size, N = max_images, S = image_size,
C = num_channels, L = seq_len); every shape is fixed, so one compilation serves a run:

    images         float32 [B, N, S, S, C]  pixels (`image_kind`); zeros where image_mask is False
    image_mask     bool    [B, N]           True for a real image (NLVR2 rows have 2, others 1)
    inputs         int32   [B, L]           [BOS] prompt answer, then PAD (0); NLVR2:
                                            [BOS] statement [BOS] prompt answer, PAD
    targets        int32   [B, L]           the next token of each input: prompt answer [EOS]
    weights        float32 [B, L]           1.0 where targets[b, i] is an answer token or the
                                            final EOS, 0.0 on the prompt and on padding
    segment_ids    int32   [B, L]           1 on real text tokens, 0 on padding
    prompt_length  int32   [B]              tokens before the answer ([BOS] + prompt, after
                                            the paired text): the answer starts at
                                            inputs[b, prompt_length[b]]
    text_length    int32   [B]              real tokens in inputs (pair + 1 + prompt + answer)
    pair_length    int32   [B]              the leading text tokens paired with image 1
                                            (NLVR2: [BOS] + statement); 0 for other rows
    task           int32   [B]              index into digits.TASKS ('caption', 'vqa', 'nlvr2')

Sequence layout (what a vision-language model builds from a row, `MetaLM.vl_layout`): the
row's images come first, in order, each as one *image span* (the vision encoder's patch
tokens of that image; for N = 2 the left image, then the right), followed by the L text
positions:

    [image 1 span] [image 2 span, if image_mask] [BOS] question ... answer: | seven [PAD] ...
                                                  \\---- prompt_length ----/ \\- weights = 1

NLVR2 rows pair the statement with each image, as the METALM paper finetunes NLVR2 ("two
image-text pairs"): the text starts with `pair_length` tokens [BOS] statement, which the
layout moves between the two images, so a model reads

    [image 1 span] [BOS] statement [image 2 span] [BOS] question: statement answer: | true
                   \\-- pair_length --/                                               weights
                   \\------------------------ prompt_length ---------------------/

(image 1 + its text one encoder span, image 2 + its text another; captions / VQA rows have
pair_length 0 and are unchanged).

Text is `prompts.prompt_text(example)` ("Summarize this image:" or "question: {q}
answer:") and `prompts.target_text(example)` (" " + answer), tokenized separately and
concatenated, so the answer tokens are exactly those a model generates after the prompt.
An answer too long for L is cut (its first tokens, then EOS), never an error.
`weights` train the answer only (finetuning / VQA). A semi-causal objective may instead
pick its own split of the text: its `prepare(row, rng)` sees single rows (shapes without
B) and may re-derive weights from `prompt_length` / `text_length`, e.g. let the encoder
see the images + a random-length text prefix and the decoder predict the rest.

Images become pixels by `images.preprocess_image(kind=image_kind)`: 'digits' (default; the
stored 8x8x1 scans scaled to [0, 1], upsampled by nearest neighbour to S, a multiple of 8,
the gray channel repeated to C in 1 or 3: the batches are bit-identical to those before
`images.py` existed), 'rgb' (official images, resized to uint8 [S, S, 3] by the source, in
[0, 1]) or 'clip' (CLIP mean / std).

Tokenizers: any `tokenizers.Tokenizer`. `get_vl_tokenizer('byte')` needs no setup;
`get_vl_tokenizer('sentencepiece', data_dir=...)` trains (in ~0.1 s) and caches a small
SentencePiece model on every text the digits templates can produce; for the official data,
`vl_sources.vl_tokenizer(data_dir, vocab_size)` (COCO captions + VQAv2 questions / answers).
"""
import functools
import os
from typing import Callable, Iterator, Sequence

import grain
import numpy as np

from metalm_jax.data import datasets
from metalm_jax.data import digits
from metalm_jax.data import images as images_lib
from metalm_jax.data import tokenizers
from metalm_jax.data import prompts

DATASET = "digits_vl"
# Feature -> (dtype, shape of one row given the pipeline's sizes).
FEATURE_DTYPES = {
    "images": np.float32, "image_mask": np.bool_, "inputs": np.int32, "targets": np.int32,
    "weights": np.float32, "segment_ids": np.int32, "prompt_length": np.int32,
    "text_length": np.int32, "task": np.int32, "pair_length": np.int32,
}
# The largest vocabulary SentencePiece can build from the templates' text (~326).
SENTENCEPIECE_VOCAB_SIZE = 320
Prepare = Callable[[dict, np.random.Generator], dict]


def feature_shapes(*, seq_len: int, max_images: int = 2, image_size: int = 8,
                   num_channels: int = 1) -> dict[str, tuple[int, ...]]:
  """The shape of each feature in one row (prepend B for a batch)."""
  return {"images": (max_images, image_size, image_size, num_channels),
          "image_mask": (max_images,), "inputs": (seq_len,), "targets": (seq_len,),
          "weights": (seq_len,), "segment_ids": (seq_len,), "prompt_length": (),
          "text_length": (), "task": (), "pair_length": ()}


def prompt_tokens(example: dict, tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """[BOS] + the prompt's tokens, int32 [prompt_length]: what generation starts from."""
  ids = tokenizer.encode(prompts.prompt_text(example))
  return np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32)


def pair_tokens(example: dict, tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """[BOS] + the tokens of the text paired with image 1 (NLVR2: the statement), int32
  [pair_length]; empty for examples without one (`prompts.pair_text`)."""
  text = prompts.pair_text(example)
  if text is None:
    return np.zeros((0,), np.int32)
  return np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)]).astype(np.int32)


def encode_example(example: dict, tokenizer: tokenizers.Tokenizer, *, seq_len: int,
                   max_images: int = 2, image_size: int = 8, num_channels: int = 1,
                   image_kind: str = "digits") -> dict[str, np.ndarray]:
  """One example -> one row of the batch format (module docstring), no B axis.

  An answer too long for seq_len is cut: its first tokens and the final EOS are kept, so a
  row never fails on a long caption. NLVR2 text starts with `pair_tokens` ([BOS] statement,
  pair_length of them), then [BOS] prompt answer as for the other tasks.

  Raises:
    ValueError: the (paired text and) prompt alone leave no room for an answer in seq_len,
      or the example has more images than max_images (NLVR2: not two), or an image its
      `image_kind` cannot take.
  """
  image_list = prompts.paired_images(example)
  pair = pair_tokens(example, tokenizer)
  prompt = np.concatenate([pair, prompt_tokens(example, tokenizer)]).astype(np.int32)
  answer = tokenizer.encode(prompts.target_text(example)).astype(np.int32)
  room = seq_len - len(prompt)  # the sequence (one longer than a row) ends with EOS
  if room < 1:
    raise ValueError(f"The prompt {prompts.prompt_text(example)!r} takes {len(prompt)} text "
                     f"positions{' with its paired text' if len(pair) else ''}, leaving no "
                     f"room for an answer in seq_len={seq_len}; raise seq_len.")
  sequence = np.concatenate([prompt, answer[:room], [tokenizer.eos_id]]).astype(np.int32)
  text_length = len(sequence) - 1
  inputs = np.full((seq_len,), tokenizer.pad_id, np.int32)
  targets = np.full((seq_len,), tokenizer.pad_id, np.int32)
  inputs[:text_length], targets[:text_length] = sequence[:-1], sequence[1:]
  positions = np.arange(seq_len)
  weights = ((positions >= len(prompt) - 1) & (positions < text_length)).astype(np.float32)

  if len(image_list) > max_images:
    raise ValueError(f"Example has {len(image_list)} images but max_images={max_images}.")
  images = np.zeros((max_images, image_size, image_size, num_channels), np.float32)
  for n, image in enumerate(image_list):
    images[n] = images_lib.preprocess_image(image, image_size=image_size,
                                            channels=num_channels, kind=image_kind)
  return {
      "images": images, "image_mask": np.arange(max_images) < len(image_list),
      "inputs": inputs, "targets": targets, "weights": weights,
      "segment_ids": (positions < text_length).astype(np.int32),
      "prompt_length": np.int32(len(prompt)), "text_length": np.int32(text_length),
      "task": np.int32(digits.TASKS.index(prompts.as_text(example["task"]))),
      "pair_length": np.int32(len(pair)),
  }


def _check_tasks(tasks: Sequence[str] | None) -> tuple[str, ...]:
  tasks = tuple(digits.TASKS if tasks is None else tasks)
  bad = [t for t in tasks if t not in digits.TASKS]
  if bad or not tasks:
    raise ValueError(f"tasks={list(tasks)} must be a non-empty subset of {list(digits.TASKS)}.")
  return tasks


def shard_examples(source, *, tasks: Sequence[str] | None = None, seed: int = 0,
                   shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                   process_count: int = 1) -> grain.MapDataset:
  """This process's examples of `tasks`, shuffled and repeated.

  Order: source -> the examples of `tasks` (default: all of digits.TASKS) -> this process's
  share of them, process_index::process_count -> shuffle(seed) (a new order every epoch) ->
  repeat(num_epochs). The task's examples are picked before sharding, so every process gets
  its share of them whatever the source's layout (digits_vl interleaves its tasks).
  """
  tasks = _check_tasks(tasks)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count}).")
  examples = grain.MapDataset.source(source)
  if tuple(tasks) != digits.TASKS:
    keep = task_indices(source, tasks)
    if not len(keep):
      raise ValueError(f"{source!r} has no examples of tasks {list(tasks)}.")
    examples = grain.MapDataset.source(Subset(source, keep))
  if len(examples) < process_count:
    raise ValueError(f"{len(examples)} examples of tasks {list(tasks)} cannot be shared by "
                     f"{process_count} processes.")
  examples = examples[process_index::process_count]
  if shuffle:
    examples = examples.shuffle(seed)
  return examples.repeat(num_epochs)


class Subset:
  """The examples `indices` of a random-access source, in that order (picklable)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]

  def __repr__(self) -> str:
    return f"Subset({self.source!r}, {len(self)} examples)"


def task_indices(source, tasks: Sequence[str]) -> np.ndarray:
  """Positions of `source`'s examples whose task is in `tasks` (a `VlSource` answers
  without decoding images; other sources are read example by example)."""
  if hasattr(source, "task_names"):
    names = source.task_names()
  else:
    names = [prompts.as_text(source[i]["task"]) for i in range(len(source))]
  return np.flatnonzero(np.isin(np.asarray(names), list(tasks)))


def read_options(batch_size: int) -> grain.ReadOptions:
  """Reader threads and prefetch sized to the batch: grain's default (500 examples ahead)
  spends seconds decoding images before the first batch of every iterator."""
  return grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(16, 4 * batch_size))


def vl_dataset(source, tokenizer: tokenizers.Tokenizer, *, seq_len: int, batch_size: int,
               seed: int, shuffle: bool = True, num_epochs: int | None = None,
               tasks: Sequence[str] | None = None, max_images: int = 2, image_size: int = 8,
               num_channels: int = 1, image_kind: str = "digits", process_index: int = 0,
               process_count: int = 1, worker_count: int = 0,
               prepare: Prepare | None = None) -> grain.IterDataset:
  """Training batches of vision-language rows for one process (see the module docstring).

  Args:
    source: random-access examples: `vl_sources.vl_source(...)` of digits_vl or an official
      dataset, or `datasets.data_source('digits_vl', ...)`.
    tokenizer: a `tokenizers.Tokenizer` (e.g. `get_vl_tokenizer(...)`).
    seq_len: L, text positions per row.
    batch_size: B, this process's batch size.
    seed: shuffling seed (a new order every epoch) and the seed of `prepare`.
    shuffle: False reads examples in order.
    num_epochs: passes over the examples; None repeats forever.
    tasks: keep only these tasks (default: all of digits.TASKS).
    max_images, image_size, num_channels: N, S, C of `images`.
    image_kind: how images become pixels (`images.preprocess_image`): 'digits' (8x8 gray,
      nearest-neighbour), 'rgb' ([0, 1], bicubic) or 'clip' (CLIP mean / std).
    process_index, process_count: this process takes examples process_index::process_count.
    worker_count: grain worker processes (0: in this process).
    prepare: an objective's `prepare(row, rng) -> row` on each row before batching, with a
      generator seeded from `seed` and the row's position; outputs must have static shapes.

  Returns:
    A grain IterDataset of dicts of numpy arrays, shapes `feature_shapes(...)` with B first.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  images_lib.check_kind(image_kind, num_channels)
  examples = shard_examples(source, tasks=tasks, seed=seed, shuffle=shuffle,
                            num_epochs=num_epochs, process_index=process_index,
                            process_count=process_count)
  rows = examples.to_iter_dataset(read_options(batch_size)).map(functools.partial(
      encode_example, tokenizer=tokenizer, seq_len=seq_len, max_images=max_images,
      image_size=image_size, num_channels=num_channels, image_kind=image_kind))
  if prepare is not None:
    rows = rows.random_map(prepare, seed=seed)
  batches = rows.batch(batch_size, drop_remainder=True)
  if worker_count:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return batches


def vl_eval_batches(source, tokenizer: tokenizers.Tokenizer, *, seq_len: int,
                    batch_size: int, tasks: Sequence[str] | None = None,
                    max_images: int = 2, image_size: int = 8, num_channels: int = 1,
                    image_kind: str = "digits", process_index: int = 0, process_count: int = 1,
                    num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One unshuffled pass for evaluation; the last batch is padded with empty rows.

  Empty rows are all zeros (weights 0, image_mask False). With several processes, pass the
  same `num_batches` to all (at least ceil(max examples per process / B)); processes that
  run out yield empty batches.
  """
  images_lib.check_kind(image_kind, num_channels)
  examples = shard_examples(source, tasks=tasks, shuffle=False, num_epochs=1,
                            process_index=process_index, process_count=process_count)
  encode = functools.partial(encode_example, tokenizer=tokenizer, seq_len=seq_len,
                             max_images=max_images, image_size=image_size,
                             num_channels=num_channels, image_kind=image_kind)
  pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
  shapes = feature_shapes(seq_len=seq_len, max_images=max_images, image_size=image_size,
                          num_channels=num_channels)
  count = 0
  for batch in examples.to_iter_dataset(read_options(batch_size)).map(encode).batch(
      batch_size, batch_fn=pad):
    if count == num_batches:
      raise ValueError(f"num_batches={num_batches} is too small for process "
                       f"{process_index}'s evaluation examples.")
    count += 1
    yield batch
  for _ in range(count, num_batches or 0):
    yield {k: np.zeros((batch_size,) + shapes[k], FEATURE_DTYPES[k]) for k in shapes}


def template_examples() -> list[dict]:
  """One example dict (task, question, answer; no images) per text the templates produce."""
  examples = []
  for label in range(10):
    examples.append({"task": "caption", "question": "", "answer": digits.caption(label)})
    examples.extend({"task": "vqa", "question": q, "answer": digits.vqa_answer(q, label)}
                    for q in digits.VQA_QUESTIONS)
  for statement in digits.NLVR2_STATEMENTS:
    examples.extend({"task": "nlvr2", "question": statement, "answer": answer}
                    for answer in ("true", "false"))
  return examples


def sentencepiece_texts() -> list[str]:
  """Every prompt + target text the templates produce (the SentencePiece training text)."""
  return [prompts.prompt_text(ex) + prompts.target_text(ex) for ex in template_examples()]


def max_text_length(tokenizer: tokenizers.Tokenizer) -> int:
  """Text positions of the longest template ([BOS] statement, for NLVR2, then [BOS] prompt
  answer): the least seq_len."""
  return max(len(pair_tokens(ex, tokenizer)) + len(prompt_tokens(ex, tokenizer))
             + len(tokenizer.encode(prompts.target_text(ex))) for ex in template_examples())


def get_vl_tokenizer(kind: str, *, data_dir: str | None = None,
                     vocab_size: int = SENTENCEPIECE_VOCAB_SIZE) -> tokenizers.Tokenizer:
  """'byte', 'hf:<dir>' (a Hugging Face tokenizer.json, `tokenizers.HFTokenizer`), or a
  SentencePiece model of the digits templates cached under data_dir.

  The SentencePiece model is trained on `sentencepiece_texts()` (the templates are a closed
  set, so no split leaks) and cached at
  `{data_dir}/tokenizers/digits_vl_sp{vocab_size}.model`; vocab_size <= ~326.
  """
  if kind == "byte":
    return tokenizers.ByteTokenizer()
  if kind.startswith(tokenizers.HF_PREFIX):
    return tokenizers.hf_tokenizer(kind)
  if kind != "sentencepiece":
    raise ValueError(f"Unknown tokenizer kind {kind!r}; kinds: "
                     f"{list(tokenizers.TOKENIZER_KINDS)} {tokenizers.HF_KIND_HELP}.")
  path = tokenizers.sentencepiece_model_path(data_dir or datasets.default_data_dir(), DATASET,
                                             vocab_size)
  if os.path.exists(path):
    return tokenizers.SentencePieceTokenizer(path)
  return tokenizers.train_sentencepiece(sentencepiece_texts(), path, vocab_size)
