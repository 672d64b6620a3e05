r"""Which text prefix joins the image span: random vs length_aware vs saliency on the digits
vision-language rows, at equal steps, scored by held-out loss and zero- / 4-shot / finetuned VQA.

  python experiments/reproduce.py --table=metalm_vl_spans --seed=0

Stages, per strategy S in (random, length_aware, saliency):
  pretrain_S  METALM vision-language pretraining on the bundled digits_vl
              (configs/metalm_vl.py size=tiny spans=S, 600 steps), where S picks how many text
              tokens join the image in the encoder span (`masking.prefix_length`)
  vqa_S       VQA finetuning from pretrain_S (250 steps, the same for every strategy)
The held-out loss uses random prefixes for every strategy; the VQA evaluators put the whole
question in the encoder, as always. pretrain_random and vqa_random are the metalm_digits
table's metalm_pretrain and metalm_vqa stages (same configs and seed).

Arguments: runlocal=1 (the stages' runlocal configs at size=test), seed=N (every stage's
config.seed; run several seeds for intervals).
"""
import ml_collections

from metalm_jax import config as config_lib

STRATEGIES = ("random", "length_aware", "saliency")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args, suffix, seed = config_lib.seeded_table_args(arg)
  size = "test" if args["runlocal"] == "1" else "tiny"
  t = config_lib.table_spec(
      "metalm_vl_spans", title="METALM vision-language: which text prefix joins the image span",
      note=f"configs/metalm_vl.py size={size}, seed {args['seed']}; accuracy in %",
      generated="", bundled=("digits_vl",), data_subdir="")
  rows = []
  for s in STRATEGIES:
    t.stages[f"pretrain_{s}"] = dict(config=f"metalm_vl:size={size},spans={s}{suffix}",
                                     init_from="", overrides=seed)
    rows.append(dict(task=f"{s}: pretraining", metric="held-out loss", paper="-",
                     stage=f"pretrain_{s}", eval="eval", scalars="loss", scale=1.0))
    t.stages[f"vqa_{s}"] = dict(config=f"metalm_vl:size={size},stage=finetune{suffix}",
                                init_from=f"pretrain_{s}", overrides=seed)
    rows += [dict(task=f"{s}: {setting}", metric="VQA accuracy (%)", paper="-",
                  stage=stage, eval=evaluator, scalars="accuracy", scale=100.0)
             for setting, stage, evaluator in (("zero-shot", f"pretrain_{s}", "vqa"),
                                               ("4-shot", f"pretrain_{s}", "vqa_fewshot"),
                                               ("finetuned", f"vqa_{s}", "vqa"))]
  t.rows = rows
  return t
