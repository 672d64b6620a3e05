"""metalm_jax.evaluation: answer metrics, zero/few-shot prompts, the evaluators of
`config.evals` (`evaluators`: registry and 'loss'; `task_evaluators`: 'vqa', 'captioning',
'nlvr2', 'retrieval', 'text_tasks') and a model-agnostic harness.

    from metalm_jax import evaluation
    result = evaluation.evaluate_vqa(predict_fn, examples, shots=4, support=train_examples)

Metrics: `vqa_score` / `vqa_accuracy` (the official VQA normalisation and 10-annotator
accuracy), `exact_match` / `token_f1` (SQuAD), `accuracy`, `retrieval_recall` (R@k), and
corpus-level caption metrics `bleu4`, `cider_d` (pycocoevalcap) and `rouge_l` (rouge-score).

`predict_fn(prompts) -> answers` receives prompts as lists of `Segment`s (image or text,
each tagged with its shot), so each demonstration can be encoded separately.
"""
from metalm_jax.evaluation.caption_metrics import bleu4
from metalm_jax.evaluation.caption_metrics import caption_scores
from metalm_jax.evaluation.caption_metrics import cider_d
from metalm_jax.evaluation.caption_metrics import coco_tokenize
from metalm_jax.evaluation.caption_metrics import rouge_l
from metalm_jax.evaluation.harness import build_prompts
from metalm_jax.evaluation.harness import evaluate_vqa
from metalm_jax.evaluation.harness import select_shots
from metalm_jax.evaluation.metrics import accuracy
from metalm_jax.evaluation.metrics import exact_match
from metalm_jax.evaluation.metrics import mean_exact_match
from metalm_jax.evaluation.metrics import mean_token_f1
from metalm_jax.evaluation.metrics import normalize_answer
from metalm_jax.evaluation.metrics import normalize_squad_answer
from metalm_jax.evaluation.metrics import normalize_vqa_answer
from metalm_jax.evaluation.metrics import retrieval_recall
from metalm_jax.evaluation.metrics import token_f1
from metalm_jax.evaluation.metrics import vqa_accuracy
from metalm_jax.evaluation.metrics import vqa_score
from metalm_jax.data.prompts import CAPTION_PROMPT
from metalm_jax.data.prompts import VQA_TEMPLATE
from metalm_jax.data.prompts import Segment
from metalm_jax.data.prompts import few_shot_prompt
from metalm_jax.data.prompts import group_by_shot
from metalm_jax.data.prompts import zero_shot_prompt
from metalm_jax.evaluation import evaluators  # noqa: E402  (the registry)
from metalm_jax.evaluation import task_evaluators  # noqa: E402,F401  (registers its types)
