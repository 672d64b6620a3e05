r"""METALM multitask language finetuning: the tasks, the model and the schedule of the table.

  python experiments/reproduce.py --table=metalm_multitask --tiny   # CI-sized, bundled data
  python experiments/metalm_multitask.py --size=tiny --workdir=workdirs/metalm_multitask

`get_config("size=...")` is the model / optimizer config (a configs/metalm_lm.py METALM with
span room for the task inputs); `TASKS` lists the datasets of the mixture with their metric,
and `SCHEDULES[size]` the steps and lengths. The paper (Hao et al. 2022) finetunes the
pretrained 1.3B METALM on a mixture of 34 NLU / NLG datasets and scores exact match, F1 and
ROUGE with beam 4 and length penalty 0.6. The datasets here are the ones this repository
builds from their official files (`metalm_jax/data/text_tasks.py`): one reading-comprehension
(SQuAD v1.1: EM / F1), four SuperGLUE classification tasks (BoolQ, CB, RTE, COPA: accuracy)
and one summarisation task (CNN / DailyMail: ROUGE-L). Adding a dataset is one `TASKS`
entry plus a builder that yields {inputs, targets, references}.

size=tiny runs on `text_tasks.write_pydoc_task_files`: SQuAD-, BoolQ- and CNN/DM-format files
generated from Python's bundled help pages (the same builders and the same code path, on
data a tiny model can learn in minutes). size=paper is the paper's model shape; it needs a
pretrained METALM checkpoint and the official datasets (docs/reproducing.md).
"""
import ml_collections

from metalm_jax import config as config_lib

metalm_lm = config_lib.config_module("metalm_lm")

# task -> (dataset 'name[/config]', metric, the paper's number or None when not reported
# for this dataset on its own).
TASKS = {
    "squad_v1": dict(dataset="squad_v1", metric="exact_match_f1", paper=None),
    "boolq": dict(dataset="superglue/boolq", metric="accuracy", paper=None),
    "cb": dict(dataset="superglue/cb", metric="accuracy", paper=None),
    "rte": dict(dataset="superglue/rte", metric="accuracy", paper=None),
    "copa": dict(dataset="superglue/copa", metric="accuracy", paper=None),
    "cnn_dailymail": dict(dataset="cnn_dailymail", metric="rouge_l", paper=None),
}
# The tasks `write_pydoc_task_files` generates for size=tiny.
TINY_TASKS = ("squad_v1", "boolq", "cnn_dailymail")
METRICS = ("exact_match_f1", "accuracy", "rouge_l")

SCHEDULES = {
    # seq_len: decoder row; max_input_tokens: the prompt's share ([BOS] + input, cut there);
    # max_span_len: tokens per encoder span (the prompt takes ceil(input / span) spans).
    # tiny: the whole prompt is one span (as the paper's 512-token encoder holds an input);
    # two spans of 48 tokens did worse (SQuAD EM 9.4 after 100 + 700 steps; one span: 15.6
    # after 100 + 500).
    "tiny": dict(seq_len=128, max_input_tokens=96, max_span_len=96, batch=16,
                 pretrain_steps=100, finetune_steps=400, lr=3e-3, mixing_cap=3000,
                 eval_limit=64),
    "paper": dict(seq_len=2048, max_input_tokens=1536, max_span_len=512, batch=256,
                  pretrain_steps=0, finetune_steps=20_000, lr=1e-4, mixing_cap=3000,
                  eval_limit=0),
}


def get_config(arg: str | None = None, schedule: dict | None = None
               ) -> ml_collections.ConfigDict:
  """configs/metalm_lm.py at `size` with the multitask schedule (`schedule` overrides
  SCHEDULES[size] keys) and span room for its `max_span_len`."""
  args = config_lib.parse_config_args(arg, size="tiny")
  if args["size"] not in SCHEDULES:
    raise ValueError(f"size={args['size']!r}; valid sizes: {sorted(SCHEDULES)}")
  s = dict(SCHEDULES[args["size"]], **(schedule or {}))
  config = metalm_lm.get_config(f"size={args['size']}")
  with config.unlocked():
    config.model.max_span_len = s["max_span_len"]
    config.model.text_encoder.max_len = max(config.model.text_encoder.max_len,
                                            s["max_span_len"] + 1)
    config.data.seq_len = s["seq_len"]
    config.batch_size = s["batch"]
    config.optimizer.learning_rate = s["lr"]
  return config
