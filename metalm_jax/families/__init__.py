"""Model families: what differs between model families, for the one trainer.

    family = families.build(config)     # config.family names it; the config is checked
    family.train_dataset(...), family.loss(...), family.init_extra(...), family.predictor(...)

Families (`config.family`):
  lm          Decoder / HybridDecoder / MetaLM on packed documents (families/lm.py)
  metalm_vl   METALM vision-language rows: images as encoder spans (families/metalm_vl.py)
  text_tasks  METALM multitask text-to-text rows, prompt in encoder spans (families/text_tasks.py)
  mplug       mPLUG: ITC / ITM / MLM / PrefixLM pretraining with momentum encoders and ITC
              queues in the train state, and seq2seq finetuning (families/mplug.py)

A new family subclasses `families.base.Family` and calls `register(cls)`.
"""
from __future__ import annotations

import ml_collections

from metalm_jax.config import ConfigError
from metalm_jax.families.base import COMMON_DATA_KEYS, Family, ObjectiveLoss, token_sums
from metalm_jax.families.lm import LanguageModel

FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family], *, overwrite: bool = False) -> type[Family]:
  """Adds a Family subclass under `cls.name`."""
  if cls.name in FAMILIES and not overwrite:
    raise ValueError(f"family {cls.name!r} is already registered; pass overwrite=True")
  FAMILIES[cls.name] = cls
  return cls


def build(config: ml_collections.ConfigDict) -> Family:
  """The config's family, after checking that the config fits it (ConfigError if not)."""
  name = config.get("family", "lm")
  if name not in FAMILIES:
    raise ConfigError(f"config.family={name!r} is not a known family; known: {sorted(FAMILIES)}")
  family = FAMILIES[name](config)
  owners = [f.name for f in FAMILIES.values()
            if config.objective in f.exclusive_objectives and f.name != name]
  if owners:
    raise ConfigError(f"config.objective={config.objective!r} belongs to family {owners[0]!r} "
                      f"(its rows), not config.family={name!r}")
  family.validate()
  return family


from metalm_jax.families.metalm_vl import MetaLMVisionLanguage  # noqa: E402
from metalm_jax.families.mplug import MPlugFamily  # noqa: E402
from metalm_jax.families.text_tasks import TextTasks  # noqa: E402

for _family in (LanguageModel, MetaLMVisionLanguage, TextTasks, MPlugFamily):
  register(_family)

__all__ = ["COMMON_DATA_KEYS", "FAMILIES", "Family", "LanguageModel", "MPlugFamily",
           "MetaLMVisionLanguage", "ObjectiveLoss", "TextTasks", "build", "register",
           "token_sums"]
