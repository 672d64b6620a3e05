"""Answer metrics: VQA-style exact match after normalisation, and plain accuracy.

`normalize_answer` is a simplified form of the official VQA evaluation's processing:
lowercase; punctuation removed (a period between digits, as in "2.5", is kept); the
articles a / an / the dropped; number words "zero" .. "ten" (and "none") written as
digits, as VQA does, so "Seven." and "7" match; whitespace collapsed.

    normalize_answer("The Seven.") == "7"
    vqa_accuracy(["seven", "odd"], ["7", "even"]) == 0.5
"""
import re
import string
from typing import Sequence

ARTICLES = ("a", "an", "the")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]")


def normalize_answer(answer: str) -> str:
  """Lowercase, no punctuation or articles, number words as digits, single spaces."""
  answer = _PERIOD_NOT_IN_NUMBER.sub(" ", answer.lower())
  answer = _PUNCTUATION.sub(" ", answer)
  words = [NUMBER_WORDS.get(w, w) for w in answer.split() if w not in ARTICLES]
  return " ".join(words)


def vqa_score(prediction: str, answers: str | Sequence[str]) -> float:
  """Score of one prediction against one reference or a list of human answers.

  With one reference: normalised exact match (0 or 1). With several (VQA's 10 human
  answers): the official VQA accuracy, the mean over the leave-one-out subsets of
  min(#matching answers / 3, 1).
  """
  if isinstance(answers, str):
    answers = [answers]
  if not answers:
    raise ValueError("vqa_score needs at least one reference answer, got none.")
  prediction = normalize_answer(prediction)
  matches = [normalize_answer(a) == prediction for a in answers]
  if len(matches) == 1:
    return float(matches[0])
  total = sum(matches)
  return sum(min((total - m) / 3.0, 1.0) for m in matches) / len(matches)


def vqa_accuracy(predictions: Sequence[str],
                 references: Sequence[str | Sequence[str]]) -> float:
  """Mean `vqa_score` over examples (0.0 .. 1.0)."""
  _check_lengths(predictions, references)
  return sum(vqa_score(p, r) for p, r in zip(predictions, references)) / len(predictions)


def accuracy(predictions: Sequence, labels: Sequence) -> float:
  """Fraction of predictions equal to their label (no normalisation)."""
  _check_lengths(predictions, labels)
  return sum(p == l for p, l in zip(predictions, labels)) / len(predictions)


def retrieval_recall(scores, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k of a retrieval: the fraction of queries with a relevant item among their k
  highest-scoring candidates (ties broken by candidate index, as a stable sort does).

  Args:
    scores: float [Q, C], higher = ranked earlier.
    relevant: bool [Q, C], True where candidate c is a correct answer to query q; every query
      needs at least one.
    ks: the cut-offs.

  Returns:
    {'R@1': ..., 'R@5': ..., ...} in [0, 1].
  """
  import numpy as np  # local: the rest of this module is pure Python
  scores, relevant = np.asarray(scores), np.asarray(relevant, bool)
  if scores.shape != relevant.shape or scores.ndim != 2:
    raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must both be "
                     "[queries, candidates].")
  if not relevant.any(axis=1).all():
    raise ValueError(f"{int((~relevant.any(axis=1)).sum())} queries have no relevant candidate; "
                     "recall is undefined for them: drop them or fix the relevance matrix.")
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = np.take_along_axis(relevant, order, axis=1)
  first = hits.argmax(axis=1)  # rank of the first relevant candidate
  return {f"R@{k}": float(np.mean(first < k)) for k in ks}


def _check_lengths(predictions, references):
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} references; "
                     "pass one reference per prediction.")
  if not predictions:
    raise ValueError("No predictions to score; pass at least one example.")
