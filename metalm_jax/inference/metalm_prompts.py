"""METALM prompts with encoder spans, and their padded batch layouts (NumPy, no model).

A prompt is first built on its own, unpadded, as a `SpanPrompt`:

  tokens        int32 [n]      the decoder's prompt positions (image positions hold pad_id)
  span_starts   int32 [m]      span k covers tokens[span_starts[k] : + span_lengths[k]], read
  span_lengths  int32 [m]      bidirectionally by the encoder ('dual') or the semi-causal
                               mask ('single'); 'causal' ignores spans
  images        float32 [m, S, S, C] or None: image k fills span k's first T positions

Builders (each lays a prompt out exactly as training does):
  text_prompt   [BOS] + input text in consecutive spans of <= max_span_len, as
                `data.text_task_pipeline.prompt_row` (which it calls); encode_input=False
                leaves the prompt causal (the causal baseline).
  vl_prompt     zero- or k-shot `data.prompts.Segment` lists, as `MetaLM.vl_layout` lays out
                training rows: shot by shot, each image is T image positions and its own
                span; each text is `[BOS] text` after the images it follows (+ `[EOS]` after
                a demonstration's last text, which carries its answer); with `encode_text`,
                the span of the image right before a text also covers that text, up to
                max_span_len in all. A shot is usually its images then one text (the last
                image's span takes it); an NLVR2 shot interleaves them, image 1, statement,
                image 2, prompt (`prompts.example_segments`): two image + text spans, as
                training rows pair them (`vl_pipeline`'s pair_length).

Then a batch is padded to one static shape, B prompts x L positions x M span slots:
  pad_left      the prompts end at position L - 1 (generation appends after the last
                column, all rows at once: the KV-cached path); `valid` [B, L] marks real
                positions, positions count from 0 at each prompt's first token.
  pad_right     the prompts start at position 0 and `ends` [B] is each one's length (the
                full-forward reference appends at `ends`).
Both return int32 tokens, positions, span_ids [B, L]; span_starts, span_lengths [B, M]
(in row positions; unused slots (0, 0)); images float32 [B, M, S, S, C] or None.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from metalm_jax.data import prompts as prompts_lib
from metalm_jax.data import text_task_pipeline
from metalm_jax.masking import span_ids_from_spans

# preprocess(image uint8 [H, W, C]) -> float32 [S, S, C], the model's image input.
Preprocess = Callable[[np.ndarray], np.ndarray]


class SpanPrompt(NamedTuple):
  """One unpadded METALM prompt (module docstring)."""
  tokens: np.ndarray
  span_starts: np.ndarray
  span_lengths: np.ndarray
  images: np.ndarray | None = None
  # int32 [m, Ce]: each span in an own-vocabulary encoder's tokens (`data.encoder_spans`).
  encoder_ids: np.ndarray | None = None


def text_prompt(text: str, tokenizer, *, max_input_tokens: int, max_span_len: int,
                encode_input: bool = True, encoder_spans=None) -> SpanPrompt:
  """[BOS] + the text's tokens (cut to max_input_tokens), as `text_task_pipeline` lays out
  a training row's prompt: consecutive spans of at most max_span_len from position 0, or
  no span with encode_input=False. `encoder_spans` (`data.encoder_spans.EncoderSpans`): the
  spans also in an own-vocabulary encoder's tokens, as training rows carry them."""
  ids = text_task_pipeline.input_ids(text, tokenizer, max_input_tokens)
  row = text_task_pipeline.prompt_row(
      ids, seq_len=len(ids) + 1, max_span_len=max_span_len,
      max_spans=text_task_pipeline.max_spans_for(len(ids), max_span_len),
      encode_input=encode_input)
  used = row["span_lengths"] > 0
  starts, lengths = row["span_starts"][used], row["span_lengths"][used]
  encoder_ids = (None if encoder_spans is None else
                 encoder_spans.span_ids(ids, starts, lengths))
  return SpanPrompt(ids.astype(np.int32), starts, lengths, encoder_ids=encoder_ids)


def vl_prompt(prompt: Sequence[prompts_lib.Segment], tokenizer, *, num_image_tokens: int,
              max_span_len: int, encode_text: bool, preprocess: Preprocess) -> SpanPrompt:
  """A zero- or k-shot image-text prompt (module docstring); `preprocess` maps each image
  to the model's input [S, S, C]."""
  tokens, starts, lengths, images = [], [], [], []
  cur = 0
  groups = prompts_lib.group_by_shot(prompt)
  for g, group in enumerate(groups):
    chunks = _image_text_chunks(group)
    for c, (chunk_images, texts) in enumerate(chunks):
      last = c == len(chunks) - 1  # a demonstration's answer ends its last text
      ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(" ".join(texts)),
                            [tokenizer.eos_id] if last and g < len(groups) - 1 else []])
      ids = ids.astype(np.int32)
      for k, image in enumerate(chunk_images):
        length = num_image_tokens
        if encode_text and k == len(chunk_images) - 1:
          length += min(len(ids), max_span_len - num_image_tokens)
        starts.append(cur)
        lengths.append(length)
        images.append(np.asarray(preprocess(image), np.float32))
        tokens.append(np.full((num_image_tokens,), tokenizer.pad_id, np.int32))
        cur += num_image_tokens
      tokens.append(ids)
      cur += len(ids)
  return SpanPrompt(np.concatenate(tokens), np.asarray(starts, np.int32),
                    np.asarray(lengths, np.int32), np.stack(images) if images else None)


