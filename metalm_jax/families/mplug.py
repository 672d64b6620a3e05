"""Family 'mplug': mPLUG pretraining with momentum encoders and ITC queues, and finetuning.

Two objectives (`config.objective`):

  mplug_pretrain  ITC + ITM + MLM + PrefixLM on image-caption pairs
                  (`image_text_pipeline`, task 'pretrain'). Extra train state:
                    extra = {'momentum': EMA copies of the unimodal encoders and ITC
                             projections (`MOMENTUM_MODULES`), sharded like their params,
                             'queues': {'image', 'text' [Q, E], 'ids' [Q], 'ptr'}: ITC ring
                             buffers of earlier batches' momentum features, replicated}
                  One jitted step: the four losses and their gradient, the AdamW update, the
                  ITC temperature clamped in the parameter, momentum <- decay * momentum +
                  (1 - decay) * params, the batch's momentum features into the queues.
                  (ALBEF updates the momentum encoders at the start of the next forward; the
                  sequence of values is the same.)
  mplug_seq2seq   captioning / VQA finetuning (`config.data.tasks` = ('caption',) or
                  ('vqa',)): image + encoder text -> decoder target. No extra state.

The momentum model starts as a copy of the params the run starts from (fresh, or
`config.init_from`'s). Predictor: beam-search generation (captioning, VQA), answer-list
ranking and ITC-then-ITM retrieval (`inference.mplug`). With gradient accumulation the
momentum and queues move every trainer step (micro-batch), not every update.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from metalm_jax import config as config_lib
from metalm_jax.config import ConfigError
from metalm_jax.data import image_text_pipeline
from metalm_jax.families import base, vl_common
from metalm_jax.objectives import mplug as mplug_objectives

MOMENTUM_MODULES = ('vision_encoder', 'vision_projection', 'text_encoder',
                    'itc_image_projection', 'itc_text_projection')
PRETRAIN, SEQ2SEQ = "mplug_pretrain", "mplug_seq2seq"
FINETUNE_TASKS = ("caption", "vqa")


def momentum_subset(params: Mapping) -> dict:
  """The part of the params that has a momentum copy."""
  return {k: params[k] for k in MOMENTUM_MODULES if k in params}


class MPlugFamily(vl_common.VisionLanguageData, base.Family):
  """mPLUG: pretraining (with momentum encoders + ITC queues) and seq2seq finetuning."""

  name = "mplug"
  models = ("mplug",)
  objectives = exclusive_objectives = (PRETRAIN, SEQ2SEQ)
  data_keys = ("tasks", "image_preprocessing", "vqa_answers")
  throughput_unit = "examples"

  @property
  def pretraining(self) -> bool:
    return self.config.objective == PRETRAIN

  @property
  def task(self) -> str:
    return "pretrain" if self.pretraining else self.config.data.tasks[0]

  def validate(self) -> None:
    super().validate()
    c = self.config
    if self.pretraining and "mplug" not in c:
      raise ConfigError("config.objective='mplug_pretrain' needs the config.mplug section "
                        "(config_lib.mplug_defaults(); configs/mplug.py)")
    if not self.pretraining:
      if "mplug" in c:
        raise ConfigError("config.mplug holds pretraining settings; remove it for "
                          "config.objective='mplug_seq2seq'")
      if tuple(c.data.tasks) not in (("caption",), ("vqa",)):
        raise ConfigError(f"config.data.tasks={tuple(c.data.tasks)!r}: mPLUG finetuning takes "
                          "one task, ('caption',) or ('vqa',)")
    elif tuple(c.data.tasks) not in ((), ("caption",)):
      raise ConfigError(f"config.data.tasks={tuple(c.data.tasks)!r}: mPLUG pretraining reads "
                        "caption pairs; use () or ('caption',)")
    if c.data.vqa_answers not in image_text_pipeline.VQA_ANSWER_MODES:
      raise ConfigError(f"config.data.vqa_answers={c.data.vqa_answers!r}; valid: "
                        f"{list(image_text_pipeline.VQA_ANSWER_MODES)}")
    if self.pretraining and c.mplug.queue_size < c.batch_size:
      raise ConfigError(f"config.mplug.queue_size={c.mplug.queue_size} must be >= "
                        f"config.batch_size={c.batch_size} (a batch of features is enqueued "
                        "every step)")
    self.check_images()

  def check_model(self, model) -> None:
    kwargs = config_lib.model_kwargs(self.config.model)[1]  # a docked encoder's vocabulary
    vocab, mask_id = kwargs["vocab_size"], kwargs.get("mask_id", -1)
    if mask_id >= 0:  # a tokenizer with its own [MASK] (a docked BERT's)
      own = {k: getattr(self.tokenizer, k, None) for k in ("mask_id", "pad_id", "bos_id",
                                                           "eos_id")}
      wrong = {k: (kwargs.get(k), v) for k, v in own.items()
               if v is not None and kwargs.get(k, v) != v}
      if wrong or mask_id >= vocab:
        raise ConfigError(f"config.model's special ids disagree with the tokenizer "
                          f"{self.config.data.tokenizer!r} (model, tokenizer): {wrong}, or "
                          f"mask_id={mask_id} >= vocab_size={vocab}; set them to the "
                          "tokenizer's.")
      return
    if vocab <= self.tokenizer.vocab_size:
      raise ConfigError(f"config.model.vocab_size={vocab} leaves no [MASK] id above the "
                        f"tokenizer's {self.tokenizer.vocab_size} ids (config.data."
                        f"vocab_size={self.config.data.vocab_size}); raise it to at least "
                        f"{self.tokenizer.vocab_size + 1}")

  def units_per_batch(self, batch_size: int) -> int:
    return batch_size

  # ---------------------------------------------------------------- input
  def _rows(self) -> dict:
    m, v = self.config.model, self.vision
    return dict(task=self.task, text_len=m.text_encoder.max_len, answer_len=m.decoder.max_len,
                image_size=v["image_size"], channels=v.get("channels", 3),
                image_kind=self.image_kind, vqa_answers=self.config.data.vqa_answers)

  def train_dataset(self, *, batch_size: int, process_index: int, process_count: int):
    c = self.config
    return image_text_pipeline.image_text_dataset(
        self.source(c.data.train_split, per_caption=self.task != "vqa"), self.tokenizer,
        batch_size=batch_size, seed=c.seed, process_index=process_index,
        process_count=process_count, worker_count=c.data.worker_count, **self._rows())

  def eval_batches(self, split: str, *, batch_size: int, process_index: int,
                   process_count: int, num_batches: int | None):
    """Seq2seq: one padded pass (padding rows weigh 0). Pretraining: full batches only (a
    padding row would join ITC / ITM as a real pair)."""
    batches = image_text_pipeline.image_text_eval_batches(
        self.source(split), self.tokenizer, batch_size=batch_size,
        process_index=process_index, process_count=process_count, num_batches=num_batches,
        **self._rows())
    for batch in batches:
      if self.pretraining and (batch["pair_ids"] < 0).any():
        return
      yield batch

  # ---------------------------------------------------------------- state and loss (traced)
  def init_extra(self, params, rng):
    if not self.pretraining:
      return None
    return {"momentum": jax.tree.map(jnp.copy, momentum_subset(params)),
            "queues": mplug_objectives.init_queues(self.config.mplug.queue_size,
                                                   int(self.config.model.get("itc_dim", 256)),
                                                   rng)}

  def _alpha(self, step):
    m = self.config.mplug
    ramp = (1.0 if m.alpha_warmup_steps <= 0 else
            jnp.minimum(1.0, step.astype(jnp.float32) / m.alpha_warmup_steps))
    return m.alpha * ramp

  def _pretrain_loss(self, model, params, rest, extra, batch, rng, step, deterministic):
    m = self.config.mplug
    frozen = jax.lax.stop_gradient(params)
    momentum_module = model.merge({**frozen, **extra["momentum"]}, rest)
    return mplug_objectives.pretrain_loss(
        model.merge(params, rest), momentum_module, batch, extra["queues"], rng,
        loss_weights=dict(m.loss_weights), alpha=self._alpha(step), mask_rate=m.mask_rate,
        deterministic=deterministic)

  def loss(self, model, params, rest, extra, batch, *, rng, step):
    if self.pretraining:
      value, (metrics, rows) = self._pretrain_loss(model, params, rest, extra, batch, rng,
                                                   step, deterministic=False)
      return value, (metrics, rows)
    value, metrics = mplug_objectives.seq2seq_loss(model.merge(params, rest), batch, rng,
                                                   deterministic=False)
    return value, (metrics, None)

  def after_update(self, params, extra, aux, step):
    """The temperature clamped in the parameter (ALBEF clamps it in place, so its gradient
    never freezes at a clip); pretraining: momentum EMA and the queues."""
    del step
    m = self.config.model
    low, high = m.get("min_temperature", 0.001), m.get("max_temperature", 0.5)
    params = dict(params, temperature=jnp.clip(params["temperature"], low, high))
    if extra is None:
      return params, extra
    momentum = mplug_objectives.ema_update(extra["momentum"], momentum_subset(params),
                                           self.config.mplug.momentum_decay)
    queues = mplug_objectives.enqueue(extra["queues"], aux["image"], aux["text"], aux["ids"])
    return params, {"momentum": momentum, "queues": queues}

  def eval_sums(self, model, params, rest, extra, batch) -> dict:
    if self.pretraining:
      value, (metrics, _) = self._pretrain_loss(model, params, rest, extra, batch,
                                                jax.random.key(0), jnp.asarray(10**9),
                                                deterministic=True)
      rows = jnp.asarray(batch["text"].shape[0], jnp.float32)
      return {"loss_sum": value * rows, "accuracy_sum": metrics.get("itm_accuracy", 0.0) * rows,
              "tokens": rows}
    value, metrics = mplug_objectives.seq2seq_loss(model.merge(params, rest), batch,
                                                   deterministic=True)
    tokens = batch["decoder_weights"].sum()
    return {"loss_sum": value * tokens, "accuracy_sum": metrics["token_accuracy"] * tokens,
            "tokens": tokens}

  # ---------------------------------------------------------------- prediction
  @functools.cached_property
  def max_new_tokens(self) -> int:
    return self.config.model.decoder.max_len - 1

  def predictor(self, model, params, rest):
    from metalm_jax.families import predictors  # the generation path (inference/)
    return predictors.MPlugPredictor(self, model, params, rest)
