"""Evaluation metrics against known values: BLEU-4 / CIDEr-D (pycocoevalcap), ROUGE-L
(rouge-score), the official VQA normalisation and accuracy, SQuAD exact match and F1.

Expected values are worked out by hand from each metric's definition (shown beside them),
or computed independently (BLEU with nltk, CIDEr-D with a slow from-the-definition
reference below).
"""
import collections
import math
import random
import re
import shutil
import string

import pytest

from metalm_jax.evaluation import caption_metrics as cm
from metalm_jax.evaluation import metrics


# ---------------------------------------------------------------- tokenisation for captions
@pytest.mark.parametrize("raw, tokens", [
    ('A man\'s dog, "running".', "a man 's dog running"),
    ("Don't go.", "do n't go"),
    ("A two-story house with 2.5 doors...", "a two-story house with 2.5 doors"),
    ("Two dogs. One cat!\nA bird?", "two dogs one cat a bird"),
    ("  A  Dog ;-- Sits : ", "a dog sits"),
    ("Mr. Smith saw a cat (black).", "mr. smith saw a cat -lrb- black -rrb-"),  # as Java does
    ("He said 'hi'!!", "he said hi !!"),
])
def test_coco_tokenize(raw, tokens):
  assert cm.coco_tokenize(raw) == tokens


# Captions on which the Python tokenisation agrees with the Java PTBTokenizer (checked with
# CoreNLP 3.4.1 from pycocoevalcap 1.2 on OpenJDK 17).
PTB_CASES = [
    "A man riding a wave on top of a surfboard.", 'A man\'s dog, "running" in the park.',
    "Two dogs don't play; they sleep.", "A two-story house (red) with 2.5 doors...",
    "Two dogs. One cat!", "A dog -- a big one -- sits: it's tired?",
    "There are 1,000 people at the 3-day event.", "The cat's toys aren't here, are they?",
    "a woman in a 'big' hat", "  A  Dog ;-- Sits : ", "Mr. Smith went to the U.S. yesterday.",
    "Mr. Smith went to the U.S.", "a black/white cat * on a mat", "a cat [on] a {mat}",
    "rock & roll band", "a dog's  bone... and  cat\u2019s toy \u201cquoted\u201d \u2014 dash",
    "He said 'hello'.", "a cat sat.A dog", "Two dogs.\nA bird?", "cannot gonna wanna",
    "the 1990s' best", "it's 5 p.m. now", "a table with 3 apples, 2 pears & a knife!!",
    "an old-fashioned, well-kept car", "e.g. a car", "$5.00 and 50% off",
    "a man's hat and the boys' shoes", "'twas the night of 'em", "the dr. is in.",
    "a dog on main st. near a car", "a man (in a hat) and a woman.", "there are 5. then 6",
    "I'm here, we'll go, they'd say, you're right", "a tennis player swinging at a ball .",
    "people at a cafe#3 @ noon", "a child's toy;a ball", "what?! no", "a dog .. sits",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="the official PTBTokenizer needs java")
def test_coco_tokenize_matches_java_ptb_tokenizer():
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(PTB_CASES)})
  for i, caption in enumerate(PTB_CASES):
    assert cm.coco_tokenize(caption) == java[i][0], caption
  # tokenizer="ptb" runs that Java tokenizer: the same scores on these captions.
  refs, preds = [[c] for c in PTB_CASES], PTB_CASES[1:] + PTB_CASES[:1]
  assert cm.cider_d(refs, preds, tokenizer="ptb") == pytest.approx(cm.cider_d(refs, preds))


