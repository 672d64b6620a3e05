"""Freezing parameters via optax masks: a docked encoder's lower layers, or any by regex.

`trainable_mask(params, ...)` returns a tree of bools shaped like `params` (True = trained);
`freeze(tx, mask)` wraps an optimizer so frozen leaves get zero updates and no optimizer
state (optax.multi_transform with optax.set_to_zero):

  mask = freeze.trainable_mask(params, trainable_layers=2)            # params: pure dict
  tx = freeze.freeze(make_optimizer(...), mask)

Frozen in the encoder: token / position / type embeddings, the embedding LayerNorm, the
relative-bias table and layers 0 .. n-k-1. Trained: layers n-k .. n-1, the final LayerNorm
(pre-LN layout), and everything outside the encoder (decoder, connector, vision encoder).

Config-driven freezing (`config.optimizer.freeze`, applied by `train.state.make_optimizer`)
names parameters by regexes `re.search`ed in their '/'-joined paths
('blocks/0/attention/query/kernel', 'embedder/embedding'):

  mask = freeze.regex_trainable_mask(params, ('^embedder/', '^blocks/0/'))
  tx = freeze.freeze(make_optimizer(...), mask)

`first_match` is the first-match-wins lookup that `config.optimizer.lr_multipliers` shares,
and `check_patterns` makes a pattern that selects no parameter a ConfigError naming it and
listing real paths: nothing in a config is silently ignored.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from metalm_jax import config as config_lib


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
      raise config_lib.ConfigError(f'{name}[{i}]={pattern!r} must be a regex string')
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise config_lib.ConfigError(f'{name}[{i}]={pattern!r} is not a valid regex ({e})') from e
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
      raise config_lib.ConfigError(
          f'{name}[{i}]={patterns[i]!r} matches only parameters an earlier pattern already '
          f'selects ({by}; first match wins), e.g. {shadowed[0]!r}: reorder or remove it.')
    closest = difflib.get_close_matches(patterns[i], paths, n=4, cutoff=0.0)
    top = sorted({p.split('/')[0] for p in paths})
    raise config_lib.ConfigError(
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
