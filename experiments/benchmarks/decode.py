"""Decode step latency and cache bytes vs context length: attention (KV cache) vs Mamba layers.

    python experiments/benchmark.py decode
    python experiments/benchmark.py decode --contexts 1024 8192 --steps 32 --plot docs/img/x.png

Five schedules of `HybridDecoder` (batch 1, same widths as the hybrid forward benchmark):
'AAAAAAAA' (attention twin, equal parameter count), 'MMMMAMMM' (hybrid 1:7), 'MMMMMMMM'
(pure Mamba, the hybrid's d_ff), and with Mamba-2 layers of the same state size (--archs
hybrid_m2 mamba2): 'M2M2M2M2AM2M2M2' (equal parameter count) and 'M2' x 8 (the hybrid's d_ff). A cache is allocated for `context` tokens and its index set
near the end, then one-token `decode` steps are timed (jitted, cache buffers donated, median
over --steps steps after a warm-up step). Attention decoding reads every cache slot (masked),
so its step cost grows with the allocated context; a Mamba layer's state is constant.
Cache bytes are exact (sum of the cache arrays), split by layer kind.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.benchmarks.hybrid import build
from metalm_jax.models.hybrid import HybridDecoder

MIB = 2 ** 20


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(model: HybridDecoder, context: int, steps: int) -> dict:
  graphdef, state = nnx.split(model)
  cache = model.init_cache(1, context)
  kinds = {k: [c for s, c in zip(model.layer_kinds, cache["layers"]) if s == k]
           for k in ("A", "M", "M2")}
  ssm = kinds["M"] + kinds["M2"]
  row = dict(cache_mib=_nbytes(cache) / MIB, attn_cache_mib=_nbytes(kinds["A"]) / MIB,
             mamba_cache_mib=_nbytes(ssm) / MIB,
             bytes_per_attn_layer=_nbytes(kinds["A"][:1]) if kinds["A"] else None,
             bytes_per_mamba_layer=_nbytes(ssm[:1]) if ssm else None)
  cache["index"] = jnp.int32(max(0, context - steps - 2))

  @jax.jit
  def _step(state, token, cache):
    logits, cache = nnx.merge(graphdef, state).decode(token, cache)
    return jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), cache

  step = jax.jit(_step, donate_argnums=(2,))
  token = jnp.ones((1, 1), jnp.int32)
  token, cache = jax.block_until_ready(step(state, token, cache))  # compile + warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    token, cache = jax.block_until_ready(step(state, token, cache))
    times.append(time.perf_counter() - start)
  row["step_ms"] = 1e3 * statistics.median(times)
  return row


ARCHS = ("attention", "hybrid", "mamba", "hybrid_m2", "mamba2")


def run(contexts=(1024, 4096, 16384, 32768), steps=20, archs=("attention", "hybrid", "mamba"),
        ssm_head_dim=32, **widths) -> list[dict]:
  rows = []
  for context in contexts:
    for arch in archs:
      if arch in ("mamba", "mamba2"):
        model = HybridDecoder(
            vocab_size=widths["vocab"], d_model=widths["d_model"], schedule="mamba",
            mamba_version=2 if arch == "mamba2" else 1, ssm_head_dim=ssm_head_dim,
            num_layers=widths["num_layers"], num_heads=widths["num_heads"],
            d_ff=widths["d_ff"], d_state=widths["d_state"], rngs=nnx.Rngs(0))
      else:
        model = build(arch, path="reference", block_size=512, ssm_head_dim=ssm_head_dim,
                      **widths)
      row = dict(context=context, arch=arch, schedule=model.schedule)
      row.update(measure(model, context, steps))
      rows.append(row)
      print(f"# {row}", flush=True)
  return rows


def to_markdown(rows) -> str:
  cols = ["context", "arch", "schedule", "step_ms", "cache_mib", "attn_cache_mib",
          "mamba_cache_mib", "bytes_per_attn_layer", "bytes_per_mamba_layer"]
  fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for arch in ARCHS:
    sel = [r for r in rows if r["arch"] == arch]
    if not sel:
      continue
    label = f"{arch} ({sel[0]['schedule']})" if sel else arch
    axes[0].plot([r["context"] for r in sel], [r["step_ms"] for r in sel], "-o", label=label)
    axes[1].plot([r["context"] for r in sel], [r["cache_mib"] for r in sel], "-o", label=label)
  for ax, title in zip(axes, ("decode step latency (ms, median)", "cache size (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens, batch 1)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--num_layers", type=int, default=8)
  parser.add_argument("--num_heads", type=int, default=4)
  parser.add_argument("--d_ff", type=int, default=192)
  parser.add_argument("--d_state", type=int, default=16)
  parser.add_argument("--vocab", type=int, default=256)
  parser.add_argument("--archs", nargs="+", default=["attention", "hybrid", "mamba"],
                      choices=ARCHS)
  parser.add_argument("--ssm_head_dim", type=int, default=32,
                      help="Mamba-2 channels per head (d_inner = 2 d_model)")
  parser.add_argument("--plot", default="", help="write a PNG of latency and cache size here")
  args = parser.parse_args(argv)
  print(f"backend={jax.default_backend()} d_model={args.d_model} layers={args.num_layers} "
        f"batch=1 steps={args.steps} (median ms per one-token step)")
  rows = run(tuple(args.contexts), args.steps, tuple(args.archs), args.ssm_head_dim,
             d_model=args.d_model,
             num_layers=args.num_layers, num_heads=args.num_heads, d_ff=args.d_ff,
             d_state=args.d_state, vocab=args.vocab)
  print(to_markdown(rows))
  if args.plot:
    plot(rows, args.plot)
  return rows


if __name__ == "__main__":
  main()
