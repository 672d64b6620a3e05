"""Reading a checkpoint of `experiments/train.py` for evaluation: the params (and extra state).

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
import ml_collections
import orbax.checkpoint as ocp

from metalm_jax import checks, sharding
from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import peft as peft_lib

logger = logging.getLogger(__name__)

# config.model keys that change how the model runs, not its parameters: they may differ from
# training without being refused (a difference is logged).
RUNTIME_MODEL_KEYS = frozenset({"dropout_rate", "attention_impl", "blockwise_threshold",
                                "block_size", "remat_policy", "dtype"})
# config.data keys that change the eval batches: a difference is logged (not refused), as the
# numbers then differ from the trainer's.
_DATA_KEYS = ("dataset", "tokenizer", "vocab_size", "seq_len")


class CheckpointNotFoundError(FileNotFoundError):
  """--checkpoint names no checkpoint; the message says what is there instead."""


class ConfigMismatchError(ValueError):
  """The checkpoint was trained with other config.model values than --config."""


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
  if isinstance(tree, (dict, ml_collections.ConfigDict)):
    out = {}
    for k in tree.keys():
      out.update(_flatten(tree[k], f"{prefix}.{k}"))
    return out
  return {prefix: tree}


def model_config_differences(saved: dict, config: ml_collections.ConfigDict
                             ) -> tuple[list[str], list[str]]:
  """(shape differences, runtime-only differences) between a checkpoint's saved config and
  `config`, as 'config.model.<key>: checkpoint <v> vs --config <v>' lines."""
  want = _flatten(checkpoint_lib.config_to_dict(config)["model"], "config.model")
  have = _flatten(saved.get("model", {}), "config.model")
  missing = object()
  shape, runtime = [], []
  for key in sorted(set(want) | set(have)):
    a, b = have.get(key, missing), want.get(key, missing)
    if a == b:
      continue
    line = (f"  {key}: checkpoint {'(absent)' if a is missing else repr(a)} vs --config "
            f"{'(absent)' if b is missing else repr(b)}")
    (runtime if key.rsplit(".", 1)[-1] in RUNTIME_MODEL_KEYS else shape).append(line)
  return shape, runtime


def check_config(saved: dict | None, config: ml_collections.ConfigDict, *, where: str,
                 allow_mismatch: bool = False) -> None:
  """Raises ConfigMismatchError if `saved` (a checkpoint's config) has other config.model
  values than `config`; logs runtime-only model and data differences."""
  if not saved:
    logger.warning("%s holds no saved config; cannot check that --config matches it", where)
    return
  shape, runtime = model_config_differences(saved, config)
  if runtime:
    logger.info("config.model differs from training in runtime-only keys (allowed):\n%s",
                "\n".join(runtime))
  data = [f"  config.data.{k}: checkpoint {saved.get('data', {}).get(k)!r} vs --config "
          f"{config.data[k]!r}" for k in _DATA_KEYS
          if k in saved.get("data", {}) and saved["data"][k] != config.data[k]]
  if data:
    logger.warning("the eval data differs from training (the numbers will not match the "
                   "trainer's):\n%s", "\n".join(data))
  if not shape:
    return
  differ = f"{len(shape)} config.model key{'s differ' if len(shape) > 1 else ' differs'}"
  message = (f"{where} was trained with another model config than --config ({differ}):\n"
             + "\n".join(shape))
  if allow_mismatch:
    logger.warning("%s\nproceeding anyway (--allow_config_mismatch)", message)
    return
  raise ConfigMismatchError(
      message + "\nPass the config it was trained with (the --config file, its :args and any "
      "--config.model.* overrides of the experiments/train.py command; the checkpoint's "
      "'config' item has them all), or --allow_config_mismatch to evaluate anyway (the "
      "parameter shapes must still agree).")


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
    there = (f"; {parent} contains: {checks.dir_listing(parent)}" if os.path.isdir(parent)
             else "")
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
      f"and no step folders; it contains: {checks.dir_listing(path)}. {hint.capitalize()}.")


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
        f"no finished checkpoint in {directory} (it contains: "
        f"{checks.dir_listing(directory)}); a run "
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
        "\nPass the config the checkpoint was trained with" +
        (" (its config.peft: the checkpoint has LoRA factors, lora_a / lora_b)"
         if any(peft_lib.is_factor(k) for k in extra + missing) else "") + ".")


@dataclasses.dataclass(frozen=True)
class Restored:
  """The params (and extra state) of one checkpoint step, where it is, and the config it was
  trained with."""
  params: Any
  step: int
  saved_config: dict | None
  directory: str  # the checkpoints/ folder
  workdir: str
  extra: Any = None


def read_state_items(manager: ocp.CheckpointManager, step: int, item: dict, *, where: str,
                     what: str = "the parameters") -> dict:
  """Reads the sub-trees `item` (shape/dtype/sharding leaves) of a checkpoint's state.

  Only what `item` names is read (a partial restore); anything else saved is left on disk.

  Raises:
    checkpoint.CheckpointCorruptError: the read failed; names `where` and the saved steps.
  """
  try:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))["state"]
  except Exception as e:  # noqa: BLE001 - name the checkpoint and the way out
    raise checkpoint_lib.CheckpointCorruptError(
        f"reading {what} of {where} failed: {type(e).__name__}: {str(e)[:500]}\n"
        f"Pick another step (steps: {sorted(manager.all_steps())}).") from e


def restore_params(checkpoint: str, model, mesh, rules, *, step: int | None = None,
                   check_config=None, abstract_extra=None, extra_shardings=None) -> Restored:
  """The parameters of a train.py checkpoint, placed on `mesh` by `rules`.

  Args:
    checkpoint: a training workdir, its `checkpoints/` folder, or a step folder.
    model: the `state.Model` the checkpoint was trained with (its shapes are checked).
    mesh, rules: where and how the params are placed (`sharding.make_mesh`, rule set).
    step: the step (default: the step folder's, else the latest).
    check_config: optional `check_config(saved_config_or_None, where)`, called before any
      parameter is read (e.g. to refuse another model config with a clear message).
    abstract_extra, extra_shardings: the family's extra state (`TrainState.extra`) to read
      too, as shapes and shardings (None: params only).

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
    param_shardings = sharding.state_shardings(model.abstract_params, model.logical_specs,
                                               mesh, rules)
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    wanted = jax.tree.map(place, model.abstract_params, param_shardings)
    base_from = _trainable_only_base(saved, model, where)
    if base_from is not None:  # config.peft.save_trainable_only: the trained params alone
      keep = _saved_paths_mask(manager, step, model.abstract_params)
      wanted = peft_lib.subset(wanted, keep)
    check_param_shapes(manager, step, wanted, where)
    item = {"params": wanted}
    if abstract_extra is not None:
      item["extra"] = jax.tree.map(place, abstract_extra, extra_shardings)
    state = read_state_items(manager, step, item, where=where)
  finally:
    manager.close()
  params = state["params"]
  if base_from is not None:
    from metalm_jax.train import init_from as init_from_lib  # local: init_from imports restore

    base, _ = init_from_lib.load(base_from, model.abstract_params, param_shardings)
    params = init_from_lib.merge(model.abstract_params,
                                 {**base, **init_from_lib.flat_params(params)})
  return Restored(params=params, step=int(step), saved_config=saved,
                  directory=directory, workdir=workdir, extra=state.get("extra"))


def _trainable_only_base(saved: dict | None, model, where: str):
  """`config.init_from` of a checkpoint saved with config.peft.save_trainable_only (where
  its frozen base is read from), or None for a checkpoint that holds every param."""
  peft = (saved or {}).get("peft") or {}
  if not peft.get("save_trainable_only"):
    return None
  if model.peft is None:
    raise checkpoint_lib.CheckpointMismatchError(
        f"{where} holds only the params peft method {peft.get('method')!r} trains "
        "(config.peft.save_trainable_only); pass the config it was trained with (its "
        "config.peft)")
  return ml_collections.ConfigDict(saved["init_from"])


def _saved_paths_mask(manager, step: int, abstract_params) -> Any:
  """Bool tree like `abstract_params`: True where the checkpoint holds the param."""
  meta = manager.item_metadata(step)["state"]
  saved = getattr(meta, "tree", meta).get("params", {})
  have = {"/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(saved)[0]}
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path) in have,
      abstract_params)
