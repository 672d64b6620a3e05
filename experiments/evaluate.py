r"""Evaluate a checkpoint of `experiments/train.py` on a split: loss, perplexity, tokens.

  python experiments/evaluate.py --config=configs/decoder_lm.py --checkpoint=workdirs/tiny
  python experiments/evaluate.py --config=configs/decoder_lm.py:size=small \
      --checkpoint=workdirs/small/checkpoints/4000 --split=validation --num_batches=0

--config is the training config (same file, args and --config.<key>=<value> overrides as the
train.py command); --checkpoint is the training --workdir (its latest checkpoint, or --step),
its `checkpoints/` folder, or one step folder `checkpoints/<step>`. Only the parameters are
read (no optimizer state). The model, eval step and eval batches are the trainer's own
(`trainer.make_evaluator`), so the default run (the trainer's eval split and
config.eval_batches) reproduces the trainer's eval metrics at that step.

Prints the result and writes it as JSON to --output (default
`<workdir>/eval_<split>_step<step>.json`): {step, split, loss, perplexity, accuracy, tokens,
num_batches, config, config_overrides, checkpoint, workdir, seconds}.

A checkpoint trained with other config.model values is refused, naming the keys;
--allow_config_mismatch evaluates anyway (the parameter shapes must still agree).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from absl import app, flags
from ml_collections import config_flags

import jax
import ml_collections

from metalm_jax import config as config_lib
from metalm_jax import objectives
from metalm_jax import sharding
from metalm_jax.data import datasets
from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import metrics as metrics_lib
from metalm_jax.train import restore
from metalm_jax.train import state as state_lib
from metalm_jax.train import step as step_lib
from metalm_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config "
                                          "(configs/*.py[:args], plus the same overrides).",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The training --workdir, its "
                                  "checkpoints/ folder, or a step folder checkpoints/<step>.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: the trainer's, "
                             f"{trainer.EVAL_SPLIT!r}); TFDS expressions like "
                             "'train[:10%]' work.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", None, "Eval batches (default: "
                                    "config.eval_batches, as the trainer); 0 = the whole split.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON result path (default: "
                              "<workdir>/eval_<split>_step<step>.json).")
_ALLOW_MISMATCH = flags.DEFINE_bool("allow_config_mismatch", False,
                                    "Evaluate even if config.model differs from the one the "
                                    "checkpoint was trained with (shapes must still agree).")
flags.mark_flags_as_required(["config", "checkpoint"])

logger = logging.getLogger("evaluate")

# config.model keys that change how the model runs, not its parameters: they may differ from
# training without being refused (a difference is logged).
RUNTIME_MODEL_KEYS = frozenset({"dropout_rate", "attention_impl", "blockwise_threshold",
                                "block_size", "remat_policy", "dtype"})
# config.data keys that change the eval batches: a difference is logged (not refused), as the
# numbers then differ from the trainer's.
_DATA_KEYS = ("dataset", "tokenizer", "vocab_size", "seq_len")


CheckpointNotFoundError = restore.CheckpointNotFoundError


class ConfigMismatchError(ValueError):
  """The checkpoint was trained with other config.model values than --config."""


# ------------------------------------------------------------------------ config checks


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
  if isinstance(tree, (dict, ml_collections.ConfigDict)):
    out = {}
    for k in tree.keys():
      out.update(_flatten(tree[k], f"{prefix}.{k}"))
    return out
  return {prefix: tree}


def model_config_differences(saved: dict, config: ml_collections.ConfigDict
                             ) -> tuple[list[str], list[str]]:
  """(shape differences, runtime-only differences) between a checkpoint's saved config and
  `config`, as 'config.model.<key>: checkpoint <v> vs --config <v>' lines."""
  want = _flatten(checkpoint_lib.config_to_dict(config)["model"], "config.model")
  have = _flatten(saved.get("model", {}), "config.model")
  missing = object()
  shape, runtime = [], []
  for key in sorted(set(want) | set(have)):
    a, b = have.get(key, missing), want.get(key, missing)
    if a == b:
      continue
    line = (f"  {key}: checkpoint {'(absent)' if a is missing else repr(a)} vs --config "
            f"{'(absent)' if b is missing else repr(b)}")
    (runtime if key.rsplit(".", 1)[-1] in RUNTIME_MODEL_KEYS else shape).append(line)
  return shape, runtime


def check_config(saved: dict | None, config: ml_collections.ConfigDict, *, where: str,
                 allow_mismatch: bool = False) -> None:
  """Raises ConfigMismatchError if `saved` (a checkpoint's config) has other config.model
  values than `config`; logs runtime-only model and data differences."""
  if not saved:
    logger.warning("%s holds no saved config; cannot check that --config matches it", where)
    return
  shape, runtime = model_config_differences(saved, config)
  if runtime:
    logger.info("config.model differs from training in runtime-only keys (allowed):\n%s",
                "\n".join(runtime))
  data = [f"  config.data.{k}: checkpoint {saved.get('data', {}).get(k)!r} vs --config "
          f"{config.data[k]!r}" for k in _DATA_KEYS
          if k in saved.get("data", {}) and saved["data"][k] != config.data[k]]
  if data:
    logger.warning("the eval data differs from training (the numbers will not match the "
                   "trainer's):\n%s", "\n".join(data))
  if not shape:
    return
  differ = f"{len(shape)} config.model key{'s differ' if len(shape) > 1 else ' differs'}"
  message = (f"{where} was trained with another model config than --config ({differ}):\n"
             + "\n".join(shape))
  if allow_mismatch:
    logger.warning("%s\nproceeding anyway (--allow_config_mismatch)", message)
    return
  raise ConfigMismatchError(
      message + "\nPass the config it was trained with (the --config file, its :args and any "
      "--config.model.* overrides of the experiments/train.py command; the checkpoint's "
      "'config' item has them all), or --allow_config_mismatch to evaluate anyway (the "
      "parameter shapes must still agree).")


# ------------------------------------------------------------------------ evaluation


def _progress(total: int | None, split: str, enabled: bool) -> tuple[Callable, Callable]:
  """(on_batch(totals), close()): a tqdm bar, or a log line every ~10% (every 10 batches
  when the total is unknown) when the bar is off or tqdm is missing."""
  bar = None
  if enabled:
    try:
      from tqdm.auto import tqdm
    except ImportError:
      pass
    else:
      bar = tqdm(total=total or None, unit="batch", desc=f"eval {split}", file=sys.stderr,
                 dynamic_ncols=True, mininterval=0.5)
  every = max(1, (total or 100) // 10)
  count = [0]

  def on_batch(totals):
    count[0] += 1
    loss = totals["loss_sum"] / max(totals["tokens"], 1e-8)
    if bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    elif count[0] % every == 0 or count[0] == total:
      logger.info("eval %s: batch %d/%s, loss so far %.4f", split, count[0], total or "?", loss)

  return on_batch, (bar.close if bar is not None else (lambda: None))


def evaluate(config: ml_collections.ConfigDict, checkpoint: str, *, step: int | None = None,
             split: str | None = None, num_batches: int | None = None,
             allow_config_mismatch: bool = False, progress: bool | None = None,
             config_name: str | None = None, config_overrides: dict | None = None) -> dict:
  """Evaluates a checkpoint of `experiments/train.py` as the trainer does.

  Args:
    config: the training config.
    checkpoint: the training workdir, its `checkpoints/` folder, or a step folder.
    step: the step to evaluate (default: the step folder's, else the latest).
    split: the split (default `trainer.EVAL_SPLIT`, the trainer's).
    num_batches: eval batches (default `config.eval_batches`); 0 = the whole split.
    allow_config_mismatch: evaluate even if config.model differs from the saved config.
    progress: show a tqdm bar (default `config.progress_bar`); off: a log line per ~10%.
    config_name, config_overrides: recorded in the result (the --config flag's value).

  Returns:
    {'step', 'split', 'loss', 'perplexity', 'accuracy', 'tokens', 'num_batches', 'config',
    'config_overrides', 'checkpoint', 'workdir', 'seconds'}.

  Raises:
    CheckpointNotFoundError: no checkpoint (of `step`) at `checkpoint`.
    ConfigMismatchError: the checkpoint's saved config.model differs from `config`.
    checkpoint_lib.CheckpointMismatchError: its parameter shapes do not fit the model.
    config_lib.ConfigError: an invalid config.
  """
  start = time.perf_counter()
  config_lib.validate(config)
  if config.model.name == "mplug":
    raise config_lib.ConfigError("config.model.name='mplug': evaluate mPLUG with "
                                 "experiments/mplug_digits.py; this script evaluates "
                                 "experiments/train.py checkpoints")
  split = split or trainer.EVAL_SPLIT
  num_batches = config.eval_batches if num_batches is None else num_batches
  if num_batches < 0:
    raise ValueError(f"num_batches={num_batches} must be >= 0 (0 = the whole split)")

  # The trainer's mesh, model, non-parameter state and eval step (train_and_evaluate).
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  batch_shardings = sharding.batch_sharding(mesh, rules)
  batch_axes = batch_shardings.spec[0] if batch_shardings.spec else None
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  data_parallel = math.prod(mesh.shape[a] for a in batch_axes)
  if config.batch_size % data_parallel or config.batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"config.batch_size={config.batch_size} must be divisible by the mesh's batch axes "
        f"({data_parallel} devices) and the process count ({jax.process_count()}); set "
        "--config.batch_size or --config.mesh.* for this machine")
  model = state_lib.Model(config.model)
  restored = restore.restore_params(
      checkpoint, model, mesh, rules, step=step,
      check_config=lambda saved, where: check_config(saved, config, where=where,
                                                     allow_mismatch=allow_config_mismatch))
  params, step = restored.params, restored.step
  directory, workdir = restored.directory, restored.workdir
  param_shardings = sharding.state_shardings(model.abstract_params, model.logical_specs,
                                             mesh, rules)
  init_key, _ = jax.random.split(jax.random.key(config.seed))  # as create_train_state
  rest = jax.jit(lambda key: model.init(key)[1])(init_key)
  objective = objectives.get(config.objective)
  # make_eval_step reads only the params' shardings of the train state's.
  eval_step = step_lib.make_eval_step(model, objective,
                                      types.SimpleNamespace(params=param_shardings), rest,
                                      batch_shardings, mesh, rules=rules)
  logger.info("restored the parameters of step %d from %s (%s parameters)", step, directory,
              f"{model.param_count():,}")

  data_dir = config.data.data_dir or datasets.default_data_dir()
  source = datasets.data_source(config.data.dataset, split, data_dir)
  tokenizer = trainer.load_tokenizer(config.data)
  on_batch, close = _progress(num_batches or None, split,
                              config.progress_bar if progress is None else progress)
  batches_run = [0]

  def count_and_show(totals):
    batches_run[0] += 1
    on_batch(totals)

  run = trainer.make_evaluator(config, eval_step, rest, batch_shardings, source=source,
                               tokenizer=tokenizer, objective=objective,
                               num_batches=num_batches, on_batch=count_and_show)
  try:
    metrics = run(params)
  finally:
    close()
  if num_batches and batches_run[0] < num_batches:
    logger.info("the %r split has only %d eval batches (asked for %d): evaluated them all",
                split, batches_run[0], num_batches)
  return {"step": int(step), "split": split, "loss": float(metrics["loss"]),
          "perplexity": float(metrics["perplexity"]), "accuracy": float(metrics["accuracy"]),
          "tokens": int(metrics["tokens"]), "num_batches": batches_run[0],
          "config": config_name, "config_overrides": config_overrides or {},
          "checkpoint": os.path.join(directory, str(step)), "workdir": workdir,
          "seconds": round(time.perf_counter() - start, 3)}


def default_output(result: dict) -> str:
  """`<workdir>/eval_<split>_step<step>.json` (split expressions made file-name safe)."""
  split = re.sub(r"[^A-Za-z0-9_.-]+", "_", result["split"]).strip("_")
  return os.path.join(result["workdir"], f"eval_{split}_step{result['step']}.json")


def write_result(result: dict, output: str | None = None) -> str:
  """Writes `result` as JSON to `output` (default `default_output(result)`); returns it."""
  path = output or default_output(result)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  return path


def trainer_eval(workdir: str, step: int) -> dict | None:
  """The trainer's own eval row of `step` in `<workdir>/metrics.jsonl`, if it has one."""
  rows = [r for r in metrics_lib.read_metrics(workdir, "eval") if r["step"] == step]
  return rows[-1] if rows else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-file INFO lines
  try:
    result = evaluate(
        _CONFIG.value, _CHECKPOINT.value, step=_STEP.value, split=_SPLIT.value,
        num_batches=_NUM_BATCHES.value, allow_config_mismatch=_ALLOW_MISMATCH.value,
        config_name=config_flags.get_config_filename(flags.FLAGS["config"]),
        config_overrides=config_flags.get_override_values(flags.FLAGS["config"]))
  except (restore.CheckpointNotFoundError, ConfigMismatchError, checkpoint_lib.CheckpointMismatchError,
          checkpoint_lib.CheckpointCorruptError, config_lib.ConfigError,
          datasets.DatasetNotPreparedError) as e:  # a clear message; no traceback needed
    raise SystemExit(f"evaluate.py: {type(e).__name__}: {e}") from e
  if jax.process_index() == 0:
    result["output"] = write_result(result, _OUTPUT.value)
  print(json.dumps(result, indent=2))
  print(f"step {result['step']} {result['split']}: loss {result['loss']:.6f}, perplexity "
        f"{result['perplexity']:.4f} over {result['tokens']:,} tokens "
        f"({result['num_batches']} batches, {result['seconds']:.1f} s)")
  own = trainer_eval(result["workdir"], result["step"])
  if (own is not None and result["split"] == trainer.EVAL_SPLIT
      and int(own["tokens"]) == result["tokens"]):  # the same batches as the trainer's eval
    print(f"the trainer's eval at step {result['step']}: loss {own['loss']:.6f}, perplexity "
          f"{own['perplexity']:.4f} over {int(own['tokens']):,} tokens")


if __name__ == "__main__":
  app.run(main)
