"""Corpus-level captioning metrics from the reference libraries: BLEU-4 and CIDEr-D from
`pycocoevalcap` (the COCO caption evaluation), ROUGE-L from Google's `rouge-score`.

    refs = {"img1": ["A dog runs on the grass.", "a brown dog running"], "img2": [...]}
    preds = {"img1": "a dog running on grass", "img2": ...}
    caption_scores(refs, preds)  # {'BLEU-4': ..., 'CIDEr-D': ..., 'ROUGE-L': ...}

Every function takes `references` as {id: [reference, ...]} and `predictions` as
{id: prediction} with the same ids, or as two equally long lists (one list of references
per prediction; a single reference may be a plain string).

Tokenisation. COCOEvalCap runs every caption through Stanford's PTBTokenizer (Java,
CoreNLP 3.4.1, `-preserveLines -lowerCase`) and then drops the tokens in pycocoevalcap's
PUNCTUATIONS list (. , ? ! : ; - -- ... ' '' ` `` -LRB- -RRB- -LCB- -RCB-). By default
(`tokenizer="python"`, no Java) `coco_tokenize` does the same in Python:
  1. newlines become spaces; curly quotes, en/em dashes and the ellipsis character become
     ' " -- ...; the text is lowercased;
  2. nltk's TreebankWordTokenizer (`convert_parentheses=True`) splits it by the Penn
     Treebank rules the Java tokenizer follows: clitics split off ("man 's", "do n't",
     "can not"), double quotes as `` and '', brackets as -LRB- ... -RCB-, punctuation split
     off words, hyphenated words, "1,000", "2.5" and "sat.a" kept whole;
  3. fixes where nltk's rules differ from the Java tokenizer's: a period ending a word inside
     the text splits off ("dogs. one" -> "dogs . one"), except after acronyms ("u.s.",
     "p.m.", "e.g.") and a short list of abbreviations ("mr.", "st.", "etc."); an opening
     single quote splits off ("'big'" -> ` big '); runs such as "!!" or "?!" stay one token;
     a run of periods is an ellipsis ("..");
  4. tokens are lowercased (so brackets become -lrb- ... -rcb-: not in PUNCTUATIONS, they
     stay, exactly as in the Java pipeline) and the PUNCTUATIONS tokens are dropped.
tests/test_metrics.py checks 40 captions against the Java tokenizer when `java` is on PATH.
It can still differ on rare input: abbreviations outside the short list (Java's is long:
"calif.", "jan." ...), other non-ASCII punctuation, and text Java normalises in other ways
(e.g. "&amp;" entities). `tokenizer="ptb"` uses the official Java PTBTokenizer itself
(needs `java` on PATH; it writes a temporary file next to the pycocoevalcap package).

CIDEr-D's IDF is computed from the references of the evaluated set itself, as the library
does: the score of one caption depends on which other images are scored with it, and a
set of a single image always scores 0. The values are the library's (BLEU and ROUGE-L in
0..1, CIDEr-D in 0..10); papers usually report them x100.

ROUGE-L is rouge-score's: its own tokenizer (lowercase, every non [a-z0-9] character a
separator, no stemming), the LCS F1 against each reference, the best reference per
caption (`RougeScorer.score_multi`), averaged over captions. This is not COCOEvalCap's
ROUGE-L (which uses PTB tokens, beta = 1.2, and the best precision and best recall over
references separately), so it is not comparable with COCO leaderboard ROUGE-L numbers.
"""
import functools
import re
import shutil
from typing import Hashable, Mapping, Sequence

References = Mapping[Hashable, Sequence[str] | str] | Sequence[Sequence[str] | str]
Predictions = Mapping[Hashable, str] | Sequence[str]
TOKENIZERS = ("python", "ptb")

# Non-ASCII marks the Java tokenizer normalises to their PTB forms.
_UNICODE_MARKS = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                                "\u2013": " -- ", "\u2014": " -- ", "\u2026": "..."})
# Words the Java tokenizer keeps a period on ("mr." stays one token); its own list is longer.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "mt", "jr", "sr", "vs", "etc",
                            "inc", "ltd", "co", "corp", "ave", "blvd"})
_ACRONYM = re.compile(r"[a-z](\.[a-z])+")  # u.s, p.m, e.g (before their final period)
_CLITICS = frozenset({"'s", "'m", "'d", "'ll", "'re", "'ve", "'t", "'em"})
_MARK_RUN = re.compile(r"[!?]{2,}")  # "!!", "?!": one token each for the Java tokenizer
_RUN = "\ue000"  # a private-use character holds a run's place through nltk


@functools.cache
def _treebank():
  from nltk.tokenize import TreebankWordTokenizer  # pylint: disable=g-import-not-at-top
  return TreebankWordTokenizer()


@functools.cache
def _ptb_punctuation() -> frozenset[str]:
  from pycocoevalcap.tokenizer import ptbtokenizer  # pylint: disable=g-import-not-at-top
  return frozenset(ptbtokenizer.PUNCTUATIONS)


def _keeps_period(word: str) -> bool:
  return word in _ABBREVIATIONS or _ACRONYM.fullmatch(word) is not None


