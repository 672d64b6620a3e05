"""The training config schema, and strict validation of configs against it.

Every config file starts from `base_config()`, which holds every key the trainer reads, and
locks it: a mistyped key in a config file or on the command line
(`--config.optimizer.learning_rat=1e-3`) is an error naming the key and the valid ones, never
silently ignored. `validate` checks the same for configs built by hand (notebooks), plus
value types, and checks `config.model` against the chosen model's constructor.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import ml_collections

from metalm_jax import checks
from metalm_jax import masking
from metalm_jax import models
from metalm_jax import sharding


class ConfigError(ValueError):
  """A config key or value is wrong; the message names it and how to fix it."""


# The attention (query / key / value / out) and MLP (wi / wi_gate / wo) projection kernels of
# every model family (decoder blocks, docked encoders, ViT, mPLUG's fusion and decoder layers).
LORA_DEFAULT_TARGETS = (r"(^|/)(attention|self_attention|cross_attention)/(query|key|value|out)"
                        r"/kernel$|(^|/)(mlp|ffn)/(wi|wi_gate|wo)/kernel$")
PEFT_METHODS = ("", "lora", "bitfit")


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with defaults. Config files override values only."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # The model family (metalm_jax.families): its input pipeline, extra train state, loss and
  # predictors. 'lm' (decoder / hybrid / metalm on packed documents), 'metalm_vl'
  # (vision-language rows), 'text_tasks' (METALM multitask rows), 'mplug' (image-text pairs
  # and seq2seq finetuning).
  c.family = "lm"

  c.model = ml_collections.ConfigDict()
  c.model.name = "decoder"  # models registry name; other keys are the constructor's kwargs

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "pydoc_topics"
  c.data.data_dir = ""  # "" = $METALM_DATA_DIR or ~/.cache/metalm_jax/data
  c.data.tokenizer = "sentencepiece"  # or 'byte' (zero setup)
  c.data.vocab_size = 2048  # SentencePiece vocabulary (ignored by the byte tokenizer)
  c.data.tokenizer_dataset = ""  # whose train split trains SentencePiece ('' = dataset)
  # An own-vocabulary docked text encoder (config.model.encoder_span_len > 0) reads its spans
  # in this tokenizer ('hf:<dir>'; '' = its config.model.text_encoder.init_from 'hf:' dir).
  c.data.encoder_tokenizer = ""
  c.data.seq_len = 128
  c.data.worker_count = 0  # grain worker processes; stored with the iterator state
  c.data.train_split = "train"
  c.data.eval_split = "validation"  # the split evaluators read unless they name another
  # Family-specific data keys (a family refuses a non-default value of a key it does not read):
  c.data.tasks = ()  # metalm_vl / mplug: digits tasks or 'caption' / 'vqa'; text_tasks: tasks
  c.data.image_preprocessing = ""  # metalm_vl / mplug: digits | rgb | clip ('' = the dataset's)
  c.data.max_images = 2  # metalm_vl: image slots per row (NLVR2 rows have 2)
  c.data.max_input_tokens = 96  # text_tasks: the prompt's share of a row ([BOS] + input)
  c.data.mixing_cap = 3000  # text_tasks: examples-proportional mixing cap (0 = none)
  c.data.vqa_answers = "sample"  # mplug VQA finetuning: 'sample' a human answer or 'majority'

  c.objective = "causal_lm"
  # Which spans of a row semi_causal_lm sends to the encoder (family 'lm', objective
  # 'semi_causal_lm'; metalm_jax.masking.sample_spans, docs/training.md): 'random' (uniform
  # lengths and starts), 'length_aware' (longer documents get longer spans) or 'saliency'
  # (spans centred on rare tokens: -log unigram frequency of the training split, cached beside
  # the tokenizer). Same span settings and guarantees for all three.
  c.spans = ml_collections.ConfigDict()
  c.spans.strategy = "random"
  c.spans.temperature = 0.25  # saliency: centres drawn with probability ~ exp(score / T)

  c.batch_size = 16  # global batch, split over processes and the mesh's batch axes
  c.num_train_steps = 1000
  c.log_every_steps = 20
  c.eval_every_steps = 200
  c.eval_batches = 8  # batches of the validation split per eval; 0 = the whole split
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 3
  c.nan_policy = "stop"  # non-finite loss or gradient: 'stop' naming the step (the last good
  # checkpoint is kept) or 'skip' the update (parameters unchanged) and count it
  c.deadline_minutes = 0.0  # > 0: checkpoint and stop cleanly after this much wall-clock time

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.end_lr_ratio = 0.1  # cosine decays to learning_rate * end_lr_ratio
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1  # applied to weight matrices only (ndim >= 2)
  c.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  # k > 1: average the gradients of k micro-batches (optax.MultiSteps), one update per k
  # trainer steps. Trainer steps stay micro-batches: num_train_steps, warmup_steps and the
  # log / eval / checkpoint intervals count them; num_train_steps must be a multiple of k;
  # batch_size is the micro-batch (the effective batch is batch_size * k). docs/training.md.
  c.optimizer.grad_accum_steps = 1
  # ((regex, multiplier), ...): the first regex that re.search'es a parameter's '/'-joined
  # path ('blocks/0/mlp/wo/kernel') scales its whole AdamW update (weight decay included).
  c.optimizer.lr_multipliers = ()
  # (regex, ...): matching parameters get zero updates, no weight decay, no optimizer state.
  # A regex matching no parameter is an error (listing real paths) when the trainer starts.
  c.optimizer.freeze = ()

  # Start from the params of another run (pretrain -> finetune): a train.py workdir, its
  # checkpoints/ folder or a step folder. Params only; applied when the workdir has no
  # checkpoint of its own yet. `rename`: ((regex, replacement), ...) applied to the source
  # run's '/'-joined param paths; `skip`: regexes of this model's params that keep their
  # fresh init (e.g. a new head). Any other mismatch is an error naming every param.
  c.init_from = ml_collections.ConfigDict()
  c.init_from.checkpoint = ""
  c.init_from.step = 0  # 0 = the latest
  c.init_from.rename = ()
  c.init_from.skip = ()

  # Parameter-efficient finetuning (metalm_jax/train/peft.py, docs/training.md): '' (off),
  # 'lora' (frozen base; trained low-rank factors beside each target kernel: kernel +
  # alpha / rank * A @ B) or 'bitfit' (only biases and norm parameters train). Frozen
  # parameters get no gradient step and no optimizer state.
  c.peft = ml_collections.ConfigDict()
  c.peft.method = ""
  c.peft.rank = 8  # lora: r, the factors' inner size
  c.peft.alpha = 16.0  # lora: the update is scaled by alpha / rank
  # lora: a regex re.search'ed in '/'-joined param paths; the kernels it matches get factors.
  c.peft.targets = LORA_DEFAULT_TARGETS
  # Checkpoints hold only the trained params (+ optimizer state, step, data position): the
  # frozen base is read again from config.init_from.checkpoint on resume and evaluation.
  c.peft.save_trainable_only = False

  # Evaluators, by name (metalm_jax.evaluation.evaluators): {'type': ..., 'every_steps': ...,
  # options}. They run every `every_steps` (0 = config.eval_every_steps, -1 = at the end only)
  # and at the last step, write to metrics.jsonl / TensorBoard under their name, and run
  # from experiments/evaluate.py too. 'eval' is the held-out loss / perplexity.
  c.evals = ml_collections.ConfigDict({"eval": {"type": "loss"}})

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = sharding.FSDP_TP_RULES

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "The "
  c.sample.max_new_tokens = 64  # 0: no sample at the end
  c.sample.temperature = 0.0  # 0 = greedy

  c.progress_bar = True
  return c


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_module(name: str):
  """`configs/<name>.py` of this checkout as a module (configs/ is a folder of files, not a
  package), e.g. `config_module("mplug").SIZES` or `.get_config("size=tiny")`."""
  path = os.path.join(CONFIGS_DIR, f"{name}.py")
  if not os.path.exists(path):
    known = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py"))
    raise ValueError(f"no config file {path}; configs: {known}")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def mplug_defaults() -> ml_collections.ConfigDict:
  """`config.mplug`: the mPLUG pretraining objective's settings (configs/mplug.py; read by
  the mplug family, metalm_jax/families/mplug.py). Only configs whose model is 'mplug' may
  have this section."""
  c = ml_collections.ConfigDict()
  # Weight of each loss in the sum; 0 switches an objective off (it is not computed).
  c.loss_weights = ml_collections.ConfigDict({"itc": 1.0, "itm": 1.0, "mlm": 1.0,
                                              "prefix_lm": 1.0})
  c.alpha = 0.4  # momentum-distillation weight of the ITC soft targets
  c.alpha_warmup_steps = 0  # > 0: alpha ramps linearly from 0 over these steps (ALBEF)
  c.momentum_decay = 0.995  # EMA decay of the momentum encoders
  c.queue_size = 65536  # ITC feature queue length (>= the global batch)
  c.mask_rate = 0.15  # MLM: fraction of caption tokens picked
  return c


def seeded_table_args(arg: str | None) -> tuple[dict[str, str], str, tuple]:
  """A seeded experiment table's arguments (tiny, runlocal, seed): (args, the stage-config
  suffix for runlocal=1, the stage overrides that set config.seed: the initialisation, data
  order and dropout seed)."""
  args = parse_config_args(arg, tiny="0", runlocal="0", seed="0")
  suffix = ",runlocal=1" if args["runlocal"] == "1" else ""
  return args, suffix, (("seed", int(args["seed"])),)


def table_spec(name: str, *, title: str, note: str = "", generated: str = "",
               bundled: tuple[str, ...] = (), data_subdir: str = "") -> ml_collections.ConfigDict:
  """The header of a paper-table config (`configs/tables/<name>.py`, `metalm_jax.tables`):
  name, title, note, the generated / bundled datasets it prepares, and empty `stages` for the
  table to fill (its `rows` too)."""
  t = ml_collections.ConfigDict()
  t.name, t.title, t.note = name, title, note
  t.generated, t.bundled, t.data_subdir = generated, tuple(bundled), data_subdir
  t.stages = ml_collections.ConfigDict()
  return t


def parse_config_args(arg: str | None, **defaults: str) -> dict[str, str]:
  """A config file's argument string: 'size=small,runlocal=1' -> {'size': 'small', ...}.

  `defaults` lists every accepted key; an unknown key or a malformed item is an error.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} must look like key=value")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    out[key] = value
  return out


