"""Train state, optimizer, and sharded initialisation.

The model is a Flax NNX module used functionally: `nnx.split` gives a static `graphdef` and
parameter / other state; the train state holds the parameters as a plain nested dict of arrays
(easy for optax, orbax and sharding), and `Model.merge(params, rest)` rebuilds the
module inside jitted functions.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from metalm_jax import config as config_lib
from metalm_jax import models
from metalm_jax import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. A pytree: checkpointed whole."""
  step: jax.Array  # int32 scalar
  params: dict  # nested dict of arrays (nnx.Param values)
  opt_state: Any
  rng: jax.Array  # raw uint32 PRNG key data, split once per step
  nonfinite_skips: jax.Array  # int32 scalar: updates skipped for a NaN/inf (nan_policy='skip')


def build_model(model_config, rngs: nnx.Rngs) -> nnx.Module:
  name, kwargs = config_lib.model_kwargs(model_config)
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return models.build_model(name, rngs=rngs, **kwargs)


def learning_rate_schedule(opt_config, num_train_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to peak * end_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.learning_rate,
      warmup_steps=min(opt_config.warmup_steps, max(num_train_steps - 1, 1)),
      decay_steps=max(num_train_steps, opt_config.warmup_steps + 1),
      end_value=opt_config.learning_rate * opt_config.end_lr_ratio)


def decay_mask(params) -> Any:
  """Weight decay on weight matrices only; never on biases, norm scales or other vectors."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_config, num_train_steps: int) -> optax.GradientTransformation:
  """AdamW with warmup + cosine schedule and global-norm clipping."""
  parts = []
  if opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  parts.append(optax.adamw(
      learning_rate_schedule(opt_config, num_train_steps), b1=opt_config.b1, b2=opt_config.b2,
      eps=opt_config.eps, weight_decay=opt_config.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


class Model:
  """The static half of a split NNX model, and `merge` to rebuild it inside jitted functions.

  Built from `jax.eval_shape`, so no parameter memory is touched: `abstract_params` (shapes)
  and `logical_specs` ({param path: logical PartitionSpec}) drive the sharded initialisation.
  """

  def __init__(self, model_config):
    self.config = model_config
    abstract = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
    self.graphdef, self._abstract_param_state, _ = nnx.split(abstract, nnx.Param, ...)
    self.abstract_params = self._abstract_param_state.to_pure_dict()
    self.logical_specs = sharding.param_logical_specs(self._abstract_param_state)

  def init(self, rng: jax.Array) -> tuple[dict, nnx.State]:
    """(params as a pure dict, the non-parameter module state: empty for the decoder)."""
    model = build_model(self.config, nnx.Rngs(rng))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return params.to_pure_dict(), rest

  def merge(self, params: Mapping, rest: nnx.State):
    """Rebuilds the module from a pure params dict (inside or outside jit)."""
    param_state = jax.tree.map(lambda v: v, self._abstract_param_state)  # fresh copy
    nnx.replace_by_pure_dict(param_state, params)
    return nnx.merge(self.graphdef, param_state, rest)

  def param_count(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.abstract_params))


def create_train_state(model: Model, tx: optax.GradientTransformation, rng: jax.Array,
                       mesh: jax.sharding.Mesh, rules) -> tuple[TrainState, Any, nnx.State]:
  """Initialises the train state directly in its sharded layout.

  `jax.eval_shape` gives the state's structure without allocating; the shardings come from the
  parameters' logical names; then one `jax.jit(init, out_shardings=...)` materialises each
  shard on its device (no host copy of the full parameters ever exists).

  Returns (state, state_shardings, rest) where `rest` is the module's non-parameter state.
  """
  init_key, state_key = jax.random.split(rng)

  def init(key):
    params, _ = model.init(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_key),
                      nonfinite_skips=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init, init_key)
  shardings = sharding.state_shardings(abstract, model.logical_specs, mesh, rules)
  state = jax.jit(init, out_shardings=shardings)(init_key)
  # The non-parameter state (rng streams) is tiny; the unused parameters are compiled away.
  rest = jax.jit(lambda key: model.init(key)[1])(init_key)
  return state, shardings, rest
