"""Fault tolerance: corrupt checkpoints, skipped non-finite updates, data-order guards."""
import logging
import os
import shutil

import numpy as np
import pytest

from metalm_jax.data import pipeline
from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import metrics as metrics_lib
from metalm_jax.train import trainer
from tests.conftest import tiny_config


def _corrupt(step_dir):
  """Overwrites every array data file of a checkpoint with garbage of the same size."""
  hit = 0
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(dirpath, name)
      if "ocdbt" in dirpath and os.path.getsize(path) > 0:
        with open(path, "r+b") as f:
          f.write(b"\x00garbage" * (os.path.getsize(path) // 8 + 1))
        hit += 1
  assert hit, f"no array files found under {step_dir}"


def test_corrupt_latest_checkpoint_falls_back_to_previous_with_warning(
    uninterrupted, pydoc_data_dir, tmp_path, caplog):
  straight_dir, config, _ = uninterrupted
  workdir = str(tmp_path / "w")
  shutil.copytree(straight_dir, workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "6"))
  config = tiny_config(pydoc_data_dir, num_train_steps=7)
  with caplog.at_level(logging.WARNING):
    result = trainer.train_and_evaluate(config, workdir)
  assert result["step"] == 7
  assert "checkpoint at step 6" in caplog.text and "resumed from step 4" in caplog.text
  kept = os.listdir(os.path.join(workdir, "checkpoints_unreadable"))
  assert len(kept) == 1 and kept[0].startswith("6-")  # set aside, not deleted
  steps = [r["step"] for r in metrics_lib.read_metrics(workdir, "train")]
  assert steps[-3:] == [5, 6, 7]  # steps 5 and 6 were trained again from step 4


def test_half_written_checkpoint_is_never_taken_as_latest(uninterrupted, tmp_path):
  straight_dir, _, _ = uninterrupted
  workdir = str(tmp_path / "w")
  shutil.copytree(straight_dir, workdir)
  # What a kill during an (atomic, rename-on-commit) orbax save leaves behind:
  shutil.copytree(os.path.join(workdir, "checkpoints", "6"),
                  os.path.join(workdir, "checkpoints", "8.orbax-checkpoint-tmp-1234"))
  assert checkpoint_lib.Checkpointer(workdir, keep=3).latest_step() == 6


def test_nan_policy_skip_drops_the_update_and_counts_it(pydoc_data_dir, tmp_path, monkeypatch):
  real = pipeline.make_global_batch
  calls = {"n": 0}

  def poisoned(batch, shardings):
    calls["n"] += 1
    if calls["n"] == 3:  # the third train batch
      batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
    return real(batch, shardings)

  monkeypatch.setattr(trainer.pipeline, "make_global_batch", poisoned)
  config = tiny_config(pydoc_data_dir, nan_policy="skip", eval_every_steps=100,
                       num_train_steps=5)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  rows = metrics_lib.read_metrics(str(tmp_path), "train")
  assert result["step"] == 5
  assert [r["nonfinite_skips"] for r in rows] == [0, 0, 1, 1, 1]
  assert np.isnan(rows[2]["loss"]) and np.isfinite(rows[3]["loss"])


def test_resuming_with_another_worker_count_is_refused(uninterrupted, pydoc_data_dir,
                                                       tmp_path):
  straight_dir, _, _ = uninterrupted
  workdir = str(tmp_path / "w")
  shutil.copytree(straight_dir, workdir)
  config = tiny_config(pydoc_data_dir, **{"data.worker_count": 2, "num_train_steps": 8})
  with pytest.raises(checkpoint_lib.WorkerCountMismatchError, match="worker_count=0"):
    trainer.train_and_evaluate(config, workdir)


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_last_checkpoint(
    pydoc_data_dir, tmp_path, monkeypatch):
  """Simulated ENOSPC from the checkpoint writer on the save of step 4, after a partial write."""
  import errno

  real_save = checkpoint_lib.ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 4:
      os.makedirs(os.path.join(self.directory, "4.orbax-checkpoint-tmp-99", "state"))
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "save", full_disk)
  workdir = str(tmp_path)
  config = tiny_config(pydoc_data_dir, eval_every_steps=100)
  with pytest.raises(checkpoint_lib.CheckpointSaveError,
                     match=r"step 4.*disk is full.*step 2\) is intact"):
    trainer.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  assert checkpoint_lib.Checkpointer(workdir, keep=3).latest_step() == 2
  result = trainer.train_and_evaluate(config, workdir)  # space freed: resumes from step 2
  assert result["step"] == 6


def test_image_larger_than_the_configured_size_is_a_clear_error():
  from metalm_jax.data import images

  with pytest.raises(ValueError, match=r"16x16 pixels is larger than image_size=8"):
    images.preprocess_image(np.zeros((16, 16, 1), np.uint8), image_size=8, channels=1,
                            kind="digits")


def test_objective_needing_special_tokens_checks_the_model_vocabulary(pydoc_data_dir, tmp_path):
  from metalm_jax import config as config_lib

  config = tiny_config(pydoc_data_dir, objective="masked_lm")  # model vocab 512 = tokenizer's
  with pytest.raises(config_lib.ConfigError, match=r"masked_lm.*vocab_size >= 640"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_wall_clock_deadline_checkpoints_and_stops_cleanly(pydoc_data_dir, tmp_path):
  config = tiny_config(pydoc_data_dir, deadline_minutes=1e-6, eval_every_steps=100)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result["stopped"] == "deadline" and result["step"] == 1
  assert checkpoint_lib.Checkpointer(str(tmp_path), keep=3).latest_step() == 1
