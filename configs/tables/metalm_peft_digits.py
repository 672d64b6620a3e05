r"""Full finetuning vs LoRA vs BitFit of a pretrained METALM on the bundled digits VQA task
(docs/results.md): accuracy, trainable parameters, optimizer-state bytes and step time.

  python experiments/reproduce.py --table=metalm_peft_digits --seed=0

Stages (experiments/train.py runs of configs/metalm_vl.py size=tiny, the METALM model):
  pretrain  semi_causal_vl pretraining (as metalm_digits' metalm_pretrain)
  full      VQA finetuning from pretrain, every parameter trained
  lora      the same finetuning with LoRA (config.peft: rank 8, alpha 16, the attention and
            MLP projection kernels; the base frozen)
  bitfit    the same finetuning with BitFit (biases and norms only)
The trainer's log names each stage's trainable parameters and optimizer-state bytes
(`peft ...` line); step times are in each stage's metrics.jsonl.

Arguments: runlocal=1 (the stages' smoke-run configs), seed=N (every stage's config.seed).
"""
import ml_collections

from metalm_jax import config as config_lib

METHODS = {"full": "", "lora": "lora", "bitfit": "bitfit"}
LABELS = {"full": "full finetuning", "lora": "LoRA (r 8)", "bitfit": "BitFit"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args, suffix, seed = config_lib.seeded_table_args(arg)
  t = config_lib.table_spec(
      "metalm_peft_digits",
      title="METALM finetuning on digits_vl VQA: full vs LoRA vs BitFit (test split)",
      note=f"configs/metalm_vl.py size=tiny, seed {args['seed']}; accuracy in %",
      generated="", bundled=("digits_vl",), data_subdir="")
  t.stages["pretrain"] = dict(config=f"metalm_vl:model=metalm{suffix}", init_from="",
                              overrides=seed)
  rows = [dict(task="METALM pretrained, zero-shot", metric="VQA accuracy (%)", paper="-",
               stage="pretrain", eval="vqa", scalars="accuracy", scale=100.0)]
  for name, peft in METHODS.items():
    extra = f",peft={peft}" if peft else ""
    t.stages[name] = dict(config=f"metalm_vl:model=metalm,stage=finetune{extra}{suffix}",
                          init_from="pretrain", overrides=seed)
    rows.append(dict(task=f"{LABELS[name]}", metric="VQA accuracy (%)", paper="-",
                     stage=name, eval="vqa", scalars="accuracy", scale=100.0))
  t.rows = rows
  return t
