"""Ahead-of-time compilation of the real train step for a large mesh, without the hardware:
per-device parameter / optimizer / temporary bytes and compile seconds.

    python experiments/benchmark.py aot                                   # small + 1b, 256 devices
    python experiments/benchmark.py aot --sizes 1b --rules fsdp_tp --devices 256
    python experiments/benchmark.py aot --sizes 1b --num_layers 2         # quicker: 2 of 24 layers
    python experiments/benchmark.py aot --sizes small --rules fsdp --activation_constraints 0

Each (size, rule set) compiles in its own subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES JAX_PLATFORMS=cpu`, so DEVICES
virtual CPU devices stand in for the accelerators. In the child: `configs/decoder_lm.py:size=S`
gives the model and optimizer config; the train state is built abstractly exactly as
`state_lib.create_train_state` does (`jax.eval_shape` of init, then
`sharding.state_shardings` from the parameters' logical names and the rule set), the batch is
a `ShapeDtypeStruct` with `sharding.batch_sharding`, and `step_lib.make_train_step(...)` is
lowered on those abstract arguments and compiled (`.lower(...).compile()`): nothing is
allocated or run.

Meshes (data x fsdp x tensor): dp 256 x 1 x 1, fsdp 16 x 16 x 1, fsdp_tp 16 x 4 x 4 (for other
device counts: dp all on 'data'; fsdp and fsdp_tp as --fsdp / --tensor say, data the rest).
The global batch is the config's batch, raised to the device count when it is smaller (size
small: 32 -> 256 on 256 devices, so every rule set sees the same batch), and reported.

Columns: `param_mib` / `opt_mib` = per-device bytes of the parameters / AdamW state computed
exactly from the shard shapes of the state shardings (`NamedSharding.shard_shape`);
`args_mib` = XLA's `memory_analysis().argument_size_in_bytes` of the compiled step (state +
batch, per device) as the cross-check (`args_mib - param_mib - opt_mib` = batch + step + rng);
`temp_mib` = XLA's temporaries (activations, gradients, collectives' buffers); `peak_mib` =
arguments + outputs - aliased (donated) + temporaries; `largest_array` = the largest array
in the compiled (per-device) HLO; `collectives` counts them in that HLO; `compile_s` = lower +
compile seconds (the state is built with `jax.eval_shape`: a few seconds more per row).
Activation memory depends on the reference attention's L x L logits (no blockwise switch in
the config) and is the XLA CPU compiler's schedule, which differs from a TPU/GPU compiler's.
--num_layers overrides the config's depth (parameters, optimizer state and the per-layer
part of the temporaries scale linearly with it). The step pins the activations by their
logical names as the trainer does (`make_train_step(..., rules=rules)`);
`--activation_constraints 0` compiles it without (XLA's propagation alone) for comparison.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 2 ** 20


def load_config(size: str):
  from metalm_jax import config as config_lib  # after the XLA flags are set
  return config_lib.config_module("decoder_lm").get_config(f"size={size}")


def mesh_shape(rules: str, devices: int, fsdp: int, tensor: int) -> dict[str, int]:
  """The ('data', 'fsdp', 'tensor') sizes for a rule set on `devices` devices."""
  if rules == "dp":
    return {"data": devices, "fsdp": 1, "tensor": 1}
  tensor = tensor if rules == "fsdp_tp" else 1
  if devices % (fsdp * tensor):
    raise ValueError(f"{devices} devices are not divisible by fsdp {fsdp} x tensor {tensor}")
  return {"data": devices // (fsdp * tensor), "fsdp": fsdp, "tensor": tensor}


def shard_bytes(abstract_tree, shardings) -> int:
  """Bytes of the largest shard of each leaf, summed: the per-device footprint."""
  import jax
  import numpy as np

  total = 0
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
  return total


def compile_one(size: str, rules_name: str, shape: dict[str, int],
                num_layers: int | None = None, return_compiled: bool = False,
                activation_constraints: bool = True):
  """In a process with enough (virtual) devices: lower + compile the train step abstractly.
  Returns the row (and the compiled executable if `return_compiled`)."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  from metalm_jax import objectives, sharding
  from metalm_jax.train import state as state_lib
  from metalm_jax.train import optimizer as optimizer_lib
  from metalm_jax.train import step as step_lib

  config = load_config(size)
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  if num_layers:
    model_config.num_layers = num_layers
  start = time.perf_counter()
  mesh = sharding.make_mesh(shape)
  rules = sharding.RULE_SETS[rules_name]
  model = state_lib.Model(model_config)
  tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
  schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
  key = jax.random.key(config.seed)
  init_key, state_key = jax.random.split(key)

  def init(key):  # as state_lib.create_train_state's init
    params, _ = model.init(key)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params),
                                rng=jax.random.key_data(state_key),
                                nonfinite_skips=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init, init_key)
  shardings = sharding.state_shardings(abstract, model.logical_specs, mesh, rules)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  rest = jax.eval_shape(lambda k: model.init(k)[1], init_key)
  batch_axes = math.prod(mesh.shape[a] for a in sharding.rules_dict(rules).get("batch", ()))
  global_batch = max(config.batch_size, jax.device_count())  # equal over rule sets
  global_batch = -(-global_batch // batch_axes) * batch_axes
  seq_len = config.data.seq_len
  batch_sharding = sharding.batch_sharding(mesh, rules)
  tokens = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=batch_sharding)
  batch = dict(inputs=tokens, targets=tokens, positions=tokens, segment_ids=tokens,
               weights=jax.ShapeDtypeStruct((global_batch, seq_len), jnp.float32,
                                            sharding=batch_sharding))
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
  train_step = step_lib.make_train_step(model, tx, objectives.get("causal_lm"), schedule,
                                        shardings, rest, batch_shardings, mesh,
                                        rules=rules if activation_constraints else None)
  setup_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered = train_step.lower(abstract_state, rest, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  param_b = shard_bytes(abstract.params, shardings.params)
  opt_b = shard_bytes(abstract.opt_state, shardings.opt_state)
  # Cross-check: every compiled input sharding equals the one we computed.
  in_shardings = compiled.input_shardings[0][0]
  same = all(a.is_equivalent_to(b, x.ndim) for a, b, x in zip(
      jax.tree.leaves(in_shardings), jax.tree.leaves(shardings), jax.tree.leaves(abstract)))
  hlo = compiled.as_text()
  largest, largest_bytes = "", 0
  for m in re.finditer(r"= (f32|bf16|s32)\[([\d,]+)\]", hlo):
    n = math.prod(int(d) for d in m.group(2).split(",")) * (2 if m.group(1) == "bf16" else 4)
    if n > largest_bytes:
      largest, largest_bytes = f"{m.group(1)}[{m.group(2)}]", n
  collectives = {op: hlo.count(f" {op}(") for op in ("all-reduce", "all-gather",
                                                     "reduce-scatter", "all-to-all")}
  row = dict(
      size=size, layers=model_config.num_layers, rules=rules_name,
      act_constraints=activation_constraints,
      mesh="x".join(str(shape[a]) for a in ("data", "fsdp", "tensor")),
      devices=jax.device_count(), params=model.param_count(), global_batch=global_batch,
      seq_len=seq_len, param_mib=param_b / MIB, opt_mib=opt_b / MIB,
      args_mib=mem.argument_size_in_bytes / MIB,
      args_minus_state_mib=(mem.argument_size_in_bytes - param_b - opt_b) / MIB,
      output_mib=mem.output_size_in_bytes / MIB, alias_mib=mem.alias_size_in_bytes / MIB,
      temp_mib=mem.temp_size_in_bytes / MIB,
      peak_mib=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / MIB,
      shardings_match=same, largest_array=f"{largest} {largest_bytes / MIB:.0f} MiB", collectives=" ".join(f"{k}:{v}" for k, v in collectives.items()),
      setup_s=setup_s, lower_s=lower_s, compile_s=lower_s + compile_s)
  return (row, compiled) if return_compiled else row


def run_child(size: str, rules: str, devices: int, fsdp: int, tensor: int,
              num_layers: int | None, timeout: float, activation_constraints: bool = True) -> dict:
  """compile_one in a subprocess with `devices` virtual CPU devices; a row (or its error)."""
  shape = mesh_shape(rules, devices, fsdp, tensor)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "experiments.benchmarks.aot", "--_child",
         json.dumps(dict(size=size, rules_name=rules, shape=shape, num_layers=num_layers,
                         activation_constraints=activation_constraints))]
  start = time.perf_counter()
  try:
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(size=size, rules=rules, devices=devices, layers=num_layers,
                error=f"timeout after {timeout:.0f} s")
  wall = time.perf_counter() - start
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    return dict(size=size, rules=rules, devices=devices, layers=num_layers,
                error=(out.stderr.strip().splitlines() or ["?"])[-1][:200])
  row = json.loads(lines[-1])
  row["child_wall_s"] = wall
  return row


