"""Family 'text_tasks': METALM multitask text-to-text finetuning (the paper's language table).

Input: `text_task_pipeline.multitask_dataset` over the tasks of `config.data.tasks`
(examples-proportional mixing, capped at `config.data.mixing_cap`): a row is
`[BOS] input | target [EOS]` whose input tokens are consecutive encoder spans of at most
`model.max_span_len` tokens (a causal-mode model reads them causally). Loss: the semi-causal
next-token loss on the rows' spans (`semi_causal_lm.loss`; the rows carry their spans, so
no `prepare`). No extra state. Predictor: KV-cached generation from the prompt's spans.

`config.data.dataset` is 'pydoc_tasks' (SQuAD / BoolQ / CNN-DM-format files generated from
Python's help pages, prepared under `<data_dir>/pydoc_tasks` by `prepare_data.py
--dataset=pydoc_tasks`) or 'official' (the official datasets in `<data_dir>`).
"""
from __future__ import annotations

import functools

from metalm_jax import objectives
from metalm_jax.config import ConfigError
from metalm_jax.data import datasets, generated, text_task_pipeline, tokenizers
from metalm_jax.families import base
from metalm_jax.families import lm
from metalm_jax.families.lm import check_vocab
from metalm_jax.objectives import semi_causal_lm

GENERATED = "pydoc_tasks"
DATASETS = (GENERATED, "official")
# task -> (its dataset 'name[/config]', metric); configs/metalm_multitask.py holds the paper
# numbers.
TASKS = {
    "squad_v1": ("squad_v1", "exact_match_f1"),
    "boolq": ("superglue/boolq", "accuracy"),
    "cb": ("superglue/cb", "accuracy"),
    "rte": ("superglue/rte", "accuracy"),
    "copa": ("superglue/copa", "accuracy"),
    "cnn_dailymail": ("cnn_dailymail", "rouge_l"),
}
# The tasks of the generated collection (`data.generated`).
GENERATED_TASKS = ("squad_v1", "boolq", "cnn_dailymail")


