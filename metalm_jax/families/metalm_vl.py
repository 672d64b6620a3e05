"""Family 'metalm_vl': METALM vision-language rows (images as encoder spans, then text).

Input: `vl_pipeline.vl_dataset` over a VL source (digits_vl, or COCO / VQAv2 / OK-VQA /
NLVR2): images [B, N, S, S, C] + text rows, with the objective's `prepare` per row:
`semi_causal_vl` (the encoder sees the images + a random-length text prefix, the decoder
predicts the rest), `causal_vl` (the baseline: images alone in the encoder), and their
finetuning twins `semi_causal_vl_finetune` / `causal_vl_finetune` (answer-only loss). No
extra state. Predictor: KV-cached generation of zero- / k-shot prompts, every shot's images
(and, for METALM, its text) in their own encoder spans.
"""
from __future__ import annotations

import functools

import numpy as np

from metalm_jax import masking, objectives
from metalm_jax.config import ConfigError
from metalm_jax.data import prompts, vl_pipeline, vl_sources
from metalm_jax.families import base, vl_common
from metalm_jax.families.lm import check_vocab
from metalm_jax.objectives import semi_causal_lm

# The objectives whose queries put the prompt text in the encoder (METALM) or not (baseline).
ENCODE_TEXT = {"semi_causal_vl": True, "semi_causal_vl_finetune": True, "causal_vl": False,
               "causal_vl_finetune": False}
# Greedy answer caps (tokens incl. EOS) on official data, per task.
MAX_NEW_TOKENS = {"vqa": 12, "caption": 32}


class MetaLMVisionLanguage(vl_common.VisionLanguageData, base.Family):
  """METALM with a vision encoder on vision-language rows."""

  name = "metalm_vl"
  models = ("metalm",)
  objectives = exclusive_objectives = tuple(ENCODE_TEXT)
  data_keys = ("tasks", "image_preprocessing", "max_images")
  throughput_unit = "examples"

  @functools.cached_property
  def objective(self) -> objectives.Objective:
    return objectives.get(self.config.objective)

  @property
  def encode_text(self) -> bool:
    return ENCODE_TEXT[self.config.objective]

  def validate(self) -> None:
    super().validate()
    model = self.config.model
    if model.get("mode", "dual") != "dual" or not model.get("vision_encoder"):
      raise ConfigError("family 'metalm_vl' needs config.model.mode='dual' with a "
                        "config.model.vision_encoder (configs/metalm_vl.py)")
    self.check_images()

  def check_model(self, model) -> None:
    check_vocab(self.config.model, self.tokenizer, f"config.data.dataset="
                f"{self.config.data.dataset!r}")
    if not self.official:
      needed = vl_pipeline.max_text_length(self.tokenizer)
      if self.config.data.seq_len < needed:
        raise ConfigError(f"config.data.seq_len={self.config.data.seq_len} is shorter than the "
                          f"longest digits template ({needed} tokens); raise it")

  def units_per_batch(self, batch_size: int) -> int:
    return batch_size

  # ---------------------------------------------------------------- input
  def _rows_kwargs(self) -> dict:
    v, d = self.vision, self.config.data
    return dict(seq_len=d.seq_len, tasks=tuple(d.tasks) or None, max_images=d.max_images,
                image_size=v["image_size"], num_channels=v.get("channels", 3),
                image_kind=self.image_kind)

  @functools.cached_property
  def prepare(self):
    """The training rows' `prepare`: the objective's, or for semi_causal_vl with a
    non-default `config.spans.strategy` the prefix that strategy picks
    (`semi_causal_lm.make_vl_prepare`; 'saliency': -log unigram frequency of the training
    rows' text). Held-out rows keep the objective's own (random) prefix, so runs with
    different strategies are scored alike."""
    spans = self.config.get("spans") or {}
    strategy = spans.get("strategy", "random")
    if strategy == "random" or self.config.objective != "semi_causal_vl":
      return self.objective.prepare
    score_table = None
    if strategy == "saliency":
      score_table = masking.unigram_scores(self._train_text_counts())
    return semi_causal_lm.make_vl_prepare(strategy=strategy, score_table=score_table,
                                          temperature=float(spans.get("temperature", 0.25)))

  def _train_text_counts(self) -> np.ndarray:
    """Token counts of the training rows' text (one unshuffled pass of the pipeline)."""
    c = self.config
    counts = np.zeros(self.tokenizer.vocab_size, np.int64)
    for batch in vl_pipeline.vl_eval_batches(
        self.source(c.data.train_split, per_caption=True), self.tokenizer, batch_size=256,
        **self._rows_kwargs()):
      real = batch["segment_ids"] > 0
      counts += np.bincount(batch["inputs"][real], minlength=counts.shape[0])[:counts.shape[0]]
    return counts

  def train_dataset(self, *, batch_size: int, process_index: int, process_count: int):
    c = self.config
    return vl_pipeline.vl_dataset(
        self.source(c.data.train_split, per_caption=True), self.tokenizer,
        batch_size=batch_size, seed=c.seed, process_index=process_index,
        process_count=process_count, worker_count=c.data.worker_count,
        prepare=self.prepare, **self._rows_kwargs())

  def eval_batches(self, split: str, *, batch_size: int, process_index: int,
                   process_count: int, num_batches: int | None):
    if num_batches is None and process_count > 1:  # the largest process share, batched
      num_batches = -(-self._count(split) // process_count // batch_size)
    batches = vl_pipeline.vl_eval_batches(
        self.source(split), self.tokenizer, batch_size=batch_size,
        process_index=process_index, process_count=process_count, num_batches=num_batches,
        **self._rows_kwargs())
    prepare = self.objective.prepare
    for i, batch in enumerate(batches):
      # The objective's row transform, seeded by the batch and row: the same every eval.
      rows = [prepare({k: v[r] for k, v in batch.items()}, np.random.default_rng([i, r]))
              for r in range(len(batch["inputs"]))]
      yield {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def _count(self, split: str) -> int:
    """Examples of the configured tasks in `split`."""
    source = self.source(split, images=False)
    tasks = tuple(self.config.data.tasks)
    return len(vl_pipeline.task_indices(source, tasks)) if tasks else len(source)

  # ---------------------------------------------------------------- loss (traced)
  def loss(self, model, params, rest, extra, batch, *, rng, step):
    return base.ObjectiveLoss(self.objective).loss(model, params, rest, extra, batch, rng=rng,
                                                   step=step)

  def eval_sums(self, model, params, rest, extra, batch) -> dict:
    return base.ObjectiveLoss(self.objective).eval_sums(model, params, rest, extra, batch)

  # ---------------------------------------------------------------- prediction
  def max_new_tokens(self, task: str) -> int:
    """Answer tokens (with EOS) generation allows for `task`."""
    if self.official and task == "nlvr2":  # the label words, however the tokenizer splits them
      return max(len(self.tokenizer.encode(prompts.target_text({"answer": w})))
                 for w in vl_sources.NLVR2_ANSWERS) + 1
    if self.official:
      return MAX_NEW_TOKENS[task]
    return max(len(self.tokenizer.encode(prompts.target_text(ex)))
               for ex in vl_pipeline.template_examples() if ex["task"] == task) + 1

  def predictor(self, model, params, rest):
    from metalm_jax.families import predictors  # the generation path (inference/)
    return predictors.MetaLMVisionLanguagePredictor(self, model, params, rest)