COLUMNS = ["size", "layers", "rules", "act_constraints", "mesh", "devices", "params",
           "global_batch", "seq_len", "param_mib", "opt_mib", "args_mib",
           "args_minus_state_mib", "temp_mib", "peak_mib", "shardings_match", "largest_array",
           "collectives", "compile_s", "error"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--sizes", nargs="+", default=["small", "1b"])
  parser.add_argument("--rules", nargs="+", default=["dp", "fsdp", "fsdp_tp"],
                      choices=["dp", "fsdp", "fsdp_tp"])
  parser.add_argument("--devices", type=int, default=256)
  parser.add_argument("--fsdp", type=int, default=0,
                      help="fsdp axis size (0: 16 for 'fsdp', 4 for 'fsdp_tp')")
  parser.add_argument("--tensor", type=int, default=4, help="tensor axis size of fsdp_tp")
  parser.add_argument("--num_layers", type=int, default=0,
                      help="override the config's layer count (0: the config's)")
  parser.add_argument("--timeout", type=float, default=1200, help="seconds per compile")
  parser.add_argument("--activation_constraints", type=int, default=1, choices=[0, 1],
                      help="1: pin activations by the rules' logical names as the trainer "
                      "does; 0: no activation constraints (XLA's propagation only)")
  args = parser.parse_args(argv)
  if args._child:
    print(json.dumps(compile_one(**json.loads(args._child))), flush=True)
    return []
  print(f"train step lowered + compiled for {args.devices} virtual CPU devices, one "
        f"subprocess per row; per-device MiB")
  rows = []
  for size in args.sizes:
    for rules in args.rules:
      fsdp = args.fsdp or (16 if rules == "fsdp" else 4)
      row = run_child(size, rules, args.devices, fsdp, args.tensor, args.num_layers or None,
                      args.timeout, bool(args.activation_constraints))
      rows.append(row)
      print(f"# {row}", flush=True)
  from experiments.benchmarks.mfu import to_markdown
  print(to_markdown(rows, COLUMNS))
  return rows


if __name__ == "__main__":
  main()
