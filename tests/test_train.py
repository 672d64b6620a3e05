"""End-to-end training on the bundled corpus: resume, sharding equivalence, bad input."""
import os

import jax
import numpy as np
import pytest

from metalm_jax import families, objectives, sharding
from metalm_jax.data import datasets, pipeline
from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import metrics as metrics_lib
from metalm_jax.train import state as state_lib
from metalm_jax.train import optimizer as optimizer_lib
from metalm_jax.train import step as step_lib
from metalm_jax.train import trainer
from tests.conftest import tiny_config


def final_params(workdir, config):
  model = state_lib.Model(config.model)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=10, async_save=False)
  step = ckpt.latest_step()
  restored = ckpt.manager.restore(step, args=checkpoint_lib.ocp.args.Composite(
      state=checkpoint_lib.ocp.args.StandardRestore()))["state"]
  ckpt.close()
  del model
  return step, restored["params"]


def test_run_writes_everything_and_learns(uninterrupted):
  workdir, config, result = uninterrupted
  assert result["step"] == 6
  train = metrics_lib.read_metrics(workdir, "train")
  evals = metrics_lib.read_metrics(workdir, "eval")
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in evals] == [3, 6]
  assert train[-1]["loss"] < train[0]["loss"]
  assert np.isfinite(result["eval_perplexity"])
  assert os.path.exists(os.path.join(workdir, "loss_curve.png"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert open(os.path.join(workdir, "sample.txt")).read().startswith(config.sample.prompt)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]


class _StopAt:
  """Wraps pipeline.make_global_batch to raise KeyboardInterrupt on its n-th call."""

  def __init__(self, n, fn):
    self.calls, self.n, self.fn = 0, n, fn

  def __call__(self, *args, **kwargs):
    self.calls += 1
    if self.calls == self.n:
      raise KeyboardInterrupt("simulated stop")
    return self.fn(*args, **kwargs)


def test_stop_and_restart_continues_same_trajectory(uninterrupted, pydoc_data_dir, tmp_path,
                                                    monkeypatch):
  straight_dir, config, _ = uninterrupted
  workdir = str(tmp_path)
  # Stop while fetching the data of step 5 (4 train batches + 1 eval batch at step 3... the
  # stop counts every batch put on the mesh, eval included: 4 train + 2 eval = 6 calls).
  stop = _StopAt(7, pipeline.make_global_batch)
  monkeypatch.setattr(trainer.pipeline, "make_global_batch", stop)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  assert checkpoint_lib.Checkpointer(workdir, keep=3).latest_step() == 4
  trainer.train_and_evaluate(config, workdir)
  resumed = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir, "train")}
  straight = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(straight_dir, "train")}
  for step in (5, 6):  # steps after the restart see the same data and the same state
    np.testing.assert_allclose(resumed[step], straight[step], rtol=1e-6)
  _, p_resumed = final_params(workdir, config)
  _, p_straight = final_params(straight_dir, config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               p_resumed, p_straight)


def test_checkpoint_of_another_model_is_a_clear_error_and_nothing_is_overwritten(
    uninterrupted, pydoc_data_dir, tmp_path):
  straight_dir, _, _ = uninterrupted
  import shutil
  workdir = str(tmp_path / "w")
  shutil.copytree(straight_dir, workdir)
  before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir)
            for p in fs}
  config = tiny_config(pydoc_data_dir, **{"model.d_model": 48, "num_train_steps": 8})
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="does not match"):
    trainer.train_and_evaluate(config, workdir)
  after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir)
           for p in fs}
  assert before == after


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(
    pydoc_data_dir, tmp_path, monkeypatch):
  real = pipeline.make_global_batch
  calls = {"train": 0}

  def poisoned(batch, shardings):
    if batch["inputs"].shape[0] == 8:  # train and eval batches alike; count all
      calls["train"] += 1
    if calls["train"] == 5:  # the 4th train batch (one eval batch... none before step 3)
      batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
    return real(batch, shardings)

  monkeypatch.setattr(trainer.pipeline, "make_global_batch", poisoned)
  config = tiny_config(pydoc_data_dir, eval_every_steps=100)
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 5.*step 4"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert checkpoint_lib.Checkpointer(str(tmp_path), keep=3).latest_step() == 4


def test_missing_dataset_says_how_to_prepare(tmp_path):
  config = tiny_config(str(tmp_path / "empty"))
  with pytest.raises(datasets.DatasetNotPreparedError, match="prepare_data.py --dataset=pydoc_topics"):
    trainer.train_and_evaluate(config, str(tmp_path / "work"))


def test_unwritable_workdir_is_a_clear_error(pydoc_data_dir, tmp_path):
  target = tmp_path / "file"
  target.write_text("not a directory")
  with pytest.raises(PermissionError, match="not writable"):
    trainer.train_and_evaluate(tiny_config(pydoc_data_dir), str(target / "sub"))


def _one_step(config, mesh, batch):
  rules = config.sharding_rules
  model = state_lib.Model(config.model)
  tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
  schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
  state, shardings, rest = state_lib.create_train_state(model, tx, jax.random.key(0), mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = step_lib.make_train_step(model, tx, objectives.get("causal_lm"), schedule, shardings,
                                  rest, batch_sharding, mesh, rules=rules)
  state, metrics = step(state, rest, pipeline.make_global_batch(batch, batch_sharding))
  state, metrics2 = step(state, rest, pipeline.make_global_batch(batch, batch_sharding))
  losses = (float(metrics["loss"]), float(metrics2["loss"]))
  grad_norms = (float(metrics["grad_norm"]), float(metrics2["grad_norm"]))
  return losses, grad_norms, jax.device_get(state.params), shardings


def test_sharded_step_equals_single_device(pydoc_data_dir, devices8):
  config = tiny_config(pydoc_data_dir)
  tokenizer = families.build(config).tokenizer
  source = datasets.data_source("pydoc_topics", "train", pydoc_data_dir)
  batch = next(iter(pipeline.lm_dataset(source, tokenizer, seq_len=config.data.seq_len,
                                        batch_size=config.batch_size, seed=0)))
  mesh1 = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices8[:1])
  mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices8)
  losses1, norms1, params1, _ = _one_step(config, mesh1, batch)
  losses8, norms8, params8, shardings8 = _one_step(config, mesh8, batch)
  # The 8-device state really is sharded (fsdp and tensor axes in use).
  specs = {str(s.spec) for s in jax.tree.leaves(shardings8.params)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
  np.testing.assert_allclose(losses8[0], losses1[0], rtol=1e-6)
  np.testing.assert_allclose(losses8[1], losses1[1], rtol=1e-6)
  np.testing.assert_allclose(norms8, norms1, rtol=1e-5)
  # Adam divides by sqrt(nu) + 1e-8, so a weight whose gradient is ~1e-9 moves by a near-random
  # fraction of the step when the summation order changes across devices: compare the weights
  # to 1e-4 absolute, 3% of one step at the peak learning rate (3e-3), and the rest tightly.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
               params8, params1)
