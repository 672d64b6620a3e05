"""The task evaluators of `config.evals`: VQA, captioning, NLVR2, retrieval, text tasks.

Each reads its examples through the family (`family.examples(split, dataset=, task=,
limit=)`: digits-style dicts, see `data/prompts.py`; text tasks: {'inputs', 'targets',
'references'}) and asks the family's predictor for answers:

  vqa         VQA accuracy of generated answers (zero- or k-shot: `shots`, demonstrations
              from `support_split`) or of answer-list ranking (`mode='rank'`, mPLUG); the
              official 10-annotator accuracy where the data has human answers
  captioning  CIDEr-D, BLEU-4, ROUGE-L (all of an image's references) and exact match
  nlvr2       accuracy of the generated 'true' / 'false'
  retrieval   R@1/5/10 image-to-text and text-to-image, ITC ranking and its top `k_test`
              re-ranked by ITM (mPLUG)
  text_tasks  per task: SQuAD exact match / F1, accuracy, ROUGE-L (METALM multitask)

Scalars go to metrics.jsonl; the details (predictions with their references, per-question
and per-answer-type accuracies) to `<workdir>/evals/<name>/step_<N>.json`.
"""
from __future__ import annotations

import collections
import time

import numpy as np

from metalm_jax.data import prompts
from metalm_jax.evaluation import caption_metrics, metrics
from metalm_jax.evaluation.evaluators import EvalContext, Evaluator, register

SAMPLES = 8  # predictions kept in the details, with their references


class _Generation(Evaluator):
  """Shared options: which examples, how to decode."""

  task = ""

  def __init__(self, ctx: EvalContext, *, dataset: str = "", split: str = "", limit: int = 0,
               shots: int = 0, support_split: str = "train", support_size: int = 0,
               match_question: bool = False, beam_size: int = 1, length_penalty: float = 0.0,
               max_new_tokens: int = 0, batch_size: int = 32, seed: int = 0):
    super().__init__(ctx)
    if shots < 0 or limit < 0 or beam_size < 1 or batch_size < 1 or length_penalty < 0:
      raise ValueError("shots, limit >= 0, beam_size, batch_size >= 1, length_penalty >= 0")
    self.dataset, self.split = dataset, split or ctx.config.data.eval_split
    self.limit, self.shots, self.seed = limit, shots, seed
    self.support_split, self.support_size = support_split, support_size
    self.match_question = match_question
    self.decode = dict(beam_size=beam_size, length_penalty=length_penalty,
                       max_new_tokens=max_new_tokens, batch_size=batch_size)

  def examples(self) -> list[dict]:
    examples = self.ctx.family.examples(self.split, dataset=self.dataset, task=self.task,
                                        limit=self.limit)
    if not examples:
      raise ValueError(f"no {self.task!r} examples in split {self.split!r} of "
                       f"{self.dataset or self.ctx.config.data.dataset!r}")
    return examples

  def support(self) -> list[dict]:
    if not self.shots:
      return []
    return self.ctx.family.examples(self.support_split, dataset=self.dataset, task=self.task,
                                    first=self.support_size)

  def generate(self, params, examples) -> list[str]:
    predictor = self.ctx.family.predictor(self.ctx.model, params, self.ctx.rest)
    start = time.time()
    out = predictor.generate(examples, task=self.task, shots=self.shots,
                             support=self.support(), seed=self.seed,
                             match_question=self.match_question, **self.decode)
    self.ctx.progress(f"{self.type}: {len(examples)} {self.task} examples "
                      f"({self.shots}-shot) in {time.time() - start:.0f} s")
    return out


def _official(example) -> bool:
  return len(example.get("answers") or ()) > 1


