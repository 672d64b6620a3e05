r"""Which spans go to METALM's encoder: random vs length_aware vs saliency span selection at
equal steps, scored by pretraining loss and by the multitask text tasks after finetuning.

  python experiments/reproduce.py --table=metalm_spans --seed=0

Stages, per strategy S in (random, length_aware, saliency) (experiments/train.py runs of
configs/metalm_multitask.py size=tiny, on the bundled pydoc_topics corpus and the generated
pydoc_tasks SQuAD / BoolQ / CNN-DM-format files):
  pretrain_S  semi-causal LM pretraining with config.spans.strategy = S
  finetune_S  the task mixture from pretrain_S (the same for every strategy)
The held-out loss of every pretraining stage uses random spans (comparable across strategies).

Arguments: runlocal=1 (the stages' runlocal configs at size=test), seed=N (every stage's
config.seed; run several seeds for intervals).
"""
import ml_collections

from metalm_jax import config as config_lib

STRATEGIES = ("random", "length_aware", "saliency")
multitask = config_lib.config_module("metalm_multitask")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args, suffix, seed = config_lib.seeded_table_args(arg)
  size = "test" if args["runlocal"] == "1" else "tiny"
  t = config_lib.table_spec(
      "metalm_spans", title="METALM span selection: random vs length_aware vs saliency",
      note=f"configs/metalm_multitask.py size={size}, seed {args['seed']}",
      generated="pydoc_tasks", bundled=("pydoc_topics",), data_subdir="")
  rows = []
  for s in STRATEGIES:
    t.stages[f"pretrain_{s}"] = dict(
        config=f"metalm_multitask:size={size},stage=pretrain{suffix}", init_from="",
        overrides=seed + (("spans.strategy", s),))
    t.stages[f"finetune_{s}"] = dict(config=f"metalm_multitask:size={size}{suffix}",
                                     init_from=f"pretrain_{s}", overrides=seed)
    rows.append(dict(task=f"{s}: pretraining", metric="held-out perplexity", paper="-",
                     stage=f"pretrain_{s}", eval="eval", scalars="perplexity", scale=1.0))
    rows += multitask.task_rows(s, f"finetune_{s}")
  t.rows = rows
  return t
