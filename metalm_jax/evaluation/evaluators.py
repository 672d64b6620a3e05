"""Evaluators declared in the config (`config.evals`), from a registry by type.

    config.evals.eval = dict(type='loss')                                 # held-out loss
    config.evals.vqa = dict(type='vqa', split='test', limit=256, every_steps=-1, shots=0)

Each entry is `{'type': <registered type>, 'every_steps': N (0 = config.eval_every_steps,
-1 = only at the end), <the type's options>}`. The trainer builds them once
(`build_all(config, ctx)`), runs them every N steps and at the last step, writes their
scalars to metrics.jsonl / TensorBoard under the entry's name (`<name>/<metric>`) and their
full output (predictions, samples) to `<workdir>/evals/<name>/step_<N>.json`;
`experiments/evaluate.py` runs the same evaluators on a checkpoint.

An evaluator is a class with `type`, a constructor `(ctx, **options)` whose keyword
arguments are its options (checked like model kwargs: unknown keys are errors), and
`__call__(params, extra) -> (scalars, details)`. It reaches the model family through
`ctx.family` (its eval batches for 'loss', its predictor for generation, answer ranking and
retrieval), so one evaluator serves every family that can answer it.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import ml_collections

from metalm_jax import checks

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalContext:
  """What an evaluator may use: built once by the trainer (or experiments/evaluate.py)."""
  config: ml_collections.ConfigDict
  family: Any  # families.Family
  model: Any  # train.state.Model
  rest: Any  # the module's non-parameter state
  mesh: jax.sharding.Mesh
  rules: Any
  state_shardings: Any  # of the train state (params / extra are read)
  batch_shardings: Any
  make_eval_step: Callable[[], Callable]  # () -> eval_step(params, extra, rest, batch), cached
  make_global_batch: Callable[[dict], dict]
  progress: Callable[[str], None] = logger.info  # one-line status messages


class Evaluator:
  """Base class. Subclasses set `type` and take their options as keyword arguments."""

  type: ClassVar[str] = ""

  def __init__(self, ctx: EvalContext):
    self.ctx = ctx

  def __call__(self, params, extra) -> tuple[dict[str, float], dict]:
    raise NotImplementedError


EVALUATORS: dict[str, type[Evaluator]] = {}


def register(cls: type[Evaluator], *, overwrite: bool = False) -> type[Evaluator]:
  """Adds an Evaluator subclass under `cls.type` (a notebook may register its own)."""
  if cls.type in EVALUATORS and not overwrite:
    raise ValueError(f"evaluator type {cls.type!r} is already registered; pass overwrite=True")
  EVALUATORS[cls.type] = cls
  return cls


def _options(entry) -> tuple[str, int, dict]:
  entry = dict(entry)
  kind = entry.pop("type")
  every = entry.pop("every_steps", 0)
  return kind, every, entry


def check(evals) -> None:
  """Raises checks.KwargsError for an unknown evaluator type or option in `config.evals`."""
  for name in evals.keys():
    kind, _, options = _options(evals[name])
    if kind not in EVALUATORS:
      raise checks.KwargsError(f"config.evals.{name}.type={kind!r} is not a known evaluator; "
                               f"known: {sorted(EVALUATORS)}")
    checks.check_kwargs(EVALUATORS[kind], options, f"config.evals.{name}", injected=("ctx",))


@dataclasses.dataclass
class Scheduled:
  """A built evaluator and when it runs."""
  name: str
  every_steps: int  # > 0; -1 = only at the last step
  run: Evaluator

  def due(self, step: int, last_step: bool) -> bool:
    return last_step or (self.every_steps > 0 and step % self.every_steps == 0)


def build_all(config: ml_collections.ConfigDict, ctx: EvalContext,
              names: tuple[str, ...] | None = None) -> list[Scheduled]:
  """The config's evaluators (all, or those in `names`), built in config order."""
  check(config.evals)
  out = []
  for name in config.evals.keys():
    if names is not None and name not in names:
      continue
    kind, every, options = _options(config.evals[name])
    every = config.eval_every_steps if every == 0 else every
    out.append(Scheduled(name, every, EVALUATORS[kind](ctx, **options)))
  if names is not None:
    unknown = sorted(set(names) - {s.name for s in out})
    if unknown:
      raise checks.KwargsError(f"no evaluator named {unknown} in config.evals; it has "
                               f"{list(config.evals.keys())}")
  return out


# ------------------------------------------------------------------------ loss
class Loss(Evaluator):
  """Token-weighted held-out loss, perplexity and next-token accuracy over `split`.

  Options:
    split: the split (default config.data.eval_split).
    num_batches: the first this many batches (default config.eval_batches); 0 = all.
  """

  type = "loss"

  def __init__(self, ctx: EvalContext, *, split: str = "", num_batches: int = -1):
    super().__init__(ctx)
    self.split = split or ctx.config.data.eval_split
    self.num_batches = ctx.config.eval_batches if num_batches < 0 else num_batches
    self.on_batch: Callable[[dict], None] | None = None  # e.g. a progress bar

  def __call__(self, params, extra):
    ctx = self.ctx
    process_count = jax.process_count()
    local_batch = ctx.config.batch_size // process_count
    eval_step = ctx.make_eval_step()
    totals = {"loss_sum": 0.0, "accuracy_sum": 0.0, "tokens": 0.0}
    batches = ctx.family.eval_batches(self.split, batch_size=local_batch,
                                      process_index=jax.process_index(),
                                      process_count=process_count,
                                      num_batches=self.num_batches or None)
    count = 0
    # Every process yields the same number of batches, so a prefix stays in step too.
    for batch in itertools.islice(batches, self.num_batches or None):
      out = eval_step(params, extra, ctx.rest, ctx.make_global_batch(batch))
      for k, v in jax.device_get(out).items():
        totals[k] += float(v)
      count += 1
      if self.on_batch is not None:
        self.on_batch(totals)
    return summarize_loss(totals), {"split": self.split, "num_batches": count}


def summarize_loss(totals: Mapping[str, float]) -> dict[str, float]:
  """Sums of token-weighted loss / accuracy -> {'loss', 'perplexity', 'accuracy', 'tokens'}."""
  tokens = max(totals["tokens"], 1e-8)
  loss = totals["loss_sum"] / tokens
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
          "accuracy": totals["accuracy_sum"] / tokens, "tokens": totals["tokens"]}


register(Loss)


def scalars_of(result: Mapping[str, Any]) -> dict[str, float]:
  """The float-valued entries of an evaluator's scalars (what metrics.jsonl takes)."""
  return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
