"""Compile time of the decoder's train step vs depth, with and without layer scanning.

    python experiments/benchmark.py compile                          # depths 2 4 8 16 32
    python experiments/benchmark.py compile --depths 4 16 --remat full

The real train step (`metalm_jax.train.step.make_train_step`: forward, backward, AdamW, on a
1-device mesh) of a `Decoder` at d_model=--d_model, for each depth, built with
`scan_layers=False` (N blocks unrolled: XLA compiles N copies) and `scan_layers=True`
(`nnx.vmap`-stacked parameters run by `lax.scan`: one block compiled whatever N). Reported:
seconds to trace + lower (`jit(...).lower`) and to compile (`.compile()`), each best of
--repeats with jax's compilation cache off, and the HLO text size. Nothing is executed.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections

from metalm_jax import objectives, sharding
from metalm_jax.train import state as state_lib
from metalm_jax.train import optimizer as optimizer_lib
from metalm_jax.train import step as step_lib


def _train_step_lowering(*, depth: int, scan: bool, d_model: int, seq_len: int, batch: int,
                         remat: str):
  """(jit-lowering thunk) of the train step of a depth-`depth` decoder, abstract arguments."""
  model_config = ml_collections.ConfigDict(dict(
      name="decoder", vocab_size=1024, d_model=d_model, num_layers=depth,
      num_heads=max(1, d_model // 64), d_ff=3 * d_model, max_len=seq_len,
      scan_layers=scan, remat_policy=remat))
  opt = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=10, end_lr_ratio=0.1, b1=0.9, b2=0.98, eps=1e-8,
      weight_decay=0.1, grad_clip_norm=1.0, grad_accum_steps=1, lr_multipliers=(), freeze=()))
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rules = sharding.DATA_PARALLEL_RULES
  model = state_lib.Model(model_config)
  tx = optimizer_lib.make_optimizer(opt, 1000)
  objective = objectives.get("causal_lm")
  key = jax.random.key(0)

  def init(k):
    params, _ = model.init(k)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), rng=jax.random.key_data(k),
                                nonfinite_skips=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init, key)
  shardings = sharding.state_shardings(abstract, model.logical_specs, mesh, rules)
  rest = jax.eval_shape(lambda k: model.init(k)[1], key)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = step_lib.make_train_step(model, tx, objective,
                                  optimizer_lib.learning_rate_schedule(opt, 1000), shardings, rest,
                                  batch_sharding, mesh, rules=rules)
  ints = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  batch_abstract = dict(inputs=ints, targets=ints, positions=ints, segment_ids=ints,
                        weights=jax.ShapeDtypeStruct((batch, seq_len), jnp.float32))
  return lambda: step.lower(abstract, rest, batch_abstract)


def main(argv: list[str]) -> list[dict]:
  parser = argparse.ArgumentParser(prog="benchmark.py compile", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32])
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--remat", default="none")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)

  rows = []
  print(f"decoder d_model={args.d_model}, seq {args.seq_len}, batch {args.batch}, "
        f"remat={args.remat}, backend {jax.default_backend()}\n")
  print("| layers | scan_layers | lower_s | compile_s | hlo_kchars |")
  print("|---|---|---|---|---|")
  for depth in args.depths:
    for scan in (False, True):
      lower = _train_step_lowering(depth=depth, scan=scan, d_model=args.d_model,
                                   seq_len=args.seq_len, batch=args.batch, remat=args.remat)
      lower_s, compile_s = [], []
      for _ in range(args.repeats):
        jax.clear_caches()
        start = time.perf_counter()
        lowered = lower()
        lower_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        lowered.compile()
        compile_s.append(time.perf_counter() - start)
      row = dict(layers=depth, scan_layers=scan, lower_s=round(min(lower_s), 2),
                 compile_s=round(min(compile_s), 2),
                 hlo_kchars=round(len(lowered.as_text()) / 1000))
      rows.append(row)
      print(f"| {depth} | {scan} | {row['lower_s']} | {row['compile_s']} | "
            f"{row['hlo_kchars']} |", flush=True)
  return rows
