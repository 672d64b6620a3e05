"""SIGKILL at random steps, restart each time: the final train state is bitwise that of an
uninterrupted run, for every family (the decoder LM; mPLUG pretraining with its momentum
encoders, ITC queues and data position; METALM vision-language). `-m slow` runs the 10-kill
version whose result is in docs/reliability.md."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from metalm_jax.train import checkpoint as checkpoint_lib
from tests.test_preemption import ROOT, train_cmd

STEPS = 16


def _cmd(data_dir, workdir, config=None, steps=STEPS):
  if config is None:
    return train_cmd(data_dir, workdir, steps) + ["--config.checkpoint_every_steps=1"]
  return [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
          "--config=" + os.path.join(ROOT, "configs", config), f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", f"--config.num_train_steps={steps}",
          "--config.checkpoint_every_steps=1", "--config.log_every_steps=1",
          "--config.eval_every_steps=1000"]


def _last_logged_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return max([json.loads(line)["step"] for line in f if line.strip()] or [0])


def _run_and_kill_at(cmd, workdir, step, timeout=240):
  """Starts training and SIGKILLs it once `step` has been logged; False if it finished first."""
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  start = time.time()
  while proc.poll() is None and time.time() - start < timeout:
    if _last_logged_step(workdir) >= step:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.05)
  if proc.poll() is None:
    proc.kill()
    raise AssertionError("training did not reach the kill step in time")
  assert proc.returncode == 0
  return False


def _final_params(workdir):
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=3, async_save=False)
  step = ckpt.latest_step()
  state = ckpt.manager.restore(step, args=checkpoint_lib.ocp.args.Composite(
      state=checkpoint_lib.ocp.args.StandardRestore()))["state"]
  ckpt.close()
  return step, state


def _kill_and_resume(data_dir, tmp_path, kills, seed, config=None, steps=STEPS):
  cmd = lambda workdir: _cmd(data_dir, workdir, config, steps)
  straight = str(tmp_path / "straight")
  subprocess.run(cmd(straight), check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, timeout=600)
  killed = str(tmp_path / "killed")
  rng = np.random.default_rng(seed)
  points = np.sort(rng.choice(np.arange(2, steps - 1), size=kills, replace=False))
  done = 0
  for point in points:
    if _run_and_kill_at(cmd(killed), killed, int(point), timeout=600):
      done += 1
  subprocess.run(cmd(killed), check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, timeout=600)
  step_a, a = _final_params(straight)
  step_b, b = _final_params(killed)
  assert step_a == step_b == steps
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):  # bitwise: params, optimizer, extra state
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))
  return done, points, a


def test_three_sigkills_resume_bitwise(pydoc_data_dir, tmp_path):
  done, points, _ = _kill_and_resume(pydoc_data_dir, tmp_path, kills=3, seed=0)
  assert done == 3, f"only {done} of the kills at {points} landed before the run ended"


# The families' runlocal configs at their own 6 steps: the same compiled steps as
# tests/test_families.py (shared through the persistent compilation cache).
def test_mplug_pretraining_resumes_bitwise_with_its_momentum_and_queues(family_data_dir,
                                                                        tmp_path):
  done, points, state = _kill_and_resume(
      family_data_dir, tmp_path, kills=1, seed=2, config="mplug.py:size=test,runlocal=1",
      steps=6)
  assert done == 1, f"the kill at {points} did not land before the run ended"
  assert set(state["extra"]) == {"momentum", "queues"}  # compared bitwise above
  assert int(state["extra"]["queues"]["ptr"]) == 6 * 8 % 64  # 6 steps of 8 rows, queue 64


def test_metalm_vision_language_resumes_bitwise(family_data_dir, tmp_path):
  done, points, _ = _kill_and_resume(
      family_data_dir, tmp_path, kills=1, seed=3, config="metalm_vl.py:size=test,runlocal=1",
      steps=6)
  assert done == 1, f"the kill at {points} did not land before the run ended"


@pytest.mark.slow
def test_ten_sigkills_resume_bitwise(pydoc_data_dir, tmp_path):
  done, points, _ = _kill_and_resume(pydoc_data_dir, tmp_path, kills=10, seed=1)
  assert done == 10, f"only {done} of the kills at {points} landed before the run ended"
