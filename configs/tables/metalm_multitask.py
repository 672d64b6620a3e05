r"""The METALM multitask language table: SQuAD EM / F1, SuperGLUE accuracy, CNN/DM ROUGE-L.

  python experiments/reproduce.py --table=metalm_multitask --tiny   # generated tasks
  python experiments/reproduce.py --table=metalm_multitask --data_dir=$DATA \
      --pretrained=<the workdir of your configs/metalm_lm.py:size=paper run>  # official tasks

Stages (experiments/train.py runs of configs/metalm_multitask.py):
  pretrain  (tiny) semi-causal LM on the bundled pydoc_topics corpus
  finetune  the task mixture from pretrain (full size: from `pretrained`, a METALM language
            model you pretrained: the paper pretrains on the Pile, which is not here, and no
            weights are downloaded); each task's validation examples decoded and scored

Arguments: tiny=1 (CI-sized, on the generated pydoc_tasks collection), runlocal=1 (the stages'
runlocal configs at size=test), pretrained=<workdir> (full size: the METALM to finetune).
"""
import ml_collections

from metalm_jax import config as config_lib

NAMES = {"exact_match": "exact match", "f1": "F1", "accuracy": "accuracy",
         "rouge_l": "ROUGE-L F1"}
METRICS = {"squad_v1": ("exact_match", "f1"), "boolq": ("accuracy",), "cb": ("accuracy",),
           "rte": ("accuracy",), "copa": ("accuracy",), "cnn_dailymail": ("rouge_l",)}
GENERATED = ("squad_v1", "boolq", "cnn_dailymail")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, tiny="0", runlocal="0", pretrained="")
  tiny, runlocal = args["tiny"] == "1", args["runlocal"] == "1"
  size = "test" if runlocal else "tiny" if tiny else "paper"
  if not tiny and not runlocal and not args["pretrained"]:
    raise ValueError(
        "metalm_multitask at full size finetunes a METALM language model you pretrained: "
        "pass --pretrained=<the experiments/train.py workdir of configs/metalm_lm.py:"
        "size=paper> (the paper pretrains on the Pile, which is not here; no weights are "
        "downloaded), with the task datasets squad_v1, superglue/{boolq,cb,rte,copa} and "
        "cnn_dailymail prepared in --data_dir (docs/reproducing.md). --tiny runs the whole "
        "path on generated data.")
  suffix = ",runlocal=1" if runlocal else ""
  t = config_lib.table_spec(
      "metalm_multitask", title="metalm_multitask" + (" (--tiny)" if tiny else ""),
      note=("--tiny: SQuAD / BoolQ / CNN-DM-format tasks generated from Python's help pages; "
            "'ours' measures this code path, not the paper's benchmark" if tiny else
            "6 of the paper's 34 datasets; greedy at tiny size, beam 4 / length penalty 0.6 "
            "at paper size"),
      generated="pydoc_tasks" if tiny else "", bundled=("pydoc_topics",), data_subdir="")
  if args["pretrained"]:
    t.stages.finetune = dict(config=f"metalm_multitask:size={size}{suffix}", init_from="",
                             init_from_path=args["pretrained"], overrides=())
  else:
    t.stages.pretrain = dict(config=f"metalm_multitask:size={size},stage=pretrain{suffix}",
                             init_from="", overrides=())
    t.stages.finetune = dict(config=f"metalm_multitask:size={size}{suffix}",
                             init_from="pretrain", overrides=())
  t.rows = [dict(task=task, metric=NAMES[m], paper="- (in the 34-dataset mixture, see paper)",
                 stage="finetune", eval="tasks", scalars=f"{task}/{m}", scale=1.0)
            for task in (GENERATED if tiny else METRICS) for m in METRICS[task]]
  return t
