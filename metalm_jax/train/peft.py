"""Parameter-efficient finetuning (`config.peft`): LoRA and BitFit, for every model family.

    config.peft.method = 'lora'     # or 'bitfit'; '' = train everything
    config.peft.rank = 8            # r
    config.peft.alpha = 16.0        # the update is scaled by alpha / r
    config.peft.targets = r'attention/(query|value)/kernel$'   # default: attention + MLP

**LoRA.** Every kernel whose '/'-joined path `targets` matches gets two factors beside it in
the params (so checkpoints, resume, sharding and the NaN policy treat them like any param):

    .../query/kernel  [D, N, H]    frozen
    .../query/lora_a  [D, r]       trained; uniform(+-1/sqrt(D)) (LoRA's kaiming-uniform)
    .../query/lora_b  [r, N, H]    trained; zeros (the adapted model starts as the base)

A kernel's axes split into the input axes its projection contracts and the output axes it
produces (attention's query / key / value [D, N, H]: in = D; out [N, H, D]: in = N, H; MLP
[D, F]: in = D); a leading scanned-layers axis ('layers') is a batch axis of both factors.
`Model.merge` (train/state.py) builds the adapted kernel W + alpha / r * A @ B
(`merge_lora`) before the module is rebuilt, so no layer or family changes. `merge_lora(params,
alpha)` is also the export: the plain params of the original model, no factor leaves.

**BitFit.** Only biases and norm parameters train (the roles 'bias' and 'norm' of
`train.weight_decay.no_decay_role`).

Either way the frozen params get no optimizer state (`trainable_mask` goes to the optimizer's
masks, train/optimizer.py) and no gradient (`Model.merge` stops it).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from metalm_jax import config as config_lib
from metalm_jax.config import ConfigError
from metalm_jax.train import weight_decay

LORA_A, LORA_B = "lora_a", "lora_b"
FACTOR_PATTERN = r"(^|/)lora_(a|b)$"  # a factor leaf's path
RANK_AXIS = "lora_rank"  # the factors' rank axis: no sharding rule names it (replicated)
BATCH_AXES = ("layers",)  # leading logical axes shared by a kernel and both its factors
EMBED_AXES = ("embed", "encoder_embed", "vision_embed")
BITFIT_ROLES = ("bias", "norm")
_FACTOR = re.compile(FACTOR_PATTERN)


def method(peft_config) -> str:
  """`config.peft.method` ('' without a peft section)."""
  return "" if peft_config is None else peft_config.get("method", "")


def is_factor(path: str) -> bool:
  return bool(_FACTOR.search(path))


def _path(keys) -> str:
  return "/".join(map(str, keys))


@dataclasses.dataclass(frozen=True)
class Target:
  """A kernel that gets LoRA factors."""
  path: tuple  # the kernel's dict path, e.g. ('blocks', '0', 'attention', 'query', 'kernel')
  shape: tuple
  dtype: Any
  logical: tuple  # the kernel's logical axis names
  num_batch: int  # leading axes shared by both factors (scanned layers)
  num_in: int  # then the input axes A takes; B takes the rest

  def factor_shapes(self, rank: int) -> tuple[tuple, tuple]:
    b, i = self.num_batch, self.num_batch + self.num_in
    return self.shape[:i] + (rank,), self.shape[:b] + (rank,) + self.shape[i:]

  def factor_specs(self) -> tuple[P, P]:
    b, i = self.num_batch, self.num_batch + self.num_in
    names = tuple(self.logical) + (None,) * (len(self.shape) - len(self.logical))
    return P(*names[:i], RANK_AXIS), P(*names[:b], RANK_AXIS, *names[i:])

  def factor_paths(self) -> tuple[tuple, tuple]:
    return self.path[:-1] + (LORA_A,), self.path[:-1] + (LORA_B,)


def _split(shape, logical) -> tuple[int, int]:
  """(batch axes, input axes) of a kernel from its logical axis names."""
  names = tuple(logical) + (None,) * (len(shape) - len(logical))
  num_batch = 0
  while num_batch < len(shape) - 2 and names[num_batch] in BATCH_AXES:
    num_batch += 1
  rest = names[num_batch:]
  # An output projection ([heads, head_dim, embed]) contracts every axis but the last.
  num_in = len(rest) - 1 if len(rest) > 2 and rest[-1] in EMBED_AXES else 1
  return num_batch, num_in


def lora_targets(abstract_params: Mapping, logical_specs: Mapping, peft_config, *,
                 frozen: Any = None) -> list[Target]:
  """The kernels `config.peft.targets` matches, in tree order.

  Args:
    abstract_params: the base model's params (shapes).
    logical_specs: {dict path: logical PartitionSpec} (`state.Model.logical_specs`).
    peft_config: `config.peft`.
    frozen: optional bool tree like the params, True where the param stays frozen whatever
      peft does (a docked encoder's frozen layers): those kernels get no factors.

  Raises:
    ConfigError: the regex matches no kernel (the message lists kernel paths), or a matched
      param is not a kernel of >= 2 dims.
  """
  pattern = peft_config.get("targets", config_lib.LORA_DEFAULT_TARGETS)
  compiled = re.compile(pattern)
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  frozen_flat = ([False] * len(flat) if frozen is None else jax.tree.leaves(frozen))
  kernels = [tuple(k.key for k in p) for p, x in flat if len(x.shape) >= 2]
  targets, skipped = [], []
  for (path, x), is_frozen in zip(flat, frozen_flat):
    keys = tuple(k.key for k in path)
    name = _path(keys)
    if not compiled.search(name):
      continue
    if len(x.shape) < 2 or keys[-1] != "kernel":
      raise ConfigError(
          f"config.peft.targets={pattern!r} matches {name} {tuple(x.shape)}, which is not a "
          "projection kernel (LoRA adapts '.../kernel' params of >= 2 dims); anchor the regex "
          r"on kernels, e.g. 'attention/(query|value)/kernel$'")
    if is_frozen:
      skipped.append(name)
      continue
    logical = tuple(logical_specs.get(keys, P()))
    num_batch, num_in = _split(x.shape, logical)
    targets.append(Target(keys, tuple(x.shape), x.dtype, logical, num_batch, num_in))
  if not targets:
    shown = [_path(k) for k in kernels if k[-1] == "kernel"][:12]
    why = (f" (it matches only kernels of frozen encoder layers: {skipped[:4]}; raise "
           "config.model.trainable_encoder_layers or target other kernels)" if skipped else "")
    raise ConfigError(
        f"config.peft.targets={pattern!r} matches no kernel of this model{why}. LoRA needs "
        f"projection kernels; this model's kernels include {shown} "
        f"({sum(k[-1] == 'kernel' for k in kernels)} in all). Set config.peft.targets to a "
        "regex over these '/'-joined paths, or use config.peft.method='bitfit'.")
  return targets


def _set(tree: dict, keys: tuple, value) -> None:
  for k in keys[:-1]:
    tree = tree[k]
  tree[keys[-1]] = value


def _copy(tree):
  return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def add_abstract_factors(abstract_params: Mapping, targets: list[Target], rank: int) -> dict:
  """`abstract_params` with the factors' shapes beside each target kernel."""
  out = _copy(abstract_params)
  for t in targets:
    for path, shape in zip(t.factor_paths(), t.factor_shapes(rank)):
      _set(out, path, jax.ShapeDtypeStruct(shape, t.dtype))
  return out


def factor_logical_specs(targets: list[Target]) -> dict[tuple, P]:
  """{factor dict path: logical spec}: A the kernel's input axes + the rank axis, B the rank
  axis + the output axes (scanned layers lead both)."""
  out = {}
  for t in targets:
    for path, spec in zip(t.factor_paths(), t.factor_specs()):
      out[path] = spec
  return out


def init_factors(params: Mapping, targets: list[Target], rank: int, rng: jax.Array) -> dict:
  """`params` with fresh factors: A uniform in +-1/sqrt(fan_in) (LoRA's kaiming-uniform with
  a = sqrt(5)), B zeros, so the adapted kernel starts equal to the base one."""
  out = _copy(params)
  for i, t in enumerate(targets):
    a_shape, b_shape = t.factor_shapes(rank)
    fan_in = math.prod(t.shape[t.num_batch:t.num_batch + t.num_in])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), a_shape, t.dtype, -bound, bound)
    a_path, b_path = t.factor_paths()
    _set(out, a_path, a)
    _set(out, b_path, jnp.zeros(b_shape, t.dtype))
  return out


