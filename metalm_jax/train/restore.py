"""Reading a checkpoint of `experiments/train.py` for evaluation or finetuning: the params.

    restored = restore.restore_params("workdirs/tiny", model, mesh, rules)  # latest step
    restored.params, restored.step, restored.saved_config

`--checkpoint`-style paths: the training workdir (holding `checkpoints/`), the `checkpoints/`
folder itself, or one step folder `checkpoints/<step>`. The orbax manager is opened read-only
(nothing is created, saved or deleted, even for a wrong path) and only the parameters are read
(no optimizer state). Errors name the path and what is there instead.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from metalm_jax import sharding
from metalm_jax.train import checkpoint as checkpoint_lib

class CheckpointNotFoundError(FileNotFoundError):
  """--checkpoint names no checkpoint; the message says what is there instead."""





def _listing(path: str, limit: int = 10) -> str:
  try:
    entries = sorted(os.listdir(path))
  except OSError as e:
    return f"(unreadable: {e.strerror})"
  if not entries:
    return "(empty)"
  more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
  return ", ".join(entries[:limit]) + more


def _is_step_dir(path: str) -> bool:
  name = os.path.basename(os.path.normpath(path))
  return name.isdigit() and any(os.path.exists(os.path.join(path, f))
                                for f in ("_CHECKPOINT_METADATA", "state"))


def _has_step_dirs(path: str) -> bool:
  return any(_is_step_dir(os.path.join(path, n)) for n in os.listdir(path))


def locate_checkpoint(checkpoint: str, step: int | None = None) -> tuple[str, str, int | None]:
  """(checkpoints folder, workdir, step or None) of a --checkpoint path.

  Accepts the training workdir (holding `checkpoints/`), the `checkpoints/` folder itself, or
  a step folder `checkpoints/<step>` (which fixes the step).

  Raises:
    CheckpointNotFoundError: the path does not exist or holds no checkpoint; `step`
      contradicts the step folder.
  """
  path = os.path.abspath(os.path.expanduser(checkpoint))
  hint = ("pass the --workdir given to experiments/train.py (it holds checkpoints/<step>/), "
          "or one of its step folders")
  if not os.path.isdir(path):
    what = "is not a directory" if os.path.exists(path) else "does not exist"
    parent = os.path.dirname(path)
    there = (f"; {parent} contains: {_listing(parent)}" if os.path.isdir(parent) else "")
    raise CheckpointNotFoundError(f"--checkpoint={checkpoint!r} {what} ({path}){there}. "
                                  f"{hint.capitalize()}.")
  if _is_step_dir(path):
    path_step = int(os.path.basename(os.path.normpath(path)))
    if step is not None and step != path_step:
      raise CheckpointNotFoundError(
          f"--checkpoint={checkpoint!r} is the step-{path_step} folder but --step={step}; pass "
          "the workdir with --step, or the step folder alone")
    directory = os.path.dirname(path)
    return directory, os.path.dirname(directory), path_step
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), path, step
  if _has_step_dirs(path):
    return path, os.path.dirname(path), step
  raise CheckpointNotFoundError(
      f"no checkpoint in --checkpoint={checkpoint!r} ({path}): it has no checkpoints/ folder "
      f"and no step folders; it contains: {_listing(path)}. {hint.capitalize()}.")


def open_read_only(directory: str) -> ocp.CheckpointManager:
  """A read-only orbax manager over `directory` (nothing is created, saved or deleted)."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns about each read-only default it adjusts
  try:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0),
        # PyTree (not Standard) handler for the state: it can restore the params alone.
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
  finally:
    absl_logger.setLevel(level)


def choose_step(manager: ocp.CheckpointManager, directory: str, step: int | None) -> int:
  steps = sorted(manager.all_steps())
  if not steps:
    raise CheckpointNotFoundError(
        f"no finished checkpoint in {directory} (it contains: {_listing(directory)}); a run "
        "writes checkpoints/<step>/ every config.checkpoint_every_steps steps and at its end. "
        "Unfinished saves (tmp folders) are never used.")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointNotFoundError(f"no checkpoint of step {step} in {directory}; its steps: "
                                  f"{steps}")
  return step


