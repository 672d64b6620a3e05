"""Multi-objective training: a weighted mix of registered objectives, named by a spec string.

    config.objective = "causal_lm:0.7,span_corruption:0.3"

`objectives.get(spec)` returns a mixed Objective. Its `prepare` draws ONE objective per
packed row with probability weight / sum(weights) and runs that objective's `prepare`. A
batch holds every objective's fields under `<name>/<key>` (rows given to another objective
carry that objective's fields zeroed, weights 0), so all shapes stay static. Its `loss`
runs each objective's loss on the whole batch (one forward pass per objective; rows with
zero weights add nothing) and combines them as a token-weighted mean,

    loss = sum_k loss_k * tokens_k / sum_k tokens_k,

the mean over every trained position of the batch, so the weights are the objectives'
shares of rows. Metrics: 'loss', 'accuracy', 'tokens' and per objective
'<name>/loss', '<name>/tokens'. Every objective must weight its loss by batch['weights'].
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from metalm_jax import objectives


def parse(spec: str) -> list[tuple[str, float]]:
  """'a:0.7,b:0.3' -> [('a', 0.7), ('b', 0.3)]; a name without ':w' has weight 1."""
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise ValueError(f"config.objective={spec!r} names no objective")
  out = []
  for part in parts:
    name, _, weight = part.partition(":")
    name = name.strip()
    try:
      value = float(weight) if weight.strip() else 1.0
    except ValueError:
      raise ValueError(f"config.objective={spec!r}: weight {weight!r} of {name!r} is not a "
                       "number; write e.g. 'causal_lm:0.7,masked_lm:0.3'") from None
    if not np.isfinite(value) or value <= 0:
      raise ValueError(f"config.objective={spec!r}: weight {value} of {name!r} must be a "
                       "positive number")
    if not re.fullmatch(r"[\w.\-]+", name):
      raise ValueError(f"config.objective={spec!r}: {name!r} is not an objective name")
    out.append((name, value))
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f"config.objective={spec!r} names an objective twice: {names}")
  return out


def _zeros_like(fields: dict) -> dict:
  return {k: np.zeros_like(v) for k, v in fields.items()}


def make(components: list[tuple[str, float]], name: str | None = None) -> objectives.Objective:
  """A mixed Objective of registered objectives [(name, weight > 0), ...]."""
  members = [(objectives.get(n), w) for n, w in components]
  probs = np.asarray([w for _, w in members], float)
  probs /= probs.sum()
  spec = name or ",".join(f"{n}:{w:g}" for n, w in components)

  def run_prepare(objective, row, rng):
    fields = objective.prepare(dict(row), rng) if objective.prepare else dict(row)
    return {k: np.asarray(v) for k, v in fields.items()}

  templates: dict[str, dict] = {}

  def prepare(row: dict, rng: np.random.Generator) -> dict:
    if not templates:  # every objective's fields once (shapes and dtypes), zeroed
      for objective, _ in members:
        probe = run_prepare(objective, row, np.random.default_rng(0))
        templates[objective.name] = _zeros_like(probe)
    chosen = members[int(rng.choice(len(members), p=probs))][0]
    out = {}
    for objective, _ in members:
      fields = (run_prepare(objective, row, rng) if objective is chosen
                else templates[objective.name])
      out.update({f"{objective.name}/{k}": v for k, v in fields.items()})
    return out

  def loss(model, batch, *, deterministic: bool = True, rng=None):
    metrics, losses, accuracies, counts = {}, [], [], []
    for i, (objective, _) in enumerate(members):
      prefix = objective.name + "/"
      sub = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
      sub_rng = None if rng is None else jax.random.fold_in(rng, i)
      value, sub_metrics = objective.loss(model, sub, deterministic=deterministic, rng=sub_rng)
      tokens = sub_metrics["tokens"]
      losses.append(value * tokens)
      accuracies.append(sub_metrics.get("accuracy", jnp.zeros(())) * tokens)
      counts.append(tokens)
      metrics[prefix + "loss"], metrics[prefix + "tokens"] = value, tokens
    total = sum(counts)
    denominator = jnp.maximum(total, 1e-8)
    value = sum(losses) / denominator
    metrics.update(loss=value, accuracy=sum(accuracies) / denominator, tokens=total)
    return value, metrics

  return objectives.Objective(name=spec, loss=loss, prepare=prepare,
                              special_tokens=any(o.special_tokens for o, _ in members))


def from_spec(spec: str) -> objectives.Objective:
  """The Objective named by `spec`: a registered name, or a weighted 'a:w,b:w' mix."""
  components = parse(spec)
  if len(components) == 1 and ":" not in spec:
    return objectives.get(components[0][0])
  return make(components, name=spec)