def lora_delta(a: jax.Array, b: jax.Array, kernel_shape: tuple) -> jax.Array:
  """A @ B over the rank axis, shaped like the kernel (float32 accumulation)."""
  ndim = len(kernel_shape)
  num_batch = a.ndim + b.ndim - 2 - ndim
  batch = a.shape[:num_batch]
  a2 = a.reshape(batch + (-1, a.shape[-1]))
  b2 = b.reshape(batch + (b.shape[num_batch], -1))
  delta = jnp.matmul(a2, b2, preferred_element_type=jnp.float32)
  return delta.reshape(kernel_shape)


def merge_lora(params: Mapping, alpha: float) -> dict:
  """The plain params of the original model: every kernel with factors beside it replaced by
  kernel + alpha / r * A @ B, the factor leaves removed. Works inside jit (the forward) and
  outside (export, evaluation of the merged model); params without factors come back as
  they are."""
  if not isinstance(params, Mapping):
    return params
  out = {k: merge_lora(v, alpha) for k, v in params.items() if k not in (LORA_A, LORA_B)}
  if LORA_A in params and LORA_B in params and "kernel" in params:
    kernel, a, b = params["kernel"], params[LORA_A], params[LORA_B]
    scale = alpha / a.shape[-1]
    delta = lora_delta(a, b, kernel.shape)
    out["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return out


def trainable_mask(params: Any, peft_config) -> Any:
  """Bool tree like `params`: True where `config.peft` lets a param train (all of them
  without a method; LoRA: the factors; BitFit: biases and norm parameters)."""
  m = method(peft_config)

  def trainable(path, _):
    name = _path(k.key if hasattr(k, "key") else k for k in path)
    if m == "lora":
      return is_factor(name)
    if m == "bitfit":
      return _bitfit_role(name)
    return True

  return jax.tree_util.tree_map_with_path(trainable, params)


def _bitfit_role(name: str) -> bool:
  role = weight_decay.no_decay_role(name)
  return role is not None and role.split(" ")[0] in BITFIT_ROLES


def check_bitfit(abstract_params: Any) -> None:
  """ConfigError when the model has no bias or norm parameter for BitFit to train."""
  if not any(jax.tree.leaves(trainable_mask(abstract_params, {"method": "bitfit"}))):
    raise ConfigError("config.peft.method='bitfit' trains biases and norm parameters, but this "
                      "model has none; use config.peft.method='lora'")


def stop_frozen_gradients(params: Mapping, peft_config) -> dict:
  """`params` with `jax.lax.stop_gradient` on every leaf peft freezes (no gradient is
  computed for them: their updates are zero anyway)."""
  mask = trainable_mask(params, peft_config)
  return jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), params, mask)