# ---------------------------------------------------------------- BLEU-4
def test_bleu4_hand_computed_one_sentence():
  # Hypothesis "the cat sat on a mat" vs "the cat sat on the mat" (6 tokens each, BP = 1):
  # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 -> BLEU-4 = (1/12) ** (1/4).
  score = cm.bleu4([["The cat sat on the mat."]], ["the cat sat on a mat"])
  assert score == pytest.approx((1 / 12) ** 0.25, rel=1e-6)
  # Brevity: "the cat sat on" (4 tokens) vs the same 6-token reference: precisions 1, BP
  # = exp(1 - 6/4).
  assert cm.bleu4([["the cat sat on the mat"]], ["the cat sat on"]) == \
      pytest.approx(math.exp(1 - 6 / 4), rel=1e-6)
  # A perfect match (4+ tokens: a shorter one has no 4-gram and scores ~0).
  assert cm.bleu4({"a": ["A dog runs fast."]}, {"a": "a dog runs fast"}) == pytest.approx(1.0)
  assert cm.bleu4(["a dog runs"], ["two cats sleep here"]) == pytest.approx(0.0, abs=1e-6)


CORPUS_REFS = {
    "img1": ["A dog runs on the green grass.", "A brown dog is running in a field.",
             "The dog runs across the grass."],
    "img2": ["Two people ride bikes down a street.", "Two cyclists on a city street.",
             "People riding bicycles on the road."],
    "img3": ["A plate of food with broccoli and rice.", "Rice and broccoli on a white plate."],
    "img4": ["A cat sleeping on a red couch.", "A cat is asleep on the sofa.",
             "A sleeping cat lies on a couch."],
}
CORPUS_PREDS = {"img1": "A dog running on the grass.", "img2": "Two people riding bikes.",
                "img3": "A plate of rice and broccoli.", "img4": "A cat on a red couch."}


def test_bleu4_corpus_matches_nltk():
  from nltk.translate.bleu_score import corpus_bleu
  keys = sorted(CORPUS_REFS)
  expected = corpus_bleu([[cm.coco_tokenize(r).split() for r in CORPUS_REFS[k]] for k in keys],
                         [cm.coco_tokenize(CORPUS_PREDS[k]).split() for k in keys])
  assert 0.1 < expected < 0.9
  assert cm.bleu4(CORPUS_REFS, CORPUS_PREDS) == pytest.approx(expected, rel=1e-6)
  # The same corpus as lists gives the same value.
  assert cm.bleu4([CORPUS_REFS[k] for k in keys], [CORPUS_PREDS[k] for k in keys]) == \
      pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- CIDEr-D
def _cider_d_reference(gts, res, n=4, sigma=6.0):
  """CIDEr-D from its definition (Vedantam et al. 2015, sec. 3-4): per n, tf-idf vectors
  with the IDF over the images' reference sets, hypothesis weights clipped to the
  reference's, cosine, Gaussian length penalty; mean over n and references, x10; mean over
  images. Slow and obvious; non-empty sentences only."""
  def grams(text, k):
    w = text.split()
    return collections.Counter(tuple(w[i:i + k]) for i in range(len(w) - k + 1))

  images = len(gts)
  df = collections.Counter(g for refs in gts.values()
                           for g in {g for r in refs for k in range(1, n + 1) for g in grams(r, k)})

  def vec(text, k):
    return {g: c * (math.log(images) - math.log(max(1.0, df[g])))
            for g, c in grams(text, k).items()}

  def cosine(h, r):
    dot = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in h.items())
    norms = math.sqrt(sum(v * v for v in h.values())) * math.sqrt(sum(v * v for v in r.values()))
    return dot / norms if norms else dot

  scores = []
  for key, refs in gts.items():
    hyp = res[key][0]
    total = 0.0
    for ref in refs:
      penalty = math.exp(-((len(hyp.split()) - len(ref.split())) ** 2) / (2 * sigma ** 2))
      total += sum(cosine(vec(hyp, k), vec(ref, k)) for k in range(1, n + 1)) / n * penalty
    scores.append(10.0 * total / len(refs))
  return sum(scores) / len(scores)


