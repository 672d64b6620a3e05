"""Answer metrics: the official VQA accuracy, SQuAD exact match / token F1, accuracy, recall@k.

Two normalisations live here, each a faithful port of an official evaluation script (neither
has a maintained package); the code is written from the scripts' behaviour, not copied:

- `normalize_vqa_answer`: the VQA evaluation's `processPunctuation` + `processDigitArticle`
  (github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py):
  punctuation removed or turned into a space by the script's own rules, a period kept only
  before a digit, lowercase, number words "none"/"zero" .. "ten" as digits, articles dropped,
  apostrophe-less contractions restored ("dont" -> "don't"). Those two functions are the
  same in every version of the script; *which answers they are applied to* changed:
    '2016' (the default here): vqaEval.py as it stood from 2016 until its 2021 change (e.g.
      GT-Vision-Lab/VQA commit c4e6a0e): the prediction is always stripped and normalised
      (punctuation + digits / articles); the human answers are only passed through
      processPunctuation, and only when they are not all identical.
    '2021': the script's master since then (commit a013f00): answers and prediction are
      stripped; when the human answers are not all identical, both the answers and the
      prediction get punctuation + digits / articles; when they are all identical,
      neither is processed (a raw, case-sensitive comparison).
  `vqa_score(..., official_references=True, vqa_eval='2016' | '2021')` reproduces either;
  the default (official_references=False) normalises answers and prediction alike.
- `normalize_squad_answer`: SQuAD's `normalize_answer` (rajpurkar.github.io/SQuAD-explorer,
  evaluate-v1.1.py; v2.0 normalises the same way): lowercase, every `string.punctuation`
  character deleted, articles dropped, whitespace collapsed. `exact_match` and `token_f1`
  use it. They score as evaluate-v1.1.py by default (`squad_version='1.1'`): F1 is 0 when
  no token is shared, so an empty (or all-article / all-punctuation) prediction scores 0
  even against an empty reference. `squad_version='2.0'` is evaluate-v2.0.py's rule for
  unanswerable questions: references that normalise to '' are dropped unless all do, and
  an empty prediction against an empty reference scores F1 1.

`normalize_answer` is the older, simplified VQA-style normaliser (kept for its callers).

    normalize_vqa_answer("Two dogs!") == "2 dogs"
    vqa_score("two", ["2"] * 2 + ["3"] * 8) == 0.6  # leave-one-out: (2 * 1/3 + 8 * 2/3) / 10
    token_f1("the cat sat", ["a cat sat down"]) == 0.8
    token_f1("the", ["a"]) == 0.0                         # evaluate-v1.1.py
    token_f1("the", ["a"], squad_version="2.0") == 1.0    # evaluate-v2.0.py
"""
import collections
import re
import string
from typing import Sequence

ARTICLES = ("a", "an", "the")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]")


def normalize_answer(answer: str) -> str:
  """Simplified VQA-style normalisation (not the official one: see `normalize_vqa_answer`).

  Lowercase; punctuation removed (a period between digits, as in "2.5", is kept); the
  articles a / an / the dropped; number words "zero" .. "ten" (and "none") written as digits;
  whitespace collapsed.  normalize_answer("The Seven.") == "7"
  """
  answer = _PERIOD_NOT_IN_NUMBER.sub(" ", answer.lower())
  answer = _PUNCTUATION.sub(" ", answer)
  words = [NUMBER_WORDS.get(w, w) for w in answer.split() if w not in ARTICLES]
  return " ".join(words)


# ------------------------------------------------------------------ official VQA normalisation
# The tables and rules of vqaEval.py (GT-Vision-Lab/VQA, master), copied as they are, quirks
# included: the keys of VQA_CONTRACTIONS are matched after lowercasing, so its capitalised keys
# ("Im", "Ive", "Id've", "I'dve") never match, and "somebody'd" maps to "somebodyd".
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've"}
# vqaEval.py's `punct`: note that ':', "'", '.', '#', '$', '%', '&', '*', '|', '~' and '^'
# are not in it (a period has its own rule; the others are kept).
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                   ">", "<", "@", "`", ",", "?", "!")
# vqaEval.py's periodStrip "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a negative *lookahead*
# for the text "<=digit" (a typo for a lookbehind) and never fails in front of a period, so
# the rule is "delete every period not followed by a digit" ("5." -> "5", "2.5" stays).
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(\,)(\d)")
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): the third positional argument of
# Pattern.sub is `count`, so at most re.UNICODE == 32 periods go. Kept for exactness.
_VQA_PERIOD_COUNT = int(re.UNICODE)


