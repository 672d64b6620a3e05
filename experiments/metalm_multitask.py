r"""METALM multitask language finetuning (the paper's language table), end to end.

    python experiments/metalm_multitask.py --size=tiny --workdir=workdirs/metalm_multitask
    python experiments/reproduce.py --table=metalm_multitask --tiny   # the same, as a table
    # Full size: finetune a pretrained METALM on the official datasets prepared in $DATA.
    python experiments/train.py --config=configs/metalm_lm.py:size=paper --workdir=$PRE
    python experiments/metalm_multitask.py --size=paper --checkpoint=$PRE --data_dir=$DATA

Steps (configs/metalm_multitask.py holds the tasks, the model and the schedule):
  1. Data. Without --checkpoint (size=tiny): write SQuAD-, BoolQ- and CNN/DM-format files
     generated from Python's help pages (`text_tasks.write_pydoc_task_files`) and prepare
     them with the official-format builders into `<data_dir>/pydoc_tasks` (apart from real
     datasets of the same name). With --checkpoint: the official datasets of every task,
     prepared in --data_dir (`experiments/prepare_data.py`; docs/reproducing.md).
  2. Model. Without --checkpoint: pretrain METALM here (semi-causal LM on the bundled
     `pydoc_topics` corpus) for `pretrain_steps`. With --checkpoint: the params of a
     `experiments/train.py` METALM language model, the model and tokenizer it was trained
     with (its span capacity raised to the schedule's `max_span_len` where its encoder's
     positions allow).
  3. Finetune on the task mixture (examples-proportional, capped; `data.text_task_pipeline`):
     each input is encoded by the bidirectional encoder as non-causal spans, the decoder
     predicts the target (a causal-mode checkpoint, the baseline, reads the input causally).
  4. Greedy-decode each task's validation examples and score them: SQuAD exact match / F1
     (official normalisation), accuracy (exact match of the label word), ROUGE-L F1. The
     paper decodes with beam 4 and length penalty 0.6; this is greedy.

Results go to {workdir}/results.json.
"""
from __future__ import annotations

import json
import os
import time
from typing import Mapping, Sequence

from absl import app
from absl import flags
from absl import logging

import ml_collections

from metalm_jax import config as config_lib
from metalm_jax import evaluation
from metalm_jax import objectives
from metalm_jax import sharding
from metalm_jax.data import datasets
from metalm_jax.data import pipeline
from metalm_jax.data import text_task_pipeline
from metalm_jax.data import text_tasks
from metalm_jax.data import tokenizers
from metalm_jax.evaluation import caption_metrics
from metalm_jax.inference import metalm_text
from metalm_jax.objectives import semi_causal_lm
from metalm_jax.train import loop
from metalm_jax.train import restore
from metalm_jax.train import state as state_lib
from metalm_jax.train import trainer

multitask = config_lib.config_module("metalm_multitask")

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/metalm_multitask", "Where results go.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: $METALM_DATA_DIR, "
                                "else ~/.cache/metalm_jax/data).")