def test_cider_d_hand_computed():
  # Two images, vocabulary disjoint between them, so every n-gram has df = 1, idf = log 2.
  # img a: "dog runs" vs "dog runs": cosine 1 for n = 1, 2; no 3-, 4-grams -> 10 * 2/4 = 5.
  # img b: "cat" vs "cat sleeps": unigram cosine log2^2 / (log2 * sqrt(2) log2) = 1/sqrt(2),
  #   no bigram in the hypothesis; length difference 1 -> penalty exp(-1 / 72).
  #   -> 10 * (1/sqrt(2)) / 4 * exp(-1/72).
  expected = (5.0 + 2.5 / math.sqrt(2) * math.exp(-1 / 72)) / 2
  score = cm.cider_d({"a": ["Dog runs."], "b": ["cat sleeps"]}, {"a": "dog runs", "b": "Cat"})
  assert score == pytest.approx(expected, rel=1e-9)


def test_cider_d_perfect_disjoint_and_reference():
  refs = {"a": ["a dog runs on grass"] * 3, "b": ["two cats sleep on a sofa"] * 3}
  # Each hypothesis equals its references: cosine 1 for every n. The n-grams both images
  # share ("a", "on") get idf log(2/2) = 0 and drop out of both vectors, cosine still 1.
  assert cm.cider_d(refs, {k: v[0] for k, v in refs.items()}) == pytest.approx(10.0)
  assert cm.cider_d(refs, {"a": "purple elephants", "b": "green trucks"}) == 0.0
  # One image alone: every reference n-gram has idf log(1/1) = 0 -> 0, the library's way.
  assert cm.cider_d({"a": ["a dog"]}, {"a": "a dog"}) == 0.0
  # A fuller corpus against the from-the-definition reference.
  gts = {k: [cm.coco_tokenize(r) for r in v] for k, v in CORPUS_REFS.items()}
  res = {k: [cm.coco_tokenize(p)] for k, p in CORPUS_PREDS.items()}
  expected = _cider_d_reference(gts, res)
  assert 0.3 < expected < 5
  assert cm.cider_d(CORPUS_REFS, CORPUS_PREDS) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- ROUGE-L
def test_rouge_l_hand_computed_lcs_f_measure():
  # LCS("the cat sat on the mat", "the cat on the mat sat") = "the cat on the mat" = 5 of 6.
  assert cm.rouge_l([["The cat sat on the mat."]], ["the cat on the mat sat"]) == \
      pytest.approx(5 / 6)
  # "cat the" vs "the cat sat": LCS 1, P = 1/2, R = 1/3, F = 2PR / (P + R) = 0.4.
  assert cm.rouge_l(["the cat sat"], ["cat the"]) == pytest.approx(0.4)
  # The best reference counts (1.0 from the second), averaged with a 0 -> 0.5.
  assert cm.rouge_l({1: ["x y", "cat the"], 2: ["dog"]}, {1: "cat the", 2: "bird"}) == \
      pytest.approx(0.5)
  scores = cm.caption_scores(CORPUS_REFS, CORPUS_PREDS)
  assert set(scores) == {"BLEU-4", "CIDEr-D", "ROUGE-L"} and 0 < scores["ROUGE-L"] < 1


def test_caption_inputs_are_checked():
  with pytest.raises(ValueError, match="ids without a prediction \\['b'\\]"):
    cm.bleu4({"a": ["x"], "b": ["y"]}, {"a": "x"})
  with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
    cm.cider_d([["x"]], ["x", "y"])
  with pytest.raises(ValueError, match="both as"):
    cm.rouge_l({"a": ["x"]}, ["x"])
  with pytest.raises(ValueError, match="non-empty list of strings"):
    cm.bleu4({"a": []}, {"a": "x"})
  with pytest.raises(ValueError, match="tokenizer='moses' is not one of"):
    cm.bleu4(["x"], ["x"], tokenizer="moses")