def saved_config(manager: ocp.CheckpointManager, directory: str, step: int) -> dict | None:
  """The config the checkpoint was trained with (None for a checkpoint without one)."""
  if not os.path.isdir(os.path.join(directory, str(step), "config")):
    return None
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]



def check_param_shapes(manager: ocp.CheckpointManager, step: int, abstract_params,
                        where: str) -> None:
  meta = manager.item_metadata(step)["state"]
  saved = getattr(meta, "tree", meta)
  saved = saved.get("params") if isinstance(saved, dict) else None
  if saved is None:
    raise checkpoint_lib.CheckpointMismatchError(f"{where} has no 'params' in its state item")
  def shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
            tuple(getattr(x, "shape", ())) for path, x in flat}

  have, want = shapes(saved), shapes(abstract_params)
  differ = sorted(k for k in set(have) & set(want) if have[k] != want[k])
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if differ or missing or extra:
    lines = [f"  {k}: checkpoint {have[k]} vs model {want[k]}" for k in differ[:10]]
    lines += [f"  only in the model: {k}" for k in missing[:5]]
    lines += [f"  only in the checkpoint: {k}" for k in extra[:5]]
    raise checkpoint_lib.CheckpointMismatchError(
        f"the parameters of {where} do not fit the configured model ({len(differ)} shapes "
        f"differ, {len(missing)} missing, {len(extra)} extra):\n" + "\n".join(lines) +
        "\nPass the config the checkpoint was trained with.")


@dataclasses.dataclass(frozen=True)
class Restored:
  """The params of one checkpoint step, where it is, and the config it was trained with."""
  params: Any
  step: int
  saved_config: dict | None
  directory: str  # the checkpoints/ folder
  workdir: str


def restore_params(checkpoint: str, model, mesh, rules, *, step: int | None = None,
                   check_config=None) -> Restored:
  """The parameters of a train.py checkpoint, placed on `mesh` by `rules`.

  Args:
    checkpoint: a training workdir, its `checkpoints/` folder, or a step folder.
    model: the `state.Model` the checkpoint was trained with (its shapes are checked).
    mesh, rules: where and how the params are placed (`sharding.make_mesh`, rule set).
    step: the step (default: the step folder's, else the latest).
    check_config: optional `check_config(saved_config_or_None, where)`, called before any
      parameter is read (e.g. to refuse another model config with a clear message).

  Raises:
    CheckpointNotFoundError: no checkpoint (of `step`) at `checkpoint`.
    checkpoint.CheckpointMismatchError: the parameter shapes do not fit `model`.
    checkpoint.CheckpointCorruptError: the parameters could not be read.
  """
  directory, workdir, step = locate_checkpoint(checkpoint, step)
  manager = open_read_only(directory)
  try:
    step = choose_step(manager, directory, step)
    where = f"the checkpoint of step {step} in {directory}"
    saved = saved_config(manager, directory, step)
    if check_config is not None:
      check_config(saved, where)
    check_param_shapes(manager, step, model.abstract_params, where)
    param_shardings = sharding.state_shardings(model.abstract_params, model.logical_specs,
                                               mesh, rules)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          model.abstract_params, param_shardings)
    try:
      params = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={"params": target},
          restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}),
          partial_restore=True)))["state"]["params"]
    except Exception as e:  # noqa: BLE001 - name the checkpoint and the way out
      raise checkpoint_lib.CheckpointCorruptError(
          f"reading the parameters of {where} failed: {type(e).__name__}: {str(e)[:500]}\n"
          f"Pick another step (steps: {sorted(manager.all_steps())}).") from e
  finally:
    manager.close()
  return Restored(params=params, step=int(step), saved_config=saved, directory=directory,
                  workdir=workdir)
