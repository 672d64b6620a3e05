"""Training objectives: a registry by name.

An objective is a pair: a NumPy `prepare(example, rng) -> example` that runs per example in the
grain pipeline (masking, span sampling, permutation; None when the packed LM batch is all it
needs) and a JAX `loss(model, batch, *, deterministic=True, rng=None) -> (loss, metrics)` that
runs inside the jitted train step (`rng`: a fresh PRNG key per step, for dropout).
`metrics` must hold 'loss' and 'tokens' (the number of positions the loss averages over). `config.objective` names one.

  from metalm_jax import objectives
  objectives.register("my_lm", loss=my_loss)       # e.g. in a notebook cell
  config.objective = "my_lm"
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

LossFn = Callable[..., tuple[Any, dict[str, Any]]]
PrepareFn = Callable[[dict, Any], dict]


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  loss: LossFn
  prepare: PrepareFn | None = None
  # True when prepare writes [MASK] / sentinel placeholders: the trainer then checks that
  # config.model.vocab_size has room for them (objectives.special_tokens.check_vocab).
  special_tokens: bool = False


_REGISTRY: dict[str, Objective] = {}


def register(name: str, *, loss: LossFn, prepare: PrepareFn | None = None,
             special_tokens: bool = False, overwrite: bool = False) -> Objective:
  """Registers an objective under `name` (set overwrite=True to redefine one in a notebook)."""
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"objective {name!r} is already registered; pass overwrite=True to replace it")
  objective = Objective(name=name, loss=loss, prepare=prepare, special_tokens=special_tokens)
  _REGISTRY[name] = objective
  return objective


def get(name: str) -> Objective:
  if ":" in name or "," in name:  # a weighted mix, e.g. "causal_lm:0.7,masked_lm:0.3"
    return mixture.from_spec(name)
  if name not in _REGISTRY:
    raise ValueError(f"config.objective={name!r} is not registered; known objectives: "
                     f"{sorted(_REGISTRY)}. Register new ones with metalm_jax.objectives.register")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


from metalm_jax.objectives import causal_lm  # noqa: E402,F401  (registers built-ins)
from metalm_jax.objectives import (denoising, masked_lm, mixture, permutation_lm,  # noqa: E402,F401
                                   prefix_lm, span_corruption)
from metalm_jax.objectives import semi_causal_lm  # noqa: E402,F401
