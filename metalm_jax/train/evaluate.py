"""Run a config's evaluators on a checkpoint of `experiments/train.py`, as the trainer does.

    result = evaluate(config, "workdirs/tiny")                      # every config.evals entry
    result = evaluate(config, "workdirs/tiny/checkpoints/200", names=("eval",), split="test")
    result["evals"]["eval"]["loss"], result["details"]["vqa"]["predictions"]

The model, mesh, family, eval steps and evaluators are the trainer's own
(`trainer.eval_context`, `evaluators.build_all`), so the default run reproduces the metrics
the trainer logged at that step. Only the params (and the family's extra state, e.g. mPLUG's
ITC queues) are read: no optimizer state. A checkpoint trained with other `config.model`
values is refused naming them (`restore.ConfigMismatchError`).
"""
from __future__ import annotations

import logging
import os
import re
import time

import jax
import ml_collections

from metalm_jax import config as config_lib
from metalm_jax import families
from metalm_jax import sharding
from metalm_jax.evaluation import evaluators as evaluators_lib
from metalm_jax.train import restore
from metalm_jax.train import state as state_lib
from metalm_jax.train import trainer

logger = logging.getLogger(__name__)


def evaluate(config: ml_collections.ConfigDict, checkpoint: str, *, step: int | None = None,
             names: tuple[str, ...] | None = None, split: str | None = None,
             num_batches: int | None = None, allow_config_mismatch: bool = False,
             config_name: str | None = None, config_overrides: dict | None = None) -> dict:
  """Runs `config.evals` (or those in `names`) on a checkpoint.

  Args:
    config: the training config (its evaluators, model and data).
    checkpoint: the training workdir, its `checkpoints/` folder, or a step folder.
    step: the step (default: the step folder's, else the latest).
    names: evaluator names of `config.evals` to run (default: all).
    split, num_batches: override the options of every 'loss' evaluator run.
    allow_config_mismatch: evaluate even if config.model differs from the saved config.
    config_name, config_overrides: recorded in the result (the --config flag's value).

  Returns:
    {'step', 'evals': {name: scalars}, 'details': {name: details}, 'checkpoint', 'workdir',
     'config', 'config_overrides', 'seconds'}.

  Raises:
    restore.CheckpointNotFoundError: no checkpoint (of `step`) at `checkpoint`.
    restore.ConfigMismatchError: the checkpoint's saved config.model differs from `config`.
    checkpoint.CheckpointMismatchError: its parameter shapes do not fit the model.
    config_lib.ConfigError: an invalid config.
  """
  start = time.perf_counter()
  if num_batches is not None and num_batches < 0:
    raise ValueError(f"num_batches={num_batches} must be >= 0 (0 = the whole split)")
  config = _with_loss_options(config, split, num_batches)
  config_lib.validate(config)
  family = families.build(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  trainer.check_batch(config, mesh)
  model = state_lib.Model.from_config(config)

  # The trainer's state layout, to place what is read exactly as training did.
  tx, _ = trainer.make_optimizer(config, model)
  rng = jax.random.key(config.seed)
  abstract_state, state_shardings = state_lib.abstract_train_state(
      model, tx, rng, mesh, rules, init_extra=family.init_extra)
  restored = restore.restore_params(
      checkpoint, model, mesh, rules, step=step,
      check_config=lambda saved, where: restore.check_config(
          saved, config, where=where, allow_mismatch=allow_config_mismatch),
      abstract_extra=abstract_state.extra, extra_shardings=state_shardings.extra)
  family.check_model(model)  # after the checkpoint is found: reads the data's tokenizer
  rest = state_lib.init_rest(model, rng)
  logger.info("restored step %d from %s (%s parameters)", restored.step, restored.directory,
              f"{model.param_count():,}")
  batch_shardings = sharding.batch_sharding(mesh, rules, ndim=1)
  ctx = trainer.eval_context(config, family, model, rest, mesh, state_shardings,
                             batch_shardings)
  evals, details = {}, {}
  for scheduled in evaluators_lib.build_all(config, ctx, names=names):
    scalars, detail = scheduled.run(restored.params, restored.extra)
    evals[scheduled.name] = evaluators_lib.scalars_of(scalars)
    details[scheduled.name] = detail
    logger.info("%s: %s", scheduled.name, evals[scheduled.name])
  return {"step": restored.step, "evals": evals, "details": details,
          "checkpoint": os.path.join(restored.directory, str(restored.step)),
          "workdir": restored.workdir, "config": config_name,
          "config_overrides": config_overrides or {},
          "seconds": round(time.perf_counter() - start, 3)}


def _with_loss_options(config, split, num_batches):
  if split is None and num_batches is None:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  for name in config.evals.keys():
    entry = config.evals[name]
    if entry.get("type") == "loss":
      if split is not None:
        entry.split = split
      if num_batches is not None:
        entry.num_batches = num_batches
  return config


def default_output(result: dict) -> str:
  """`<workdir>/eval_step<step>[_<names>].json` (file-name safe)."""
  names = "_".join(sorted(result["evals"]))
  names = re.sub(r"[^A-Za-z0-9_.-]+", "_", names).strip("_")
  return os.path.join(result["workdir"], f"eval_step{result['step']}_{names}.json")
