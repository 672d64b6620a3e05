"""What the vision-language families (metalm_vl, mplug) share: sources, tokenizers, images.

`config.data.dataset` is 'digits_vl' (the bundled digits) or an official dataset
('coco_karpathy', 'vqav2', 'ok_vqa', 'nlvr2', 'flickr30k_karpathy', also '/short_side_384')
prepared in `config.data.data_dir`. The digits keep their 8x8 images (upsampled by the
'digits' preprocessing); official images are resized to the vision encoder's size when read.
"""
from __future__ import annotations

import functools

import numpy as np

from metalm_jax import config as config_lib
from metalm_jax.config import ConfigError
from metalm_jax.data import images as images_lib
from metalm_jax.data import prompts, tokenizers, vl_pipeline, vl_sources

DIGITS = "digits_vl"
# The official datasets whose train texts train the shared SentencePiece model.
TOKENIZER_DATASETS = ("coco_karpathy", "vqav2")


class VisionLanguageData:
  """Mixed into the vision-language families: reads `config.data` and the vision encoder."""

  config = None
  data_dir: str = ""

  @property
  def official(self) -> bool:
    return vl_sources.base_name(self.config.data.dataset) != DIGITS

  @functools.cached_property
  def vision(self) -> dict:
    """The vision encoder's kwargs (a docked one's from its checkpoint)."""
    return dict(config_lib.model_kwargs(self.config.model)[1]["vision_encoder"])

  @property
  def image_kind(self) -> str:
    return self.config.data.image_preprocessing or ("rgb" if self.official else "digits")

  def check_images(self) -> None:
    kind, channels = self.image_kind, self.vision.get("channels", 3)
    try:
      images_lib.check_kind(kind, channels)
    except ValueError as e:
      raise ConfigError(f"config.data.image_preprocessing={kind!r} with "
                        f"config.model.vision_encoder.channels={channels}: {e}") from e

  @functools.cached_property
  def tokenizer(self) -> tokenizers.Tokenizer:
    d = self.config.data
    if not self.official:
      return vl_pipeline.get_vl_tokenizer(d.tokenizer, data_dir=self.data_dir,
                                          vocab_size=d.vocab_size)
    if d.tokenizer != "sentencepiece":
      return tokenizers.get_tokenizer(d.tokenizer)
    suffix = d.dataset.partition("/")[2]
    names = [f"{n}/{suffix}" if suffix else n for n in TOKENIZER_DATASETS]
    return vl_sources.vl_tokenizer(self.data_dir, d.vocab_size, caption_dataset=names[0],
                                   vqa_dataset=names[1])

  def required_datasets(self) -> list[tuple[str, str]]:
    """The training dataset, every evaluator's dataset and the official tokenizer's."""
    d = self.config.data
    names = [d.dataset] + [self.config.evals[n].get("dataset") or d.dataset
                           for n in self.config.evals.keys()]
    if self.official and d.tokenizer == "sentencepiece":
      suffix = d.dataset.partition("/")[2]
      names += [f"{n}/{suffix}" if suffix else n for n in TOKENIZER_DATASETS]
    return [(n, self.data_dir) for n in dict.fromkeys(names)]

  def source(self, split: str, *, dataset: str = "", per_caption: bool = False,
             images: bool = True):
    """One split of `dataset` (default config.data.dataset) as digits-style examples;
    `per_caption`: one example per (image, caption) where the dataset has captions."""
    dataset = dataset or self.config.data.dataset
    base = vl_sources.base_name(dataset)
    official = base != DIGITS
    return vl_sources.vl_source(
        dataset, split, self.data_dir, images=images,
        per_caption=per_caption and base in vl_sources.CAPTION_DATASETS,
        image_size=self.vision["image_size"] if official and images else None)

  def preprocess(self, image) -> np.ndarray:
    """An example's image -> the vision encoder's float32 [S, S, C] input."""
    v = self.vision
    return images_lib.preprocess_image(image, image_size=v["image_size"],
                                       channels=v.get("channels", 3), kind=self.image_kind)

  def examples(self, split: str, *, dataset: str = "", task: str | None = None,
               limit: int = 0, first: int = 0, images: bool = True) -> list[dict]:
    """The examples of `split` (of `task` only), at most `limit` (0 = all); `first` > 0
    reads only the split's first records (a demonstration pool); `images=False` reads the
    texts only."""
    source = self.source(split, dataset=dataset, images=images)
    out = []
    for i in range(len(source) if not first else min(first, len(source))):
      ex = source[i]
      if task is None or prompts.as_text(ex["task"]) == task:
        out.append(ex)
        if limit and len(out) == limit:
          break
    return out
