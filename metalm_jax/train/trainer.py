"""`train_and_evaluate(config, workdir)`: the one trainer for every model family, top to bottom.

logging -> family -> mesh -> input -> model / optimizer -> sharded init -> restore (or
init_from) -> evaluators -> steps -> (metrics, evals, checkpoint) loop -> plot and sample.

What differs between model families (input pipeline, extra train state, loss, predictors)
comes from `config.family` (`metalm_jax.families`); everything else is written once here, so
checkpoints with the data position, bitwise resume, SIGTERM / deadline, the NaN policy,
gradient accumulation, freezing, per-module learning rates, multi-host and activation
sharding hold for every family.
"""
from __future__ import annotations

import json
import logging
import math
import os

import jax
import ml_collections
import numpy as np

from metalm_jax import config as config_lib
from metalm_jax import families
from metalm_jax import sharding
from metalm_jax.data import pipeline
from metalm_jax.evaluation import evaluators as evaluators_lib
from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import init_from as init_from_lib
from metalm_jax.train import metrics as metrics_lib
from metalm_jax.train import optimizer as optimizer_lib
from metalm_jax.train import peft as peft_lib
from metalm_jax.train import preemption
from metalm_jax.train import state as state_lib
from metalm_jax.train import step as step_lib

logger = logging.getLogger(__name__)


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


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
  """ConfigError unless the global batch splits over the mesh's batch axes and processes."""
  axes = sharding.rules_dict(config.sharding_rules).get("batch", ())
  data_parallel = math.prod(mesh.shape[a] for a in axes)
  if config.batch_size % data_parallel or config.batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"config.batch_size={config.batch_size} must be divisible by the mesh's batch axes "
        f"({data_parallel} devices) and the process count ({jax.process_count()}); set "
        "--config.batch_size or --config.mesh.* for this machine")


def trainable_params(config: ml_collections.ConfigDict, model: state_lib.Model):
  """Bool tree like the params (None: all train): a docked encoder's lower layers frozen when
  `config.model.trainable_encoder_layers >= 0`, and what `config.peft` freezes (LoRA: all but
  the factors; BitFit: all but biases and norms). `config.optimizer.freeze` comes on top in
  `optimizer.make_optimizer`."""
  trainable = None
  layers = dict(config.model).get("trainable_encoder_layers", -1)
  if layers is not None and layers >= 0:
    trainable = optimizer_lib.trainable_mask(model.abstract_params, trainable_layers=layers)
  if model.peft is not None:
    mask = peft_lib.trainable_mask(model.abstract_params, model.peft)
    trainable = mask if trainable is None else jax.tree.map(
        lambda a, b: bool(a and b), trainable, mask)
  return trainable


def saved_part_fn(config: ml_collections.ConfigDict, model: state_lib.Model):
  """state (or its shardings) -> what a checkpoint holds: all of it, or with
  `config.peft.save_trainable_only` the params restricted to the trained ones."""
  if not peft_lib.saves_trainable_only(config):
    return lambda state: state
  keep = trainable_params(config, model)
  return lambda state: state.replace(params=peft_lib.subset(state.params, keep))


def make_optimizer(config: ml_collections.ConfigDict, model: state_lib.Model):
  """(tx, schedule) of `config.optimizer`, with the params `trainable_params` freezes frozen
  (zero updates, no optimizer state)."""
  tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps,
                                    model.abstract_params,
                                    trainable=trainable_params(config, model))
  return tx, optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)


def trainable_summary(config: ml_collections.ConfigDict, model: state_lib.Model, tx) -> str:
  """'peft lora r=8: 12,288 trainable of 620,704 params (1.98%); optimizer state 98.0 KB'
  (every freeze counted: encoder layers, config.peft, config.optimizer.freeze)."""
  trainable = trainable_params(config, model)
  frozen = config_lib.freeze_patterns(config.optimizer)
  if frozen:
    regex = optimizer_lib.regex_trainable_mask(model.abstract_params, frozen)
    trainable = regex if trainable is None else jax.tree.map(
        lambda a, b: bool(a and b), trainable, regex)
  return peft_lib.summary(model.peft, model.abstract_params, trainable,
                          jax.eval_shape(tx.init, model.abstract_params))


def eval_context(config, family, model, rest, mesh, state_shardings, batch_shardings,
                 progress=logger.info) -> evaluators_lib.EvalContext:
  """What the evaluators get (shared by the trainer and experiments/evaluate.py)."""
  rules = config.sharding_rules
  cache = {}

  def make_eval_step():
    if "step" not in cache:
      cache["step"] = step_lib.make_eval_step(model, family, state_shardings, rest,
                                              batch_shardings, mesh, rules=rules)
    return cache["step"]

  return evaluators_lib.EvalContext(
      config=config, family=family, model=model, rest=rest, mesh=mesh, rules=rules,
      state_shardings=state_shardings, batch_shardings=batch_shardings,
      make_eval_step=make_eval_step,
      make_global_batch=lambda b: pipeline.make_global_batch(b, batch_shardings),
      progress=progress)


