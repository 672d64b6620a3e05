"""Which parameters get weight decay: decided by name and role, the same for every family.

AdamW's decoupled weight decay pulls a parameter towards 0. That is a prior on weight
matrices (projections, MLPs, attention, heads, conv and patch kernels); on other parameters it
changes what the model computes for no benefit, so the best references exclude them:

* **SSM dynamics** (state-spaces/mamba marks `A_log`, `D` and Mamba-2's `dt_bias` as
  `_no_weight_decay`): decaying Mamba-1's `A_log` [d_inner, d_state] pulls every A towards
  -exp(0) = -1 and erases the S4D-real spectrum A = -(1..N) over a long run; `D` is a skip
  gain; the dt biases set the step sizes (softplus^-1 of 1e-3 .. 1e-1).
* **Biases and norm parameters** (GPT-2 / minGPT, BERT, ViT, LAVIS): shifts and gains.
* **Position and token embeddings** (minGPT's no-decay `nn.Embedding`, timm's `pos_embed`,
  `cls_token`): a lookup table sees a gradient only for the rows in the batch, so decay
  shrinks rare tokens each step while their gradient is absent; a tied output head shares
  the token table and so is not decayed either (an untied `head` is a weight and is).
  Learned query tokens (the resampler's `latents`, the ViT's `cls`) count as token
  embeddings; the T5 relative-position bias as a position embedding.

`NO_DECAY_RULES` lists the patterns with their role (tested against every model family's
parameter tree); anything else decays if it has >= 2 dimensions (no vector or scalar ever
decays, whatever its name). `decay_mask(params)` is optax's `mask=` argument;
`no_decay_role(path)` says why a path is excluded (docs/training.md, "Weight decay").
"""
from __future__ import annotations

import re
from typing import Any

import jax

# (regex searched in the '/'-joined path, role). Anchored on whole path components.
NO_DECAY_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)(A_log|D|dt_bias)$|(^|/)dt_proj/bias$", "SSM dynamics (A_log, D, dt bias)"),
    (r"(^|/)(embedding|positions|cls_position|relative_bias)$", "token / position embedding"),
    (r"(^|/)(cls|latents)$", "learned token (cls, latents)"),
    (r"(^|/)[^/]*norm[^/]*/[^/]+$|(^|/)norm_weight$", "norm"),
    (r"(^|/)[^/]*bias$", "bias"),
)
_COMPILED = tuple((re.compile(pattern), role) for pattern, role in NO_DECAY_RULES)


def _path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def no_decay_role(path: str) -> str | None:
  """The role that exempts '/'-joined parameter `path` from weight decay, or None."""
  for pattern, role in _COMPILED:
    if pattern.search(path):
      return role
  return None


def decays(path: str, ndim: int) -> bool:
  """True if a parameter at `path` with `ndim` dimensions gets weight decay."""
  return ndim >= 2 and no_decay_role(path) is None


def decay_mask(params: Any) -> Any:
  """A bool tree like `params` (arrays or shapes): True where AdamW applies weight decay.

  Works on optax's masked trees (inside `multi_transform`): masked leaves are skipped.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, p: decays(_path_str(path), len(p.shape)), params)


def explain(params: Any) -> list[str]:
  """'path shape -> decay' or 'path shape -> no decay (role)', one line per parameter."""
  lines = []
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    name, shape = _path_str(path), tuple(p.shape)
    role = no_decay_role(name) or ("vector / scalar" if len(shape) < 2 else None)
    lines.append(f"{name} {shape} -> " + ("decay" if role is None else f"no decay ({role})"))
  return lines
