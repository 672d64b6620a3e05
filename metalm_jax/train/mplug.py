"""mPLUG pretraining state and step: momentum encoders and ITC queues live in the train state.

    state = MPlugTrainState(step, params, opt_state, rng, momentum, queues)

  momentum  the EMA copies of the modules ITC's momentum model uses (`MOMENTUM_MODULES`:
            the ViT, its projection, the text encoder and both ITC projections), a dict
            shaped like that subset of the params, sharded like them.
  queues    {'image', 'text': [Q, E] f32, 'ids': int32 [Q], 'ptr': int32 []}: ring buffers
            of earlier batches' momentum features (replicated; 2 x 64 MiB at the paper's
            Q = 65,536, E = 256).

One jitted step (`make_pretrain_step`): the four losses and their gradient, the AdamW update,
then momentum <- decay * momentum + (1 - decay) * new params, then the batch's momentum
features written into the queues. (ALBEF updates the momentum encoders at the start of the
next forward; the sequence of values is the same.) Finetuning needs none of this: it is the
ordinary `train.step.make_train_step` with `objectives.mplug.seq2seq_loss`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from metalm_jax import sharding
from metalm_jax.objectives import mplug as mplug_objectives
from metalm_jax.train import state as state_lib
from metalm_jax.train.step import replicated

MOMENTUM_MODULES = ('vision_encoder', 'vision_projection', 'text_encoder',
                    'itc_image_projection', 'itc_text_projection')


@flax.struct.dataclass
class MPlugTrainState:
  step: jax.Array
  params: dict
  opt_state: Any
  rng: jax.Array
  momentum: dict
  queues: dict


def momentum_subset(params: Mapping) -> dict:
  """The part of the params that has a momentum copy."""
  return {k: params[k] for k in MOMENTUM_MODULES if k in params}


def create_pretrain_state(model: state_lib.Model, tx: optax.GradientTransformation,
                          rng: jax.Array, mesh: jax.sharding.Mesh, rules, *,
                          queue_size: int) -> tuple[MPlugTrainState, Any, Any]:
  """The sharded initial state: fresh params, momentum = a copy of them, random queues.

  Returns (state, state_shardings, rest) as `train.state.create_train_state`.
  """
  init_key, state_key, queue_key = jax.random.split(rng, 3)
  itc_dim = int(model.config.get('itc_dim', 256))

  def init(key):
    params, _ = model.init(key)
    return MPlugTrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), rng=jax.random.key_data(state_key),
                           momentum=jax.tree.map(jnp.copy, momentum_subset(params)),
                           queues=mplug_objectives.init_queues(queue_size, itc_dim, queue_key))

  abstract = jax.eval_shape(init, init_key)
  shardings = sharding.state_shardings(abstract, model.logical_specs, mesh, rules)
  state = jax.jit(init, out_shardings=shardings)(init_key)
  rest = jax.jit(lambda key: model.init(key)[1])(init_key)
  return state, shardings, rest


def make_pretrain_step(model: state_lib.Model, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, state_shardings, rest, batch_shardings, mesh, *,
                       loss_weights: Mapping[str, float], alpha: float = 0.4,
                       alpha_warmup_steps: int = 0, momentum_decay: float = 0.995,
                       mask_rate: float = 0.15):
  """Returns `step(state, rest, batch) -> (state, metrics)`, jitted with explicit shardings and
  the old state donated.

  Args:
    loss_weights: {'itc', 'itm', 'mlm', 'prefix_lm'} -> weight (0 = not computed).
    alpha: momentum-distillation weight; with alpha_warmup_steps > 0 it ramps linearly from
      0 over that many steps (ALBEF ramps it over the first epoch).
    momentum_decay: EMA decay of the momentum encoders (0.995).
  """
  if not 0.0 <= momentum_decay <= 1.0:
    raise ValueError(f'momentum_decay={momentum_decay} must be in [0, 1].')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha={alpha} must be in [0, 1].')

  def train_step(state: MPlugTrainState, rest, batch):
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
    momentum_module = model.merge({**state.params, **state.momentum}, rest)
    ramp = (1.0 if alpha_warmup_steps <= 0 else
            jnp.minimum(1.0, state.step.astype(jnp.float32) / alpha_warmup_steps))

    def loss_fn(params):
      return mplug_objectives.pretrain_loss(
          model.merge(params, rest), momentum_module, batch, state.queues, key,
          loss_weights=loss_weights, alpha=alpha * ramp, mask_rate=mask_rate,
          deterministic=False)

    (_, (metrics, rows)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    momentum = mplug_objectives.ema_update(state.momentum, momentum_subset(params),
                                           momentum_decay)
    queues = mplug_objectives.enqueue(state.queues, rows['image'], rows['text'], rows['ids'])
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=jax.random.key_data(rng), momentum=momentum,
                         queues=queues), metrics

  return jax.jit(train_step,
                 in_shardings=(state_shardings, replicated(mesh, rest), batch_shardings),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())),
                 donate_argnums=(0,))


def batch_shardings(mesh: jax.sharding.Mesh, rules, batch: Mapping) -> dict:
  """Batch axis of every feature over the rules' 'batch' mesh axes."""
  return {k: sharding.batch_sharding(mesh, rules, ndim=max(v.ndim, 1)) for k, v in batch.items()}


__all__ = ['MOMENTUM_MODULES', 'MPlugTrainState', 'batch_shardings', 'create_pretrain_state',
           'make_pretrain_step', 'momentum_subset']
