"""Train state, optimizer, and sharded initialisation.

The model is a Flax NNX module used functionally: `nnx.split` gives a static `graphdef` and
parameter / other state; the train state holds the parameters as a plain nested dict of arrays
(easy for optax, orbax and sharding), and `Model.merge(params, rest)` rebuilds the
module inside jitted functions.
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
from metalm_jax.models import freeze
from metalm_jax.train import weight_decay


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
  """The learning rate at each trainer step: linear warmup to the peak, then cosine decay to
  peak * end_lr_ratio, over `num_train_steps` trainer steps (`warmup_steps` of them warmup).

  With gradient accumulation (`opt_config.grad_accum_steps` = k > 1) a trainer step is one
  micro-batch and the parameters change once per k of them; the schedule is the same curve,
  held constant over each group of k: step s gets the rate of s // k * k, the first micro-step
  of its group, which is the rate that group's update uses. So the rate logged at each step
  (`schedule(state.step)`) is the one applied, and changing k keeps the curve's shape.
  """
  k = config_lib.grad_accum_steps(opt_config)
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.learning_rate,
      warmup_steps=min(opt_config.warmup_steps, max(num_train_steps - 1, 1)),
      decay_steps=max(num_train_steps, opt_config.warmup_steps + 1),
      end_value=opt_config.learning_rate * opt_config.end_lr_ratio)
  if k == 1:
    return base
  return lambda step: base(step // k * k)


def decay_mask(params) -> Any:
  """Weight decay on weight matrices only; never on biases, norm scales or other vectors."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def scale_by_path(multiplier: Callable[[str], float]) -> optax.GradientTransformation:
  """Multiplies each leaf's update by `multiplier('/'-joined path)` (stateless).

  Works on the masked trees inside `optax.multi_transform` too (masked leaves are skipped).
  """

  def update(updates, state, params=None):
    del params

    def scale(path, u):
      m = multiplier(freeze.path_str(path))
      return u if m == 1.0 else u * jnp.asarray(m, u.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def lr_multiplier_fn(opt_config) -> Callable[[str], float]:
  """path -> learning-rate multiplier: the first matching `opt_config.lr_multipliers` pair's
  multiplier, 1.0 where none matches."""
  pairs = config_lib.lr_multiplier_pairs(opt_config)
  compiled = freeze.compile_patterns([p for p, _ in pairs], "config.optimizer.lr_multipliers")

  def multiplier(path: str) -> float:
    i = freeze.first_match(path, compiled)
    return 1.0 if i < 0 else float(pairs[i][1])

  return multiplier


def check_optimizer_patterns(opt_config, params, trainable=None) -> None:
  """ConfigError for a `freeze` or `lr_multipliers` regex that selects no parameter of
  `params` (arrays or shapes), naming it and listing real parameter paths."""
  freeze.check_patterns(params, config_lib.freeze_patterns(opt_config),
                        "config.optimizer.freeze")
  freeze.check_patterns(params, [p for p, _ in config_lib.lr_multiplier_pairs(opt_config)],
                        "config.optimizer.lr_multipliers")
  if trainable is not None and (jax.tree.structure(trainable) != jax.tree.structure(params)):
    raise ValueError("make_optimizer(trainable=...) must be a bool tree shaped like the params "
                     "(e.g. models.freeze.trainable_mask(params, ...))")


def make_optimizer(opt_config, num_train_steps: int, params: Any = None, *,
                   trainable: Any = None) -> optax.GradientTransformation:
  """AdamW with warmup + cosine schedule and global-norm clipping, plus (all from config):

  * `freeze`: regexes over '/'-joined parameter paths (`re.search`); matching parameters get
    zero updates, no weight decay and no optimizer state (`optax.multi_transform` with
    `optax.set_to_zero`). `trainable` (a bool tree like the params, False = frozen, e.g.
    `models.freeze.trainable_mask` for a docked encoder) freezes more.
  * `lr_multipliers`: ((regex, multiplier), ...), first match wins, others 1.0: scales the
    parameter's whole AdamW update, weight decay included (a per-group learning rate).
  * `grad_accum_steps` = k > 1: `optax.MultiSteps` averages the gradients of k consecutive
    calls (micro-batches) and applies one AdamW update on the k-th; the calls before return
    zero updates. Clipping, the schedule and Adam's moments all see the averaged gradient:
    k micro-batches of b equal-length examples update like one batch of k*b. The inner
    schedule counts updates u and uses `learning_rate_schedule(...)(u * k)`, so
    `num_train_steps` (and `warmup_steps`) count micro-batches; it must be a multiple of k.

  Args:
    opt_config: `config.optimizer`.
    num_train_steps: trainer steps (micro-batches) of the whole run.
    params: the parameter tree, arrays or shapes (`Model.abstract_params`): checks the
      `freeze` / `lr_multipliers` patterns now. Without it they are checked at `tx.init`.
    trainable: optional bool tree like the params; False leaves are frozen.

  Raises:
    ConfigError: a pattern matches no parameter, a malformed entry, or num_train_steps not a
      multiple of grad_accum_steps.
  """
  k = config_lib.grad_accum_steps(opt_config, num_train_steps)
  frozen = config_lib.freeze_patterns(opt_config)
  has_multipliers = bool(config_lib.lr_multiplier_pairs(opt_config))
  if params is not None:
    check_optimizer_patterns(opt_config, params, trainable)

  schedule = learning_rate_schedule(opt_config, num_train_steps)
  parts = []
  if opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  parts.append(optax.adamw(
      schedule if k == 1 else (lambda update: schedule(update * k)), b1=opt_config.b1,
      b2=opt_config.b2, eps=opt_config.eps, weight_decay=opt_config.weight_decay,
      mask=weight_decay.decay_mask))
  if has_multipliers:
    parts.append(scale_by_path(lr_multiplier_fn(opt_config)))
  tx = optax.chain(*parts)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()

  if frozen or trainable is not None:
    def labels(tree):  # called on the params (init) and on the gradients (update)
      mask = freeze.regex_trainable_mask(tree, frozen)
      if trainable is not None:
        mask = jax.tree.map(lambda a, b: bool(a and b), mask, trainable)
      return jax.tree.map(lambda t: "trained" if t else "frozen", mask)

    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)

  if params is None and (frozen or has_multipliers):  # check the patterns at init instead
    inner = tx

    def init(params):
      check_optimizer_patterns(opt_config, params, trainable)
      return inner.init(params)

    tx = optax.GradientTransformation(init, inner.update)
  return tx


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
