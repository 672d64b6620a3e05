"""Generate from a checkpoint of `experiments/train.py`, for every family that generates.

    out = generation.generate(config, "workdirs/demo", ["The "], Decoding(temperature=0.8))
    out = generation.generate(vl_config, "workdirs/vl_vqa", ["question: which digit is this?"
                                                             " answer:"], image=pixels)

  lm          decoder / hybrid / METALM language models: continue the prompt ([BOS] + its
              tokens, read causally)
  text_tasks  METALM multitask: the prompt is read by the encoder as spans, as in training
  metalm_vl   the image (its encoder span) then the prompt text: "Summarize this image:",
              "question: ... answer:"
  mplug       the image with the prompt as the question (VQA), or the image alone
              (captioning, an empty prompt)

Greedy by default; `Decoding` sets sampling (temperature, top-k, top-p, seed) or beam search
(beam_size > 1 with the GNMT length penalty). The model, tokenizer and checkpoint checks are
the trainer's (`train.evaluate`'s restore path).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalm_jax import config as config_lib
from metalm_jax import families, inference, sharding
from metalm_jax.data.prompts import Segment
from metalm_jax.families.predictors import decode as decode_ids
from metalm_jax.inference import beam_search  # the function (inference/__init__)
from metalm_jax.train import restore
from metalm_jax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How to decode: greedy (the default), sampling (temperature > 0, with top_k / top_p) or
  beam search (beam_size > 1, GNMT length_penalty)."""
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  beam_size: int = 1
  length_penalty: float = 0.0
  seed: int = 0

  def __post_init__(self):
    if self.beam_size > 1 and self.temperature > 0:
      raise ValueError("beam search (beam_size > 1) is deterministic: drop temperature, or "
                       "sample with beam_size=1")
    if self.max_new_tokens < 1 or self.beam_size < 1 or self.temperature < 0:
      raise ValueError(f"max_new_tokens >= 1, beam_size >= 1, temperature >= 0: {self}")

  def kwargs(self) -> dict:
    """The decoding keyword arguments of the inference functions."""
    out = dict(beam_size=self.beam_size, length_penalty=self.length_penalty)
    if self.beam_size == 1:
      out.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                 rng=jax.random.key(self.seed))
    return out


@dataclasses.dataclass
class Loaded:
  """A family, its model and a checkpoint's params, ready to generate."""
  config: ml_collections.ConfigDict
  family: families.Family
  model: state_lib.Model
  params: dict
  rest: object
  step: int


def load(config: ml_collections.ConfigDict, checkpoint: str, *, step: int | None = None,
         allow_config_mismatch: bool = False) -> Loaded:
  """The params of a train.py checkpoint of `config` (its family and model)."""
  config_lib.validate(config)
  family = families.build(config)
  model = state_lib.Model.from_config(config)
  mesh = sharding.make_mesh(config.mesh)
  restored = restore.restore_params(
      checkpoint, model, mesh, config.sharding_rules, step=step,
      check_config=lambda saved, where: restore.check_config(
          saved, config, where=where, allow_mismatch=allow_config_mismatch))
  family.check_model(model)
  rest = state_lib.init_rest(model, jax.random.key(config.seed))
  return Loaded(config, family, model, jax.device_get(restored.params), rest, restored.step)