class TextTasks(base.Family):
  """METALM finetuned on a mixture of text-to-text tasks."""

  name = "text_tasks"
  models = ("metalm",)
  objectives = ("semi_causal_lm",)
  data_keys = ("tasks", "max_input_tokens", "mixing_cap", "encoder_tokenizer")

  def validate(self) -> None:
    super().validate()
    d = self.config.data
    if d.dataset not in DATASETS:
      raise ConfigError(f"config.data.dataset={d.dataset!r} for family 'text_tasks'; valid: "
                        f"{list(DATASETS)} ('{GENERATED}': the generated tasks)")
    tasks = tuple(d.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
      raise ConfigError(f"config.data.tasks={tasks!r}: name tasks of {sorted(TASKS)}")
    if d.dataset == GENERATED and set(tasks) - set(GENERATED_TASKS):
      raise ConfigError(f"config.data.tasks={tasks!r}: the generated data has only "
                        f"{list(GENERATED_TASKS)}")
    if not 1 <= d.max_input_tokens < d.seq_len:
      raise ConfigError(f"config.data.max_input_tokens={d.max_input_tokens} must be in "
                        f"[1, config.data.seq_len={d.seq_len})")

  def required_datasets(self) -> list[tuple[str, str]]:
    out = [(TASKS[t][0], self.task_dir) for t in self.config.data.tasks]
    if self.config.data.tokenizer == "sentencepiece":
      out.append((self.config.data.tokenizer_dataset or "pydoc_topics", self.data_dir))
    return out

  def check_model(self, model) -> None:
    check_vocab(self.config.model, self.tokenizer,
                f"config.data.tokenizer={self.config.data.tokenizer!r}")

  @property
  def task_dir(self) -> str:
    if self.config.data.dataset == GENERATED:
      return generated.root(GENERATED, self.data_dir)
    return self.data_dir

  @property
  def encode_input(self) -> bool:
    """A causal-mode model (the baseline) reads the prompt causally."""
    return self.config.model.get("mode", "dual") != "causal"

  @property
  def max_span_len(self) -> int:
    return self.config.model.max_span_len

  # ---------------------------------------------------------------- input
  @functools.cached_property
  def tokenizer(self) -> tokenizers.Tokenizer:
    d = self.config.data
    return tokenizers.get_tokenizer(d.tokenizer, dataset=d.tokenizer_dataset or "pydoc_topics",
                                    data_dir=self.data_dir, vocab_size=d.vocab_size)

  @functools.cached_property
  def encoder_spans(self):
    """`data.encoder_spans.EncoderSpans` for an own-vocabulary docked encoder, else None."""
    return lm.encoder_spans(self.config, self)

  def sources(self, split: str) -> dict:
    names = [TASKS[t][0] for t in self.config.data.tasks]
    how = (f"python experiments/prepare_data.py --dataset={GENERATED}"
           if self.config.data.dataset == GENERATED else None)
    try:
      datasets.check_prepared(names, self.task_dir, what="The text-task mixture")
    except datasets.DatasetNotPreparedError as e:
      if how:
        raise datasets.DatasetNotPreparedError(
            f"the generated text tasks are not prepared in {self.task_dir}; run once:\n"
            f"  {how} --data_dir={self.data_dir}") from e
      raise
    return {t: datasets.data_source(TASKS[t][0], split, self.task_dir)
            for t in self.config.data.tasks}

  def _rows(self) -> dict:
    d = self.config.data
    return dict(seq_len=d.seq_len, max_span_len=self.max_span_len,
                max_input_tokens=d.max_input_tokens, encode_input=self.encode_input)

  def train_dataset(self, *, batch_size: int, process_index: int, process_count: int):
    c = self.config
    return text_task_pipeline.multitask_dataset(
        self.sources(c.data.train_split), self.tokenizer, batch_size=batch_size, seed=c.seed,
        mixing_cap=c.data.mixing_cap or None, process_index=process_index,
        process_count=process_count, worker_count=c.data.worker_count,
        prepare=self.encoder_spans, **self._rows())

  def eval_batches(self, split: str, *, batch_size: int, process_index: int,
                   process_count: int, num_batches: int | None):
    return text_task_pipeline.eval_batches(
        self.sources(split), self.tokenizer, batch_size=batch_size,
        process_index=process_index, process_count=process_count, num_batches=num_batches,
        prepare=self.encoder_spans, **self._rows())

  # ---------------------------------------------------------------- loss (traced)
  @functools.cached_property
  def _loss(self):
    return base.ObjectiveLoss(objectives.Objective("text_task_rows", loss=semi_causal_lm.loss))

  def loss(self, model, params, rest, extra, batch, *, rng, step):
    return self._loss.loss(model, params, rest, extra, batch, rng=rng, step=step)

  def eval_sums(self, model, params, rest, extra, batch) -> dict:
    return self._loss.eval_sums(model, params, rest, extra, batch)

  # ---------------------------------------------------------------- prediction
  def metric(self, task: str) -> str:
    return TASKS[task][1]

  def task_examples(self, task: str, split: str, *, limit: int = 0) -> list[dict]:
    """The first `limit` (0 = all) examples of `task`'s `split`."""
    if task not in TASKS:
      raise ValueError(f"unknown text task {task!r}; tasks: {sorted(TASKS)}")
    datasets.check_prepared([TASKS[task][0]], self.task_dir, what=f"The {task} evaluation")
    source = datasets.data_source(TASKS[task][0], split, self.task_dir)
    return [source[i] for i in range(len(source) if not limit else min(limit, len(source)))]

  def predictor(self, model, params, rest):
    from metalm_jax.families import predictors  # the generation path (inference/)
    return predictors.TextTaskPredictor(self, model, params, rest)
