"""Freezing a docked encoder: all but its last k layers (METALM: k = 2), via optax masks.

`trainable_mask(params, ...)` returns a tree of bools shaped like `params` (True = trained);
`freeze(tx, mask)` wraps an optimizer so frozen leaves get zero updates and no optimizer
state (optax.multi_transform with optax.set_to_zero):

  mask = freeze.trainable_mask(params, trainable_layers=2)            # params: pure dict
  tx = freeze.freeze(make_optimizer(...), mask)

Frozen in the encoder: token / position / type embeddings, the embedding LayerNorm, the
relative-bias table and layers 0 .. n-k-1. Trained: layers n-k .. n-1, the final LayerNorm
(pre-LN layout), and everything outside the encoder (decoder, connector, vision encoder).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax


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
