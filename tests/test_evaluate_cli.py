"""Evaluating a checkpoint (library `train.evaluate` and experiments/evaluate.py): the
trainer's own evaluators reproduce its logged metrics; clear errors for wrong checkpoints."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import evaluate as ev
from metalm_jax.train import metrics as metrics_lib
from metalm_jax.train import restore
from metalm_jax.train import trainer
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "evaluate.py")


@pytest.fixture(scope="module")
def trained(pydoc_data_dir, tmp_path_factory):
  """A 4-step run of the test config, evaluated and checkpointed at steps 2 and 4:
  (workdir, config, {step: the trainer's eval row})."""
  workdir = str(tmp_path_factory.mktemp("eval_cli"))
  config = tiny_config(pydoc_data_dir, num_train_steps=4, eval_every_steps=2,
                       checkpoint_every_steps=2, **{"sample.max_new_tokens": 0})
  result = trainer.train_and_evaluate(config, workdir)
  evals = {r["step"]: r for r in metrics_lib.read_metrics(workdir, "eval")}
  assert sorted(evals) == [2, 4] and result["step"] == 4
  np.testing.assert_allclose(evals[4]["loss"], result["eval_loss"], rtol=1e-6)
  return workdir, config, evals


def test_latest_checkpoint_reproduces_the_trainers_last_eval(trained):
  workdir, config, evals = trained
  result = ev.evaluate(config, workdir, config_name="configs/decoder_lm.py:size=test")
  loss = result["evals"]["eval"]
  assert result["step"] == 4
  np.testing.assert_allclose(loss["loss"], evals[4]["loss"], rtol=1e-5)
  np.testing.assert_allclose(loss["perplexity"], math.exp(loss["loss"]), rtol=1e-5)
  assert loss["tokens"] == evals[4]["tokens"] > 0
  assert result["details"]["eval"]["num_batches"] == config.eval_batches
  assert result["checkpoint"] == os.path.join(workdir, "checkpoints", "4")
  assert result["config"] == "configs/decoder_lm.py:size=test"
  assert ev.default_output(result) == os.path.join(workdir, "eval_step4_eval.json")


def test_step_folder_or_step_argument_picks_an_older_checkpoint(trained):
  workdir, config, evals = trained
  result = ev.evaluate(config, os.path.join(workdir, "checkpoints", "2"))
  assert result["step"] == 2
  np.testing.assert_allclose(result["evals"]["eval"]["loss"], evals[2]["loss"], rtol=1e-5)
  again = ev.evaluate(config, os.path.join(workdir, "checkpoints"), step=2, num_batches=1)
  assert (again["step"], again["details"]["eval"]["num_batches"]) == (2, 1)
  with pytest.raises(restore.CheckpointNotFoundError, match=r"step-2 folder but --step=4"):
    ev.evaluate(config, os.path.join(workdir, "checkpoints", "2"), step=4)
  with pytest.raises(restore.CheckpointNotFoundError, match=r"no checkpoint of step 3 .*\[2, 4\]"):
    ev.evaluate(config, workdir, step=3)
  with pytest.raises(Exception, match=r"no evaluator named \['nope'\]"):
    ev.evaluate(config, workdir, names=("nope",))


def test_another_model_config_is_refused_naming_the_keys(trained, pydoc_data_dir):
  workdir, _, evals = trained
  other = tiny_config(pydoc_data_dir, **{"model.d_model": 48})
  with pytest.raises(restore.ConfigMismatchError,
                     match=r"(?s)config\.model\.d_model: checkpoint 32 vs --config 48.*"
                           r"--allow_config_mismatch"):
    ev.evaluate(other, workdir)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="do not fit"):
    ev.evaluate(other, workdir, allow_config_mismatch=True)
  # Keys that only change how the model runs are not refused; dropout is off in eval.
  runtime = tiny_config(pydoc_data_dir, **{"model.dropout_rate": 0.1})
  result = ev.evaluate(runtime, workdir)
  np.testing.assert_allclose(result["evals"]["eval"]["loss"], evals[4]["loss"], rtol=1e-5)


def test_missing_checkpoint_is_a_clear_error(trained, tmp_path):
  _, config, _ = trained
  with pytest.raises(restore.CheckpointNotFoundError, match=r"does not exist.*--workdir"):
    ev.evaluate(config, str(tmp_path / "nowhere"))
  assert not (tmp_path / "nowhere").exists()
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(restore.CheckpointNotFoundError,
                     match="no finished checkpoint in .*checkpoints"):
    ev.evaluate(config, str(tmp_path / "run"))
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("")
  with pytest.raises(restore.CheckpointNotFoundError,
                     match=r"no checkpoint in .*contains: notes\.txt"):
    ev.evaluate(config, str(tmp_path / "other"))


def test_command_line_writes_the_json(trained, pydoc_data_dir, tmp_path):
  workdir, _, evals = trained
  output = str(tmp_path / "out" / "eval.json")
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--config=" + os.path.join(ROOT, "configs", "decoder_lm.py")
       + ":size=test", f"--config.data.data_dir={pydoc_data_dir}", f"--checkpoint={workdir}",
       f"--output={output}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
  out = proc.stdout.decode()
  assert proc.returncode == 0, out[-3000:]
  with open(output) as f:
    result = json.load(f)
  assert result["step"] == 4 and result["config"].endswith("decoder_lm.py:size=test")
  assert result["config_overrides"] == {"data.data_dir": pydoc_data_dir}
  np.testing.assert_allclose(result["evals"]["eval"]["loss"], evals[4]["loss"], rtol=1e-5)
  assert "the trainer's eval at step 4" in out

  bad = subprocess.run(
      [sys.executable, SCRIPT, "--config=" + os.path.join(ROOT, "configs", "decoder_lm.py")
       + ":size=test", f"--checkpoint={tmp_path / 'nowhere'}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
  assert bad.returncode == 1
  assert "CheckpointNotFoundError" in bad.stdout.decode() and "Traceback" not in bad.stdout.decode()
