"""The optimizer: AdamW with warmup + cosine, clipping, weight-decay mask, freezing, per-module
learning rates and gradient accumulation, all from `config.optimizer`.

Freezing uses optax masks: a docked encoder's lower layers (`trainable_mask`, applied when
`config.model.trainable_encoder_layers >= 0`) or any parameter by regex (`config.optimizer.freeze`).
A frozen leaf gets zero updates and no optimizer state (`optax.multi_transform` with
`optax.set_to_zero`):

  mask = trainable_mask(params, trainable_layers=2)            # params: pure dict
  tx = freeze(optax.adamw(...), mask)

Frozen in the encoder: token / position / type embeddings, the embedding LayerNorm, the
relative-bias table and layers 0 .. n-k-1. Trained: layers n-k .. n-1, the final LayerNorm
(pre-LN layout), and everything outside the encoder (decoder, connector, vision encoder).

Regexes are `re.search`ed in '/'-joined parameter paths ('blocks/0/attention/query/kernel',
'embedder/embedding'). `first_match` is the first-match-wins lookup that
`config.optimizer.lr_multipliers` shares, and `check_patterns` makes a pattern that selects no
parameter a ConfigError naming it and listing real paths: nothing in a config is silently
ignored.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metalm_jax import config as config_lib
from metalm_jax.config import ConfigError
from metalm_jax.train import weight_decay


def _key(entry) -> Any:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def trainable_mask(params: Mapping, *, trainable_layers: int, encoder_key: str = 'text_encoder',
                   layers_key: str = 'layers') -> Any:
  """Bool tree like `params`: False for the encoder's frozen leaves, True elsewhere.

  Args:
    params: pure params dict (e.g. TrainState.params / nnx.state(...).to_pure_dict()).
    trainable_layers: k, how many of the encoder's top layers stay trainable (0 = freeze
      the whole encoder; >= num_layers = train it all).
    encoder_key: the encoder's entry in `params`.
    layers_key: the encoder's list of layers.
  """
  if trainable_layers < 0:
    raise ValueError(f'trainable_layers={trainable_layers} must be >= 0.')
  if encoder_key not in params:
    raise ValueError(f'params has no {encoder_key!r} entry (top-level keys: '
                     f'{sorted(params)}); the model has no docked encoder to freeze.')
  num_layers = len(params[encoder_key].get(layers_key, {}))
  first_trained = num_layers - trainable_layers

  def trainable(path, _):
    keys = [_key(p) for p in path]
    if not keys or keys[0] != encoder_key:
      return True
    if len(keys) > 2 and keys[1] == layers_key:
      return int(keys[2]) >= first_trained
    return keys[1] == 'final_norm' and trainable_layers > 0

  return jax.tree_util.tree_map_with_path(trainable, params)


def freeze(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
  """`tx` on leaves where mask is True; zero updates (and no state) where it is False."""
  labels = jax.tree.map(lambda m: 'trained' if m else 'frozen', mask)
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)


def path_str(path) -> str:
  """A `tree_flatten_with_path` key path as the '/'-joined string patterns match against."""
  return '/'.join(str(_key(p)) for p in path)


def param_paths(params: Any) -> list[str]:
  """Every leaf's '/'-joined path, in tree order (e.g. 'blocks/0/mlp/wo/kernel')."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def compile_patterns(patterns: Sequence[str], name: str) -> list[re.Pattern]:
  """`patterns` compiled; a malformed one is a ConfigError naming `name`[i]."""
  compiled = []
  for i, pattern in enumerate(patterns):
    if not isinstance(pattern, str):
      raise ConfigError(f'{name}[{i}]={pattern!r} must be a regex string')
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ConfigError(f'{name}[{i}]={pattern!r} is not a valid regex ({e})') from e
  return compiled


def first_match(path: str, compiled: Sequence[re.Pattern]) -> int:
  """Index of the first pattern that `re.search`es `path`, or -1."""
  for i, pattern in enumerate(compiled):
    if pattern.search(path):
      return i
  return -1