class Vqa(_Generation):
  """VQA accuracy: generation (zero- / k-shot) or answer-list ranking (`mode='rank'`).

  Options (besides the generation ones): mode 'generate' | 'rank'; answer_list_size: the
  ranking's answers, the most frequent train answers (0 = every distinct train answer);
  rank_k: answers scored in full per question, chosen by their first token (mPLUG's
  k_test = 128); vqa_eval: vqaEval.py version '2016' | '2021' for official answers.
  """

  type = "vqa"
  task = "vqa"

  def __init__(self, ctx: EvalContext, *, mode: str = "generate", answer_list_size: int = 0,
               rank_k: int = 128, vqa_eval: str = "2016", **options):
    super().__init__(ctx, **options)
    if mode not in ("generate", "rank"):
      raise ValueError(f"mode={mode!r}; valid: 'generate', 'rank'")
    self.mode, self.answer_list_size, self.rank_k = mode, answer_list_size, rank_k
    self.vqa_eval = vqa_eval

  def answer_list(self) -> list[str]:
    train = self.ctx.family.examples("train", dataset=self.dataset, task="vqa", images=False)
    answers = [[prompts.as_text(a) for a in (ex.get("answers") or [ex["answer"]])]
               for ex in train]
    counts = collections.Counter(a for row in answers for a in row)
    size = self.answer_list_size or len(counts)
    return sorted(a for a, _ in counts.most_common(size))

  def __call__(self, params, extra):
    examples = self.examples()
    if self.mode == "generate":
      predictions = self.generate(params, examples)
    else:
      predictor = self.ctx.family.predictor(self.ctx.model, params, self.ctx.rest)
      predictions = predictor.rank_answers(examples, self.answer_list(), k=self.rank_k,
                                           batch_size=self.decode["batch_size"])
    scores = [metrics.vqa_score(p, ex.get("answers") or [ex["answer"]],
                                official_references=_official(ex), vqa_eval=self.vqa_eval)
              for p, ex in zip(predictions, examples)]
    by_question = collections.defaultdict(list)
    by_type = collections.defaultdict(list)
    for s, ex in zip(scores, examples):
      by_question[prompts.as_text(ex["question"])].append(s)
      if ex.get("answer_type"):
        by_type[prompts.as_text(ex["answer_type"])].append(s)
    details = {
        "mode": self.mode, "shots": self.shots, "num_examples": len(examples),
        "per_question": {q: float(np.mean(v)) for q, v in by_question.items()
                         if len(by_question) <= 20},
        "per_answer_type": {t: float(np.mean(v)) for t, v in by_type.items()},
        "answer_counts": dict(collections.Counter(
            metrics.normalize_vqa_answer(p) for p in predictions).most_common(5)),
        "samples": [{"id": ex.get("id"), "question": prompts.as_text(ex["question"]),
                     "prediction": p, "answers": list(ex.get("answers") or [ex["answer"]])}
                    for p, ex in zip(predictions[:SAMPLES], examples[:SAMPLES])]}
    return {"accuracy": float(np.mean(scores)), "num_examples": len(examples)}, details


class Captioning(_Generation):
  """CIDEr-D, BLEU-4 and ROUGE-L against every reference of each image, and exact match
  with the first reference (the digits have one)."""

  type = "captioning"
  task = "caption"

  def __call__(self, params, extra):
    examples = self.examples()
    predictions = self.generate(params, examples)
    references = [[prompts.as_text(r) for r in (ex.get("references") or [ex["answer"]])]
                  for ex in examples]
    scores = caption_metrics.caption_scores(references, predictions)
    exact = [metrics.vqa_score(p, r[0]) for p, r in zip(predictions, references)]
    out = {"cider_d": scores["CIDEr-D"], "bleu4": scores["BLEU-4"],
           "rouge_l": scores["ROUGE-L"], "exact_match": float(np.mean(exact)),
           "num_examples": len(examples)}
    details = {"shots": self.shots, "samples": [
        {"id": ex.get("id"), "prediction": p, "references": r}
        for p, r, ex in zip(predictions[:SAMPLES], references[:SAMPLES], examples[:SAMPLES])]}
    return out, details


class Nlvr2(_Generation):
  """Accuracy of the generated label word ('true' / 'false') on NLVR2-style pairs."""

  type = "nlvr2"
  task = "nlvr2"

  def __call__(self, params, extra):
    examples = self.examples()
    predictions = self.generate(params, examples)
    correct = [metrics.normalize_vqa_answer(p) == metrics.normalize_vqa_answer(ex["answer"])
               for p, ex in zip(predictions, examples)]
    details = {"answer_counts": dict(collections.Counter(
        metrics.normalize_vqa_answer(p) for p in predictions).most_common(5)),
               "samples": [{"id": ex.get("id"), "statement": prompts.as_text(ex["question"]),
                            "prediction": p, "answer": ex["answer"]}
                           for p, ex in zip(predictions[:SAMPLES], examples[:SAMPLES])]}
    return {"accuracy": float(np.mean(correct)), "num_examples": len(examples)}, details


