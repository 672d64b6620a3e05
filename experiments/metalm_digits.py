r"""METALM (semi-causal) vs an equal-size causal-only baseline on the bundled digits data.

    python experiments/prepare_data.py --dataset=digits_vl --data_dir=/tmp/metalm_digits_data
    python experiments/metalm_digits.py --data_dir=/tmp/metalm_digits_data \
        --workdir=workdirs/metalm_digits
    python experiments/metalm_digits.py --quick ...   # a smoke run: a few steps, 8 queries

For each model (the SAME `configs/metalm_vl.py` tiny MetaLM, mode 'dual', so the same
parameter count; only the objective differs):

  metalm  pretrained with `semi_causal_vl`: the encoder sees the images + a random-length
          text prefix, the decoder predicts the rest; queried with images + the whole
          prompt in the encoder; finetuned with `semi_causal_vl_finetune`.
  causal  pretrained with `causal_vl`: the encoder sees the images alone and all text is
          causal; queried and finetuned the same way (prefix 0, answer-only loss).

Steps: (1) pretrain for --pretrain_steps on the train split (captions + VQA + NLVR2 pairs);
(2) zero-shot and k-shot (--shots) VQA accuracy of the pretrained model on --eval_split,
greedy decoding, demonstrations drawn from the train split with the query's question; each
demonstration (its image + its text for METALM, its image alone for the baseline) is
encoded as its own span, in order, before the query; (3) finetune on the train split's VQA
examples for --finetune_steps and report VQA accuracy on --eval_split.

Results (JSON and a markdown table) go to --workdir. Nothing in metalm_jax/train is
changed: this script drives its pieces (Model, make_optimizer, create_train_state,
make_train_step) on the vision-language pipeline (`data.vl_pipeline`).
"""
from __future__ import annotations

import collections
import functools
import json
import os
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from metalm_jax import config as config_lib
from metalm_jax import evaluation
from metalm_jax import objectives
from metalm_jax.data import datasets
from metalm_jax.data import digits
from metalm_jax.data import vl_pipeline
from metalm_jax.data import prompts as prompts_lib
from metalm_jax.objectives import semi_causal_lm
from metalm_jax.train import loop
from metalm_jax.train import state as state_lib

MODELS = ("metalm", "causal")
metalm_vl = config_lib.config_module("metalm_vl")

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/metalm_digits", "Where results go.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "digits_vl data directory (prepared with "
                                "experiments/prepare_data.py; default: $METALM_DATA_DIR, else "
                                "~/.cache/metalm_jax/data). Prepared here if missing.")
_MODELS = flags.DEFINE_list("models", list(MODELS), f"Which of {MODELS} to run.")
_SIZE = flags.DEFINE_enum("size", "tiny", sorted(metalm_vl.SIZES), "configs/metalm_vl.py size.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation, data order and dropout seed.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 600, "Pretraining steps per model.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 250, "VQA finetuning steps per model.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Batch size (default: the config's).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 48, "Text positions per row (the SentencePiece "
                                "templates need up to 42).")
_PREFIX = flags.DEFINE_integer("prefix", 32, "Text tokens an encoder span can hold after "
                               "the image tokens (model.max_span_len = image tokens + this).")
_SHOTS = flags.DEFINE_integer("shots", 4, "Demonstrations for the few-shot evaluation.")
_EVAL_SPLIT = flags.DEFINE_enum("eval_split", "test", list(digits.SPLITS), "Evaluation split.")
_EVAL_LIMIT = flags.DEFINE_integer("eval_limit", 0, "Evaluate the first N VQA examples of the "
                                   "split only (0 = all).")
_SUPPORT_SIZE = flags.DEFINE_integer("support_size", 1500, "Train examples read for the "
                                     "demonstration pool (its VQA ones are used).")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 32, "Prompts per decoding batch.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Log the training loss every N steps.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 4 + 2 steps, 8 queries, 2 shots.")


# ---------------------------------------------------------------- objectives
def vl_causal_finetune_prepare(row: dict, rng: np.random.Generator) -> dict:
  """The baseline's finetuning: images alone in the encoder (prefix 0), answer-only loss."""
  del rng
  return dict(row, prefix_length=np.int32(0))


# name -> (pretraining objective, finetuning objective, the query text goes to the encoder).
OBJECTIVES = {
    "metalm": (objectives.get("semi_causal_vl"), objectives.get("semi_causal_vl_finetune"),
               True),
    "causal": (objectives.get("causal_vl"),
               objectives.Objective("causal_vl_finetune", loss=semi_causal_lm.vl_loss,
                                    prepare=vl_causal_finetune_prepare), False),
}


