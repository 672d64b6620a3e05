"""Zero- and few-shot evaluation of any model that answers prompts of image/text segments.

    def predict_fn(prompts: list[list[Segment]]) -> list[str]:
      ...  # encode each prompt (each shot separately if you like), generate, decode
    result = evaluate_vqa(predict_fn, test_examples, shots=4, support=train_examples)
    result["accuracy"], result["per_task"]["nlvr2"]

The harness only builds prompts (`prompts.zero_shot_prompt` / `prompts.few_shot_prompt`),
batches them, calls `predict_fn`, and scores the answers with `metrics.vqa_score`
(normalised exact match). It never touches a model, so the METALM, mPLUG or a baseline
wiring lives in the caller.

Demonstrations for k-shot: for query i, k examples drawn without replacement from the
`support` examples of the same task (and the same question if `match_question`), with a
generator seeded by (seed, i): the same shots on every run and for every model. Support
examples showing one of the query's images (same 'index') are never drawn.
"""
from typing import Callable, Sequence

import numpy as np

from metalm_jax.evaluation import metrics
from metalm_jax.data import prompts
from metalm_jax.data.prompts import Segment

PredictFn = Callable[[list[list[Segment]]], list[str]]


def select_shots(query: dict, support: Sequence[dict], shots: int, *, rng: np.random.Generator,
                 match_question: bool = False) -> list[dict]:
  """`shots` support examples of the query's task (and question), none showing its image."""
  task, question = prompts.as_text(query["task"]), prompts.as_text(query["question"])
  query_images = {int(query.get("index", -1)), int(query.get("index2", -1))} - {-1}
  pool = [ex for ex in support if prompts.as_text(ex["task"]) == task
          and (not match_question or prompts.as_text(ex["question"]) == question)
          and not ({int(ex.get("index", -1)), int(ex.get("index2", -1))} & query_images)]
  if len(pool) < shots:
    raise ValueError(f"Only {len(pool)} support examples of task {task!r} (match_question="
                     f"{match_question}) for shots={shots}; pass more support examples.")
  return [pool[j] for j in rng.choice(len(pool), size=shots, replace=False)]


def build_prompts(examples: Sequence[dict], *, shots: int = 0,
                  support: Sequence[dict] | None = None, seed: int = 0,
                  match_question: bool = False) -> list[list[Segment]]:
  """One prompt (list of segments) per example: zero-shot, or k demonstrations + query."""
  if shots < 0:
    raise ValueError(f"shots={shots} must be >= 0.")
  if shots and not support:
    raise ValueError(f"shots={shots} needs support= examples to draw demonstrations from "
                     "(e.g. the train split).")
  if not shots:
    return [prompts.zero_shot_prompt(ex) for ex in examples]
  return [prompts.few_shot_prompt(
      select_shots(ex, support, shots, rng=np.random.default_rng([seed, i]),
                   match_question=match_question), ex)
          for i, ex in enumerate(examples)]


def evaluate_vqa(predict_fn: PredictFn, examples: Sequence[dict], *, shots: int = 0,
                 support: Sequence[dict] | None = None, batch_size: int = 32, seed: int = 0,
                 match_question: bool = False) -> dict:
  """Accuracy of `predict_fn`'s answers on question-answering (and captioning) examples.

  Args:
    predict_fn: list of prompts (each a list of `Segment`s) -> one answer string each
      (the text generated after the prompt; leading/trailing space is ignored).
    examples: dicts with 'task', 'question', 'answer', 'image', 'image2', 'num_images'
      (e.g. `digits_vl` examples; 'caption' examples are scored on their caption).
    shots: k demonstrations per query (0 = zero-shot).
    support: where demonstrations come from (required when shots > 0).
    batch_size: prompts per `predict_fn` call.
    seed: the demonstrations' seed.
    match_question: draw demonstrations with the query's question only.

  Returns:
    {'accuracy': mean score, 'num_examples': n, 'per_task': {task: accuracy},
     'predictions': [str], 'references': [str]}.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  if not examples:
    raise ValueError("evaluate_vqa got no examples.")
  all_prompts = build_prompts(examples, shots=shots, support=support, seed=seed,
                              match_question=match_question)
  predictions = []
  for start in range(0, len(all_prompts), batch_size):
    batch = all_prompts[start:start + batch_size]
    answers = list(predict_fn(batch))
    if len(answers) != len(batch):
      raise ValueError(f"predict_fn returned {len(answers)} answers for {len(batch)} prompts.")
    predictions.extend(str(a).strip() for a in answers)
  references = [prompts.as_text(ex["answer"]) for ex in examples]
  scores = [metrics.vqa_score(p, r) for p, r in zip(predictions, references)]
  tasks = [prompts.as_text(ex["task"]) for ex in examples]
  per_task = {t: float(np.mean([s for s, u in zip(scores, tasks) if u == t]))
              for t in sorted(set(tasks))}
  return {"accuracy": float(np.mean(scores)), "num_examples": len(examples),
          "per_task": per_task, "predictions": predictions, "references": references}
