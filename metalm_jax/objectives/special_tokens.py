"""Special tokens of the pretraining objectives: negative placeholders in the pipeline,
ids at the top of the model vocabulary in the model.

A `prepare` runs in the data pipeline, which knows neither the model's vocabulary size nor
the tokenizer's, so it writes special tokens as NEGATIVE placeholder ids:

    MASK          = -1        the [MASK] token (masked LM, BART denoising, XLNet query stream)
    sentinel(k)   = -2 - k    T5's <extra_id_k>, k = 0 .. NUM_SENTINELS - 1

and the objective's `loss` (which holds the model) maps them with `resolve(ids, vocab_size)`
to the top NUM_RESERVED ids of the model vocabulary:

    MASK -> vocab_size - 1,   sentinel(k) -> vocab_size - 2 - k.

Real token ids are never negative (pad 0, bos 1, eos 2, unk 3 for both tokenizers), so the
two never mix. The model vocabulary therefore needs NUM_RESERVED ids above the tokenizer's:
`check_vocab(model_vocab_size, tokenizer_vocab_size)` raises a clear error otherwise, e.g.
tokenizer vocab 512 -> config.model.vocab_size >= 640.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

NUM_SENTINELS = 127
NUM_RESERVED = 1 + NUM_SENTINELS  # [MASK] + sentinels, at the top of the model vocabulary
MASK = -1


def sentinel(k) -> np.ndarray | int:
  """Placeholder id of T5's <extra_id_k> (k int or int array in [0, NUM_SENTINELS))."""
  k_arr = np.asarray(k)
  if np.any(k_arr < 0) or np.any(k_arr >= NUM_SENTINELS):
    raise ValueError(f"sentinel index {k} is outside [0, {NUM_SENTINELS}); cap the number of "
                     "spans per document at special_tokens.NUM_SENTINELS")
  return -2 - k


def is_special(ids):
  """True where an id is a placeholder (negative). Works on NumPy and JAX arrays."""
  return ids < 0


def is_sentinel(ids):
  return ids <= -2


def sentinel_index(ids):
  """k of placeholder sentinel(k) (meaningless where `is_sentinel` is False)."""
  return -2 - ids


def resolve(ids, vocab_size: int):
  """Placeholders -> ids at the top of a `vocab_size` vocabulary; real ids unchanged.

  Args:
    ids: int array (jax or numpy) of token ids and negative placeholders.
    vocab_size: the model's vocabulary size (static).
  Returns:
    ids of the same shape and dtype, all in [0, vocab_size).
  """
  if vocab_size <= NUM_RESERVED:
    raise ValueError(f"model vocab_size={vocab_size} has no room for the {NUM_RESERVED} "
                     "reserved special tokens; raise config.model.vocab_size to the tokenizer's "
                     f"vocabulary + {NUM_RESERVED}")
  xp = jnp if not isinstance(ids, np.ndarray) else np
  return xp.where(ids < 0, vocab_size + ids, ids).astype(ids.dtype)


def check_vocab(model_vocab_size: int, tokenizer_vocab_size: int) -> None:
  """Raises unless the model vocabulary holds the tokenizer's plus NUM_RESERVED special ids."""
  needed = tokenizer_vocab_size + NUM_RESERVED
  if model_vocab_size < needed:
    raise ValueError(
        f"config.model.vocab_size={model_vocab_size} has no room for the objective's special "
        f"tokens: the tokenizer uses ids [0, {tokenizer_vocab_size}) and the objectives reserve "
        f"the top {NUM_RESERVED} ids ([MASK] and T5 sentinels); set config.model.vocab_size >= "
        f"{needed}")


def describe(token_id: int, vocab_size: int | None = None) -> str | None:
  """'<mask>' / '<extra_id_k>' for a placeholder (or resolved id, given vocab_size); else None."""
  token_id = int(token_id)
  if vocab_size is not None and token_id >= vocab_size - NUM_RESERVED:
    token_id -= vocab_size
  if token_id == MASK:
    return "<mask>"
  if token_id <= -2:
    return f"<extra_id_{-2 - token_id}>"
  return None


def render(ids, tokenizer, vocab_size: int | None = None) -> str:
  """Human-readable text of ids with placeholders shown as <mask> / <extra_id_k> (notebooks)."""
  out, run = [], []
  for token_id in np.asarray(ids).reshape(-1).tolist():
    name = describe(token_id, vocab_size)
    if name is None:
      run.append(token_id)
      continue
    if run:
      out.append(tokenizer.decode([t for t in run if t != tokenizer.eos_id]))
      run = []
    out.append(name)
  if run:
    out.append(tokenizer.decode([t for t in run if t != tokenizer.eos_id]))
  return " ".join(s for s in out if s)
