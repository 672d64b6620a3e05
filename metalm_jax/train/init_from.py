"""`config.init_from`: start a run from the params of another run (pretrain -> finetune).

    config.init_from.checkpoint = "workdirs/pretrain"        # a workdir, checkpoints/ or a step
    config.init_from.rename = (("^head/", "lm_head/"),)       # source path -> this model's path
    config.init_from.skip = ("^itm_head/",)                   # keep fresh / drop these

Only the params are read (no optimizer state, no data position); the trainer applies this
when its own workdir has no checkpoint yet, so a restarted finetune resumes from its own
checkpoints, never from the source again. Paths are '/'-joined ('blocks/0/mlp/wo/kernel').

Matching: every source param path goes through the `rename` pairs in order (`re.sub`); a
param of this model is taken from the source param that lands on its path. Params of this
model matched by a `skip` regex keep their fresh initialisation; source params matched by a
`skip` regex (before or after renaming) are dropped. Anything else that does not line up (a
param of this model with no source, a source param with no target, a shape that differs) is
an error listing every one of them, before any parameter is read. A dtype that differs is
cast to the model's. A LoRA model's factors (`config.peft`) keep their fresh init when the
source has none (the usual pretrain -> LoRA finetune).

Parts (`config.model.<part>.init_from`, `models.hf.docking`): `load_parts` reads each
docked part, an imported Hugging Face directory ('hf:<dir>') or the same part of a checkpoint
of this project, checked path by path against this model before anything is placed.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from metalm_jax import config as config_lib
from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import optimizer as optimizer_lib
from metalm_jax.train import peft
from metalm_jax.train import restore

logger = logging.getLogger(__name__)


class InitFromMismatchError(checkpoint_lib.CheckpointMismatchError):
  """config.init_from's params do not line up with this model; the message lists them."""


