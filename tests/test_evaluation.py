"""Tests for metalm_jax.evaluation: answer normalisation, VQA accuracy, prompts, harness."""
import numpy as np
import pytest

from metalm_jax.evaluation import harness
from metalm_jax.evaluation import metrics
from metalm_jax.data import prompts
from metalm_jax.data.prompts import Segment


def _example(i, task="vqa", question="which digit is this?", answer="seven", num_images=1):
  image = np.full((8, 8, 1), i, np.uint8)
  return {"task": task.encode(), "question": question.encode(), "answer": answer.encode(),
          "image": image, "image2": image + 100 if num_images == 2 else np.zeros_like(image),
          "num_images": num_images, "index": i, "index2": i + 1000 if num_images == 2 else -1}


EXAMPLES = (
    [_example(i, answer=["seven", "three"][i % 2]) for i in range(6)]
    + [_example(10 + i, "nlvr2", "the two digits are the same.", ["true", "false"][i % 2], 2)
       for i in range(4)]
    + [_example(20 + i, "caption", "", "a handwritten digit one.") for i in range(3)])


@pytest.mark.parametrize("raw, normal", [
    ("The Seven.", "7"), ("  seven ", "7"), ("7", "7"), ("Yes!", "yes"),
    ("a handwritten digit one.", "handwritten digit 1"), ("2.5", "2.5"), ("odd,", "odd"),
    ("an  apple's", "apple s"),
])
def test_normalize_answer(raw, normal):
  assert metrics.normalize_answer(raw) == normal


def test_vqa_score_single_and_human_answers():
  assert metrics.vqa_score("Seven", "seven.") == 1.0
  assert metrics.vqa_score("six", "seven") == 0.0
  humans = ["yes"] * 2 + ["no"] * 8
  # leave-one-out: 2 subsets hold 1 'yes' (1/3), 8 subsets hold 2 (2/3)
  assert metrics.vqa_score("yes", humans) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
  assert metrics.vqa_score("no", humans) == 1.0
  assert metrics.vqa_accuracy(["seven", "odd"], ["7", "even"]) == 0.5
  assert metrics.accuracy([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    metrics.vqa_accuracy(["a", "b"], ["a"])


def test_zero_shot_prompts_follow_the_paper_templates():
  vqa = prompts.zero_shot_prompt(EXAMPLES[0])
  assert [s.kind for s in vqa] == ["image", "text"]
  assert vqa[1] == Segment("text", "question: which digit is this? answer:", 0)
  caption = prompts.zero_shot_prompt(EXAMPLES[-1])
  assert caption[-1].value == "Summarize this image:"
  pair = prompts.zero_shot_prompt(EXAMPLES[6])  # the statement paired with each image
  assert [s.kind for s in pair] == ["image", "text", "image", "text"]
  np.testing.assert_array_equal(pair[0].value, EXAMPLES[6]["image"])
  assert pair[1] == Segment("text", "the two digits are the same.", 0)
  np.testing.assert_array_equal(pair[2].value, EXAMPLES[6]["image2"])
  assert pair[3] == Segment("text", "question: the two digits are the same. answer:", 0)
  demo = prompts.few_shot_prompt([EXAMPLES[7]], EXAMPLES[6])[:4]
  assert [s.value for s in demo[1::2]] == ["the two digits are the same.",
                                           "question: the two digits are the same. answer: false"]
  with pytest.raises(ValueError, match="each of two images"):
    prompts.zero_shot_prompt(dict(EXAMPLES[6], num_images=1))


def test_few_shot_prompt_keeps_each_shot_separate():
  prompt = prompts.few_shot_prompt(EXAMPLES[1:3], EXAMPLES[0])
  groups = prompts.group_by_shot(prompt)
  assert [[s.kind for s in g] for g in groups] == [["image", "text"]] * 3
  assert [g[0].shot for g in groups] == [0, 1, 2]
  assert groups[0][1].value == "question: which digit is this? answer: three"
  assert groups[2][1].value == "question: which digit is this? answer:"  # query: no answer
  with pytest.raises(ValueError, match="without gaps"):
    prompts.group_by_shot([Segment("text", "x", 1)])


def test_select_shots_same_task_no_shared_image_deterministic():
  support = EXAMPLES
  query = EXAMPLES[6]  # nlvr2, images 16 and 1016
  shots = harness.select_shots(query, support, 3, rng=np.random.default_rng(0))
  assert all(s["task"] == b"nlvr2" and s["index"] != 16 for s in shots)
  again = harness.select_shots(query, support, 3, rng=np.random.default_rng(0))
  assert [s["index"] for s in shots] == [s["index"] for s in again]
  with pytest.raises(ValueError, match="Only 3 support examples"):
    harness.select_shots(query, support, 4, rng=np.random.default_rng(0))


def _oracle(prompt_batch, answers):
  """A fake model: reads the query image's pixel value (= example index) -> the answer."""
  out = []
  for prompt in prompt_batch:
    query = prompts.group_by_shot(prompt)[-1]
    out.append(answers[int(query[0].value[0, 0, 0])])
  return out


def test_evaluate_vqa_with_fake_predict_fns():
  answers = {int(ex["index"]): ex["answer"].decode() for ex in EXAMPLES}
  answers_index = {int(ex["index"]): i for i, ex in enumerate(EXAMPLES)}
  calls = []

  def oracle(batch):
    calls.append(len(batch))
    return [" " + a.upper() + "." for a in _oracle(batch, answers)]  # normalised away

  result = harness.evaluate_vqa(oracle, EXAMPLES, batch_size=5)
  assert result["accuracy"] == 1.0 and result["num_examples"] == 13
  assert calls == [5, 5, 3]
  assert result["per_task"] == {"caption": 1.0, "nlvr2": 1.0, "vqa": 1.0}

  always_true = harness.evaluate_vqa(lambda b: ["true"] * len(b), EXAMPLES)
  assert always_true["per_task"] == {"caption": 0.0, "nlvr2": 0.5, "vqa": 0.0}

  def check_shots(batch):
    for prompt in batch:
      groups = prompts.group_by_shot(prompt)
      assert len(groups) == 3  # 2 shots + query
      for demo in groups[:-1]:  # a demonstration's text ends with its own answer
        assert demo[-1].value.endswith(" " + answers[int(demo[0].value[0, 0, 0])])
      assert groups[-1][-1].value in ("Summarize this image:", prompts.VQA_TEMPLATE.format(
          q=prompts.as_text(EXAMPLES[answers_index[int(groups[-1][0].value[0, 0, 0])]]
                            ["question"])))
    return _oracle(batch, answers)

  few = harness.evaluate_vqa(check_shots, EXAMPLES, shots=2, support=EXAMPLES, seed=3)
  assert few["accuracy"] == 1.0
  assert harness.build_prompts(EXAMPLES, shots=2, support=EXAMPLES, seed=3) == \
      harness.build_prompts(EXAMPLES, shots=2, support=EXAMPLES, seed=3)


def test_evaluate_vqa_errors():
  with pytest.raises(ValueError, match="needs support="):
    harness.evaluate_vqa(lambda b: b, EXAMPLES, shots=2)
  with pytest.raises(ValueError, match="returned 0 answers for 13 prompts"):
    harness.evaluate_vqa(lambda b: [], EXAMPLES, batch_size=13)