def eval_path(workdir: str, name: str, step: int) -> str:
  """Where an evaluator's full output of `step` is written."""
  return os.path.join(workdir, "evals", name, f"step_{step}.json")


def read_eval(workdir: str, name: str, step: int) -> dict | None:
  """An evaluator's recorded output of `step` ({'step', 'name', 'type', 'metrics',
  'details'}), or None if it was not run (to completion) at that step."""
  path = eval_path(workdir, name, step)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_evals(scheduled, state, step: int, *, last_step: bool, workdir: str, writer,
              progress, skip_recorded: bool = False) -> dict[str, dict]:
  """Runs the due evaluators on `state`; writes metrics and their output; returns
  {name: scalars}. `skip_recorded`: an evaluator whose output of `step` exists is read back
  instead of run again (a run resumed after its last checkpoint)."""
  out = {}
  for s in scheduled:
    if not s.due(step, last_step):
      continue
    recorded = read_eval(workdir, s.name, step) if skip_recorded else None
    if recorded is not None:
      out[s.name] = recorded["metrics"]
      continue
    scalars, details = s.run(state.params, state.extra)
    scalars = evaluators_lib.scalars_of(scalars)
    out[s.name] = scalars
    writer.write(step, s.name, scalars)
    if writer.enabled:
      path = eval_path(workdir, s.name, step)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        json.dump({"step": step, "name": s.name, "type": s.run.type, "metrics": scalars,
                   "details": details}, f, indent=1, default=str)
      os.replace(tmp, path)  # never a half-written result
    shown = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k != "tokens")
    progress.write(f"step {step}: {s.name}: {shown}")
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  SIGTERM / SIGINT or `config.deadline_minutes` stop it cleanly: the current step finishes,
  a checkpoint is written, and the result's 'stopped' names the reason (None otherwise).
  A workdir whose run is already complete is not trained again: its last metrics are
  returned, and final evaluations that a kill interrupted are run.

  Returns the final metrics: {'step', 'train_loss', 'eval_loss', 'eval_perplexity',
  'evals' ({name: scalars} of the last step), 'stopped', 'already_complete', 'sample'}.
  """
  config_lib.validate(config)
  family = families.build(config)
  _check_workdir(workdir)
  is_main = jax.process_index() == 0

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  check_batch(config, mesh)
  logger.info("mesh %s on %d devices, %d processes; family %s", dict(mesh.shape), mesh.size,
              jax.process_count(), family.name)

  # ---------------------------------------------------------------- model and input
  model = state_lib.Model.from_config(config)
  family.check_model(model)
  local_batch = config.batch_size // jax.process_count()
  train_iter = iter(family.train_dataset(batch_size=local_batch,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count()))
  batch_shardings = sharding.batch_sharding(mesh, rules, ndim=1)

  # ---------------------------------------------------------------- optimizer
  # Also config.optimizer.freeze / lr_multipliers / grad_accum_steps (optimizer.make_optimizer):
  # a trainer step is one micro-batch; `schedule(step)` is the rate its group's update uses.
  tx, schedule = make_optimizer(config, model)
  logger.info("model %s: %s parameters", config.model.name, f"{model.param_count():,}")
  logger.info("%s", trainable_summary(config, model, tx))

  # ---------------------------------------------------------------- sharded init / restore
  rng = jax.random.key(config.seed)
  state, state_shardings, rest = state_lib.create_train_state(
      model, tx, rng, mesh, rules, init_extra=family.init_extra)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  saved_part = saved_part_fn(config, model)  # what a checkpoint holds of the state
  abstract = jax.eval_shape(lambda: saved_part(state))
  restored, restored_step = checkpointer.restore_latest_good(
      abstract, saved_part(state_shardings), train_iter, worker_count=config.data.worker_count)
  if restored is not None:
    if peft_lib.saves_trainable_only(config):  # the frozen base from config.init_from
      base = start_from(config, family, state, state_shardings, rng)
      restored = restored.replace(params=init_from_lib.merge(
          base.params, init_from_lib.flat_params(restored.params)))
    state = restored
    logger.info("resumed from step %d in %s", restored_step, checkpointer.directory)
  elif config.init_from.checkpoint or config_lib.model_parts(config.model):
    state = start_from(config, family, state, state_shardings, rng)
  start_step = int(state.step)

  # ---------------------------------------------------------------- evaluators
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  progress = metrics_lib.Progress(initial=start_step, total=config.num_train_steps,
                                  enabled=config.progress_bar and is_main,
                                  units_per_step=family.units_per_batch(config.batch_size),
                                  unit=family.throughput_unit)
  ctx = eval_context(config, family, model, rest, mesh, state_shardings, batch_shardings,
                     progress=progress.write)
  scheduled = evaluators_lib.build_all(config, ctx)
  if start_step >= config.num_train_steps:
    try:
      return _already_complete(config, family, model, state, rest, rng, scheduled, workdir,
                               writer, progress, checkpointer)
    finally:
      progress.close()
      checkpointer.close()
      writer.close()

  train_step = step_lib.make_train_step(model, tx, family, schedule, state_shardings, rest,
                                        batch_shardings, mesh, rules=rules,
                                        skip_nonfinite=config.nan_policy == "skip")

  # ---------------------------------------------------------------- loop
  config_dict = checkpoint_lib.config_to_dict(config)
  train_loss, evals, window, stopped = float("nan"), {}, [], None
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
          mean[f"{family.throughput_unit}_per_sec"] = progress.update(step, mean)
          writer.write(step, "train", mean)
          train_loss, window = mean["loss"], []
        else:
          progress.update(step)
        stopped = None if last_step else stop.requested()
        # Checkpoint first: a kill during a long evaluation loses no training.
        if step % config.checkpoint_every_steps == 0 or last_step or stopped:
          checkpointer.save(step, saved_part(state), train_iter, config_dict,
                            force=bool(stopped))
        if last_step:
          checkpointer.wait()
        if stopped:
          progress.write(f"stop requested ({stopped}): checkpoint written at step {step} in "
                         f"{checkpointer.directory}; run the same command again to resume")
          break
        step_evals = run_evals(scheduled, state, step, last_step=last_step, workdir=workdir,
                               writer=writer, progress=progress)
        evals.update(step_evals)
  finally:
    progress.close()
    checkpointer.close()
    writer.close()

  # ---------------------------------------------------------------- plot and sample
  result = _result(int(state.step), train_loss, evals, stopped)
  if is_main and not stopped:
    _finish(workdir, family, model, state, rest, rng, result)
  return result


def _result(step: int, train_loss: float, evals: dict, stopped, **extra) -> dict:
  held_out = evals.get("eval", {})
  return {"step": step, "train_loss": train_loss, "stopped": stopped,
          "eval_loss": held_out.get("loss"), "eval_perplexity": held_out.get("perplexity"),
          "evals": evals, **extra}


def _finish(workdir, family, model, state, rest, rng, result) -> None:
  plot = metrics_lib.plot_loss_curve(workdir)
  outputs = [f"checkpoints/ (step {result['step']})", "metrics.jsonl", "tensorboard/"]
  if os.path.isdir(os.path.join(workdir, "evals")):
    outputs.append("evals/")
  if plot:
    outputs.append(os.path.basename(plot))
  sample = family.sample(model, state.params, rest, rng)
  if sample is not None:
    result["sample"] = sample
    with open(os.path.join(workdir, "sample.txt"), "w") as f:
      f.write(sample + "\n")
    outputs.append("sample.txt")
    logger.info("sample: %r", sample)
  logger.info("outputs in %s: %s", os.path.abspath(workdir), ", ".join(outputs))


def _already_complete(config, family, model, state, rest, rng, scheduled, workdir, writer,
                      progress, checkpointer) -> dict:
  """A rerun on a finished workdir: no training; final evals a kill interrupted are run."""
  step = int(state.step)
  progress.write(f"the run in {workdir} is already complete at step {step} "
                 f"(config.num_train_steps={config.num_train_steps}); nothing to train. To "
                 "train longer, raise --config.num_train_steps; to start over, use a fresh "
                 "--workdir.")
  del checkpointer
  train_rows = metrics_lib.read_metrics(workdir, "train")
  train_loss = train_rows[-1]["loss"] if train_rows else float("nan")
  evals = run_evals(scheduled, state, step, last_step=True, workdir=workdir, writer=writer,
                    progress=progress, skip_recorded=True)
  shown = "; ".join(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items())
                    for name, m in evals.items())
  progress.write(f"last metrics (step {step}): train loss {train_loss:.4f}; {shown}")
  result = _result(step, train_loss, evals, None, already_complete=True)
  sample_path = os.path.join(workdir, "sample.txt")
  if os.path.exists(sample_path):
    with open(sample_path) as f:
      result["sample"] = f.read().rstrip("\n")
  del family, model, rest, rng
  return result


def start_from(config, family, state, state_shardings, rng):
  """`state` with its params taken from the docked parts (`config.model.<part>.init_from`),
  then from `config.init_from` (a whole-model checkpoint, on top), and the family's extra
  state rebuilt from them (mPLUG's momentum encoders start as copies of the loaded params)."""
  abstract = jax.eval_shape(lambda: state.params)
  loaded, summaries = init_from_lib.load_parts(config_lib.model_parts(config.model), abstract,
                                               state_shardings.params)
  for line in summaries:
    logger.info("docked %s", line)
  if config.init_from.checkpoint:
    from_checkpoint, summary = init_from_lib.load(config.init_from, abstract,
                                                  state_shardings.params)
    logger.info("init_from: %d params from step %d of %s; kept fresh: %s; dropped: %s",
                summary["loaded"], summary["step"], summary["checkpoint"],
                summary["kept"] or "none", summary["dropped"] or "none")
    loaded.update(from_checkpoint)
  extra_key = jax.random.fold_in(rng, 2)

  def replace(state, loaded):
    params = init_from_lib.merge(state.params, loaded)
    return state.replace(params=params, extra=family.init_extra(params, extra_key))

  return jax.jit(replace, out_shardings=state_shardings, donate_argnums=(0,))(state, loaded)
