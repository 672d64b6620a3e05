"""The pure, jitted train and eval steps."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from metalm_jax import sharding
from metalm_jax.objectives import Objective
from metalm_jax.train.state import Model, TrainState


def replicated(mesh, tree) -> Any:
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def make_train_step(model: Model, tx: optax.GradientTransformation, objective: Objective,
                    schedule: optax.Schedule, state_shardings, rest, batch_shardings, mesh, *,
                    rules: sharding.Rules | None = None, skip_nonfinite: bool = False):
  """Returns `train_step(state, rest, batch) -> (state, metrics)`, jitted with explicit
  in/out shardings and the old state's buffers donated.

  With `rules` (the config's sharding rules), the model's activations are pinned by their
  logical names (`sharding.activation_sharding`: batch over the data axes, logits' vocab as
  the rules say); None leaves their sharding to XLA's propagation from the inputs.

  With `skip_nonfinite`, an update whose loss or gradient norm is NaN/inf is dropped
  (parameters and optimizer state unchanged) and counted in `state.nonfinite_skips`.
  """

  def train_step(state: TrainState, rest, batch):
    rng, dropout_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

    def loss_fn(params):
      module = model.merge(params, rest)
      with sharding.activation_sharding(mesh, rules):
        return objective.loss(module, batch, deterministic=False, rng=dropout_rng)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    skips = state.nonfinite_skips
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
      skips = skips + (~finite).astype(jnp.int32)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   nonfinite_skips=skips)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(rng), nonfinite_skips=skips)
    return new_state, metrics

  return jax.jit(
      train_step,
      in_shardings=(state_shardings, replicated(mesh, rest), batch_shardings),
      out_shardings=(state_shardings, NamedSharding(mesh, P())),
      donate_argnums=(0,))


def make_eval_step(model: Model, objective: Objective, state_shardings, rest, batch_shardings,
                   mesh, *, rules: sharding.Rules | None = None):
  """Returns `eval_step(params, rest, batch) -> metrics` (token-weighted sums, for exact means
  over a whole split); `rules` as for `make_train_step`."""

  def eval_step(params, rest, batch):
    module = model.merge(params, rest)
    with sharding.activation_sharding(mesh, rules):
      _, metrics = objective.loss(module, batch, deterministic=True)
    tokens = metrics["tokens"]
    return {"loss_sum": metrics["loss"] * tokens, "accuracy_sum": metrics["accuracy"] * tokens,
            "tokens": tokens}

  return jax.jit(
      eval_step,
      in_shardings=(state_shardings.params, replicated(mesh, rest), batch_shardings),
      out_shardings=NamedSharding(mesh, P()))


def summarize_eval(totals: dict[str, float]) -> dict[str, float]:
  tokens = max(totals["tokens"], 1e-8)
  loss = totals["loss_sum"] / tokens
  return {"loss": loss, "perplexity": float(jnp.exp(jnp.minimum(loss, 50.0))),
          "accuracy": totals["accuracy_sum"] / tokens, "tokens": totals["tokens"]}
