"""experiments/metalm_multitask.py at full size: a train.py METALM checkpoint finetuned on
task datasets prepared from official-format files, and its clear errors."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from metalm_jax import config as config_lib
from metalm_jax.data import datasets
from metalm_jax.data import text_tasks
from metalm_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "metalm_multitask.py")
TASKS = {"squad_v1": "squad_v1", "boolq": "superglue/boolq", "cnn_dailymail": "cnn_dailymail"}


def run(*args, timeout=900):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def pretrained(pydoc_data_dir, tmp_path_factory):
  """A 2-step experiments/train.py run of configs/metalm_lm.py:size=test (a METALM)."""
  workdir = str(tmp_path_factory.mktemp("metalm_pre"))
  config = ml_collections.ConfigDict(
      config_lib.config_module("metalm_lm").get_config("size=test").to_dict())
  config.data.data_dir = pydoc_data_dir
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 2
  config.sample.max_new_tokens = 0
  trainer.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_checkpoint_finetunes_on_prepared_official_datasets(pretrained, tmp_path):
  data_dir, manual = str(tmp_path / "data"), tmp_path / "manual"
  text_tasks.write_pydoc_task_files(manual, max_topics=12)
  for name in TASKS.values():
    datasets.prepare(name, data_dir, manual_dir=str(manual))
  out = run("--size=tiny", f"--checkpoint={pretrained}", f"--data_dir={data_dir}",
            f"--workdir={tmp_path}/out", f"--tasks={','.join(TASKS)}",
            "--schedule=finetune_steps=2,eval_limit=4,batch=8,seq_len=64,max_input_tokens=40")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "out" / "results.json") as f:
    results = json.load(f)
  assert results["checkpoint"] == pretrained and results["pretrain_steps"] == 0
  assert results["finetune_steps"] == 2 and set(results["mixing"]) == set(TASKS)
  squad, boolq, cnn = (results["tasks"][t] for t in TASKS)
  assert squad["num_examples"] == boolq["num_examples"] == cnn["num_examples"] == 4
  for value in (squad["exact_match"], squad["f1"], boolq["accuracy"], cnn["rouge_l"]):
    assert 0.0 <= value <= 100.0
  assert squad["f1"] >= squad["exact_match"]


def test_missing_task_datasets_are_listed_with_their_commands(tmp_path):
  # (One subprocess: each costs an interpreter start. The datasets are checked before the
  # checkpoint is read, so none is needed here.)
  out = run("--size=paper", f"--checkpoint={tmp_path}/pretrained", f"--data_dir={tmp_path}",
            f"--workdir={tmp_path}/o")
  assert out.returncode != 0
  assert "6 task dataset(s) are not prepared" in out.stderr
  assert "prepare_data.py --dataset=superglue/copa" in out.stderr
