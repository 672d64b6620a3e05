"""The families' predictors: what the evaluators call to generate, rank and retrieve.

All generation goes through one KV-cached path (`inference.decoding`): METALM prompts with
encoder spans (`inference.metalm`, left-padded batches of zero- / k-shot vision-language
prompts or text prompts) and mPLUG's image + text encoder (`inference.mplug`); greedy, or beam
search with the GNMT length penalty.

    predictor = family.predictor(model, params, rest)
    predictor.generate(examples, task='vqa', shots=4, support=train, beam_size=1)
    predictor.rank_answers(examples, answer_list, k=128)            # mPLUG
    predictor.retrieval_scores(images, captions, k=256)             # mPLUG
    predictor.generate_text(["question: ... context: ..."])        # METALM text tasks
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from metalm_jax import config as config_lib
from metalm_jax.data import image_text_pipeline, prompts, vl_sources
from metalm_jax.data.prompts import Segment
from metalm_jax.evaluation import harness
from metalm_jax.inference import metalm as metalm_generation
from metalm_jax.inference import metalm_prompts
from metalm_jax.inference import mplug as mplug_inference

UNK_ID = 3  # the tokenizers' unknown id: what an id the tokenizer lacks decodes as


def decode(tokenizer, ids) -> str:
  """Generated ids -> text; ids the tokenizer does not have (a model vocabulary larger than
  the tokenizer's, mPLUG's [MASK]) decode as unknown."""
  ids = np.asarray(ids)
  return tokenizer.decode(np.where(ids >= tokenizer.vocab_size, UNK_ID, ids)).strip()


class MetaLMVisionLanguagePredictor:
  """Zero- and k-shot generation of a METALM vision-language model: each shot's images (and,
  for METALM, its text) in their own encoder spans, as in training."""

  def __init__(self, family, model, params, rest):
    self.family, self.tokenizer = family, family.tokenizer
    self.module = model.merge(params, rest)

  def generate(self, examples: Sequence[dict], *, task: str, shots: int = 0,
               support: Sequence[dict] = (), seed: int = 0, match_question: bool = False,
               max_new_tokens: int = 0, **decoding) -> list[str]:
    """Answers / captions of zero- or k-shot prompts built from `examples`; `decoding`:
    beam_size, length_penalty, temperature, top_k, top_p, rng, batch_size."""
    segments = harness.build_prompts(examples, shots=shots, support=support, seed=seed,
                                     match_question=match_question)
    return self.generate_segments(
        segments, max_new_tokens=max_new_tokens or self.family.max_new_tokens(task), **decoding)

  def generate_segments(self, prompts: Sequence[Sequence[Segment]], *, max_new_tokens: int,
                        **decoding) -> list[str]:
    """The text generated after each prompt of image / text segments."""
    module = self.module
    span_prompts = [metalm_prompts.vl_prompt(
        p, self.tokenizer, num_image_tokens=module.vision_encoder.num_tokens(),
        max_span_len=module.max_span_len, encode_text=self.family.encode_text,
        preprocess=self.family.preprocess) for p in prompts]
    tokens, _ = metalm_generation.generate(
        module, span_prompts, max_new_tokens=max_new_tokens, eos_id=self.tokenizer.eos_id,
        pad_id=self.tokenizer.pad_id, **decoding)
    return [decode(self.tokenizer, row[0]) for row in tokens]


class TextTaskPredictor:
  """Generation of a METALM whose prompt is read by its encoder (as `text_task_pipeline`
  lays rows out: consecutive spans; causal-mode models read it causally)."""

  def __init__(self, family, model, params, rest):
    self.family, self.tokenizer = family, family.tokenizer
    self.module = model.merge(params, rest)

  def generate_text(self, texts: Sequence[str], *, references=None, max_new_tokens: int = 0,
                    **decoding) -> list[str]:
    """The text generated after each prompt. max_new_tokens 0: the longest reference + 1
    (EOS), at most what a training row leaves after the prompt. `decoding`: beam_size,
    length_penalty, temperature, top_k, top_p, rng, batch_size."""
    d = self.family.config.data
    if not max_new_tokens:
      if references is None:
        raise ValueError("generate_text needs max_new_tokens or references")
      max_new_tokens = max(len(self.tokenizer.encode(" " + prompts.as_text(r)))
                           for refs in references for r in refs) + 1
    max_new_tokens = max(1, min(max_new_tokens, d.seq_len - d.max_input_tokens))
    span_prompts = [metalm_prompts.text_prompt(
        t, self.tokenizer, max_input_tokens=d.max_input_tokens,
        max_span_len=self.family.max_span_len, encode_input=self.family.encode_input,
        encoder_spans=self.family.encoder_spans) for t in texts]
    tokens, _ = metalm_generation.generate(
        self.module, span_prompts, max_new_tokens=max_new_tokens, eos_id=self.tokenizer.eos_id,
        pad_id=self.tokenizer.pad_id, **decoding)
    return [decode(self.tokenizer, row[0]) for row in tokens]


def _batched(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield slice(start, min(n, start + batch_size))


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
  """x [m, ...] -> [n, ...] by repeating its last row: one compiled shape per call site."""
  return x if len(x) == n else np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


class MPlugPredictor:
  """mPLUG: beam-search captions and answers, answer-list ranking and ITC + ITM retrieval."""

  def __init__(self, family, model, params, rest):
    self.family, self.tokenizer = family, family.tokenizer
    self.module = model.merge(params, rest)
    kwargs = config_lib.model_kwargs(family.config.model)[1]  # a docked part's from its checkpoint
    self.text_len = kwargs["text_encoder"]["max_len"]
    self.answer_len = family.config.model.decoder.max_len

  def _clean(self, text: str) -> str:
    return vl_sources.clean_text(text) if self.family.official else text

  def _images(self, images) -> np.ndarray:
    return np.stack([self.family.preprocess(image) for image in images])

  def _text(self, text: str | None) -> np.ndarray:
    return image_text_pipeline.encoder_text(
        self.tokenizer, None if text is None else self._clean(text), self.text_len)

  def _encoder_inputs(self, examples, task: str):
    images = self._images([ex["image"] for ex in examples])
    text = np.stack([self._text(None if task == "caption" else prompts.as_text(ex["question"]))
                     for ex in examples])
    return images, text

  def generate(self, examples: Sequence[dict], *, task: str, shots: int = 0,
               support: Sequence[dict] = (), seed: int = 0, match_question: bool = False,
               max_new_tokens: int = 0, batch_size: int = 32, rng=None,
               **decoding) -> list[str]:
    """Captions (the image and [CLS] alone) or answers (image + question); `decoding`:
    beam_size, length_penalty, temperature, top_k, top_p."""
    del support, seed, match_question
    if shots:
      raise ValueError("mPLUG has no in-context prompting: use shots=0")
    if task not in ("caption", "vqa"):
      raise ValueError(f"mPLUG generates for task 'caption' or 'vqa', not {task!r}")
    max_new = max_new_tokens or self.family.max_new_tokens
    out = []
    for s in _batched(len(examples), batch_size):
      images, text = self._encoder_inputs(examples[s], task)
      n = len(images)
      key = None if rng is None else jax.random.fold_in(rng, s.start)
      tokens, _ = mplug_inference.generate(
          self.module, _pad_to(images, batch_size), _pad_to(text, batch_size),
          max_new_tokens=max_new, rng=key, **decoding)
      out += [decode(self.tokenizer, row[0]) for row in np.asarray(tokens)[:n]]
    return out

  def rank_answers(self, examples: Sequence[dict], answers: Sequence[str], *, k: int,
                   batch_size: int = 32) -> list[str]:
    """Each question's best answer of `answers`: the k likeliest by first token scored in
    full (mPLUG / ALBEF's answer-list ranking)."""
    targets = image_text_pipeline.answer_targets(self.tokenizer, list(answers), self.answer_len)
    out = []
    for s in _batched(len(examples), batch_size):
      images, text = self._encoder_inputs(examples[s], "vqa")
      n = len(images)
      best, _ = mplug_inference.rank_answers(self.module, _pad_to(images, batch_size),
                                             _pad_to(text, batch_size), targets, k=k)
      out += [answers[int(i)] for i in np.asarray(best)[:n]]
    return out

  def retrieval_scores(self, images, texts: Sequence[str], *, k: int,
                       batch_size: int = 64) -> dict:
    """`inference.mplug.retrieval_scores` of the images and captions (ITC, then the top k
    re-ranked by the ITM logit)."""
    pixels = self._images(images)
    tokens = np.stack([self._text(t) for t in texts])
    return mplug_inference.retrieval_scores(self.module, pixels, tokens, k_test=k,
                                            batch_size=batch_size)