def saves_trainable_only(config) -> bool:
  """`config.peft.save_trainable_only` (False without a peft section)."""
  return bool(config.get("peft", {}).get("save_trainable_only", False))


def subset(params: Any, keep: Any) -> dict:
  """The nested dict `params` restricted to the leaves where the bool tree `keep` is True
  (empty dicts dropped): what a `save_trainable_only` checkpoint holds."""
  if isinstance(params, Mapping):
    out = {k: subset(v, keep[k]) for k, v in params.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)
            and v is not None}
  return params if keep else None


def _nbytes(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def summary(peft_config, abstract_params: Any, trainable: Any, opt_state_shapes: Any) -> str:
  """One line: the method, trainable / all parameters and the optimizer state's bytes."""
  sizes = [int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(abstract_params)]
  flags = jax.tree.leaves(trainable) if trainable is not None else [True] * len(sizes)
  total = sum(sizes)
  trained = sum(s for s, t in zip(sizes, flags) if t)
  state_bytes = sum(_nbytes(x) for x in jax.tree.leaves(opt_state_shapes)
                    if hasattr(x, "shape"))
  m = method(peft_config)
  head = {"": "full finetuning", "bitfit": "peft bitfit",
          "lora": f"peft lora r={peft_config.get('rank') if peft_config else ''}"}[m]
  return (f"{head}: {trained:,} trainable of {total:,} params ({100 * trained / max(total, 1):.2f}%)"
          f"; optimizer state {_human(state_bytes)}")


def _human(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"