def experiment_config(size: str, *, seq_len: int, prefix: int, batch_size: int | None):
  """configs/metalm_vl.py at `size`, with span room for `prefix` text tokens."""
  config = metalm_vl.get_config(f"size={size}")
  with config.unlocked():
    vit = config.model.vision_encoder
    num_image_tokens = (vit.image_size // vit.patch_size) ** 2 + int(vit.use_cls)
    config.model.max_span_len = num_image_tokens + prefix
    config.model.text_encoder.max_len = config.model.max_span_len + 1
    config.data.seq_len = seq_len
    if batch_size:
      config.batch_size = batch_size
  return config


# ---------------------------------------------------------------- training
def train(config, model: state_lib.Model, objective: objectives.Objective, source, tokenizer,
          *, steps: int, seed: int, tasks: Sequence[str] | None = None,
          init_params=None, log_every: int = 50, name: str = "") -> tuple[dict, object, dict]:
  """Trains `steps` steps of `objective` on the `digits_vl` rows of `source` (`tasks` only)
  from fresh or given parameters; see `loop.train_on_batches`."""
  batches = vl_pipeline.vl_dataset(
      source, tokenizer, seq_len=config.data.seq_len, batch_size=config.batch_size, seed=seed,
      tasks=tasks, prepare=objective.prepare)
  return loop.train_on_batches(config, model, objective, batches, steps=steps, seed=seed,
                               init_params=init_params, log_every=log_every, name=name)


# ---------------------------------------------------------------- prompts -> model rows
def build_rows(prompt_batch: Sequence[Sequence[prompts_lib.Segment]], tokenizer, *,
               num_image_tokens: int, max_span_len: int, encode_text: bool, length: int,
               num_spans: int, image_size: int = 8, num_channels: int = 1) -> dict:
  """Prompts (lists of Segments) -> one decoder row each, every shot its own spans.

  Shot by shot: each image takes `num_image_tokens` positions and its own encoder span;
  then the shot's text `[BOS] text` (+ `[EOS]` for a demonstration, which carries its
  answer) follows. With `encode_text`, the shot's last image span also covers the text
  (up to max_span_len - num_image_tokens tokens), as `MetaLM.vl_layout` does with a prefix;
  otherwise the text is causal. The query's text is its prompt; generation continues at
  `ends`.

  Returns:
    numpy dict: inputs, segment_ids, positions int32 [B, length]; span_starts,
    span_lengths int32 [B, num_spans]; images float32 [B, num_spans, S, S, C]; ends int32
    [B] (the first free position).

  Raises:
    ValueError: a prompt needs more than `length` positions or `num_spans` images.
  """
  batch = len(prompt_batch)
  rows = {"inputs": np.zeros((batch, length), np.int32),
          "segment_ids": np.zeros((batch, length), np.int32),
          "positions": np.zeros((batch, length), np.int32),
          "span_starts": np.zeros((batch, num_spans), np.int32),
          "span_lengths": np.zeros((batch, num_spans), np.int32),
          "images": np.zeros((batch, num_spans, image_size, image_size, num_channels),
                             np.float32),
          "ends": np.zeros((batch,), np.int32)}
  for b, prompt in enumerate(prompt_batch):
    groups = prompts_lib.group_by_shot(prompt)
    cur, span = 0, 0
    for g, group in enumerate(groups):
      is_query = g == len(groups) - 1
      images = [s.value for s in group if s.kind == "image"]
      text = " ".join(s.value for s in group if s.kind == "text")
      ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text),
                            [] if is_query else [tokenizer.eos_id]]).astype(np.int32)
      if span + len(images) > num_spans:
        raise ValueError(f"prompt {b} has more than num_spans={num_spans} images.")
      for k, image in enumerate(images):
        rows["images"][b, span] = vl_pipeline.preprocess_image(
            image, image_size=image_size, num_channels=num_channels)
        rows["span_starts"][b, span] = cur
        rows["span_lengths"][b, span] = num_image_tokens
        if encode_text and k == len(images) - 1:
          rows["span_lengths"][b, span] += min(len(ids), max_span_len - num_image_tokens)
        cur, span = cur + num_image_tokens, span + 1
      if cur + len(ids) > length:
        raise ValueError(f"prompt {b} needs more than length={length} positions.")
      rows["inputs"][b, cur:cur + len(ids)] = ids
      cur += len(ids)
    rows["segment_ids"][b, :cur] = 1
    rows["positions"][b, :cur] = np.arange(cur)
    rows["ends"][b] = cur
  return rows