_SIZE = flags.DEFINE_enum("size", "tiny", sorted(multitask.SCHEDULES), "configs/"
                          "metalm_multitask.py schedule (size=paper needs --checkpoint).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "experiments/train.py workdir (or step "
                                  "folder) of a pretrained METALM language model; then the "
                                  "official task datasets in --data_dir are used.")
_SCHEDULE = flags.DEFINE_string("schedule", None, "Overrides of the size's schedule, "
                              "'key=value,...' (keys of configs/metalm_multitask.py "
                              "SCHEDULES, e.g. 'finetune_steps=1000,eval_limit=0').")
_TASKS = flags.DEFINE_list("tasks", None, "Tasks of configs/metalm_multitask.py TASKS (default: "
                           "all with --checkpoint, else the generated three).")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation, data order and mixing seed.")

FINETUNE = objectives.Objective("multitask_finetune", loss=semi_causal_lm.loss)
PRETRAIN_DATASET = "pydoc_topics"
VOCAB_SIZE = 1024


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def prepare_tiny_tasks(data_dir: str) -> str:
  """Generates and prepares the tiny tasks under `<data_dir>/pydoc_tasks`; returns that dir."""
  task_dir = os.path.join(data_dir, "pydoc_tasks")
  manual_dir = os.path.join(task_dir, "manual")
  if not os.path.exists(os.path.join(manual_dir, "squad")):
    counts = text_tasks.write_pydoc_task_files(manual_dir)
    logging.info("generated task files in %s: %s", manual_dir, counts)
  for task in multitask.TINY_TASKS:
    datasets.prepare(multitask.TASKS[task]["dataset"], task_dir, manual_dir=manual_dir)
  return task_dir


def score(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
  """The task's metric(s) in %: {'exact_match', 'f1'} | {'accuracy'} | {'rouge_l'}."""
  if metric == "exact_match_f1":
    return {"exact_match": 100 * evaluation.mean_exact_match(predictions, references),
            "f1": 100 * evaluation.mean_token_f1(predictions, references)}
  if metric == "accuracy":  # the label word, after SQuAD's answer normalisation
    return {"accuracy": 100 * evaluation.mean_exact_match(predictions, references)}
  if metric == "rouge_l":
    return {"rouge_l": 100 * caption_metrics.rouge_l(list(references), list(predictions))}
  raise ValueError(f"metric={metric!r} is not one of {multitask.METRICS}.")


def evaluate_task(predictor: metalm_text.TextGreedyPredictor, source, metric: str, *, limit: int) -> dict:
  """Greedy predictions on the first `limit` examples of `source` (0 = all), scored."""
  n = len(source) if not limit else min(limit, len(source))
  examples = [source[i] for i in range(n)]
  predictions = []
  for start in range(0, n, predictor.batch_size):
    batch = examples[start:start + predictor.batch_size]
    predictions += predictor([_text(ex["inputs"]) for ex in batch])
  references = [[_text(r) for r in ex["references"]] for ex in examples]
  return {"num_examples": n, **score(metric, predictions, references),
          "samples": [{"prediction": p, "references": r[:3]}
                      for p, r in zip(predictions[:5], references[:5])]}


def load_pretrained(checkpoint: str, size: str, schedule: Mapping, *, step: int | None = None):
  """(config, model, params, tokenizer) from a train.py checkpoint of a METALM language model
  (e.g. configs/metalm_lm.py:size=paper): the model is the one it was trained with, its span
  capacity raised to the schedule's `max_span_len` where the encoder's positions allow."""
  directory, _, step = restore.locate_checkpoint(checkpoint, step)
  manager = restore.open_read_only(directory)
  try:
    saved = restore.saved_config(manager, directory, restore.choose_step(manager, directory,
                                                                        step))
  finally:
    manager.close()
  if not saved or saved.get("model", {}).get("name") != "metalm":
    raise ValueError(f"--checkpoint={checkpoint!r} is not a METALM language model trained by "
                     "experiments/train.py (its saved config.model.name is "
                     f"{(saved or {}).get('model', {}).get('name')!r}); pretrain one with "
                     "experiments/train.py --config=configs/metalm_lm.py:size=paper.")
  config = multitask.get_config(f"size={size}")
  with config.unlocked():
    config.model = ml_collections.ConfigDict(saved["model"])
    encoder = config.model.get("text_encoder")
    room = encoder.max_len - 1 if encoder else schedule["max_span_len"]
    config.model.max_span_len = min(schedule["max_span_len"], room)
    config.data = ml_collections.ConfigDict(saved["data"])
  model = state_lib.Model(config.model)
  mesh = sharding.make_mesh(config.mesh)
  restored = restore.restore_params(checkpoint, model, mesh, config.sharding_rules, step=step)
  logging.info("restored METALM step %d from %s (%s parameters)", restored.step,
               restored.directory, f"{model.param_count():,}")
  return config, model, restored.params, trainer.load_tokenizer(config.data)


def check_prepared(task_dir: str, tasks: Sequence[str]) -> None:
  """Raises DatasetNotPreparedError listing every task dataset missing from `task_dir`."""
  missing = [multitask.TASKS[t]["dataset"] for t in tasks
             if not datasets.get_builder(multitask.TASKS[t]["dataset"], task_dir).is_prepared()]
  if missing:
    commands = "\n".join(f"  {datasets.prepare_command(name, task_dir)}" for name in missing)
    raise datasets.DatasetNotPreparedError(
        f"{len(missing)} task dataset(s) are not prepared in data_dir={task_dir!r}: {missing}. "
        f"Put their official files under {task_dir}/downloads/manual (docs/reproducing.md, "
        f"Datasets: text tasks) and run:\n{commands}")


def run(*, workdir: str, data_dir: str | None, size: str = "tiny", seed: int = 0,
        tasks: Sequence[str] | None = None, schedule: Mapping | None = None,
        checkpoint: str | None = None, step: int | None = None) -> dict:
  """The whole experiment; writes {workdir}/results.json, returns the results.

  Without `checkpoint` (size=tiny only): generated tasks, METALM pretrained here. With
  `checkpoint` (a train.py workdir of a METALM language model): the official task datasets
  prepared in `data_dir`, finetuned from its params (no pretraining here).
  """
  if size not in multitask.SCHEDULES:
    raise ValueError(f"size={size!r}; sizes: {sorted(multitask.SCHEDULES)}")
  if checkpoint is None and size != "tiny":
    raise NotImplementedError(
        f"size={size} finetunes a pretrained METALM: pass checkpoint= (--checkpoint), the "
        "experiments/train.py workdir of configs/metalm_lm.py:size=paper (the paper pretrains "
        "on the Pile, which is not here; no weights are downloaded), with the task datasets "
        "prepared in data_dir (docs/reproducing.md). Only size=tiny runs without one.")
  s = dict(multitask.SCHEDULES[size], **(schedule or {}))
  data_dir = data_dir or datasets.default_data_dir()
  start = time.time()
  params, pre = None, None
  if checkpoint is None:
    tasks = list(tasks or multitask.TINY_TASKS)
    task_dir = prepare_tiny_tasks(data_dir)
    datasets.prepare(PRETRAIN_DATASET, data_dir)
    tokenizer = tokenizers.get_tokenizer("sentencepiece", dataset=PRETRAIN_DATASET,
                                         data_dir=data_dir, vocab_size=VOCAB_SIZE)
    config = multitask.get_config(f"size={size}", s)
    model = state_lib.Model(config.model)
    if s["pretrain_steps"]:
      source = datasets.data_source(PRETRAIN_DATASET, "train", data_dir)
      pretrain = objectives.get(config.objective)
      batches = pipeline.lm_dataset(source, tokenizer, seq_len=s["seq_len"],
                                    batch_size=s["batch"], seed=seed, prepare=pretrain.prepare)
      params, _, pre = loop.train_on_batches(
          config, model, pretrain, batches, steps=s["pretrain_steps"], seed=seed,
          log_every=50, name="metalm pretrain")
  else:
    tasks = list(tasks or multitask.TASKS)
    task_dir = data_dir
    check_prepared(task_dir, tasks)
    config, model, params, tokenizer = load_pretrained(checkpoint, size, s, step=step)
    s["pretrain_steps"] = 0
    s["max_span_len"] = config.model.max_span_len
  unknown = [t for t in tasks if t not in multitask.TASKS]
  if unknown:
    raise ValueError(f"unknown tasks {unknown}; tasks: {sorted(multitask.TASKS)}")
  encode_input = config.model.get("mode", "dual") != "causal"
  with config.unlocked():
    config.batch_size = s["batch"]
    config.data.seq_len = s["seq_len"]
  train_sources = {t: datasets.data_source(multitask.TASKS[t]["dataset"], "train", task_dir)
                   for t in tasks}
  batches = text_task_pipeline.multitask_dataset(
      train_sources, tokenizer, seq_len=s["seq_len"], batch_size=s["batch"],
      max_span_len=s["max_span_len"], max_input_tokens=s["max_input_tokens"], seed=seed,
      mixing_cap=s["mixing_cap"], encode_input=encode_input)
  params, rest, fine = loop.train_on_batches(
      config, model, FINETUNE, batches, steps=s["finetune_steps"], seed=seed + 1,
      init_params=params, log_every=50, name="metalm multitask finetune")
  results = {"size": size, "checkpoint": checkpoint, "tasks": {},
             "params": model.param_count(), "pretrain_steps": s["pretrain_steps"],
             "finetune_steps": s["finetune_steps"],
             "pretrain_final_loss": pre and pre["final_loss"],
             "finetune_final_loss": fine["final_loss"],
             "mixing": text_task_pipeline.mixing_weights(
                 {t: len(src) for t, src in train_sources.items()}, s["mixing_cap"])}
  for t in tasks:
    source = datasets.data_source(multitask.TASKS[t]["dataset"], "validation", task_dir)
    n = len(source) if not s["eval_limit"] else min(s["eval_limit"], len(source))
    longest = max(len(tokenizer.encode(" " + _text(r)))
                  for i in range(n) for r in source[i]["references"])
    predictor = metalm_text.TextGreedyPredictor(
        model, params, rest, tokenizer, seq_len=s["seq_len"], max_span_len=s["max_span_len"],
        max_input_tokens=s["max_input_tokens"], max_new_tokens=longest + 1, batch_size=32,
        encode_input=encode_input)
    results["tasks"][t] = evaluate_task(predictor, source, multitask.TASKS[t]["metric"],
                                        limit=s["eval_limit"])
    logging.info("%s: %s", t, {k: v for k, v in results["tasks"][t].items() if k != "samples"})
  results["wall_seconds"] = time.time() - start
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  defaults = multitask.SCHEDULES[_SIZE.value]
  try:
    given = config_lib.parse_config_args(_SCHEDULE.value, **{k: "" for k in defaults})
    schedule = {k: type(defaults[k])(v) for k, v in given.items() if v != ""}
  except ValueError as e:
    raise app.UsageError(f"--schedule: {e}") from None
  try:
    results = run(workdir=_WORKDIR.value, data_dir=_DATA_DIR.value, size=_SIZE.value,
                  seed=_SEED.value, tasks=_TASKS.value, schedule=schedule,
                  checkpoint=_CHECKPOINT.value)
  except (NotImplementedError, datasets.DatasetNotPreparedError) as e:
    raise app.UsageError(str(e)) from None
  for task, r in results["tasks"].items():
    print(task, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                 if k != "samples"})


if __name__ == "__main__":
  app.run(main)