def _image_text_chunks(group: Sequence[prompts_lib.Segment]) -> list[tuple[list, list[str]]]:
  """A shot's segments as (images, texts) chunks, each images followed by the texts up to the
  next image: one chunk for images-then-text shots, one per image + text pair for NLVR2."""
  chunks: list[tuple[list, list[str]]] = [([], [])]
  for s in group:
    if s.kind == "image":
      if chunks[-1][1]:  # an image after text starts the next pair
        chunks.append(([], []))
      chunks[-1][0].append(s.value)
    else:
      chunks[-1][1].append(prompts_lib.as_text(s.value))
  return chunks


def extent(prompts: Sequence[SpanPrompt]) -> tuple[int, int]:
  """(the longest prompt's positions, the most spans of a prompt) of a batch."""
  return (max(len(p.tokens) for p in prompts), max(len(p.span_starts) for p in prompts))


def pad_left(prompts: Sequence[SpanPrompt], *, length: int, num_spans: int,
             pad_id: int) -> dict[str, np.ndarray | None]:
  """The batch right-aligned at position length - 1, with `valid` bool [B, L]."""
  return _pad(prompts, length=length, num_spans=num_spans, pad_id=pad_id, left=True)


def pad_right(prompts: Sequence[SpanPrompt], *, length: int, num_spans: int,
              pad_id: int) -> dict[str, np.ndarray | None]:
  """The batch from position 0, with `segment_ids` int32 [B, L] (1 = real) and `ends` [B]."""
  return _pad(prompts, length=length, num_spans=num_spans, pad_id=pad_id, left=False)


def _pad(prompts, *, length, num_spans, pad_id, left):
  batch = len(prompts)
  longest, most_spans = extent(prompts)
  if longest > length:
    raise ValueError(f"a prompt of {longest} positions does not fit length={length}.")
  if most_spans > num_spans:
    raise ValueError(f"a prompt with {most_spans} spans does not fit num_spans={num_spans}.")
  shapes = {p.images.shape[1:] for p in prompts if p.images is not None}
  if len(shapes) > 1:
    raise ValueError(f"the prompts' images differ in shape: {sorted(shapes)}; preprocess them "
                     "to one size.")
  out = {"tokens": np.full((batch, length), pad_id, np.int32),
         "valid": np.zeros((batch, length), bool),
         "positions": np.zeros((batch, length), np.int32),
         "span_ids": np.zeros((batch, length), np.int32),
         "span_starts": np.zeros((batch, num_spans), np.int32),
         "span_lengths": np.zeros((batch, num_spans), np.int32),
         "images": (np.zeros((batch, num_spans) + shapes.pop(), np.float32) if shapes
                    else None)}
  encoder = [p.encoder_ids for p in prompts if p.encoder_ids is not None]
  if encoder and len(encoder) < batch:
    raise ValueError("some prompts have encoder_ids and some not; build them all alike.")
  # Unused slots hold 0 (the model keeps their first key valid; their outputs are dropped).
  out["span_encoder_ids"] = (np.zeros((batch, num_spans, encoder[0].shape[1]), np.int32)
                             if encoder else None)
  for b, p in enumerate(prompts):
    n, m = len(p.tokens), len(p.span_starts)
    offset = length - n if left else 0
    out["tokens"][b, offset:offset + n] = p.tokens
    out["valid"][b, offset:offset + n] = True
    out["positions"][b, offset:offset + n] = np.arange(n)
    out["span_starts"][b, :m] = offset + p.span_starts
    out["span_lengths"][b, :m] = p.span_lengths
    out["span_ids"][b] = span_ids_from_spans(out["span_starts"][b], out["span_lengths"][b],
                                             length)
    if p.images is not None:
      out["images"][b, :m] = p.images
    if p.encoder_ids is not None:
      out["span_encoder_ids"][b, :m] = p.encoder_ids
  if not left:
    out["segment_ids"] = out.pop("valid").astype(np.int32)
    out["ends"] = np.array([len(p.tokens) for p in prompts], np.int32)
  return out


__all__ = ["Preprocess", "SpanPrompt", "extent", "pad_left", "pad_right", "text_prompt",
           "vl_prompt"]