class Retrieval(Evaluator):
  """Image-text retrieval R@1/5/10 in both directions over a split's images and all their
  captions: ITC similarity ranking, and its top `k_test` re-ranked by the ITM logit (ALBEF /
  mPLUG; 256 on COCO). An image is a hit when any of its captions is retrieved, a caption
  when its image is; digits images showing the same digit count as the same image.

  Options: dataset, split, limit (the first N images, 0 = all), k_test, batch_size.
  Scalars: 'i2t_R1', 'i2t_R5', 'i2t_R10', 't2i_R1', ... after ITM re-ranking, 'itc_i2t_R1',
  ... of the ITC ranking alone.
  """

  type = "retrieval"

  def __init__(self, ctx: EvalContext, *, dataset: str = "", split: str = "", limit: int = 0,
               k_test: int = 256, batch_size: int = 64):
    super().__init__(ctx)
    if k_test < 1:
      raise ValueError(f"k_test={k_test} must be >= 1")
    self.dataset, self.split = dataset, split or ctx.config.data.eval_split
    self.limit, self.k_test, self.batch_size = limit, k_test, batch_size

  def __call__(self, params, extra):
    examples = self.ctx.family.examples(self.split, dataset=self.dataset, task="caption",
                                        limit=self.limit)
    images = [ex["image"] for ex in examples]
    texts, owner = [], []
    for i, ex in enumerate(examples):
      for ref in ex.get("references") or [ex["answer"]]:
        texts.append(prompts.as_text(ref))
        owner.append(i)
    owner = np.asarray(owner)
    group = np.asarray([ex.get("pair_id", i) for i, ex in enumerate(examples)])
    relevant = group[:, None] == group[owner][None, :]  # [images, texts]
    predictor = self.ctx.family.predictor(self.ctx.model, params, self.ctx.rest)
    start = time.time()
    scores = predictor.retrieval_scores(images, texts, k=self.k_test,
                                        batch_size=self.batch_size)
    self.ctx.progress(f"retrieval: {len(images)} images x {len(texts)} texts in "
                      f"{time.time() - start:.0f} s")
    out = {"num_images": len(images), "num_texts": len(texts)}
    details = {"k_test": self.k_test}
    for stage, (i2t, t2i) in {"itc": ("itc_i2t", "itc_t2i"), "itm": ("i2t", "t2i")}.items():
      r_i2t = metrics.retrieval_recall(scores[i2t], relevant)
      r_t2i = metrics.retrieval_recall(scores[t2i], relevant.T)
      details[stage] = {"i2t": r_i2t, "t2i": r_t2i}
      prefix = "" if stage == "itm" else "itc_"  # 'R@1' -> 'i2t_R1' (TensorBoard-safe)
      out.update({f"{prefix}i2t_{k.replace('@', '')}": v for k, v in r_i2t.items()})
      out.update({f"{prefix}t2i_{k.replace('@', '')}": v for k, v in r_t2i.items()})
    return out, details


class TextTasks(Evaluator):
  """Per task of the text-task mixture, generated answers scored by the task's metric:
  SQuAD exact match / F1 (the official v1.1 rules), accuracy (the label word after SQuAD
  normalisation), ROUGE-L F1. Scalars are '<task>/<metric>' in %, and '<task>/num_examples'.

  Options: tasks (default config.data.tasks), split, limit (per task), beam_size,
  length_penalty, max_new_tokens (0: the longest reference + 1), batch_size.
  """

  type = "text_tasks"

  def __init__(self, ctx: EvalContext, *, tasks: tuple = (), split: str = "", limit: int = 0,
               beam_size: int = 1, length_penalty: float = 0.0, max_new_tokens: int = 0,
               batch_size: int = 32):
    super().__init__(ctx)
    self.tasks = tuple(tasks) or tuple(ctx.config.data.tasks)
    self.split, self.limit = split or ctx.config.data.eval_split, limit
    self.decode = dict(beam_size=beam_size, length_penalty=length_penalty,
                       max_new_tokens=max_new_tokens, batch_size=batch_size)

  def __call__(self, params, extra):
    family = self.ctx.family
    predictor = family.predictor(self.ctx.model, params, self.ctx.rest)
    out, details = {}, {}
    for task in self.tasks:
      examples = family.task_examples(task, self.split, limit=self.limit)
      start = time.time()
      predictions = predictor.generate_text([prompts.as_text(ex["inputs"]) for ex in examples],
                                            references=[ex["references"] for ex in examples],
                                            **self.decode)
      references = [[prompts.as_text(r) for r in ex["references"]] for ex in examples]
      scores = score_text_task(family.metric(task), predictions, references)
      out.update({f"{task}/{k}": v for k, v in scores.items()})
      out[f"{task}/num_examples"] = len(examples)
      details[task] = {"num_examples": len(examples), "seconds": round(time.time() - start, 1),
                       "samples": [{"prediction": p, "references": r[:3]}
                                   for p, r in zip(predictions[:SAMPLES], references)]}
      self.ctx.progress(f"text_tasks {task}: {scores}")
    return out, details


def score_text_task(metric: str, predictions, references) -> dict[str, float]:
  """A task's metric(s) in %: {'exact_match', 'f1'} | {'accuracy'} | {'rouge_l'}."""
  if metric == "exact_match_f1":
    return {"exact_match": 100 * metrics.mean_exact_match(predictions, references),
            "f1": 100 * metrics.mean_token_f1(predictions, references)}
  if metric == "accuracy":
    return {"accuracy": 100 * metrics.mean_exact_match(predictions, references)}
  if metric == "rouge_l":
    return {"rouge_l": 100 * caption_metrics.rouge_l(list(references), list(predictions))}
  raise ValueError(f"metric={metric!r}; valid: 'exact_match_f1', 'accuracy', 'rouge_l'")


for _cls in (Vqa, Captioning, Nlvr2, Retrieval, TextTasks):
  register(_cls)
