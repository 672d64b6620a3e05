"""metalm_jax.evaluation: answer metrics, zero/few-shot prompts and a model-agnostic harness.

    from metalm_jax import evaluation
    result = evaluation.evaluate_vqa(predict_fn, examples, shots=4, support=train_examples)

`predict_fn(prompts) -> answers` receives prompts as lists of `Segment`s (image or text,
each tagged with its shot), so each demonstration can be encoded separately.
"""
from metalm_jax.evaluation.harness import build_prompts
from metalm_jax.evaluation.harness import evaluate_vqa
from metalm_jax.evaluation.harness import select_shots
from metalm_jax.evaluation.metrics import accuracy
from metalm_jax.evaluation.metrics import normalize_answer
from metalm_jax.evaluation.metrics import retrieval_recall
from metalm_jax.evaluation.metrics import vqa_accuracy
from metalm_jax.evaluation.metrics import vqa_score
from metalm_jax.evaluation.prompts import CAPTION_PROMPT
from metalm_jax.evaluation.prompts import VQA_TEMPLATE
from metalm_jax.evaluation.prompts import Segment
from metalm_jax.evaluation.prompts import few_shot_prompt
from metalm_jax.evaluation.prompts import group_by_shot
from metalm_jax.evaluation.prompts import zero_shot_prompt
