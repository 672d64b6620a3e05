"""The pure, jitted train and eval steps: one of each for every model family.

    state, metrics = train_step(state, rest, batch)

loss and gradient of `family.loss` -> optax update -> `family.after_update` (mPLUG: the
temperature clamp, the momentum encoders' EMA and the ITC queues; language models: nothing).
The state is donated.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from metalm_jax import sharding
from metalm_jax.families.base import ObjectiveLoss
from metalm_jax.train.state import Model, TrainState


def replicated(mesh, tree) -> Any:
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def step_family(family_or_objective):
  """A `families.Family` as it is; an `objectives.Objective` as `ObjectiveLoss` (a language
  model step on ready batches, no extra state)."""
  if hasattr(family_or_objective, "after_update"):
    return family_or_objective
  return ObjectiveLoss(family_or_objective)


def make_train_step(model: Model, tx: optax.GradientTransformation, family,
                    schedule: optax.Schedule, state_shardings, rest, batch_shardings, mesh, *,
                    rules: sharding.Rules | None = None, skip_nonfinite: bool = False):
  """Returns `train_step(state, rest, batch) -> (state, metrics)`, jitted with explicit
  in/out shardings and the old state's buffers donated.

  Args:
    model: the static model (`state.Model`).
    tx: the optimizer (`optimizer.make_optimizer`).
    family: a `families.Family` (its `loss` and `after_update`), or an `objectives.Objective`
      (`step_family`).
    schedule: the learning rate at each step (logged as 'learning_rate').
    state_shardings, batch_shardings: of the train state and of every batch feature.
    rules: the config's sharding rules: the model's activations are pinned by their logical
      names (`sharding.activation_sharding`); None leaves them to XLA's propagation.
    skip_nonfinite: an update whose loss or gradient norm is NaN/inf is dropped (params,
      optimizer state and extra state unchanged) and counted in `state.nonfinite_skips`.
  """
  family = step_family(family)

  def train_step(state: TrainState, rest, batch):
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))

    def loss_fn(params):
      with sharding.activation_sharding(mesh, rules):
        return family.loss(model, params, rest, state.extra, batch, rng=key, step=state.step)

    (loss, (metrics, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, extra = family.after_update(params, state.extra, aux, state.step)
    grad_norm = optax.tree.norm(grads)
    skips = state.nonfinite_skips
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
      extra = jax.tree.map(keep, extra, state.extra)
      skips = skips + (~finite).astype(jnp.int32)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   nonfinite_skips=skips)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(rng), nonfinite_skips=skips, extra=extra)
    return new_state, metrics

  return jax.jit(
      train_step,
      in_shardings=(state_shardings, replicated(mesh, rest), batch_shardings),
      out_shardings=(state_shardings, NamedSharding(mesh, P())),
      donate_argnums=(0,))


def make_eval_step(model: Model, family, state_shardings, rest, batch_shardings, mesh, *,
                   rules: sharding.Rules | None = None):
  """Returns `eval_step(params, extra, rest, batch) -> {'loss_sum', 'accuracy_sum', 'tokens'}`
  (`family.eval_sums`: sums, for exact means over a whole split); `rules` as for
  `make_train_step`."""
  family = step_family(family)

  def eval_step(params, extra, rest, batch):
    with sharding.activation_sharding(mesh, rules):
      return family.eval_sums(model, params, rest, extra, batch)

  return jax.jit(
      eval_step,
      in_shardings=(state_shardings.params, state_shardings.extra, replicated(mesh, rest),
                    batch_shardings),
      out_shardings=NamedSharding(mesh, P()))
