"""`train_and_evaluate(config, workdir)`: the one trainer, read top to bottom.

logging -> mesh -> input -> model / optimizer -> sharded init -> restore -> steps ->
(metrics, eval, checkpoint) loop -> plot and a sample generation.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalm_jax import config as config_lib
from metalm_jax import objectives
from metalm_jax import sharding
from metalm_jax.models import freeze
from metalm_jax.objectives import special_tokens
from metalm_jax.data import datasets, pipeline, tokenizers
from metalm_jax.inference import generate
from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import metrics as metrics_lib
from metalm_jax.train import preemption
from metalm_jax.train import state as state_lib
from metalm_jax.train import step as step_lib

logger = logging.getLogger(__name__)


# The split the trainer evaluates on (experiments/evaluate.py's default --split).
EVAL_SPLIT = "validation"


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; the message names the step and the checkpoint kept."""


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir!r} is not writable ({e.strerror}); choose a "
                          "directory you can write to") from e


def load_tokenizer(data_config) -> tokenizers.Tokenizer:
  return tokenizers.get_tokenizer(
      data_config.tokenizer, dataset=data_config.dataset,
      data_dir=data_config.data_dir or None, vocab_size=data_config.vocab_size)


def make_evaluator(config: ml_collections.ConfigDict, eval_step, rest, batch_shardings, *,
                   source, tokenizer: tokenizers.Tokenizer, objective: objectives.Objective,
                   num_batches: int | None = None,
                   on_batch: Callable[[dict[str, float]], None] | None = None):
  """The trainer's evaluation: returns `evaluate(params) -> {'loss', 'perplexity', 'accuracy',
  'tokens'}`, token-weighted over one deterministic pass of `source`.

  Args:
    config: the training config (batch size, sequence length, `eval_batches`).
    eval_step: `step.make_eval_step(...)`.
    rest: the module's non-parameter state.
    batch_shardings: the batch sharding on the mesh.
    source: the data source of the split to evaluate (`datasets.data_source`).
    tokenizer: the config's tokenizer.
    objective: the config's objective (its `prepare` transforms the rows).
    num_batches: the first this many batches; None = `config.eval_batches`; 0 = all of them.
    on_batch: called after each batch with the running totals (progress display).
  """
  local_batch = config.batch_size // jax.process_count()
  limit = config.eval_batches if num_batches is None else num_batches

  def evaluate(params) -> dict[str, float]:
    totals = {"loss_sum": 0.0, "accuracy_sum": 0.0, "tokens": 0.0}
    batches = pipeline.eval_batches(
        source, tokenizer, seq_len=config.data.seq_len, batch_size=local_batch,
        process_index=jax.process_index(), process_count=jax.process_count(),
        prepare=objective.prepare)
    # Every process yields the same number of batches, so a prefix stays in step too.
    for batch in itertools.islice(batches, limit or None):
      out = eval_step(params, rest, pipeline.make_global_batch(batch, batch_shardings))
      for k, v in jax.device_get(out).items():
        totals[k] += float(v)
      if on_batch is not None:
        on_batch(totals)
    return step_lib.summarize_eval(totals)

  return evaluate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  SIGTERM / SIGINT or `config.deadline_minutes` stop it cleanly: the current step finishes,
  a checkpoint is written, and the result's 'stopped' names the reason (None otherwise).

  Returns the final metrics: {'step', 'train_loss', 'eval_loss', 'eval_perplexity', 'stopped',
  'sample' (unless stopped)}.
  """
  config_lib.validate(config)
  if config.model.name == "mplug":
    raise config_lib.ConfigError(
        "config.model.name='mplug': mPLUG pretraining keeps momentum encoders and ITC queues in "
        "its train state (metalm_jax.train.mplug), which this trainer does not; run "
        "`python experiments/mplug_digits.py --config=configs/mplug.py` instead.")
  _check_workdir(workdir)
  is_main = jax.process_index() == 0

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  data_parallel = math.prod(mesh.shape[a] for a in sharding._rules_dict(rules).get("batch", ()))
  if config.batch_size % data_parallel or config.batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"config.batch_size={config.batch_size} must be divisible by the mesh's batch axes "
        f"({data_parallel} devices) and the process count ({jax.process_count()})")
  logger.info("mesh %s on %d devices, %d processes", dict(mesh.shape), mesh.size,
              jax.process_count())

  # ---------------------------------------------------------------- input
  data_dir = config.data.data_dir or datasets.default_data_dir()
  train_source = datasets.data_source(config.data.dataset, "train", data_dir)
  eval_source = datasets.data_source(config.data.dataset, EVAL_SPLIT, data_dir)
  tokenizer = load_tokenizer(config.data)
  model_kwargs = dict(config.model)
  vocab_size = model_kwargs.get("vocab_size") or dict(model_kwargs.get("decoder") or {}).get(
      "vocab_size")
  if vocab_size is not None and vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
        f"({tokenizer.vocab_size}, config.data.tokenizer={config.data.tokenizer!r}); raise it")
  objective = objectives.get(config.objective)
  if objective.special_tokens and vocab_size is not None:
    try:
      special_tokens.check_vocab(vocab_size, tokenizer.vocab_size)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.objective={config.objective!r}: {e}") from e
  local_batch = config.batch_size // jax.process_count()
  train_ds = pipeline.lm_dataset(
      train_source, tokenizer, seq_len=config.data.seq_len, batch_size=local_batch,
      seed=config.seed, shuffle=True, num_epochs=None, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=config.data.worker_count,
      prepare=objective.prepare)
  train_iter = iter(train_ds)
  batch_shardings = sharding.batch_sharding(mesh, rules)

  # ---------------------------------------------------------------- model and optimizer
  model = state_lib.Model(config.model)
  trainable, trainable_layers = None, model_kwargs.get("trainable_encoder_layers", -1)
  if trainable_layers is not None and trainable_layers >= 0:  # a docked, mostly frozen encoder
    trainable = freeze.trainable_mask(model.abstract_params, trainable_layers=trainable_layers)
  # Also config.optimizer.freeze / lr_multipliers / grad_accum_steps (see make_optimizer): a
  # trainer step is one micro-batch; `schedule(step)` is the rate its group's update uses.
  tx = state_lib.make_optimizer(config.optimizer, config.num_train_steps,
                                model.abstract_params, trainable=trainable)
  schedule = state_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
  logger.info("model %s: %s parameters", config.model.name, f"{model.param_count():,}")

  # ---------------------------------------------------------------- sharded init / restore
  rng = jax.random.key(config.seed)
  state, state_shardings, rest = state_lib.create_train_state(model, tx, rng, mesh, rules)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  abstract = jax.eval_shape(lambda: state)
  restored, restored_step = checkpointer.restore_latest_good(
      abstract, state_shardings, train_iter, worker_count=config.data.worker_count)
  if restored is not None:
    state = restored
    logger.info("resumed from step %d in %s", restored_step, checkpointer.directory)
  start_step = int(state.step)

  train_step = step_lib.make_train_step(model, tx, objective, schedule, state_shardings, rest,
                                        batch_shardings, mesh, rules=rules,
                                        skip_nonfinite=config.nan_policy == "skip")
  eval_step = step_lib.make_eval_step(model, objective, state_shardings, rest,
                                      batch_shardings, mesh, rules=rules)

  evaluate = make_evaluator(config, eval_step, rest, batch_shardings, source=eval_source,
                            tokenizer=tokenizer, objective=objective)

  # ---------------------------------------------------------------- loop
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  tokens_per_step = config.batch_size * config.data.seq_len
  progress = metrics_lib.Progress(initial=start_step, total=config.num_train_steps,
                                  enabled=config.progress_bar and is_main,
                                  tokens_per_step=tokens_per_step)
  config_dict = checkpoint_lib.config_to_dict(config)
  train_loss, eval_metrics, window, stopped = float("nan"), {}, [], None
  try:
    with preemption.StopRequest(deadline_minutes=config.deadline_minutes) as stop:
      for step in range(start_step + 1, config.num_train_steps + 1):
        batch = pipeline.make_global_batch(next(train_iter), batch_shardings)
        state, metrics = train_step(state, rest, batch)
        metrics = metrics_lib.host_scalars(jax.device_get(metrics))
        if config.nan_policy == "stop" and not (math.isfinite(metrics["loss"])
                                                and math.isfinite(metrics["grad_norm"])):
          raise NonFiniteLossError(
              f"loss {metrics['loss']} / gradient norm {metrics['grad_norm']} at step {step}; "
              f"stopping. The last good checkpoint (step {checkpointer.latest_step()}) in "
              f"{checkpointer.directory} is kept untouched. Lower config.optimizer.learning_rate"
              ", check the data, or set config.nan_policy='skip' to drop such updates.")
        window.append(metrics)
        last_step = step == config.num_train_steps
        if step % config.log_every_steps == 0 or last_step:
          mean = {k: float(np.nanmean([m[k] for m in window])) for k in window[0]}
          mean["nonfinite_skips"] = metrics["nonfinite_skips"]
          mean["tokens_per_sec"] = progress.update(step, mean)
          writer.write(step, "train", mean)
          train_loss, window = mean["loss"], []
        else:
          progress.update(step)
        if step % config.eval_every_steps == 0 or last_step:
          eval_metrics = evaluate(state.params)
          writer.write(step, "eval", eval_metrics)
          progress.write(f"step {step}: eval loss {eval_metrics['loss']:.4f}, "
                         f"perplexity {eval_metrics['perplexity']:.2f}")
        stopped = None if last_step else stop.requested()
        if step % config.checkpoint_every_steps == 0 or last_step or stopped:
          checkpointer.save(step, state, train_iter, config_dict, force=bool(stopped))
        if stopped:
          progress.write(f"stop requested ({stopped}): checkpoint written at step {step} in "
                         f"{checkpointer.directory}; run the same command again to resume")
          break
  finally:
    progress.close()
    checkpointer.close()
    writer.close()

  # ---------------------------------------------------------------- plot and sample
  result = {"step": int(state.step), "train_loss": train_loss, "stopped": stopped,
            "eval_loss": eval_metrics.get("loss"), "eval_perplexity": eval_metrics.get("perplexity")}
  if is_main and not stopped:
    plot = metrics_lib.plot_loss_curve(workdir)
    logger.info("loss curve: %s", plot)
    if config.sample.max_new_tokens > 0:
      result["sample"] = sample_text(model, state.params, rest, tokenizer, config.sample, rng)
      with open(os.path.join(workdir, "sample.txt"), "w") as f:
        f.write(result["sample"] + "\n")
      logger.info("sample: %r", result["sample"])
  return result


def sample_text(model: state_lib.Model, params, rest, tokenizer, sample_config, rng) -> str:
  """Generates a continuation of `sample_config.prompt` with the trained model."""
  module = model.merge(jax.device_get(params), jax.device_get(rest))
  prompt = np.concatenate([[tokenizer.bos_id], tokenizer.encode(sample_config.prompt)])
  tokens = generate(
      module, jnp.asarray(prompt[None], jnp.int32),
      max_new_tokens=sample_config.max_new_tokens, rng=jax.random.fold_in(rng, 1),
      temperature=sample_config.temperature, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  return sample_config.prompt + tokenizer.decode(np.asarray(tokens[0, len(prompt):]))
