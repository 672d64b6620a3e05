"""Clean stops of experiments/train.py: SIGTERM / SIGINT checkpoint the step and exit 0."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from metalm_jax.train import checkpoint as checkpoint_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(data_dir, workdir, steps):
  return [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
          "--config=" + os.path.join(ROOT, "configs", "decoder_lm.py") + ":size=test",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          f"--config.num_train_steps={steps}", "--config.checkpoint_every_steps=1000",
          "--config.eval_every_steps=1000", "--config.log_every_steps=1",
          "--config.sample.max_new_tokens=0"]


def wait_for_train_rows(workdir, n, proc, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  start = time.time()
  while time.time() - start < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode}:\n"
                           + proc.stdout.read().decode()[-3000:])
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for line in f if '"train"' in line) >= n:
          return
    time.sleep(0.2)
  raise AssertionError("training did not reach the expected step in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM,  # SIGINT takes the same path: slow only
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_checkpoints_current_step_and_exits_zero_then_resumes(pydoc_data_dir, tmp_path,
                                                                      sig):
  workdir = str(tmp_path)
  proc = subprocess.Popen(train_cmd(pydoc_data_dir, workdir, 100_000), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, cwd=ROOT)
  wait_for_train_rows(workdir, 3, proc)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  out = out.decode()
  assert proc.returncode == 0, out[-3000:]
  assert f"stop requested ({sig.name})" in out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last_logged = max(json.loads(line)["step"] for line in f)
  latest = checkpoint_lib.Checkpointer(workdir, keep=3).latest_step()
  assert latest == last_logged >= 3  # the interrupted step itself was saved

  if sig == signal.SIGTERM:  # the same command resumes from that step
    resumed = subprocess.run(train_cmd(pydoc_data_dir, workdir, latest + 2), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    log = resumed.stdout.decode()
    assert resumed.returncode == 0, log[-3000:]
    assert f"resumed from step {latest}" in log
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      steps = [json.loads(line)["step"] for line in f if '"train"' in line]
    assert steps[-2:] == [latest + 1, latest + 2]
