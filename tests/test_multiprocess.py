"""Two local processes x 4 virtual CPU devices: training runs, and a dead peer is noticed."""
import json
import os
import signal
import socket
import subprocess
import time

import numpy as np

from metalm_jax.train import checkpoint as checkpoint_lib
from tests.test_preemption import ROOT, train_cmd


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(data_dir, workdir, steps, *, heartbeat=100, config=None):
  """Two train.py processes of 4 devices each: the decoder test config, or `config`
  ('<configs file>:<args>') for `steps` steps."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  procs = []
  for i in range(2):
    base = train_cmd(data_dir, workdir, steps)
    if config is not None:
      base = [base[0], base[1], "--config=" + os.path.join(ROOT, "configs", config)] + base[3:]
    cmd = base + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
        f"--heartbeat_timeout_seconds={heartbeat}", "--config.checkpoint_every_steps=2"]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT))
  return procs


def _one_process_losses(data_dir, steps, devices):
  """The same training in this process on 8 devices, fed the global batches the two
  processes assemble (process 0's rows, then process 1's): per-step losses."""
  import jax
  import numpy as np

  from metalm_jax import families, objectives, sharding
  from metalm_jax.data import datasets, pipeline
  from metalm_jax.train import state as state_lib
  from metalm_jax.train import optimizer as optimizer_lib
  from metalm_jax.train import step as step_lib
  from tests.conftest import tiny_config

  config = tiny_config(data_dir, num_train_steps=steps)
  objective = objectives.get(config.objective)
  source = datasets.data_source(config.data.dataset, "train", data_dir)
  tokenizer = families.build(config).tokenizer
  local = [iter(pipeline.lm_dataset(
      source, tokenizer, seq_len=config.data.seq_len, batch_size=config.batch_size // 2,
      seed=config.seed, shuffle=True, num_epochs=None, process_index=i, process_count=2,
      prepare=objective.prepare)) for i in range(2)]
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = config.sharding_rules
  model = state_lib.Model(config.model)
  tx = optimizer_lib.make_optimizer(config.optimizer, steps)
  state, shardings, rest = state_lib.create_train_state(model, tx, jax.random.key(config.seed),
                                                        mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  train_step = step_lib.make_train_step(
      model, tx, objective, optimizer_lib.learning_rate_schedule(config.optimizer, steps),
      shardings, rest, batch_sharding, mesh, rules=rules)
  losses = []
  for _ in range(steps):
    parts = [next(it) for it in local]
    batch = {k: jax.device_put(np.concatenate([p[k] for p in parts]), batch_sharding)
             for k in parts[0]}
    state, metrics = train_step(state, rest, batch)
    losses.append(float(metrics["loss"]))
  return losses


def test_two_processes_train_and_checkpoint_together(pydoc_data_dir, tmp_path, devices8):
  workdir = str(tmp_path)
  procs = _launch(pydoc_data_dir, workdir, steps=4)
  outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "process 1 of 2; 4 local / 8 global devices" in outs[1]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:  # written by process 0 only
    rows = [json.loads(line) for line in f if '"train"' in line]
  steps = [row["step"] for row in rows]
  assert steps == [1, 2, 3, 4]
  # The same losses as one process on 8 devices fed the same global batches.
  expected = _one_process_losses(pydoc_data_dir, 4, devices8)
  np.testing.assert_allclose([row["loss"] for row in rows], expected, rtol=1e-5)
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


MPLUG = "mplug.py:size=test,runlocal=1"


def _one_process_mplug_losses(data_dir, steps, devices):
  """mPLUG pretraining in this process on 8 devices, fed the global batches the two
  processes assemble (process 0's rows, then process 1's): per-step losses."""
  import jax

  from metalm_jax import families, sharding
  from metalm_jax.train import optimizer as optimizer_lib
  from metalm_jax.train import state as state_lib
  from metalm_jax.train import step as step_lib
  from tests.conftest import runlocal_config

  config = runlocal_config("mplug", "size=test", data_dir, num_train_steps=steps)
  family = families.build(config)
  local = [iter(family.train_dataset(batch_size=config.batch_size // 2, process_index=i,
                                     process_count=2)) for i in range(2)]
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = config.sharding_rules
  model = state_lib.Model(config.model)
  tx = optimizer_lib.make_optimizer(config.optimizer, steps)
  state, shardings, rest = state_lib.create_train_state(
      model, tx, jax.random.key(config.seed), mesh, rules, init_extra=family.init_extra)
  batch_sharding = sharding.batch_sharding(mesh, rules, ndim=1)
  train_step = step_lib.make_train_step(
      model, tx, family, optimizer_lib.learning_rate_schedule(config.optimizer, steps),
      shardings, rest, batch_sharding, mesh, rules=rules)
  losses = []
  for _ in range(steps):
    parts = [next(it) for it in local]
    batch = {k: jax.device_put(np.concatenate([p[k] for p in parts]), batch_sharding)
             for k in parts[0]}
    state, metrics = train_step(state, rest, batch)
    losses.append(float(metrics["loss"]))
  return losses


def test_two_processes_train_mplug_with_its_momentum_and_queues(family_data_dir, tmp_path,
                                                                devices8):
  """mPLUG's extra state (momentum encoders, ITC queues) is global state sharded over the
  two processes' devices: the per-step losses equal one process on 8 devices."""
  workdir = str(tmp_path)
  procs = _launch(family_data_dir, workdir, steps=6, config=MPLUG)
  outs = [p.communicate(timeout=600)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if '"train"' in line]
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
  # (6 steps: the runlocal config's own, so the reference's compiled step is the one
  # tests/test_families.py compiled, through the persistent cache.)
  expected = _one_process_mplug_losses(family_data_dir, 6, devices8)
  np.testing.assert_allclose([row["loss"] for row in rows], expected, rtol=2e-5)
  assert checkpoint_lib.Checkpointer(workdir, keep=3).latest_step() == 6
