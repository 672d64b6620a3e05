"""A plain training loop for experiments: N steps of an objective on an iterable of batches.

`trainer.train_and_evaluate` is the full job (checkpoints, resumption, evaluation,
preemption); this is the loop that experiment scripts and paper tables run when they pretrain
and then finetune in one process and keep the parameters in memory.
"""
from __future__ import annotations

import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from metalm_jax import objectives
from metalm_jax import sharding
from metalm_jax.data import pipeline
from metalm_jax.train import state as state_lib
from metalm_jax.train import step as step_lib


def train_on_batches(config, model: state_lib.Model, objective: objectives.Objective, batches,
                     *, steps: int, seed: int, init_params=None, log_every: int = 50,
                     name: str = "") -> tuple[dict, object, dict]:
  """Trains `steps` steps of `objective` on an iterable of numpy batches (leading batch
  axis), from fresh or given parameters (finetuning: a fresh optimizer).

  Returns:
    (params, rest, {'seconds': wall time, 'final_loss': mean loss of the last 10% of steps,
     'losses': [loss per logged step]}).
  """
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  tx = state_lib.make_optimizer(config.optimizer, steps)
  schedule = state_lib.learning_rate_schedule(config.optimizer, steps)
  state, state_shardings, rest = state_lib.create_train_state(
      model, tx, jax.random.key(seed), mesh, rules)
  if init_params is not None:  # finetuning: pretrained weights, a fresh optimizer
    params = jax.tree.map(jnp.copy, init_params)
    # Placed as the step's outputs are, so the first and later steps share one compilation.
    state = jax.device_put(state.replace(params=params, opt_state=tx.init(params)),
                           state_shardings)
  # Batch features have ranks 1..5: shard only the leading (batch) axis.
  batch_shardings = sharding.batch_sharding(mesh, rules, ndim=1)
  train_step = step_lib.make_train_step(model, tx, objective, schedule, state_shardings, rest,
                                        batch_shardings, mesh, rules=rules)
  batches = iter(batches)
  start, losses, tail = time.time(), [], []
  for i in range(steps):
    batch = pipeline.make_global_batch(next(batches), batch_shardings)
    state, metrics = train_step(state, rest, batch)
    if i >= steps - max(1, steps // 10):
      tail.append(float(metrics["loss"]))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      loss = float(metrics["loss"])
      losses.append((i + 1, loss))
      logging.info("%s step %d/%d loss %.4f (%.1f s)", name, i + 1, steps, loss,
                   time.time() - start)
  jax.block_until_ready(state.params)
  return state.params, rest, {"seconds": time.time() - start,
                              "final_loss": float(np.mean(tail)), "losses": losses}
