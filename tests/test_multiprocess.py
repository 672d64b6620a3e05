"""Two local processes x 4 virtual CPU devices: training runs, and a dead peer is noticed."""
import json
import os
import signal
import socket
import subprocess
import time

from metalm_jax.train import checkpoint as checkpoint_lib
from tests.test_preemption import train_cmd


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(data_dir, workdir, steps, *, heartbeat=100):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  procs = []
  for i in range(2):
    cmd = train_cmd(data_dir, workdir, steps) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
        f"--heartbeat_timeout_seconds={heartbeat}", "--config.checkpoint_every_steps=2"]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT))
  return procs


def test_two_processes_train_and_checkpoint_together(pydoc_data_dir, tmp_path):
  workdir = str(tmp_path)
  procs = _launch(pydoc_data_dir, workdir, steps=4)
  outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "process 1 of 2; 4 local / 8 global devices" in outs[1]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:  # written by process 0 only
    steps = [json.loads(line)["step"] for line in f if '"train"' in line]
  assert steps == [1, 2, 3, 4]
  assert checkpoint_lib.Checkpointer(workdir, keep=3).latest_step() == 4
  # Each process stored its own data-iterator position.
  data_dir = os.path.join(workdir, "checkpoints", "4", "data")
  names = set(os.listdir(data_dir))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= names


def test_dead_peer_makes_the_survivor_exit_with_a_clear_error(pydoc_data_dir, tmp_path):
  workdir = str(tmp_path)
  procs = _launch(pydoc_data_dir, workdir, steps=100_000, heartbeat=5)
  metrics = os.path.join(workdir, "metrics.jsonl")
  start = time.time()
  while not (os.path.exists(metrics) and open(metrics).read().count('"train"') >= 2):
    assert time.time() - start < 240 and procs[0].poll() is None, "training did not start"
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  out = procs[0].communicate(timeout=120)[0].decode()
  procs[1].wait()
  assert procs[0].returncode != 0
  assert time.time() - killed_at < 60
  assert "another task died" in out