def export_decoder(loaded: Loaded, out_dir: str, *, model_type: str | None = None,
                   overwrite: bool = False) -> str:
  """Writes the decoder of `loaded` (the model of a 'decoder' config, METALM's `decoder`) as a
  Hugging Face directory (`models.hf.decoders.export`; LoRA factors merged, scanned blocks
  unstacked), with the tokenizer files of an 'hf:<dir>' config.data.tokenizer beside it."""
  import shutil

  from metalm_jax.data import tokenizers
  from metalm_jax.models import decoder as decoder_lib
  from metalm_jax.models.hf import decoders as hf_decoders

  name, kwargs = config_lib.model_kwargs(loaded.config.model)
  params = loaded.model.plain_params(loaded.params)
  if name == "metalm":
    params, kwargs = params["decoder"], dict(kwargs["decoder"])
  elif name != "decoder":
    raise ValueError(f"config.model.name={name!r} has no Decoder to export; export works for "
                     "'decoder' models and METALM's decoder.")
  params = jax.tree.map(np.asarray, params)
  if kwargs.get("scan_layers"):
    params = decoder_lib.unstack_layer_params(params)
  kwargs = {k: v for k, v in kwargs.items() if k not in ("scan_layers", "remat_policy")}
  out = hf_decoders.export(params, kwargs, out_dir, model_type=model_type, overwrite=overwrite)
  kind = loaded.config.data.tokenizer
  if kind.startswith(tokenizers.HF_PREFIX):
    source = kind[len(tokenizers.HF_PREFIX):]
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
      if os.path.isfile(os.path.join(source, file)):
        shutil.copy(os.path.join(source, file), os.path.join(out, file))
  return out


def generate(loaded: Loaded, prompts: Sequence[str], decoding: Decoding = Decoding(), *,
             image: np.ndarray | None = None) -> list[str]:
  """The text each prompt continues with (module docstring for what a prompt is per family).

  Args:
    loaded: `load(...)`'s result.
    prompts: text prompts ('' for mPLUG captioning).
    decoding: greedy / sampling / beam settings.
    image: uint8 [H, W, C]: the image of every prompt (metalm_vl, mplug; required there).
  """
  family = loaded.family
  if family.name in ("metalm_vl", "mplug") and image is None:
    raise ValueError(f"family {family.name!r} generates from an image: pass image= (the CLI's "
                     "--image=<file>)")
  if family.name not in ("metalm_vl", "mplug") and image is not None:
    raise ValueError(f"family {family.name!r} reads text only; drop the image")
  predictor = family.predictor(loaded.model, loaded.params, loaded.rest) \
      if family.name != "lm" else None
  if family.name == "lm":
    return [_continue_text(loaded, p, decoding) for p in prompts]
  if family.name == "text_tasks":
    return predictor.generate_text(list(prompts), max_new_tokens=decoding.max_new_tokens,
                                   **decoding.kwargs())
  if family.name == "metalm_vl":
    segments = [[Segment("image", image, 0), Segment("text", p, 0)] for p in prompts]
    return predictor.generate_segments(segments, max_new_tokens=decoding.max_new_tokens,
                                       **decoding.kwargs())
  examples = [{"task": "vqa" if p else "caption", "question": p, "answer": "", "image": image}
              for p in prompts]
  out = []
  for ex in examples:  # one task per call
    out += predictor.generate([ex], task=ex["task"], max_new_tokens=decoding.max_new_tokens,
                              batch_size=1, **decoding.kwargs())
  return out


def _continue_text(loaded: Loaded, prompt: str, decoding: Decoding) -> str:
  """A language model's continuation of `prompt` ([BOS] + its tokens, causal)."""
  tokenizer = loaded.family.tokenizer
  module = loaded.model.merge(loaded.params, loaded.rest)
  ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)]).astype(np.int32)
  prompt_ids = jnp.asarray(ids[None])
  if decoding.beam_size > 1:
    out = beam_search(module, prompt_ids, max_new_tokens=decoding.max_new_tokens,
                                  beam_size=decoding.beam_size,
                                  length_penalty=decoding.length_penalty,
                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    new = np.asarray(out.sequences[0, 0, len(ids):])
  else:
    tokens = inference.generate(module, prompt_ids, max_new_tokens=decoding.max_new_tokens,
                                rng=jax.random.key(decoding.seed),
                                temperature=decoding.temperature, top_k=decoding.top_k,
                                top_p=decoding.top_p, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id)
    new = np.asarray(tokens[0, len(ids):])
  return decode_ids(tokenizer, new)


def read_image(path: str, channels: int) -> np.ndarray:
  """An image file as uint8 [H, W, C] (C = 1: grey, as the digits are stored; 3: RGB)."""
  from PIL import Image
  with Image.open(path) as img:
    if channels == 1:
      return np.asarray(img.convert("L"), np.uint8)[..., None]
    return np.asarray(img.convert("RGB"), np.uint8)