def prompt_extent(prompt: Sequence[prompts_lib.Segment], tokenizer, num_image_tokens: int):
  """(positions, images) a prompt takes in `build_rows`."""
  images = sum(s.kind == "image" for s in prompt)
  groups = prompts_lib.group_by_shot(prompt)
  text = sum(len(tokenizer.encode(" ".join(s.value for s in g if s.kind == "text"))) + 2
             for g in groups) - 1  # [BOS] each, [EOS] per demonstration
  return images * num_image_tokens + text, images


class GreedyPredictor:
  """`predict_fn(prompts) -> answers` for `evaluation.evaluate_vqa`: greedy decoding.

  Every step runs the whole fixed-shape row through the model (no KV cache: rows are short,
  and the spans stay exactly as in training) and appends the argmax token at `ends`.
  """

  def __init__(self, model: state_lib.Model, params, rest, tokenizer, *, encode_text: bool,
               max_new_tokens: int, length: int, num_spans: int, batch_size: int):
    module = model.merge(params, rest)
    self.num_image_tokens = module.vision_encoder.num_tokens()
    self.max_span_len = module.max_span_len
    self.tokenizer, self.encode_text = tokenizer, encode_text
    self.max_new_tokens, self.length, self.num_spans = max_new_tokens, length, num_spans
    self.batch_size = batch_size
    self._params, self._rest = params, rest

    def next_tokens(params, rest, rows):
      m = model.merge(params, rest)
      logits, _ = m(rows["inputs"], positions=rows["positions"],
                    segment_ids=rows["segment_ids"], span_starts=rows["span_starts"],
                    span_lengths=rows["span_lengths"], images=rows["images"],
                    deterministic=True)
      last = jnp.take_along_axis(logits, (rows["ends"] - 1)[:, None, None], axis=1)[:, 0]
      return jnp.argmax(last, axis=-1).astype(jnp.int32)

    self._next_tokens = jax.jit(next_tokens)

  def __call__(self, prompt_batch: Sequence[Sequence[prompts_lib.Segment]]) -> list[str]:
    n = len(prompt_batch)
    if not 0 < n <= self.batch_size:
      raise ValueError(f"got {n} prompts; between 1 and batch_size={self.batch_size}.")
    padded = list(prompt_batch) + [prompt_batch[-1]] * (self.batch_size - n)  # static shapes
    rows = build_rows(padded, self.tokenizer, num_image_tokens=self.num_image_tokens,
                      max_span_len=self.max_span_len, encode_text=self.encode_text,
                      length=self.length, num_spans=self.num_spans)
    ends = rows.pop("ends")
    rows_idx = np.arange(self.batch_size)
    out = np.full((self.batch_size, self.max_new_tokens), self.tokenizer.pad_id, np.int32)
    done = np.zeros(self.batch_size, bool)
    for i in range(self.max_new_tokens):
      if np.any(ends >= self.length):
        raise ValueError(f"length={self.length} leaves no room to generate token {i}.")
      tokens = np.asarray(self._next_tokens(self._params, self._rest, dict(rows, ends=ends)))
      tokens = np.where(done, self.tokenizer.pad_id, tokens)
      out[:, i] = tokens
      done |= tokens == self.tokenizer.eos_id
      rows["inputs"][rows_idx, ends] = tokens
      rows["segment_ids"][rows_idx, ends] = 1
      rows["positions"][rows_idx, ends] = ends
      ends = ends + 1
      if done.all():
        break
    return [self.tokenizer.decode(row) for row in out[:n]]


def max_answer_tokens(tokenizer, tasks: Sequence[str] = digits.TASKS) -> int:
  """Tokens of the longest templated answer of `tasks`, + 1 for EOS."""
  return max(len(tokenizer.encode(prompts_lib.target_text(ex)))
             for ex in vl_pipeline.template_examples() if ex["task"] in tasks) + 1


