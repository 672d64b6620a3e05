"""SIGKILL at random steps, restart each time: the final parameters are bitwise those of an
uninterrupted run (`-m slow` runs the 10-kill version whose result is in docs/reliability.md)."""
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from metalm_jax.train import checkpoint as checkpoint_lib
from tests.test_preemption import train_cmd

STEPS = 16


def _cmd(data_dir, workdir):
  return train_cmd(data_dir, workdir, STEPS) + ["--config.checkpoint_every_steps=1"]


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


def _kill_and_resume(data_dir, tmp_path, kills, seed):
  straight = str(tmp_path / "straight")
  subprocess.run(_cmd(data_dir, straight), check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, timeout=300)
  killed = str(tmp_path / "killed")
  rng = np.random.default_rng(seed)
  points = np.sort(rng.choice(np.arange(2, STEPS - 1), size=kills, replace=False))
  done = 0
  for point in points:
    if _run_and_kill_at(_cmd(data_dir, killed), killed, int(point)):
      done += 1
  subprocess.run(_cmd(data_dir, killed), check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, timeout=300)
  step_a, a = _final_params(straight)
  step_b, b = _final_params(killed)
  assert step_a == step_b == STEPS
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise
  return done, points


def test_three_sigkills_resume_bitwise(pydoc_data_dir, tmp_path):
  done, points = _kill_and_resume(pydoc_data_dir, tmp_path, kills=3, seed=0)
  assert done == 3, f"only {done} of the kills at {points} landed before the run ended"


@pytest.mark.slow
def test_ten_sigkills_resume_bitwise(pydoc_data_dir, tmp_path):
  done, points = _kill_and_resume(pydoc_data_dir, tmp_path, kills=10, seed=1)
  assert done == 10, f"only {done} of the kills at {points} landed before the run ended"