def _flat(tree) -> dict[str, Any]:
  return {optimizer_lib.path_str(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_params(tree) -> dict[str, Any]:
  """{'/'-joined path: leaf} of a params tree (what `merge` takes)."""
  return _flat(tree)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which source param fills which param of this model."""
  source_of: dict[str, str]  # this model's path -> the source's path
  kept: list[str]  # this model's params that keep their fresh init (skip)
  dropped: list[str]  # source params not used (skip)


def plan(source_shapes: dict[str, tuple], target_shapes: dict[str, tuple], *,
         rename: list[tuple[str, str]], skip: tuple[str, ...], where: str) -> Plan:
  """Lines the source's params up with this model's (module docstring).

  Raises:
    InitFromMismatchError: listing every param that does not line up.
  """
  skips = [re.compile(p) for p in skip]
  skipped = lambda path: any(p.search(path) for p in skips)
  renamed = {}
  for path in source_shapes:
    new = path
    for pattern, replacement in rename:
      new = re.sub(pattern, replacement, new)
    renamed[path] = new
  by_target: dict[str, list[str]] = {}
  for src, new in renamed.items():
    by_target.setdefault(new, []).append(src)
  source_of, kept, problems = {}, [], []
  for path, shape in target_shapes.items():
    sources = by_target.get(path, [])
    if skipped(path):
      kept.append(path)
      continue
    if not sources:
      problems.append(f"  {path} {shape}: no source param lands here")
    elif len(sources) > 1:
      problems.append(f"  {path}: several source params land here: {sources}")
    elif tuple(source_shapes[sources[0]]) != tuple(shape):
      problems.append(f"  {path}: source {sources[0]} has shape {source_shapes[sources[0]]}, "
                      f"this model {shape}")
    else:
      source_of[path] = sources[0]
  loaded = set(source_of.values())
  dropped = [s for s in source_shapes if s not in loaded and (skipped(s) or skipped(renamed[s])
                                                             or renamed[s] in kept)]
  # Sources reported above (a mismatch on a param of this model) are not reported again.
  claimed = {src for path in target_shapes for src in by_target.get(path, [])}
  unused = [s for s in source_shapes if s not in loaded | claimed and s not in dropped]
  problems += [f"  source {s} {source_shapes[s]}: used by no param of this model" +
               (f" (renamed to {renamed[s]})" if renamed[s] != s else "") for s in unused]
  if problems:
    shown = problems[:20] + ([f"  ... ({len(problems) - 20} more)"] if len(problems) > 20 else [])
    raise InitFromMismatchError(
        f"config.init_from: the params of {where} do not line up with this model "
        f"({len(problems)} problems):\n" + "\n".join(shown) + "\nMap them with "
        "config.init_from.rename=((regex, replacement), ...) (applied to the source's paths), "
        "or list params that should keep their fresh init / be dropped in "
        "config.init_from.skip=(regex, ...). Nothing was read or written.")
  return Plan(source_of, sorted(kept), sorted(dropped))


def load(init_config, abstract_params, param_shardings) -> tuple[dict, dict]:
  """The source params placed like this model's, as {this model's path: array}, and a
  summary {'checkpoint', 'step', 'loaded', 'kept', 'dropped'}.

  Args:
    init_config: `config.init_from`.
    abstract_params: this model's params (shapes; `state.Model.abstract_params`).
    param_shardings: their shardings (a tree like the params).

  Raises:
    restore.CheckpointNotFoundError: no checkpoint at the path.
    InitFromMismatchError: the params do not line up (nothing is read).
    checkpoint.CheckpointCorruptError: they could not be read.
  """
  path = init_config.checkpoint
  directory, _, step = restore.locate_checkpoint(path, init_config.step or None)
  manager = restore.open_read_only(directory)
  try:
    step = restore.choose_step(manager, directory, step)
    where = f"the checkpoint of step {step} in {directory}"
    meta = manager.item_metadata(step)["state"]
    saved = getattr(meta, "tree", meta)
    saved = saved.get("params") if isinstance(saved, dict) else None
    if saved is None:
      raise InitFromMismatchError(f"{where} has no 'params' in its state item")
    source = _flat(saved)
    targets = _flat(abstract_params)
    shardings = _flat(param_shardings)
    skip = config_lib.init_from_skips(init_config)
    if not any(peft.is_factor(k) for k in source):
      # LoRA factors of this model start fresh from a source without them (pretrain -> LoRA).
      skip = skip + (peft.FACTOR_PATTERN,)
    p = plan({k: tuple(v.shape) for k, v in source.items()},
             {k: tuple(v.shape) for k, v in targets.items()},
             rename=config_lib.init_from_renames(init_config), skip=skip, where=where)
    wanted = {src: tgt for tgt, src in p.source_of.items()}
    # The saved tree, restricted to the params used, each placed as its target.
    def target(key_path, leaf):
      src = optimizer_lib.path_str(key_path)
      if src not in wanted:
        return None
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=shardings[wanted[src]])

    item = _prune(jax.tree_util.tree_map_with_path(target, saved))
    restored = restore.read_state_items(manager, step, {"params": item}, where=where,
                                        what="config.init_from's params")["params"]
  finally:
    manager.close()
  loaded = {wanted[k]: v.astype(targets[wanted[k]].dtype) if v.dtype != targets[wanted[k]].dtype
            else v for k, v in _flat(restored).items()}
  summary = {"checkpoint": directory, "step": int(step), "loaded": len(loaded),
             "kept": p.kept, "dropped": p.dropped}
  return loaded, summary


def load_parts(parts, abstract_params, param_shardings) -> tuple[dict, list[str]]:
  """The params of every docked part (`config_lib.model_parts`), placed like this model's:
  ({this model's path: array}, a one-line summary per part).

  Raises:
    InitFromMismatchError: an imported part does not line up with this model (every path
      named; nothing placed).
  """
  from metalm_jax.models.hf import docking

  targets = {k: v for k, v in _flat(abstract_params).items() if not peft.is_factor(k)}
  shardings = _flat(param_shardings)
  loaded, summaries = {}, []
  for part in parts:
    if part.hf_dir is None:  # the same part of a checkpoint of this project
      init = ml_collections.ConfigDict(dict(
          checkpoint=part.source, step=0, rename=(),
          skip=(f"^(?!{re.escape(part.prefix)})",) if part.prefix else ()))
      part_loaded, summary = load(init, abstract_params, param_shardings)
      loaded.update(part_loaded)
      summaries.append(f"{part.where}: {len(part_loaded)} params from step {summary['step']} "
                       f"of {summary['checkpoint']}")
      continue
    source = {part.prefix + k: v for k, v in _flat(docking.hf_params(part)).items()}
    wanted = {k: v for k, v in targets.items() if k.startswith(part.prefix)}
    for k, v in source.items():  # a smaller max_len keeps a position table's first rows
      if (k.endswith(docking.POSITION_TABLES) and k in wanted
          and v.shape[1:] == wanted[k].shape[1:] and v.shape[0] > wanted[k].shape[0]):
        source[k] = v[:wanted[k].shape[0]]
    problems = [f"  {k} {tuple(v.shape)}: not in the import" for k, v in wanted.items()
                if k not in source]
    problems += [f"  {k}: imported {tuple(source[k].shape)}, this model {tuple(v.shape)}"
                 for k, v in wanted.items() if k in source and
                 tuple(source[k].shape) != tuple(v.shape)]
    problems += [f"  {k} {tuple(v.shape)}: imported, used by no param of this model"
                 for k, v in source.items() if k not in wanted]
    if problems:
      raise InitFromMismatchError(
          f"{part.where}={part.source!r}: the imported params do not line up with "
          f"config.model.{part.key or 'name'} ({len(problems)} problems):\n"
          + "\n".join(problems[:20]) + "\nThe part's kwargs come from the checkpoint's "
          "config.json; a key set in the config that changes the parameters breaks this.")
    for k, v in source.items():
      target = targets[k]
      array = np.asarray(v, target.dtype)
      loaded[k] = jax.make_array_from_callback(array.shape, shardings[k],
                                               lambda index, a=array: a[index])
    summaries.append(f"{part.where}: {len(source)} params imported from {part.hf_dir}")
  return loaded, summaries


def _prune(tree):
  """Drops None leaves and the dicts they leave empty."""
  if isinstance(tree, dict):
    out = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if v is not None and v != {}}
  return tree


def merge(params: dict, loaded: dict[str, jax.Array]) -> dict:
  """`params` with the leaves at the paths of `loaded` replaced (others kept)."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, leaf: loaded.get(optimizer_lib.path_str(kp), leaf), params)


__all__ = ["InitFromMismatchError", "Plan", "load", "load_parts", "merge", "plan"]