def evaluate(model, params, rest, tokenizer, examples, *, encode_text: bool, shots: int = 0,
             support=None, batch_size: int = 32, seed: int = 0) -> dict:
  """VQA accuracy (overall, per question) of greedy answers; k-shot with support examples."""
  max_new = max_answer_tokens(tokenizer, {prompts_lib.as_text(ex["task"]) for ex in examples})
  num_image_tokens = model.merge(params, rest).vision_encoder.num_tokens()
  all_prompts = evaluation.build_prompts(examples, shots=shots, support=support, seed=seed,
                                         match_question=True)
  extents = [prompt_extent(p, tokenizer, num_image_tokens) for p in all_prompts]
  length = -(-(max(e[0] for e in extents) + max_new) // 8) * 8
  predictor = GreedyPredictor(model, params, rest, tokenizer, encode_text=encode_text,
                              max_new_tokens=max_new, length=length,
                              num_spans=max(e[1] for e in extents),
                              batch_size=min(batch_size, len(examples)))
  start = time.time()
  result = evaluation.evaluate_vqa(predictor, examples, shots=shots, support=support,
                                   batch_size=predictor.batch_size, seed=seed,
                                   match_question=True)
  scores = [evaluation.vqa_score(p, r)
            for p, r in zip(result["predictions"], result["references"])]
  questions = [prompts_lib.as_text(ex["question"]) for ex in examples]
  result["per_question"] = {q: float(np.mean([s for s, u in zip(scores, questions) if u == q]))
                            for q in digits.VQA_QUESTIONS if q in questions}
  # Which answers the model gives, per question (a constant answer shows up as one key).
  result["answer_counts"] = {
      q: dict(collections.Counter(evaluation.normalize_answer(p) for p, u in
                                  zip(result["predictions"], questions) if u == q).most_common(5))
      for q in digits.VQA_QUESTIONS if q in questions}
  result["seconds"] = time.time() - start
  return result


# ---------------------------------------------------------------- the experiment
def load_examples(data_dir: str, split: str, *, task: str | None = None, limit: int = 0,
                  read: int = 0) -> list[dict]:
  """Examples of a split (the first `read` only, if > 0), of `task`, at most `limit`."""
  source = datasets.data_source(vl_pipeline.DATASET, split, data_dir)
  out = []
  for i in range(len(source) if not read else min(read, len(source))):
    ex = source[i]
    if task is None or prompts_lib.as_text(ex["task"]) == task:
      out.append(ex)
      if limit and len(out) == limit:
        break
  return out


def run_model(name: str, config, tokenizer, data_dir: str, *, pretrain_steps: int,
              finetune_steps: int, shots: int, eval_examples, support, seed: int,
              eval_batch_size: int, log_every: int) -> dict:
  """Pretrain, zero-/few-shot evaluate, finetune and evaluate one model; its results."""
  pretrain_objective, finetune_objective, encode_text = OBJECTIVES[name]
  model = state_lib.Model(config.model)
  train_source = datasets.data_source(vl_pipeline.DATASET, "train", data_dir)
  start = time.time()
  params, rest, pre = train(config, model, pretrain_objective, train_source, tokenizer,
                            steps=pretrain_steps, seed=seed, log_every=log_every,
                            name=f"{name} pretrain")
  ev = functools.partial(evaluate, model, tokenizer=tokenizer, examples=eval_examples,
                         encode_text=encode_text, batch_size=eval_batch_size, seed=seed)
  zero = ev(params, rest)
  logging.info("%s zero-shot VQA %.4f %s", name, zero["accuracy"], zero["per_question"])
  few = ev(params, rest, shots=shots, support=support)
  logging.info("%s %d-shot VQA %.4f %s", name, shots, few["accuracy"], few["per_question"])
  params, rest, fine = train(config, model, finetune_objective, train_source, tokenizer,
                             steps=finetune_steps, seed=seed + 1, tasks=["vqa"],
                             init_params=params, log_every=log_every,
                             name=f"{name} finetune")
  tuned = ev(params, rest)
  logging.info("%s finetuned VQA %.4f %s", name, tuned["accuracy"], tuned["per_question"])
  keep = lambda r: {k: r[k] for k in ("accuracy", "per_question", "answer_counts",
                                      "num_examples", "seconds")}
  return {"model": name, "pretrain_objective": pretrain_objective.name,
          "finetune_objective": finetune_objective.name, "params": model.param_count(),
          "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps,
          "pretrain": pre, "finetune": fine, "zero_shot": keep(zero),
          f"{shots}_shot": keep(few), "finetuned": keep(tuned), "shots": shots,
          "samples": {"zero_shot": zero["predictions"][:6], "few_shot": few["predictions"][:6],
                      "finetuned": tuned["predictions"][:6],
                      "references": zero["references"][:6]},
          "wall_seconds": time.time() - start}


def markdown_table(results: Sequence[dict]) -> str:
  """The results as a markdown table (accuracies in %)."""
  short = {digits.VQA_QUESTIONS[0]: "which", digits.VQA_QUESTIONS[1]: "even/odd",
           digits.VQA_QUESTIONS[2]: ">5"}
  pct = lambda x: f"{100 * x:.1f}"
  per_q = lambda r: " / ".join(pct(r["per_question"].get(q, float("nan"))) for q in short)
  lines = ["| model | objective (pretrain / finetune) | params | steps (pretrain + finetune) "
           "| zero-shot | k-shot | finetuned | per question (which / even-odd / >5): "
           "zero-shot; k-shot; finetuned | final train loss (pre / fine) | wall time |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    k = f"{r['shots']}_shot"
    lines.append(
        f"| {r['model']} | {r['pretrain_objective']} / {r['finetune_objective']} | "
        f"{r['params']:,} | {r['pretrain_steps']} + {r['finetune_steps']} | "
        f"{pct(r['zero_shot']['accuracy'])} | {pct(r[k]['accuracy'])} ({r['shots']}-shot) | "
        f"{pct(r['finetuned']['accuracy'])} | {per_q(r['zero_shot'])}; {per_q(r[k])}; "
        f"{per_q(r['finetuned'])} | {r['pretrain']['final_loss']:.3f} / "
        f"{r['finetune']['final_loss']:.3f} | {r['wall_seconds']:.0f} s |")
  return "\n".join(lines)


def run(*, workdir: str, data_dir: str | None, models: Sequence[str], size: str, seed: int,
        pretrain_steps: int, finetune_steps: int, batch_size: int | None, seq_len: int,
        prefix: int, shots: int, eval_split: str, eval_limit: int, support_size: int,
        eval_batch_size: int, log_every: int) -> list[dict]:
  """The whole experiment; writes {workdir}/results.json and results.md, returns results."""
  bad = [m for m in models if m not in MODELS]
  if bad or not models:
    raise ValueError(f"models={list(models)} must be a non-empty subset of {list(MODELS)}.")
  data_dir = data_dir or datasets.default_data_dir()
  datasets.prepare(vl_pipeline.DATASET, data_dir)
  tokenizer = vl_pipeline.get_vl_tokenizer("sentencepiece", data_dir=data_dir)
  needed = vl_pipeline.max_text_length(tokenizer)
  if seq_len < needed:
    raise ValueError(f"seq_len={seq_len} < {needed}, the longest templated text; raise it.")
  config = experiment_config(size, seq_len=seq_len, prefix=prefix, batch_size=batch_size)
  eval_examples = load_examples(data_dir, eval_split, task="vqa", limit=eval_limit)
  support = load_examples(data_dir, "train", task="vqa", read=support_size)
  logging.info("%d %s VQA queries, %d VQA demonstrations to draw from", len(eval_examples),
               eval_split, len(support))
  results = []
  for name in models:
    results.append(run_model(name, config, tokenizer, data_dir,
                             pretrain_steps=pretrain_steps, finetune_steps=finetune_steps,
                             shots=shots, eval_examples=eval_examples, support=support,
                             seed=seed, eval_batch_size=eval_batch_size, log_every=log_every))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"results": results, "eval_split": eval_split,
               "num_eval_examples": len(eval_examples), "seed": seed}, f, indent=1)
  table = markdown_table(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quick = _QUICK.value
  run(workdir=_WORKDIR.value, data_dir=_DATA_DIR.value, models=_MODELS.value, size=_SIZE.value,
      seed=_SEED.value, pretrain_steps=4 if quick else _PRETRAIN_STEPS.value,
      finetune_steps=2 if quick else _FINETUNE_STEPS.value, batch_size=_BATCH_SIZE.value,
      seq_len=_SEQ_LEN.value, prefix=_PREFIX.value, shots=2 if quick else _SHOTS.value,
      eval_split=_EVAL_SPLIT.value, eval_limit=8 if quick else _EVAL_LIMIT.value,
      support_size=200 if quick else _SUPPORT_SIZE.value,
      eval_batch_size=8 if quick else _EVAL_BATCH.value,
      log_every=1 if quick else _LOG_EVERY.value)


if __name__ == "__main__":
  app.run(main)