def ptb_tokens(caption: str) -> list[str]:
  """PTB tokens of a caption as Stanford's PTBTokenizer (-lowerCase) writes them, in Python
  (see the module doc for the rules and the known differences)."""
  text = caption.replace("\n", " ").replace(_RUN, " ").translate(_UNICODE_MARKS).lower()
  runs = iter(_MARK_RUN.findall(text))
  raw = _treebank().tokenize(_MARK_RUN.sub(f" {_RUN} ", text), convert_parentheses=True)
  tokens = []
  for token in raw:
    if token == _RUN:
      tokens.append(next(runs))
    elif token == "." and tokens and _keeps_period(tokens[-1]):  # "u.s ." at the end -> "u.s."
      tokens[-1] += "."
    elif len(token) > 1 and not token.strip("."):  # "..", "....": an ellipsis for Java
      tokens.append("...")
    elif token.endswith(".") and token.strip(".") and not _keeps_period(token[:-1]):
      tokens += [token[:-1], "."]  # "dogs." inside the text: a sentence end
    elif token.startswith("'") and len(token) > 1 and token not in _CLITICS:
      tokens += ["`", token[1:]]  # an opening single quote
    else:
      tokens.append(token)
  return [t.lower() for t in tokens]  # brackets: -LRB- -> -lrb-, as the Java tokenizer does


def coco_tokenize(caption: str) -> str:
  """A caption as COCOEvalCap's tokenisation leaves it: `ptb_tokens` without the tokens in
  pycocoevalcap's PUNCTUATIONS list, joined by spaces.

  coco_tokenize('A man\'s dog, "running".') == "a man 's dog running"
  """
  punctuation = _ptb_punctuation()
  return " ".join(t for t in ptb_tokens(caption) if t not in punctuation)


def _as_dicts(references: References, predictions: Predictions):
  """-> ({id: [reference, ...]}, {id: prediction}) with the same ids, checked."""
  if isinstance(references, Mapping) != isinstance(predictions, Mapping):
    raise ValueError("Pass references and predictions both as {id: ...} dicts or both as "
                     f"lists; got {type(references).__name__} and "
                     f"{type(predictions).__name__}.")
  if not isinstance(references, Mapping):
    if len(references) != len(predictions):
      raise ValueError(f"{len(predictions)} predictions but {len(references)} reference "
                       "lists; pass one list of references per prediction.")
    references, predictions = dict(enumerate(references)), dict(enumerate(predictions))
  if references.keys() != predictions.keys():
    missing = [k for k in references if k not in predictions][:5]
    extra = [k for k in predictions if k not in references][:5]
    raise ValueError(f"references and predictions need the same ids: ids without a "
                     f"prediction {missing}, predictions without references {extra}.")
  if not references:
    raise ValueError("No captions to score; pass at least one.")
  gts = {}
  for key, refs in references.items():
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs or not all(isinstance(r, str) for r in refs):
      raise ValueError(f"references[{key!r}]={refs!r} must be a non-empty list of strings.")
    gts[key] = refs
  for key, pred in predictions.items():
    if not isinstance(pred, str):
      raise ValueError(f"predictions[{key!r}]={pred!r} must be one string (a caption).")
  return gts, dict(predictions)


def _tokenized(references: References, predictions: Predictions, tokenizer: str):
  """-> pycocoevalcap's inputs: ({id: [tokenised ref, ...]}, {id: [tokenised prediction]})."""
  gts, res = _as_dicts(references, predictions)
  if tokenizer == "python":
    return ({k: [coco_tokenize(r) for r in refs] for k, refs in gts.items()},
            {k: [coco_tokenize(p)] for k, p in res.items()})
  if tokenizer == "ptb":
    if shutil.which("java") is None:
      raise RuntimeError("tokenizer='ptb' runs Stanford's PTBTokenizer, which needs `java` on "
                         "PATH; install a JRE or use tokenizer='python'.")
    from pycocoevalcap.tokenizer import ptbtokenizer  # pylint: disable=g-import-not-at-top
    ptb = ptbtokenizer.PTBTokenizer()
    # pycocoevalcap tokenises references and predictions in two separate calls, as here.
    gts = ptb.tokenize({k: [{"caption": r} for r in refs] for k, refs in gts.items()})
    res = ptb.tokenize({k: [{"caption": p}] for k, p in res.items()})
    return gts, res
  raise ValueError(f"tokenizer={tokenizer!r} is not one of {TOKENIZERS}.")


def bleu4(references: References, predictions: Predictions, *,
          tokenizer: str = "python") -> float:
  """Corpus BLEU-4 (0..1) as COCOEvalCap computes it: pycocoevalcap's `Bleu(4)`, the
  n-gram counts summed over the corpus, brevity penalty from the closest reference length."""
  return _bleu4(*_tokenized(references, predictions, tokenizer))


def cider_d(references: References, predictions: Predictions, *,
            tokenizer: str = "python") -> float:
  """Corpus CIDEr-D (0..10) as COCOEvalCap computes it: pycocoevalcap's `Cider` (n = 1..4,
  sigma = 6, clipped tf-idf, IDF from this set's references), mean over captions."""
  return _cider_d(*_tokenized(references, predictions, tokenizer))


def rouge_l(references: References, predictions: Predictions) -> float:
  """Mean ROUGE-L F1 (0..1) of rouge-score, the best reference per caption (see module doc)."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  gts, res = _as_dicts(references, predictions)
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  scores = [scorer.score_multi(gts[k], res[k])["rougeL"].fmeasure for k in gts]
  return float(sum(scores) / len(scores))


def caption_scores(references: References, predictions: Predictions, *,
                   tokenizer: str = "python") -> dict[str, float]:
  """{'BLEU-4', 'CIDEr-D', 'ROUGE-L'} of a set of captions (see the functions above)."""
  gts, res = _tokenized(references, predictions, tokenizer)  # once for BLEU and CIDEr-D
  return {"BLEU-4": _bleu4(gts, res), "CIDEr-D": _cider_d(gts, res),
          "ROUGE-L": rouge_l(references, predictions)}


def _bleu4(gts, res) -> float:
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  score, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return float(score[3])


def _cider_d(gts, res) -> float:
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  score, _ = Cider().compute_score(gts, res)
  return float(score)