# ---------------------------------------------------------------- VQA (official rules)
@pytest.mark.parametrize("raw, normal", [
    ("Two dogs", "2 dogs"),            # number word -> digit, lowercase
    ("Yes.", "yes"),                   # a period not before a digit goes
    ("2.5", "2.5"), ("3.5.", "3.5"),   # ... one before a digit stays
    ("1,000", "1000"),                 # digit,digit anywhere: every mark deleted, no space
    ("15,5 and a-b", "155 and ab"),
    ("red, white", "red white"),       # a mark next to a space is deleted
    ("red,white", "red white"),        # otherwise it becomes a space
    ("A T-Shirt", "t shirt"),          # the article goes after the hyphen split
    ("what is it?", "what is it"), ("yes!!!", "yes"),
    ("dont", "don't"), ("Dont", "don't"),  # contraction table, matched after lowercasing
    ("Im", "im"),                      # its capitalised keys never match (as in vqaEval.py)
    ("man's", "man's"), ("10:30", "10:30"), ("$5.00", "$5.00"),  # ' : $ are kept
    ("a.m.", "am"), ("The One", "1"), ("none", "0"),
    (" two\tdogs\n", "2 dogs"),
    ("." * 33, "."),                   # periodStrip.sub(.., re.UNICODE): count = 32
])
def test_normalize_vqa_answer_official_rules(raw, normal):
  assert metrics.normalize_vqa_answer(raw) == normal


def test_vqa_score_leave_one_out():
  # m matching answers of 10: the m matching annotators see m-1 others, the rest see m.
  for m, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
    answers = ["2"] * m + ["3"] * (10 - m)
    assert metrics.vqa_score("Two", answers) == pytest.approx(expected), m
  # References are normalised like the prediction by default ...
  assert metrics.vqa_score("Yes", ["Yes."] * 10) == 1.0
  assert metrics.vqa_score("two", ["two"] * 8 + ["2"] * 2) == 1.0
  # ... or as vqaEval.py does: unanimous references untouched, else punctuation only.
  assert metrics.vqa_score("Yes", ["Yes"] * 10, official_references=True) == 0.0
  assert metrics.vqa_score("yes", ["yes"] * 10, official_references=True) == 1.0
  assert metrics.vqa_score("two", ["two"] * 8 + ["2"] * 2, official_references=True) == \
      pytest.approx(0.6)
  assert metrics.vqa_accuracy(["Two", "no"], [["2"] * 10, ["yes"] * 10]) == 0.5


# ---------------------------------------------------------------- SQuAD EM / F1
def test_squad_normalisation_exact_match_and_f1():
  assert metrics.normalize_squad_answer("The Eiffel-Tower!") == "eiffeltower"
  assert metrics.normalize_squad_answer("  An  apple,  a  day ") == "apple day"
  assert metrics.exact_match("the Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0
  assert metrics.exact_match("Denver", ["Denver Broncos"]) == 0.0
  # [cat, sat] vs [cat, sat, down]: P = 1, R = 2/3 -> F1 = 0.8.
  assert metrics.token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
  # Bag of words with counts: [cat]*3 vs [cat]*2 -> P = 2/3, R = 1 -> 0.8.
  assert metrics.token_f1("the cat cat cat", "cat cat") == pytest.approx(0.8)
  # The best reference: "red" gives P = 1/2, R = 1 -> 2/3; "green" gives 0.
  assert metrics.token_f1("blue red", ["green", "red"]) == pytest.approx(2 / 3)
  # No-answer, SQuAD 2.0's rule (an explicit option): F1 is 1 if both are empty after
  # normalisation, else 0. The default, evaluate-v1.1.py, gives 0 (test below).
  assert metrics.token_f1("", "", squad_version="2.0") == 1.0
  assert metrics.token_f1("the", "a", squad_version="2.0") == 1.0
  assert metrics.token_f1("", "x") == 0.0 == metrics.token_f1("", "x", squad_version="2.0")
  assert metrics.mean_exact_match(["a", "b"], ["A.", "c"]) == 0.5
  assert metrics.mean_token_f1(["the cat sat", "x"], [["a cat sat down"], ["x"]]) == \
      pytest.approx(0.9)
  with pytest.raises(ValueError, match="at least one reference"):
    metrics.token_f1("x", [])


# ---------------------------------------------------------------- issue 21: official versions
def _v11_f1_reference(prediction, ground_truth):
  """evaluate-v1.1.py's f1_score, restated step by step (written for this test)."""
  def normalize(text):
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())
  pred, gold = normalize(prediction).split(), normalize(ground_truth).split()
  num_same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if num_same == 0:
    return 0
  precision, recall = num_same / len(pred), num_same / len(gold)
  return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("prediction, reference", [("the", "a"), ("", ""), (".", "!"),
                                                   ("An!", "the ."), ("", "the")])
