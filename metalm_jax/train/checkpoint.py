"""Checkpoints: orbax CheckpointManager over (train state, grain iterator, config).

A checkpoint holds params, optimizer state, step and rng (`state`), the data iterator's
position (`data`, with the worker count it was taken with) and the config it was trained with
(`config`), so a restarted run continues the very same trajectory. Orbax finalises step
directories atomically: a directory left half-written by a kill is never taken as latest.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint does not fit the configured model; nothing was overwritten."""


class WorkerCountMismatchError(ValueError):
  """Resuming with another grain worker count would change the data order."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (disk full, permissions...); older ones are intact."""


class CheckpointCorruptError(RuntimeError):
  """No checkpoint in the workdir could be read."""


def _path_str(path) -> str:
  """'opt_state/1/0/mu/blocks/0/...': the same for a live tree and orbax's metadata tree
  (which stores namedtuples as dicts and integer keys as strings)."""
  parts = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
  return "/".join(str(p) for p in parts)


def _shape_tree(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(path): tuple(getattr(x, "shape", ())) for path, x in flat}


class Checkpointer:
  """Saves and restores the whole training position under `{workdir}/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config_dict: dict, *, force: bool = False):
    """Starts an (async) save of step `step`; errors of earlier async saves surface here."""
    with self._save_errors(step):
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          config=ocp.args.JsonSave(config_dict)), force=force)

  @contextlib.contextmanager
  def _save_errors(self, step: int | None):
    try:
      yield
    except OSError as e:
      disk_full = e.errno == errno.ENOSPC
      raise CheckpointSaveError(
          f"writing the checkpoint{'' if step is None else f' of step {step}'} to "
          f"{self.directory} failed: {e}. "
          + ("The disk is full: free space there. " if disk_full else "")
          + f"The last complete checkpoint (step {self.manager.latest_step()}) is intact and "
          "a partly written one is never taken as latest; run the same command again to "
          "resume from it.") from e

  def check_compatible(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatchError naming the differing arrays, before anything is written."""
    meta = self.manager.item_metadata(step)
    saved = _shape_tree(_tree_of(meta["state"]))
    wanted = _shape_tree(abstract_state)
    params_first = lambda k: (not k.startswith("params"), k)
    missing = sorted(set(wanted) - set(saved), key=params_first)
    extra = sorted(set(saved) - set(wanted), key=params_first)
    differ = sorted((k for k in set(saved) & set(wanted) if saved[k] != wanted[k]),
                    key=params_first)
    if missing or extra or differ:
      lines = [f"  {k}: checkpoint {saved[k]} vs model {wanted[k]}" for k in differ[:10]]
      lines += [f"  only in the model: {k}" for k in missing[:5]]
      lines += [f"  only in the checkpoint: {k}" for k in extra[:5]]
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} does not match the configured "
          f"model ({len(differ)} shapes differ, {len(missing)} arrays missing, {len(extra)} "
          "extra):\n" + "\n".join(lines) + "\nUse a fresh --workdir for a different model, or "
          "restore the config this workdir was trained with (saved in the checkpoint's "
          "'config' item). Nothing was overwritten.")

  def restore_latest_good(self, abstract_state, state_shardings, data_iterator, *,
                          worker_count: int):
    """Restores the newest readable checkpoint; returns (state, step) or (None, None).

    A checkpoint that fails to read (a corrupt or truncated file) is skipped with a warning
    naming it and the one used instead. A checkpoint of another model raises
    CheckpointMismatchError at once: that is a config mistake, not corruption.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        self._check_worker_count(step, worker_count)
        state = self.restore(step, abstract_state, state_shardings, data_iterator)
      except (CheckpointMismatchError, WorkerCountMismatchError):
        raise
      except Exception as e:  # noqa: BLE001 - any read failure means "try an older one"
        failures.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
        logger.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying an older one",
                       step, self.directory, type(e).__name__, str(e)[:300])
        continue
      if failures:
        logger.warning("resumed from step %d instead of the unreadable newer checkpoint(s): %s",
                       step, "; ".join(failures))
        self._set_aside_newer_than(step)
      return state, step
    if failures:
      raise CheckpointCorruptError(
          f"no readable checkpoint in {self.directory}:\n  " + "\n  ".join(failures) +
          "\nMove the directory away to start afresh, or restore it from a backup.")
    return None, None

  def _set_aside_newer_than(self, step: int) -> None:
    """Moves unreadable checkpoints newer than `step` to `{workdir}/checkpoints_unreadable/`
    (kept for inspection, never deleted) so that training can save those steps again."""
    aside = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for newer in self.manager.all_steps():
        if newer > step:
          target = os.path.join(aside, f"{newer}-{int(time.time())}")
          os.replace(os.path.join(self.directory, str(newer)), target)
          logger.warning("moved unreadable checkpoint %d to %s", newer, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("checkpoints set aside")
    self.manager.reload()

  def _check_worker_count(self, step: int, worker_count: int) -> None:
    saved = self.saved_config(step).get("data", {}).get("worker_count")
    if saved is not None and saved != worker_count:
      raise WorkerCountMismatchError(
          f"the checkpoint at step {step} was taken with config.data.worker_count={saved}, "
          f"this run has {worker_count}; the data order depends on it, so resume with "
          f"--config.data.worker_count={saved} (or start a fresh --workdir)")

  def restore(self, step: int, abstract_state, state_shardings, data_iterator):
    """Restores state (in its sharded layout) and the data iterator's position in place."""
    self.check_compatible(step, abstract_state)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, state_shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def saved_config(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def wait(self):
    with self._save_errors(None):
      self.manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def _tree_of(metadata) -> Any:
  """Orbax's item metadata as a plain tree of leaves with `.shape`."""
  tree = getattr(metadata, "tree", metadata)
  return tree


def config_to_dict(config) -> dict:
  """A JSON-safe dict of an ml_collections config (tuples become lists)."""
  return json.loads(config.to_json_best_effort())
