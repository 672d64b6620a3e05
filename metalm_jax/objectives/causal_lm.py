"""Causal (next-token) language modelling on packed batches."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from metalm_jax import objectives


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Mean token cross-entropy and accuracy over positions with weight > 0.

  Args:
    logits: [batch, length, vocab] (any float dtype; computed in float32).
    targets: [batch, length] int.
    weights: [batch, length] float, 0 where a position carries no loss.
  Returns:
    (loss, metrics) with metrics 'loss', 'accuracy' and 'tokens' (the weight sum).
  """
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  total = jnp.maximum(weights.sum(), 1e-8)
  loss = (ce * weights).sum() / total
  correct = (logits.argmax(-1) == targets).astype(jnp.float32)
  accuracy = (correct * weights).sum() / total
  return loss, {"loss": loss, "accuracy": accuracy, "tokens": weights.sum()}


def loss(model, batch, *, deterministic: bool = True, rng=None):
  """Next-token loss of a decoder on a packed batch (inputs, targets, positions, segments).

  `rng` (a PRNG key) drives dropout when `deterministic` is False.
  """
  logits, _ = model(batch["inputs"], positions=batch["positions"],
                    segment_ids=batch["segment_ids"], deterministic=deterministic, rngs=rng)
  return weighted_cross_entropy(logits, batch["targets"], batch["weights"])


objectives.register("causal_lm", loss=loss)