def test_squad_f1_is_evaluate_v11_where_answers_normalise_to_nothing(prediction, reference):
  """evaluate-v1.1.py gives 0 when no token is shared, empty answers included; these were
  1.0 before (the v2.0 rule), which stays available as squad_version='2.0'."""
  assert metrics.token_f1(prediction, [reference]) == 0.0 == \
      _v11_f1_reference(prediction, reference)
  assert metrics.token_f1(prediction, [reference], squad_version="2.0") == 1.0
  assert metrics.mean_token_f1([prediction], [[reference]]) == 0.0


def test_squad_f1_matches_the_v11_reference_on_random_answers():
  rng = random.Random(0)
  words = ["the", "a", "an", "cat", "Cat", "sat", "mat.", "!", "on", "-", "Denver", ""]
  for _ in range(500):
    prediction = " ".join(rng.choices(words, k=rng.randint(0, 4)))
    references = [" ".join(rng.choices(words, k=rng.randint(0, 4)))
                  for _ in range(rng.randint(1, 3))]
    expected = max(_v11_f1_reference(prediction, r) for r in references)
    assert metrics.token_f1(prediction, references) == pytest.approx(expected), \
        (prediction, references)


def test_squad_v20_drops_empty_references_unless_all_are():
  # v1.1 compares with every reference: "" equals normalised "the".
  assert metrics.exact_match("", ["the", "cat"]) == 1.0
  # v2.0 drops the reference that normalises to '' (it has a real answer, "cat").
  assert metrics.exact_match("", ["the", "cat"], squad_version="2.0") == 0.0
  assert metrics.exact_match("", ["the", "a"], squad_version="2.0") == 1.0  # unanswerable
  assert metrics.mean_exact_match(["", "cat"], [["the", "cat"], ["cat"]],
                                  squad_version="2.0") == 0.5
  with pytest.raises(ValueError, match="squad_version='3'"):
    metrics.token_f1("x", "x", squad_version="3")


@pytest.mark.parametrize("prediction, answers, score_2016, score_2021", [
    # Identical answers: 2016 normalises the prediction only; 2021 processes nothing.
    ("two", ["2"] * 10, 1.0, 0.0),
    ("Yes", ["Yes"] * 10, 0.0, 1.0),
    ("yes.", ["yes"] * 10, 1.0, 0.0),
    # Differing answers: 2016 runs only processPunctuation on them (case and articles
    # stay); 2021 runs the full normalisation on answers and prediction.
    ("dog", ["The Dog"] * 4 + ["cat"] * 6, 0.0, 1.0),
    ("2", ["two"] * 3 + ["2"] * 1 + ["3"] * 6, 0.3, 1.0),
    # Same under both.
    ("2", ["2"] * 3 + ["3"] * 7, 0.9, 0.9),
])
def test_vqa_eval_versions_differ_where_the_scripts_do(prediction, answers, score_2016,
                                                        score_2021):
  assert metrics.vqa_score(prediction, answers, official_references=True) == \
      pytest.approx(score_2016)
  assert metrics.vqa_score(prediction, answers, official_references=True,
                           vqa_eval="2016") == pytest.approx(score_2016)
  assert metrics.vqa_score(prediction, answers, official_references=True,
                           vqa_eval="2021") == pytest.approx(score_2021)
  assert metrics.vqa_accuracy([prediction], [answers], official_references=True,
                              vqa_eval="2021") == pytest.approx(score_2021)


def test_vqa_eval_version_is_checked():
  with pytest.raises(ValueError, match="vqa_eval='master'"):
    metrics.vqa_score("x", ["x"], official_references=True, vqa_eval="master")
  with pytest.raises(ValueError, match="official_references=True"):
    metrics.vqa_score("x", ["x"], vqa_eval="2021")
