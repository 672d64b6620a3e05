"""Train state and sharded initialisation (the optimizer is in `train.optimizer`).

The model is a Flax NNX module used functionally: `nnx.split` gives a static `graphdef` and
parameter / other state; the train state holds the parameters as a plain nested dict of arrays
(easy for optax, orbax and sharding), and `Model.merge(params, rest)` rebuilds the
module inside jitted functions. A model family's own state (mPLUG's momentum encoders and
ITC queues) rides in `TrainState.extra`, so checkpoints, resume and sharding hold for it too.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from metalm_jax import config as config_lib
from metalm_jax import models
from metalm_jax import sharding
from metalm_jax.train import peft as peft_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. A pytree: checkpointed whole."""
  step: jax.Array  # int32 scalar
  params: dict  # nested dict of arrays (nnx.Param values)
  opt_state: Any
  rng: jax.Array  # raw uint32 PRNG key data, split once per step
  nonfinite_skips: jax.Array  # int32 scalar: updates skipped for a NaN/inf (nan_policy='skip')
  # The family's state beside the params (`families.Family.init_extra`): None for language
  # models; mPLUG pretraining: {'momentum': EMA params, 'queues': ITC ring buffers}.
  extra: Any = None


def build_model(model_config, rngs: nnx.Rngs) -> nnx.Module:
  name, kwargs = config_lib.model_kwargs(model_config)
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return models.build_model(name, rngs=rngs, **kwargs)


class Model:
  """The static half of a split NNX model, and `merge` to rebuild it inside jitted functions.

  Built from `jax.eval_shape`, so no parameter memory is touched: `abstract_params` (shapes)
  and `logical_specs` ({param path: logical PartitionSpec}) drive the sharded initialisation.

  With `peft_config` (`config.peft`, train/peft.py) method 'lora', the params hold LoRA factors
  beside each target kernel (`lora_targets`) and `merge` builds the adapted kernels from them;
  with any method, `merge` stops the gradient of the params peft freezes.
  """

  def __init__(self, model_config, peft_config=None):
    self.config = model_config
    self.peft = peft_config if peft_lib.method(peft_config) else None
    abstract = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
    self.graphdef, self._abstract_param_state, _ = nnx.split(abstract, nnx.Param, ...)
    self.abstract_params = self._abstract_param_state.to_pure_dict()
    self.logical_specs = sharding.param_logical_specs(self._abstract_param_state)
    self.lora_targets: list[peft_lib.Target] = []
    method = peft_lib.method(self.peft)
    if method == "lora":
      self.lora_targets = peft_lib.lora_targets(
          self.abstract_params, self.logical_specs, self.peft,
          frozen=_encoder_frozen(model_config, self.abstract_params))
      self.abstract_params = peft_lib.add_abstract_factors(
          self.abstract_params, self.lora_targets, self.peft.rank)
      self.logical_specs = {**self.logical_specs,
                            **peft_lib.factor_logical_specs(self.lora_targets)}
    elif method == "bitfit":
      peft_lib.check_bitfit(self.abstract_params)

  @classmethod
  def from_config(cls, config) -> "Model":
    """The model of a whole training config: `config.model` with `config.peft`."""
    return cls(config.model, config.get("peft"))

  def init(self, rng: jax.Array) -> tuple[dict, nnx.State]:
    """(params as a pure dict, the non-parameter module state: empty for the decoder)."""
    model = build_model(self.config, nnx.Rngs(rng))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = params.to_pure_dict()
    if self.lora_targets:
      params = peft_lib.init_factors(params, self.lora_targets, self.peft.rank,
                                     jax.random.fold_in(rng, 0x10A))
    return params, rest

  def plain_params(self, params: Mapping) -> dict:
    """The params of the original model (LoRA factors merged into their kernels)."""
    if self.lora_targets:
      return peft_lib.merge_lora(params, float(self.peft.alpha))
    return params

  def merge(self, params: Mapping, rest: nnx.State):
    """Rebuilds the module from a pure params dict (inside or outside jit). With peft: the
    frozen params' gradient stopped, LoRA factors merged into their kernels."""
    if self.peft is not None:
      params = self.plain_params(peft_lib.stop_frozen_gradients(params, self.peft))
    param_state = jax.tree.map(lambda v: v, self._abstract_param_state)  # fresh copy
    nnx.replace_by_pure_dict(param_state, params)
    return nnx.merge(self.graphdef, param_state, rest)

  def param_count(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.abstract_params))


def _encoder_frozen(model_config, abstract_params) -> Any:
  """True where `config.model.trainable_encoder_layers` freezes a param (None if unset)."""
  from metalm_jax.train import optimizer as optimizer_lib  # local: optimizer imports no state

  layers = dict(model_config).get("trainable_encoder_layers", -1)
  if layers is None or layers < 0:
    return None
  mask = optimizer_lib.trainable_mask(abstract_params, trainable_layers=layers)
  return jax.tree.map(lambda t: not t, mask)


# (params, PRNG key) -> the family's extra state (traced inside the init jit).
InitExtra = Callable[[dict, jax.Array], Any]


def _initializer(model: Model, tx: optax.GradientTransformation, rng: jax.Array,
                 init_extra: InitExtra | None):
  """(init(key) -> TrainState, key): the state's initialiser, traced under jit / eval_shape."""
  init_key, state_key = jax.random.split(rng)
  extra_key = jax.random.fold_in(rng, 2)

  def init(key):
    params, _ = model.init(key)
    extra = None if init_extra is None else init_extra(params, extra_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_key),
                      nonfinite_skips=jnp.zeros((), jnp.int32), extra=extra)

  return init, init_key


def abstract_train_state(model: Model, tx: optax.GradientTransformation, rng: jax.Array,
                         mesh: jax.sharding.Mesh, rules, *,
                         init_extra: InitExtra | None = None) -> tuple[TrainState, Any]:
  """(the train state as shapes, its shardings): the layout `create_train_state` makes,
  without allocating anything (for restoring a checkpoint's parts)."""
  init, init_key = _initializer(model, tx, rng, init_extra)
  abstract = jax.eval_shape(init, init_key)
  return abstract, sharding.state_shardings(abstract, model.logical_specs, mesh, rules)


def create_train_state(model: Model, tx: optax.GradientTransformation, rng: jax.Array,
                       mesh: jax.sharding.Mesh, rules, *, init_extra: InitExtra | None = None
                       ) -> tuple[TrainState, Any, nnx.State]:
  """Initialises the train state directly in its sharded layout.

  `jax.eval_shape` gives the state's structure without allocating; the shardings come from the
  parameters' logical names; then one `jax.jit(init, out_shardings=...)` materialises each
  shard on its device (no host copy of the full parameters ever exists).

  `init_extra(params, key)` builds the family's extra state (`TrainState.extra`) from the fresh
  params; its leaves are sharded like the parameter whose path they end with (mPLUG's
  momentum copies), others (queues) replicated.

  Returns (state, state_shardings, rest) where `rest` is the module's non-parameter state.
  """
  init, init_key = _initializer(model, tx, rng, init_extra)
  _, shardings = abstract_train_state(model, tx, rng, mesh, rules, init_extra=init_extra)
  state = jax.jit(init, out_shardings=shardings)(init_key)
  return state, shardings, init_rest(model, rng)


def init_rest(model: Model, rng: jax.Array) -> nnx.State:
  """The module's non-parameter state (rng streams) as `create_train_state` makes it from
  the same `rng`: tiny; the unused parameters are compiled away."""
  init_key, _ = jax.random.split(rng)
  return jax.jit(lambda key: model.init(key)[1])(init_key)
