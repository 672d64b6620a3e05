"""Family 'lm': language models on packed documents (Decoder, HybridDecoder, MetaLM).

Input: `data.pipeline.lm_dataset` (documents -> [BOS] ids [EOS] chunks -> first-fit packed
rows of `config.data.seq_len`), with the objective's `prepare` per row (spans, masks,
permutations). Loss: `config.objective` (causal_lm, semi_causal_lm, masked_lm, a mix, or one
registered in a notebook). No extra state. Predictor: text generation with the KV cache; the
end-of-run sample continues `config.sample.prompt`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from metalm_jax import masking
from metalm_jax import objectives
from metalm_jax import config as config_lib
from metalm_jax.config import ConfigError
from metalm_jax.data import datasets, pipeline, tokenizers, unigram
from metalm_jax.data.encoder_spans import EncoderSpans
from metalm_jax.families import base
from metalm_jax import inference
from metalm_jax.objectives import semi_causal_lm, special_tokens


def model_vocab_size(model_config) -> int | None:
  """The model's output vocabulary (config.model.vocab_size, or its decoder's; a docked
  decoder's from its checkpoint)."""
  kwargs = config_lib.model_kwargs(model_config)[1]
  return kwargs.get("vocab_size") or dict(kwargs.get("decoder") or {}).get("vocab_size")


def encoder_spans(config, family, prepare=None):
  """`data.encoder_spans.EncoderSpans` (wrapping `prepare`) for an own-vocabulary text
  encoder (config.model.encoder_span_len > 0); else `prepare` unchanged (and the family's
  tokenizer untouched)."""
  kind = config_lib.encoder_tokenizer_kind(config)
  if not kind:
    return prepare
  return EncoderSpans(family.tokenizer, tokenizers.get_tokenizer(kind),
                      int(config.model.encoder_span_len), prepare)


def check_vocab(model_config, tokenizer, what: str) -> None:
  """ConfigError when the model's vocabulary cannot hold the tokenizer's ids."""
  vocab_size = model_vocab_size(model_config)
  if vocab_size is not None and vocab_size < tokenizer.vocab_size:
    raise ConfigError(
        f"config.model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
        f"({tokenizer.vocab_size}, {what}); raise it")


class LanguageModel(base.Family):
  """Decoder / hybrid / METALM language models on packed documents."""

  name = "lm"
  models = ("decoder", "hybrid", "metalm")
  data_keys = ("encoder_tokenizer",)  # an own-vocabulary docked encoder (encoder_spans)

  @functools.cached_property
  def objective(self) -> objectives.Objective:
    try:
      return objectives.get(self.config.objective)
    except ValueError as e:
      raise ConfigError(str(e)) from e

  def validate(self) -> None:
    super().validate()
    prepare = self.objective.prepare  # an unknown objective fails here
    try:  # spans longer than the model's span capacity
      semi_causal_lm.check_model_capacity(prepare,
                                          seq_len=self.config.data.seq_len,
                                          model=self.config.model)
    except ValueError as e:
      raise ConfigError(f"config.objective={self.config.objective!r}: {e}") from e

  @functools.cached_property
  def prepare(self):
    """The objective's `prepare`; for semi_causal_lm with a non-default
    `config.spans.strategy`, a `semi_causal_lm.make_prepare(strategy=...)` with the same
    L-relative span settings ('saliency': the unigram table of the training split, counted
    once and cached beside the tokenizer). Training rows only: the held-out loss keeps the
    objective's own (random) spans, so runs with different strategies are scored alike."""
    spans = self.config.get("spans") or {}
    strategy = spans.get("strategy", "random")
    if strategy == "random" or self.config.objective != "semi_causal_lm":
      return encoder_spans(self.config, self, self.objective.prepare)
    score_table = None
    if strategy == "saliency":
      d = self.config.data
      counts = unigram.unigram_counts(d.dataset, self.tokenizer, data_dir=self.data_dir,
                                      split=d.train_split)
      score_table = masking.unigram_scores(counts)
    return encoder_spans(self.config, self, semi_causal_lm.make_prepare(
        strategy=strategy, score_table=score_table,
        temperature=float(spans.get("temperature", 0.25))))

  def check_model(self, model) -> None:
    check_vocab(self.config.model, self.tokenizer,
                f"config.data.tokenizer={self.config.data.tokenizer!r}")
    vocab_size = model_vocab_size(self.config.model)
    if self.objective.special_tokens and vocab_size is not None:
      try:
        special_tokens.check_vocab(vocab_size, self.tokenizer.vocab_size)
      except ValueError as e:
        raise ConfigError(f"config.objective={self.config.objective!r}: {e}") from e

  # ---------------------------------------------------------------- input
  @functools.cached_property
  def tokenizer(self) -> tokenizers.Tokenizer:
    d = self.config.data
    return tokenizers.get_tokenizer(d.tokenizer, dataset=d.tokenizer_dataset or d.dataset,
                                    data_dir=self.data_dir, vocab_size=d.vocab_size)

  def source(self, split: str):
    return datasets.data_source(self.config.data.dataset, split, self.data_dir)

  def train_dataset(self, *, batch_size: int, process_index: int, process_count: int):
    c = self.config
    return pipeline.lm_dataset(
        self.source(c.data.train_split), self.tokenizer, seq_len=c.data.seq_len,
        batch_size=batch_size, seed=c.seed, shuffle=True, num_epochs=None,
        process_index=process_index, process_count=process_count,
        worker_count=c.data.worker_count, prepare=self.prepare)

  def eval_batches(self, split: str, *, batch_size: int, process_index: int,
                   process_count: int, num_batches: int | None):
    del num_batches  # every process packs the same documents' count (pipeline.eval_batches)
    return pipeline.eval_batches(
        self.source(split), self.tokenizer, seq_len=self.config.data.seq_len,
        batch_size=batch_size, process_index=process_index, process_count=process_count,
        prepare=encoder_spans(self.config, self, self.objective.prepare))

  # ---------------------------------------------------------------- loss (traced)
  def loss(self, model, params, rest, extra, batch, *, rng, step):
    return base.ObjectiveLoss(self.objective).loss(model, params, rest, extra, batch, rng=rng,
                                                   step=step)

  def eval_sums(self, model, params, rest, extra, batch) -> dict:
    return base.ObjectiveLoss(self.objective).eval_sums(model, params, rest, extra, batch)

  # ---------------------------------------------------------------- prediction
  def sample(self, model, params, rest, rng) -> str | None:
    """Continues `config.sample.prompt` (greedy at temperature 0) for max_new_tokens."""
    s = self.config.sample
    if s.max_new_tokens <= 0:
      return None
    tokenizer = self.tokenizer
    module = model.merge(jax.device_get(params), jax.device_get(rest))
    prompt = np.concatenate([[tokenizer.bos_id], tokenizer.encode(s.prompt)])
    tokens = inference.generate(
        module, jnp.asarray(prompt[None], jnp.int32), max_new_tokens=s.max_new_tokens,
        rng=jax.random.fold_in(rng, 1), temperature=s.temperature, eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id)
    return s.prompt + tokenizer.decode(np.asarray(tokens[0, len(prompt):]))
