r"""METALM (semi-causal) vs an equal-size causal-only baseline on the bundled digits
(docs/results.md): zero-shot, 4-shot and finetuned VQA.

  python experiments/reproduce.py --table=metalm_digits

Stages (experiments/train.py runs of configs/metalm_vl.py size=tiny, the same model):
  metalm_pretrain  semi_causal_vl: the encoder sees the images + a random-length text prefix
  causal_pretrain  causal_vl: the encoder sees the images alone, all text causal
  metalm_vqa       VQA finetuning from metalm_pretrain (images + prompt in the encoder)
  causal_vqa       VQA finetuning from causal_pretrain (prompt causal)
Every pretraining stage is evaluated zero-shot and 4-shot (demonstrations with the query's
question, each its own span) on the test split's VQA questions; every finetune on the same.

Arguments: runlocal=1 (the stages' smoke-run configs), seed=N (every stage's config.seed).
"""
import ml_collections

from metalm_jax import config as config_lib

MODELS = {"metalm": "METALM (semi-causal)", "causal": "causal-only baseline"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args, suffix, seed = config_lib.seeded_table_args(arg)
  t = config_lib.table_spec(
      "metalm_digits", title="METALM vs causal-only baseline on digits_vl (test split VQA)",
      note=f"configs/metalm_vl.py size=tiny, seed {args['seed']}; accuracy in %",
      generated="", bundled=("digits_vl",), data_subdir="")
  rows = []
  for model, label in MODELS.items():
    t.stages[f"{model}_pretrain"] = dict(config=f"metalm_vl:model={model}{suffix}", init_from="",
                                         overrides=seed)
    t.stages[f"{model}_vqa"] = dict(config=f"metalm_vl:model={model},stage=finetune{suffix}",
                                    init_from=f"{model}_pretrain", overrides=seed)
    for setting, stage, evaluator in (("zero-shot", "pretrain", "vqa"),
                                      ("4-shot", "pretrain", "vqa_fewshot"),
                                      ("finetuned", "vqa", "vqa")):
      rows.append(dict(task=f"{label} {setting}", metric="VQA accuracy (%)", paper="-",
                       stage=f"{model}_{stage}", eval=evaluator, scalars="accuracy", scale=100.0))
  t.rows = rows
  return t
