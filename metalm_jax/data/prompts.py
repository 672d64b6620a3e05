"""Prompts for zero- and few-shot evaluation, as lists of image and text segments.

Zero-shot templates (METALM paper): captioning "Summarize this image:", VQA
"question: {q} answer:". The target follows the prompt after one space:

    "Summarize this image:" + " a handwritten digit seven."
    "question: which digit is this? answer:" + " seven"

A prompt is a list of `Segment`s in reading order. Each segment is an image (a uint8
[H, W, C] array) or a text string, and carries `shot`: 0..k-1 for the k demonstrations,
k for the query. A demonstration is its images followed by its prompt and answer text; the
query is its images followed by its prompt only. An NLVR2 example pairs its statement with
each image, as the METALM paper does ("two image-text pairs"): image 1, the statement,
image 2, the prompt (which holds the statement again) and, for a demonstration, the answer;
`pair_text` is the statement. Keeping every shot in its own segments
lets a model encode each demonstration separately (METALM's in-context learning encodes
each shot with the bidirectional encoder and feeds them to the decoder in order); use
`group_by_shot` to get them back.

Examples are dicts with the `digits_vl` features ('task', 'question', 'answer', 'image',
'image2', 'num_images'); text may be str or UTF-8 bytes (as a data source returns it).
Nothing here depends on a model.
"""
from typing import Any, NamedTuple, Sequence

import numpy as np

CAPTION_PROMPT = "Summarize this image:"
VQA_TEMPLATE = "question: {q} answer:"
SEGMENT_KINDS = ("image", "text")


class Segment(NamedTuple):
  """One piece of a prompt: kind 'image' (value uint8 [H, W, C]) or 'text' (value str)."""
  kind: str
  value: Any
  shot: int


def as_text(value: str | bytes) -> str:
  """str, or UTF-8 bytes decoded."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def prompt_text(example: dict) -> str:
  """The zero-shot prompt of an example: the caption prompt, or the VQA template."""
  task = as_text(example["task"])
  if task == "caption":
    return CAPTION_PROMPT
  return VQA_TEMPLATE.format(q=as_text(example["question"]))


def target_text(example: dict) -> str:
  """The text that follows the prompt: ' ' + the answer (the caption for 'caption')."""
  return " " + as_text(example["answer"])


def images_of(example: dict) -> list[np.ndarray]:
  """The example's images in order: [image] or [image, image2] by 'num_images'."""
  num_images = int(example.get("num_images", 1))
  if num_images not in (1, 2):
    raise ValueError(f"num_images={num_images} must be 1 or 2.")
  return [np.asarray(example["image"]), np.asarray(example["image2"])][:num_images]


def pair_text(example: dict) -> str | None:
  """The text paired with the first of two images: an NLVR2 example's statement (its second
  image is paired with the prompt, which holds the statement too); None for other tasks."""
  if as_text(example["task"]) != "nlvr2":
    return None
  return as_text(example["question"])


def paired_images(example: dict) -> list[np.ndarray]:
  """`images_of(example)`, checking that an example with a `pair_text` has two images."""
  images = images_of(example)
  if pair_text(example) is not None and len(images) != 2:
    raise ValueError(f"an {as_text(example['task'])!r} example pairs its statement with each "
                     f"of two images but has {len(images)} (num_images).")
  return images


def example_segments(example: dict, *, shot: int = 0, with_answer: bool) -> list[Segment]:
  """An example's images then its text (prompt, plus ' ' + answer if `with_answer`); for
  NLVR2 image 1, the statement (`pair_text`), image 2, then that text."""
  text = prompt_text(example) + (target_text(example) if with_answer else "")
  images = [Segment("image", image, shot) for image in paired_images(example)]
  first = pair_text(example)
  if first is not None:
    return [images[0], Segment("text", first, shot), images[1], Segment("text", text, shot)]
  return images + [Segment("text", text, shot)]


def zero_shot_prompt(example: dict) -> list[Segment]:
  """The query's images and prompt text, all shot 0."""
  return example_segments(example, shot=0, with_answer=False)


def few_shot_prompt(shots: Sequence[dict], query: dict) -> list[Segment]:
  """k demonstrations (with answers, shots 0..k-1), then the query (shot k) without answer."""
  segments = []
  for k, demo in enumerate(shots):
    segments.extend(example_segments(demo, shot=k, with_answer=True))
  return segments + example_segments(query, shot=len(shots), with_answer=False)


def group_by_shot(prompt: Sequence[Segment]) -> list[list[Segment]]:
  """The segments of each shot, in order (the last group is the query)."""
  groups: list[list[Segment]] = []
  for segment in prompt:
    if segment.kind not in SEGMENT_KINDS:
      raise ValueError(f"Segment kind {segment.kind!r} is not one of {SEGMENT_KINDS}.")
    if segment.shot == len(groups):
      groups.append([])
    elif segment.shot != len(groups) - 1:
      raise ValueError(f"Segment shots must count up from 0 without gaps; got shot "
                       f"{segment.shot} after {len(groups)} groups.")
    groups[-1].append(segment)
  return groups