def set_dotted(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  """config['a']['b']['c'] = value for dotted 'a.b.c'; a ConfigError when a key is unknown
  (an override that names no config key would otherwise do nothing)."""
  *parents, leaf = dotted.split(".")
  node = config
  for key in parents:
    if key not in node:
      raise ConfigError(f"override {dotted!r} names no config key ({key!r})")
    node = node[key]
  if leaf not in node:
    raise ConfigError(f"override {dotted!r} names no config key ({leaf!r})")
  node[leaf] = value


def set_schedule(config: ml_collections.ConfigDict, *, seq_len: int, batch: int, steps: int,
                 lr: float, test: bool = False, runlocal: bool = False) -> None:
  """The usual LM training schedule of a size variant: 5% warmup, 6 evals and checkpoints
  per run, ~10 log lines; `test` shrinks evaluation and output for the test suite, `runlocal`
  makes a 20-step smoke run."""
  config.data.seq_len = seq_len
  config.batch_size = batch
  config.num_train_steps = steps
  config.optimizer.learning_rate = lr
  config.optimizer.warmup_steps = max(1, steps // 20)
  config.eval_every_steps = max(1, steps // 6)
  config.checkpoint_every_steps = max(1, steps // 6)
  config.log_every_steps = max(1, min(20, steps // 10))
  if test:
    config.eval_batches = 2
    config.sample.max_new_tokens = 8
    config.progress_bar = False
  if runlocal:
    set_runlocal(config)


def set_runlocal(config: ml_collections.ConfigDict, *, steps: int = 6, limit: int = 8) -> None:
  """A smoke run (a config's `runlocal=1`): `steps` steps of batches of at most 8, a
  checkpoint every steps // 3, every evaluator at the end on at most `limit` examples /
  2 batches."""
  config.num_train_steps = steps
  config.batch_size = min(config.batch_size, 8)
  config.eval_every_steps = steps
  config.checkpoint_every_steps = config.log_every_steps = max(1, steps // 3)
  config.eval_batches = 2
  config.progress_bar = False
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, 1)
  config.optimizer.grad_accum_steps = 1
  if "mplug" in config:
    config.mplug.queue_size = min(config.mplug.queue_size, 64)
  for name in config.evals.keys():
    entry = config.evals[name]
    for key, small in (("limit", limit), ("support_size", 64), ("k_test", 4), ("rank_k", 4),
                       ("answer_list_size", 16)):
      if key in entry and (entry[key] == 0 or entry[key] > small):
        entry[key] = small


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates, then locks: the last line of every `get_config`."""
  validate(config)
  config.lock()
  return config


def _check_against(config, schema, prefix: str, free_keys=()):
  for key in config.keys():
    path = f"{prefix}.{key}"
    if key not in schema:
      if key in free_keys:
        continue
      raise ConfigError(f"unknown config key {path!r}.{checks.suggest(key, schema.keys())} "
                        f"Valid keys of {prefix}: {sorted(schema.keys())}")
    value, default = config[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict) and key not in ("mesh",):
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"{path} must be a section (ConfigDict), got {value!r}")
      if key not in ("model", "evals"):
        _check_against(value, default, path)
      continue
    if not checks.compatible(value, default):
      raise ConfigError(f"{path}={value!r} has type {type(value).__name__}; expected "
                        f"{type(default).__name__} (like the default {default!r})")


def model_kwargs(model_config) -> tuple[str, dict]:
  """(registry name, constructor kwargs) of `config.model`; parts docked from a pretrained
  checkpoint (`init_from` keys, `models.hf.docking`) get the checkpoint's architecture."""
  return _resolve_model(model_config)[:2]


def model_parts(model_config) -> list:
  """The parts of `config.model` that start from a pretrained checkpoint (`docking.Part`)."""
  return _resolve_model(model_config)[2]


def pretrained_kwargs(path: str, part: str, default: dict) -> dict:
  """The module kwargs of a pretrained part at `path` (a Hugging Face directory), or
  `default` (its published values) while the directory is not there yet: what a config needs
  to size the rest of the model (e.g. the image tokens a CLIP ViT gives). A missing directory
  is reported, with what to download, when the run starts (`models.hf.docking`)."""
  from metalm_jax.models import hf

  if not os.path.isfile(os.path.join(path, "config.json")):
    return dict(default)
  return hf.module_kwargs(path, part)


def pretrained_special_ids(path: str, default: dict) -> dict:
  """{'pad_id', 'bos_id', 'eos_id', ('cls_id', 'sep_id', 'mask_id')} of the Hugging Face
  tokenizer at `path`, or `default` while the directory is not there yet."""
  if not os.path.isfile(os.path.join(path, "tokenizer.json")):
    return dict(default)
  from metalm_jax.data import tokenizers

  tok = tokenizers.get_tokenizer(f"hf:{path}")
  return {k: getattr(tok, k) for k in default}


def encoder_tokenizer_kind(config) -> str:
  """The tokenizer kind of an own-vocabulary text encoder's spans (config.data.encoder_tokenizer,
  else the 'hf:' directory the encoder is docked from); '' when the encoder reads the
  decoder's ids (config.model.encoder_span_len 0 or absent)."""
  model = dict(config.model)
  kind = config.data.get("encoder_tokenizer", "")
  if not model.get("encoder_span_len"):
    if kind:
      raise ConfigError(f"config.data.encoder_tokenizer={kind!r} is read only with "
                        "config.model.encoder_span_len > 0 (an encoder with its own vocabulary); "
                        "remove it or set encoder_span_len.")
    return ""
  if kind:
    return kind
  source = dict(model.get("text_encoder") or {}).get("init_from", "")
  if source.startswith("hf:"):
    return source
  raise ConfigError("config.model.encoder_span_len > 0: the text encoder reads its own token "
                    "ids; set config.data.encoder_tokenizer ('hf:<dir>' with tokenizer.json) or "
                    "dock the encoder from 'hf:<dir>' (its tokenizer is then used).")


def _resolve_model(model_config):
  from metalm_jax.models.hf import docking  # reads config.json files: only when docking

  kwargs = dict(model_config)
  name = kwargs.pop("name")
  if not docking.has_parts(kwargs):
    return name, kwargs, []
  try:
    kwargs, parts = docking.resolve(name, kwargs)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return name, kwargs, parts


def grad_accum_steps(opt_config, num_train_steps: int | None = None) -> int:
  """`config.optimizer.grad_accum_steps`, checked: a positive int (1 = no accumulation) that
  divides `num_train_steps` (when given; trainer steps count micro-batches)."""
  k = opt_config.get("grad_accum_steps", 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"config.optimizer.grad_accum_steps={k!r} must be a positive int "
                      "(1 = no accumulation)")
  if num_train_steps is not None and num_train_steps % k:
    raise ConfigError(
        f"config.num_train_steps={num_train_steps} is not a multiple of "
        f"config.optimizer.grad_accum_steps={k}: the last {num_train_steps % k} micro-batches "
        f"would be accumulated but never applied. Use e.g. num_train_steps="
        f"{num_train_steps - num_train_steps % k + k}.")
  return k


def lr_multiplier_pairs(opt_config) -> list[tuple[str, float]]:
  """`config.optimizer.lr_multipliers` as [(regex, multiplier)], each checked."""
  pairs = []
  for i, pair in enumerate(opt_config.get("lr_multipliers", ()) or ()):
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str)
        or isinstance(pair[1], bool) or not isinstance(pair[1], (int, float))
        or not 0.0 <= pair[1] < float("inf")):
      raise ConfigError(f"config.optimizer.lr_multipliers[{i}]={pair!r} must be a (regex, "
                        "multiplier >= 0) pair, e.g. lr_multipliers=(('^embedder/', 0.1),)")
    _check_regex(f"config.optimizer.lr_multipliers[{i}]", pair[0])
    pairs.append((pair[0], float(pair[1])))
  return pairs


def freeze_patterns(opt_config) -> tuple[str, ...]:
  """`config.optimizer.freeze` as a tuple of regexes, each checked."""
  patterns = tuple(opt_config.get("freeze", ()) or ())
  for i, pattern in enumerate(patterns):
    if not isinstance(pattern, str):
      raise ConfigError(f"config.optimizer.freeze[{i}]={pattern!r} must be a regex string, "
                        "e.g. freeze=('^embedder/',)")
    _check_regex(f"config.optimizer.freeze[{i}]", pattern)
  return patterns


def _check_regex(name: str, pattern: str) -> None:
  try:
    re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"{name}={pattern!r} is not a valid regex ({e})") from e


def _check_evals(evals) -> None:
  """Each `config.evals` entry is a section with a string 'type' and an int 'every_steps'
  (if given). The type's own options are checked by `evaluation.evaluators` when the trainer
  builds them."""
  for name in evals.keys():
    entry = evals[name]
    where = f"config.evals.{name}"
    if name == "train" or "/" in name:
      raise ConfigError(f"{where}: 'train' and names with '/' are reserved; rename it")
    if not isinstance(entry, (dict, ml_collections.ConfigDict)):
      raise ConfigError(f"{where} must be a section like {{'type': 'loss'}}, got {entry!r}")
    if not isinstance(entry.get("type"), str):
      raise ConfigError(f"{where} needs a 'type' (an evaluator name, e.g. 'loss', 'vqa', "
                        "'captioning', 'retrieval', 'nlvr2', 'text_tasks')")
    every = entry.get("every_steps", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < -1:
      raise ConfigError(f"{where}.every_steps={every!r} must be an int: N > 0 steps, 0 = "
                        "config.eval_every_steps, -1 = at the end only")


def check_peft(peft_config) -> None:
  """`config.peft`'s values, each checked (its regex is matched against the model's params
  when the model is built: train.peft.lora_targets)."""
  method = peft_config.get("method", "")
  if method not in PEFT_METHODS:
    raise ConfigError(f"config.peft.method={method!r} is not a method; valid: "
                      f"{list(PEFT_METHODS)} ('' = train every parameter)")
  rank = peft_config.get("rank", 8)
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ConfigError(f"config.peft.rank={rank!r} must be an int >= 1 (LoRA's r, e.g. 8)")
  alpha = peft_config.get("alpha", 16.0)
  if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
      or not 0 < alpha < float("inf")):
    raise ConfigError(f"config.peft.alpha={alpha!r} must be a finite number > 0 (the update "
                      "is scaled by alpha / rank; e.g. alpha = 2 * rank)")
  targets = peft_config.get("targets", LORA_DEFAULT_TARGETS)
  if not isinstance(targets, str):
    raise ConfigError(f"config.peft.targets={targets!r} must be one regex string, e.g. "
                      r"'attention/(query|value)/kernel$'")
  _check_regex("config.peft.targets", targets)


# (family, objective) pairs whose spans follow config.spans.strategy: the language model's
# sampled spans, and the vision-language pretraining rows' text prefix.
SPAN_STRATEGY_READERS = (("lm", "semi_causal_lm"), ("metalm_vl", "semi_causal_vl"))


def check_spans(config) -> None:
  """`config.spans`: a known strategy, a temperature > 0, and a non-default strategy only
  where spans are chosen (SPAN_STRATEGY_READERS)."""
  spans = config.get("spans") or {}
  strategy = spans.get("strategy", "random")
  if strategy not in masking.SPAN_STRATEGIES:
    raise ConfigError(f"config.spans.strategy={strategy!r} is not a span strategy; valid: "
                      f"{list(masking.SPAN_STRATEGIES)} (e.g. --config.spans.strategy=random)")
  temperature = spans.get("temperature", 0.25)
  if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
      or not 0 < temperature < float("inf")):
    raise ConfigError(f"config.spans.temperature={temperature!r} must be a finite number > 0 "
                      "(saliency: lower concentrates spans on the rarest tokens; e.g. 0.25)")
  where = (config.get("family", "lm"), config.get("objective"))
  if strategy != "random" and where not in SPAN_STRATEGY_READERS:
    raise ConfigError(
        f"config.spans.strategy={strategy!r} is only read by "
        + " and ".join(f"objective {o!r} in family {f!r}" for f, o in SPAN_STRATEGY_READERS)
        + f" (this config: objective={where[1]!r}, family={where[0]!r}); set "
        "config.spans.strategy='random' or one of those objectives")


def init_from_renames(init_config) -> list[tuple[str, str]]:
  """`config.init_from.rename` as [(regex, replacement)], each checked."""
  pairs = []
  for i, pair in enumerate(init_config.get("rename", ()) or ()):
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
        or not all(isinstance(x, str) for x in pair)):
      raise ConfigError(f"config.init_from.rename[{i}]={pair!r} must be a (regex, replacement) "
                        "pair of strings, e.g. rename=(('^head/', 'lm_head/'),)")
    _check_regex(f"config.init_from.rename[{i}]", pair[0])
    pairs.append((pair[0], pair[1]))
  return pairs


def init_from_skips(init_config) -> tuple[str, ...]:
  """`config.init_from.skip` as a tuple of regexes, each checked."""
  patterns = tuple(init_config.get("skip", ()) or ())
  for i, pattern in enumerate(patterns):
    if not isinstance(pattern, str):
      raise ConfigError(f"config.init_from.skip[{i}]={pattern!r} must be a regex string")
    _check_regex(f"config.init_from.skip[{i}]", pattern)
  return patterns


# config.optimizer's numbers: (is the value in range, the valid range in words). A value
# outside them trains without an error but goes wrong (learning_rate=-1 climbs the loss).
_OPTIMIZER_RANGES = {
    "learning_rate": (lambda v: v > 0, "> 0 (the peak of the schedule, e.g. 3e-4)"),
    "warmup_steps": (lambda v: v >= 0, ">= 0 (an int: trainer steps of linear warmup)"),
    "end_lr_ratio": (lambda v: 0 <= v <= 1,
                     "in [0, 1] (the cosine ends at learning_rate * end_lr_ratio)"),
    "b1": (lambda v: 0 <= v < 1, "in [0, 1) (Adam's first-moment decay, e.g. 0.9)"),
    "b2": (lambda v: 0 <= v < 1, "in [0, 1) (Adam's second-moment decay, e.g. 0.98)"),
    "eps": (lambda v: v > 0, "> 0 (Adam's denominator term, e.g. 1e-8)"),
    "weight_decay": (lambda v: v >= 0, ">= 0 (0 = no weight decay)"),
    "grad_clip_norm": (lambda v: v >= 0, ">= 0 (0 = no clipping)"),
}


def _check_optimizer_number(key: str, value: Any) -> None:
  in_range, valid = _OPTIMIZER_RANGES[key]
  integer = key == "warmup_steps"
  kinds = (int,) if integer else (int, float)
  if (isinstance(value, bool) or not isinstance(value, kinds)
      or not -float("inf") < value < float("inf")):  # NaN and inf fail
    raise ConfigError(f"config.optimizer.{key}={value!r} must be a finite "
                      f"{'int' if integer else 'number'}; valid: {valid}")
  if not in_range(value):
    raise ConfigError(f"config.optimizer.{key}={value!r} is out of range; valid: {valid}")


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
  """Every number of config.optimizer in its range (`_OPTIMIZER_RANGES`; the error names
  the key, the value and the valid range), then grad_accum_steps, lr_multipliers and
  freeze. Their regexes are matched against the model's parameters when the optimizer is
  built (train.optimizer.make_optimizer)."""
  for key in _OPTIMIZER_RANGES:
    if key in config.optimizer:
      _check_optimizer_number(key, config.optimizer[key])
  grad_accum_steps(config.optimizer, config.num_train_steps)
  lr_multiplier_pairs(config.optimizer)
  freeze_patterns(config.optimizer)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for unknown keys, ill-typed values and inconsistent settings."""
  schema = base_config()
  if "mplug" in config:
    if config.model.name != "mplug":
      raise ConfigError(f"config.mplug is only read for config.model.name='mplug' (this config's "
                        f"model is {config.model.name!r}); remove it.")
    schema.mplug = mplug_defaults()
  _check_against(config, schema, "config")
  for key in ("model", "data", "optimizer", "sample"):
    if key not in config:
      raise ConfigError(f"config.{key} is missing; start configs from metalm_jax.config.base_config()")
  name, kwargs = model_kwargs(config.model)
  try:
    models.check_model(name, kwargs)
  except checks.KwargsError as e:
    raise ConfigError(str(e)) from e
  if config.nan_policy not in ("stop", "skip"):
    raise ConfigError(f"config.nan_policy={config.nan_policy!r}; valid: 'stop', 'skip'")
  for key in ("batch_size", "num_train_steps", "log_every_steps", "checkpoint_every_steps",
              "eval_every_steps", "keep_checkpoints"):
    if config[key] <= 0:
      raise ConfigError(f"config.{key}={config[key]} must be positive")
  _check_optimizer(config)
  _check_evals(config.evals)
  encoder_tokenizer_kind(config)
  check_spans(config)
  init_from_renames(config.init_from)
  init_from_skips(config.init_from)
  if "peft" in config:
    check_peft(config.peft)
    if config.peft.get("save_trainable_only", False) and not (
        config.peft.method and config.init_from.checkpoint):
      # Docked parts alone are not a base: the connector and fresh parts are not in them.
      raise ConfigError(
          f"config.peft.save_trainable_only=True with config.peft.method="
          f"{config.peft.method!r} and config.init_from.checkpoint="
          f"{config.init_from.checkpoint!r}: checkpoints without the frozen base need a peft "
          "method (something frozen) and the base to re-read from config.init_from.checkpoint "
          "(docked parts alone do not hold the fresh parts); set both, or "
          "save_trainable_only=False")
  if config.init_from.step < 0:
    raise ConfigError(f"config.init_from.step={config.init_from.step} must be >= 0 (0 = the "
                      "latest checkpoint)")
  if config.data.seq_len <= 1:
    raise ConfigError(f"config.data.seq_len={config.data.seq_len} must be > 1")
  max_len = dict(config.model).get("max_len")
  if max_len is not None and config.data.seq_len > max_len:
    raise ConfigError(f"config.data.seq_len={config.data.seq_len} exceeds config.model.max_len="
                      f"{max_len}; raise model.max_len or shorten the sequences")
  sharding.rules_dict(config.sharding_rules)  # raises on malformed rules