def check_patterns(params: Any, patterns: Sequence[str], name: str) -> None:
  """Raises ConfigError for a pattern that selects no parameter of `params`.

  A pattern selects the parameters it is the first match of; one that matches nothing, or only
  parameters an earlier pattern already took (first match wins), would be ignored silently.

  Args:
    params: the parameter tree (arrays or shapes, e.g. `train.state.Model.abstract_params`).
    patterns: regexes over '/'-joined parameter paths, in priority order.
    name: the config key, for messages (e.g. 'config.optimizer.freeze').
  """
  compiled = compile_patterns(patterns, name)
  paths = param_paths(params)
  taken = {first_match(p, compiled) for p in paths}
  for i, pattern in enumerate(compiled):
    if i in taken:
      continue
    shadowed = [p for p in paths if pattern.search(p)]
    if shadowed:
      by = sorted({patterns[first_match(p, compiled)] for p in shadowed})
      raise ConfigError(
          f'{name}[{i}]={patterns[i]!r} matches only parameters an earlier pattern already '
          f'selects ({by}; first match wins), e.g. {shadowed[0]!r}: reorder or remove it.')
    closest = difflib.get_close_matches(patterns[i], paths, n=4, cutoff=0.0)
    top = sorted({p.split('/')[0] for p in paths})
    raise ConfigError(
        f'{name}[{i}]={patterns[i]!r} matches no parameter. Patterns are regexes searched in '
        f"'/'-joined parameter paths; closest paths: {closest}; top-level modules: {top} "
        f'({len(paths)} parameters). Fix the pattern or remove it.')


def regex_trainable_mask(params: Any, patterns: Sequence[str], *,
                         name: str = 'config.optimizer.freeze') -> Any:
  """Bool tree like `params`: False where a pattern `re.search`es the '/'-joined path.

  Raises ConfigError (naming `name`[i]) for a pattern that matches no parameter.
  """
  check_patterns(params, patterns, name)
  compiled = compile_patterns(patterns, name)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: first_match(path_str(path), compiled) < 0, params)


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


def scale_by_path(multiplier: Callable[[str], float]) -> optax.GradientTransformation:
  """Multiplies each leaf's update by `multiplier('/'-joined path)` (stateless).

  Works on the masked trees inside `optax.multi_transform` too (masked leaves are skipped).
  """

  def update(updates, state, params=None):
    del params

    def scale(path, u):
      m = multiplier(path_str(path))
      return u if m == 1.0 else u * jnp.asarray(m, u.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def lr_multiplier_fn(opt_config) -> Callable[[str], float]:
  """path -> learning-rate multiplier: the first matching `opt_config.lr_multipliers` pair's
  multiplier, 1.0 where none matches."""
  pairs = config_lib.lr_multiplier_pairs(opt_config)
  compiled = compile_patterns([p for p, _ in pairs], "config.optimizer.lr_multipliers")

  def multiplier(path: str) -> float:
    i = first_match(path, compiled)
    return 1.0 if i < 0 else float(pairs[i][1])

  return multiplier


def check_optimizer_patterns(opt_config, params, trainable=None) -> None:
  """ConfigError for a `freeze` or `lr_multipliers` regex that selects no parameter of
  `params` (arrays or shapes), naming it and listing real parameter paths."""
  check_patterns(params, config_lib.freeze_patterns(opt_config),
                        "config.optimizer.freeze")
  check_patterns(params, [p for p, _ in config_lib.lr_multiplier_pairs(opt_config)],
                        "config.optimizer.lr_multipliers")
  if trainable is not None and (jax.tree.structure(trainable) != jax.tree.structure(params)):
    raise ValueError("make_optimizer(trainable=...) must be a bool tree shaped like the params "
                     "(e.g. trainable_mask(params, ...))")


def make_optimizer(opt_config, num_train_steps: int, params: Any = None, *,
                   trainable: Any = None) -> optax.GradientTransformation:
  """AdamW with warmup + cosine schedule and global-norm clipping, plus (all from config):

  * `freeze`: regexes over '/'-joined parameter paths (`re.search`); matching parameters get
    zero updates, no weight decay and no optimizer state (`optax.multi_transform` with
    `optax.set_to_zero`). `trainable` (a bool tree like the params, False = frozen, e.g.
    `trainable_mask` for a docked encoder) freezes more.
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
      mask = regex_trainable_mask(tree, frozen)
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
