"""`Family`: what one model family gives the one trainer (`train.trainer.train_and_evaluate`).

The trainer is written once: mesh, sharded init, checkpoints (with the data position),
resume, SIGTERM / deadline, NaN policy, gradient accumulation, freezing, per-module learning
rates, multi-host, activation sharding, evaluators and metrics. A family supplies only what
differs between model families:

  input       `tokenizer`, `train_dataset(...)` (a grain IterDataset of this process's
              batches, checkpointable) and `eval_batches(split, ...)` (one deterministic pass)
  state       `init_extra(params, rng)`: state kept beside the params in `TrainState.extra`
              (None for language models; mPLUG pretraining: momentum encoders + ITC queues)
  loss        `loss(model, params, rest, extra, batch, rng=, step=)` -> (loss, (metrics, aux))
  update      `after_update(params, extra, aux, step)` -> (params, extra): after the optimizer
              step (mPLUG: the ITC temperature clamped in the parameter, the momentum
              encoders' EMA, the batch's features into the queues)
  eval        `eval_sums(...)`: token-weighted sums for the held-out loss evaluator;
              `predictor(model, params, rest)`: generation / ranking / retrieval for the others

`loss`, `after_update`, `init_extra` and `eval_sums` are traced inside the jitted steps;
everything else runs on the host. Families are registered by name and chosen by
`config.family`; `families.build(config)` checks that the config fits the family (its models,
its objectives, and no non-default `config.data` key it does not read).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, ClassVar

import jax.numpy as jnp
import ml_collections

from metalm_jax import config as config_lib
from metalm_jax.config import ConfigError
from metalm_jax.data import datasets

# config.data keys every family reads.
COMMON_DATA_KEYS = ("dataset", "data_dir", "tokenizer", "vocab_size", "tokenizer_dataset",
                    "seq_len", "worker_count", "train_split", "eval_split")


class Family:
  """Base class: a language-model-like family with no extra state. Subclasses override."""

  name: ClassVar[str] = ""
  models: ClassVar[tuple[str, ...]] = ()  # config.model.name values it trains
  objectives: ClassVar[tuple[str, ...] | None] = None  # None: any registered objective
  # Objectives that only this family's rows can feed (another family naming one is an error).
  exclusive_objectives: ClassVar[tuple[str, ...]] = ()
  data_keys: ClassVar[tuple[str, ...]] = ()  # family-specific config.data keys it reads
  # What one row of a batch counts for the progress bar's throughput ('tokens' / 'examples').
  throughput_unit: ClassVar[str] = "tokens"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.data_dir = config.data.data_dir or datasets.default_data_dir()

  # ---------------------------------------------------------------- checks
  def validate(self) -> None:
    """ConfigError when the config does not fit this family (before any compute)."""
    c = self.config
    if self.models and c.model.name not in self.models:
      raise ConfigError(f"config.family={self.name!r} trains models {list(self.models)}, not "
                        f"config.model.name={c.model.name!r}; set config.family to the model's "
                        "family (see metalm_jax/families).")
    if self.objectives is not None and c.objective not in self.objectives:
      raise ConfigError(f"config.objective={c.objective!r} is not an objective of family "
                        f"{self.name!r}; valid: {list(self.objectives)}")
    defaults = config_lib.base_config().data
    read = set(COMMON_DATA_KEYS) | set(self.data_keys)
    for key in c.data.keys():
      if key not in read and c.data[key] != defaults[key]:
        raise ConfigError(
            f"config.data.{key}={c.data[key]!r} is not read by family {self.name!r} (it reads "
            f"{sorted(read)}); remove it, or pick the family that uses it.")

  def required_datasets(self) -> list[tuple[str, str]]:
    """[(dataset name, data dir)] this run reads (training, evaluators, tokenizer), for a
    check before any compute (`tables.check_data`)."""
    d = self.config.data
    out = [(d.dataset, self.data_dir)]
    if d.tokenizer == "sentencepiece" and d.tokenizer_dataset:
      out.append((d.tokenizer_dataset, self.data_dir))
    return out

  def check_model(self, model) -> None:
    """ConfigError for a model that cannot read this family's data (vocabulary too small...).
    Called once the tokenizer and the model's shapes are known."""

  # ---------------------------------------------------------------- input
  @functools.cached_property
  def tokenizer(self):
    raise NotImplementedError

  def train_dataset(self, *, batch_size: int, process_index: int, process_count: int):
    """A grain IterDataset of this process's training batches (numpy dicts, static shapes);
    `iter()` of it has get_state / set_state (saved in every checkpoint)."""
    raise NotImplementedError

  def eval_batches(self, split: str, *, batch_size: int, process_index: int,
                   process_count: int, num_batches: int | None) -> Iterator[dict]:
    """One deterministic pass over `split` in batches for the held-out loss (padded rows
    weigh 0); with several processes every process yields the same number of batches."""
    raise NotImplementedError

  def units_per_batch(self, batch_size: int) -> int:
    """Tokens (or examples) a global batch holds, for throughput."""
    return batch_size * self.config.data.seq_len

  # ---------------------------------------------------------------- state and loss (traced)
  def init_extra(self, params: dict, rng) -> Any:
    """The extra train state built from fresh (or imported) params; None: no extra state."""
    del params, rng
    return None

  def loss(self, model, params, rest, extra, batch, *, rng, step) -> tuple[Any, tuple[dict, Any]]:
    """(loss, (metrics, aux)) of one training batch; `aux` goes to `after_update`."""
    raise NotImplementedError

  def after_update(self, params, extra, aux, step) -> tuple[Any, Any]:
    """(params, extra) after the optimizer step produced `params` (constraints on params,
    the extra state's update)."""
    del aux, step
    return params, extra

  def eval_sums(self, model, params, rest, extra, batch) -> dict:
    """{'loss_sum', 'accuracy_sum', 'tokens'} of one eval batch (deterministic)."""
    raise NotImplementedError

  # ---------------------------------------------------------------- prediction (host)
  def predictor(self, model, params, rest):
    """What evaluators call: generate / rank_answers / retrieval_scores (family-specific)."""
    raise ConfigError(f"family {self.name!r} has no predictor: only 'loss' evaluators apply")

  def sample(self, model, params, rest, rng) -> str | None:
    """A text sample at the end of a run (config.sample), or None."""
    del model, params, rest, rng
    return None


class ObjectiveLoss:
  """The step side of a family for one objective on ready batches, no extra state: what
  `train.step.make_train_step` makes of an `objectives.Objective` (tests, benchmarks and
  notebooks that build steps directly)."""

  def __init__(self, objective):
    self.objective = objective

  def init_extra(self, params, rng):
    del params, rng
    return None

  def loss(self, model, params, rest, extra, batch, *, rng, step):
    del extra, step
    value, metrics = self.objective.loss(model.merge(params, rest), batch,
                                         deterministic=False, rng=rng)
    return value, (metrics, None)

  def after_update(self, params, extra, aux, step):
    del aux, step
    return params, extra

  def eval_sums(self, model, params, rest, extra, batch) -> dict:
    del extra
    _, metrics = self.objective.loss(model.merge(params, rest), batch, deterministic=True)
    return token_sums(metrics)


def token_sums(metrics: dict) -> dict:
  """An objective's mean metrics -> the token-weighted sums the loss evaluator adds up."""
  tokens = metrics["tokens"]
  return {"loss_sum": metrics["loss"] * tokens,
          "accuracy_sum": metrics.get("accuracy", jnp.zeros(())) * tokens, "tokens": tokens}
