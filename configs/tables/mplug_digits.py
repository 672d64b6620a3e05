r"""mPLUG on the bundled digits (docs/results.md): retrieval, zero-shot captioning, and VQA
finetuned from pretraining vs from scratch.

  python experiments/reproduce.py --table=mplug_digits

Stages (experiments/train.py runs of configs/mplug.py size=tiny):
  pretrain     ITC + ITM + MLM + PrefixLM on the train split's image-caption pairs (pair ids =
               the digit, so the duplicates of the 10 captions are positives); evaluated by
               retrieval (ITC, then the top k_test re-ranked by ITM) and zero-shot captioning
  vqa          VQA finetuning from pretrain; generation and answer-list ranking
  vqa_scratch  the same finetuning from random initialisation: what pretraining buys

Arguments: runlocal=1 (the stages' smoke-run configs), seed=N (every stage's config.seed).
"""
import ml_collections

from metalm_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args, suffix, seed = config_lib.seeded_table_args(arg)
  t = config_lib.table_spec(
      "mplug_digits", title="mPLUG on digits_vl (test split)",
      note=f"configs/mplug.py size=tiny, seed {args['seed']}; in %",
      generated="", bundled=("digits_vl",), data_subdir="")
  t.stages.pretrain = dict(config=f"mplug:stage=pretrain{suffix}", init_from="", overrides=seed)
  t.stages.vqa = dict(config=f"mplug:stage=vqa{suffix}", init_from="pretrain", overrides=seed)
  t.stages.vqa_scratch = dict(config=f"mplug:stage=vqa{suffix}", init_from="", overrides=seed)
  row = lambda task, metric, stage, ev, keys: dict(task=task, metric=metric, paper="-",
                                                   stage=stage, eval=ev, scalars=keys, scale=100.0)
  recall = "R@1 / R@5 / R@10"
  t.rows = [
      row("image-to-text retrieval (ITC)", recall, "pretrain", "retrieval",
          "itc_i2t_R1,itc_i2t_R5,itc_i2t_R10"),
      row("image-to-text retrieval (ITC + ITM)", recall, "pretrain", "retrieval",
          "i2t_R1,i2t_R5,i2t_R10"),
      row("text-to-image retrieval (ITC)", recall, "pretrain", "retrieval",
          "itc_t2i_R1,itc_t2i_R5,itc_t2i_R10"),
      row("text-to-image retrieval (ITC + ITM)", recall, "pretrain", "retrieval",
          "t2i_R1,t2i_R5,t2i_R10"),
      row("zero-shot captioning", "exact match", "pretrain", "zero_shot_caption", "exact_match"),
      row("zero-shot captioning", "CIDEr-D (x100)", "pretrain", "zero_shot_caption", "cider_d"),
      row("VQA, pretrained + finetuned", "generation", "vqa", "vqa",
          "accuracy"),
      row("VQA, pretrained + finetuned", "answer ranking", "vqa", "vqa_rank", "accuracy"),
      row("VQA, finetuned from scratch", "generation", "vqa_scratch", "vqa", "accuracy"),
      row("VQA, finetuned from scratch", "answer ranking", "vqa_scratch", "vqa_rank",
          "accuracy"),
  ]
  return t