def vqa_process_punctuation(text: str) -> str:
  """vqaEval.py's `processPunctuation`, rule for rule.

  Each mark of `VQA_PUNCTUATION` is deleted when the *input* has it next to a space
  ("red, blue" -> "red blue") or has a digit-comma-digit anywhere ("1,000" -> "1000"),
  and otherwise becomes a space ("red,blue" -> "red blue", "t-shirt" -> "t shirt"); then
  periods not followed by a digit are deleted ("st.louis" -> "stlouis"). No lowercasing.
  """
  out = text
  drop_all = _VQA_DIGIT_COMMA_DIGIT.search(text) is not None
  for p in VQA_PUNCTUATION:
    if p + " " in text or " " + p in text or drop_all:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_COUNT)


def vqa_process_digit_article(text: str) -> str:
  """vqaEval.py's `processDigitArticle`: lowercase, split on whitespace, number words
  (`NUMBER_WORDS`, the script's manualMap) as digits, articles dropped, then contractions
  written without their apostrophe restored (`VQA_CONTRACTIONS`), words joined by spaces."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
  """The official VQA normalisation of an answer: what vqaEval.py applies to a prediction
  (newlines and tabs as spaces, stripped, `vqa_process_punctuation`, then
  `vqa_process_digit_article`).  normalize_vqa_answer("Two dogs!") == "2 dogs"
  """
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return vqa_process_digit_article(vqa_process_punctuation(answer))


VQA_EVAL_VERSIONS = ("2016", "2021")


def _vqa_strip(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def _official_vqa_answers(prediction: str, answers: Sequence[str],
                          vqa_eval: str) -> tuple[str, list[str]]:
  """(prediction, human answers) as vqaEval.py version `vqa_eval` compares them."""
  if vqa_eval == "2016":
    answers = list(answers)  # (vqaEval.py 2016 does not strip the references)
    if len(set(answers)) > 1:
      answers = [vqa_process_punctuation(a) for a in answers]
    return normalize_vqa_answer(prediction), answers
  prediction, answers = _vqa_strip(prediction), [_vqa_strip(a) for a in answers]
  if len(set(answers)) > 1:
    answers = [vqa_process_digit_article(vqa_process_punctuation(a)) for a in answers]
    prediction = vqa_process_digit_article(vqa_process_punctuation(prediction))
  return prediction, answers


def vqa_score(prediction: str, answers: str | Sequence[str], *,
              official_references: bool = False, vqa_eval: str = "2016") -> float:
  """The VQA accuracy of one prediction against its human answers (or one reference).

  The prediction and each answer are normalised with `normalize_vqa_answer`; the score is
  vqaEval.py's: for each of the N (10 in VQA) human answers, min(#matches among the other
  N-1 answers / 3, 1), averaged over the N leave-one-out subsets. So of 10 human answers,
  4 or more matching give 1.0, 3 give 0.9, 2 give 0.6, 1 gives 0.3. With one reference it
  is a normalised exact match (0 or 1).

  Args:
    prediction: the model's answer.
    answers: the human answers (or one reference string).
    official_references: False (default) normalises the references exactly like the
      prediction, so raw references ("Seven.", "two") can be used. True treats prediction
      and references exactly as vqaEval.py version `vqa_eval` does, for reproducing
      published numbers on VQA's released (already normalised) annotations.
      (vqaEval.py has no single-reference case.)
    vqa_eval: '2016' (default) or '2021', the vqaEval.py version (module docstring);
      only read with official_references=True. Where they differ: 10 identical answers
      "2" and the prediction "two" score 1.0 under '2016' (the prediction is normalised)
      and 0.0 under '2021' (nothing is processed); answers ["The Dog"] * 4 + ["cat"] * 6
      and the prediction "dog" score 0.0 under '2016' (answers keep their case and
      article) and 1.0 under '2021'.
  """
  if isinstance(answers, str):
    answers = [answers]
  if not answers:
    raise ValueError("vqa_score needs at least one reference answer, got none.")
  if vqa_eval not in VQA_EVAL_VERSIONS:
    raise ValueError(f"vqa_eval={vqa_eval!r}; valid: {VQA_EVAL_VERSIONS} (the vqaEval.py "
                     "version whose answer processing to follow).")
  if official_references:
    prediction, answers = _official_vqa_answers(prediction, answers, vqa_eval)
  elif vqa_eval != "2016":
    raise ValueError(f"vqa_eval={vqa_eval!r} only changes how vqaEval.py treats the "
                     "references: pass official_references=True with it.")
  else:
    prediction = normalize_vqa_answer(prediction)
    answers = [normalize_vqa_answer(a) for a in answers]
  matches = [a == prediction for a in answers]
  if len(matches) == 1:
    return float(matches[0])
  total = sum(matches)
  return sum(min((total - m) / 3.0, 1.0) for m in matches) / len(matches)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
                 official_references: bool = False, vqa_eval: str = "2016") -> float:
  """Mean `vqa_score` over examples (0.0 .. 1.0; vqaEval.py reports it x100)."""
  _check_lengths(predictions, references)
  return sum(vqa_score(p, r, official_references=official_references, vqa_eval=vqa_eval)
             for p, r in zip(predictions, references)) / len(predictions)


# ------------------------------------------------------------------ SQuAD exact match and F1
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_SQUAD_PUNCTUATION = frozenset(string.punctuation)


def normalize_squad_answer(text: str) -> str:
  """SQuAD's `normalize_answer` (evaluate-v1.1.py and v2.0.py alike): lowercase, delete every
  character of `string.punctuation`, replace the words a / an / the by a space, collapse
  whitespace.  normalize_squad_answer("The Eiffel-Tower!") == "eiffeltower"
  """
  text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCTUATION)
  return " ".join(_SQUAD_ARTICLES.sub(" ", text).split())


SQUAD_VERSIONS = ("1.1", "2.0")


def _squad_f1(prediction: str, reference: str, squad_version: str = "1.1") -> float:
  """Bag-of-tokens F1 of the normalised answers: evaluate-v1.1.py's `f1_score` (0 when no
  token is shared, empty answers included) or, for '2.0', evaluate-v2.0.py's `compute_f1`
  (when either side has no token: 1.0 if both have none, else 0.0)."""
  pred, gold = normalize_squad_answer(prediction).split(), normalize_squad_answer(reference).split()
  if squad_version == "2.0" and (not pred or not gold):
    return float(pred == gold)
  same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def _squad_references(references: str | Sequence[str], squad_version: str) -> Sequence[str]:
  """The references a SQuAD script scores against: all of them (v1.1); v2.0 drops those
  that normalise to '' and uses [''] when none is left (an unanswerable question)."""
  if squad_version not in SQUAD_VERSIONS:
    raise ValueError(f"squad_version={squad_version!r}; valid: {SQUAD_VERSIONS} (the official "
                     "evaluate-v1.1.py or evaluate-v2.0.py).")
  references = _as_references(references)
  if squad_version == "2.0":
    references = [r for r in references if normalize_squad_answer(r)] or [""]
  return references


def _as_references(references: str | Sequence[str]) -> Sequence[str]:
  references = [references] if isinstance(references, str) else references
  if not references:
    raise ValueError("Need at least one reference answer, got none.")
  return references


def exact_match(prediction: str, references: str | Sequence[str], *,
                squad_version: str = "1.1") -> float:
  """SQuAD exact match: 1.0 if the normalised prediction equals any normalised reference
  (`normalize_squad_answer`), else 0.0 (the max over references, as SQuAD takes it).
  squad_version='2.0' first drops references that normalise to '' (unless all do)."""
  pred = normalize_squad_answer(prediction)
  return float(any(pred == normalize_squad_answer(r)
                   for r in _squad_references(references, squad_version)))


def token_f1(prediction: str, references: str | Sequence[str], *,
             squad_version: str = "1.1") -> float:
  """SQuAD token F1: the best bag-of-words F1 between the normalised prediction and any
  normalised reference, as evaluate-v1.1.py computes it (default) or evaluate-v2.0.py
  (squad_version='2.0'; they differ only where an answer normalises to '').
  token_f1("the cat sat", "a cat sat down") == 0.8;  token_f1("the", "a") == 0.0"""
  return max(_squad_f1(prediction, r, squad_version)
             for r in _squad_references(references, squad_version))


def mean_exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
                     squad_version: str = "1.1") -> float:
  """Mean `exact_match` over examples (0.0 .. 1.0; SQuAD's script reports it x100)."""
  _check_lengths(predictions, references)
  return sum(exact_match(p, r, squad_version=squad_version)
             for p, r in zip(predictions, references)) / len(predictions)


def mean_token_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
                  squad_version: str = "1.1") -> float:
  """Mean `token_f1` over examples (0.0 .. 1.0; SQuAD's script reports it x100)."""
  _check_lengths(predictions, references)
  return sum(token_f1(p, r, squad_version=squad_version)
             for p, r in zip(predictions, references)) / len(predictions)


# ------------------------------------------------------------------ accuracy and retrieval
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
