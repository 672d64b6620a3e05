"""Hybrid (Jamba 1:7, Mamba-1 or Mamba-2 layers) vs pure-attention decoder of equal parameter
count: forward latency and peak memory vs sequence length.

    python experiments/benchmark.py hybrid                      # lengths 1k .. 32k, batch 1
    python experiments/benchmark.py hybrid --lengths 1024 4096 --repeats 5 --plot docs/img/x.png
    python experiments/benchmark.py hybrid --archs hybrid hybrid_m2 attention --paths blockwise

All models are `metalm_jax.models.HybridDecoder`: `hybrid` schedule 'MMMMAMMM' (Mamba-1, no
positional encoding), `hybrid_m2` 'M2M2M2M2AM2M2M2' (Mamba-2 / SSD layers with the same state
size, d_inner x d_state, in heads of --ssm_head_dim; MLP width adjusted so its parameter count
matches the Mamba-1 hybrid's) and `attention` 'AAAAAAAA' (RoPE, MLP widened so the parameter
counts match within 0.1%). Each row names its attention path: 'reference' materialises the L x L logits (timed only
up to --max_reference_len; longer ones are compiled for their memory figure but not run),
'blockwise' is the online-softmax path with a lazy causal mask (no L x L array).

Latency: jitted forward (tokens -> logits), compiled ahead of time, warmed up, median of
--repeats runs with `block_until_ready` (a warm-up over 5 s counts as the first run). Memory: XLA's compiled memory analysis of that executable
(arguments + outputs + temporaries), not the process RSS.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalm_jax.models.decoder import param_count
from metalm_jax.models.hybrid import HybridDecoder, mamba_layer_extra_params, resolve_schedule

MIB = 2 ** 20
ARCHS = ("hybrid", "hybrid_m2", "attention")


def build(arch: str, *, d_model: int, num_layers: int, num_heads: int, d_ff: int,
          d_state: int, vocab: int, path: str, block_size: int, ssm_head_dim: int = 32,
          chunk_size: int | None = None) -> HybridDecoder:
  """The Mamba-1 hybrid ('MMMMAMMM'...), the Mamba-2 hybrid or the attention twin; the last two
  with d_ff chosen so their parameter count equals the Mamba-1 hybrid's."""
  if arch not in ARCHS:
    raise ValueError(f"arch={arch!r}; valid: {ARCHS}")
  schedule = resolve_schedule(num_layers, mamba_version=2 if arch == "hybrid_m2" else 1)
  mambas = num_layers - schedule.count("A")
  m1 = mamba_layer_extra_params(d_model, num_heads, d_state=d_state)
  if arch == "attention":
    d_ff = d_ff + round(mambas * m1 / (num_layers * 3 * d_model))
  elif arch == "hybrid_m2":
    m2 = mamba_layer_extra_params(d_model, num_heads, d_state=d_state, mamba_version=2,
                                  ssm_head_dim=ssm_head_dim)
    d_ff = d_ff + round(mambas * (m1 - m2) / (num_layers * 3 * d_model))
  return HybridDecoder(
      vocab_size=vocab, d_model=d_model, num_layers=num_layers, num_heads=num_heads, d_ff=d_ff,
      d_state=d_state, schedule=schedule if arch != "attention" else "attention",
      mamba_version=2 if arch == "hybrid_m2" else 1, ssm_head_dim=ssm_head_dim,
      chunk_size=chunk_size, position="rope" if arch == "attention" else "none",
      max_len=1 << 20, blockwise_threshold=0 if path == "blockwise" else None,
      block_size=block_size, rngs=nnx.Rngs(0))


def _median_ms(fn, repeats: int, slow_s: float = 5.0) -> float:
  """Median ms of `repeats` calls after a warm-up call. The executable is compiled ahead of
  time, so a warm-up slower than `slow_s` seconds counts as the first sample (long rows)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = [first] if first > slow_s else []
  while len(times) < repeats:
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def measure(model: HybridDecoder, length: int, repeats: int, run: bool) -> dict:
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.vocab_size, (1, length)),
                       jnp.int32)

  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]

  compiled = jax.jit(forward).lower(state, tokens).compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  row = dict(peak_mib=peak / MIB, temp_mib=mem.temp_size_in_bytes / MIB, fwd_ms=None)
  if run:
    row["fwd_ms"] = _median_ms(lambda: jax.block_until_ready(compiled(state, tokens)), repeats)
  return row


def run(lengths=(1024, 2048, 4096, 8192, 16384, 32768), d_model=64, num_layers=8,
        num_heads=4, d_ff=192, d_state=16, vocab=256, repeats=3, block_size=512,
        max_reference_len=4096, paths=("reference", "blockwise"),
        archs=("hybrid", "attention"), ssm_head_dim=32, chunk_size=None) -> list[dict]:
  rows = []
  for length in lengths:
    for path in paths:
      for arch in archs:
        model = build(arch, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                      d_ff=d_ff, d_state=d_state, vocab=vocab, path=path,
                      block_size=block_size, ssm_head_dim=ssm_head_dim, chunk_size=chunk_size)
        row = dict(length=length, arch=arch, schedule=model.schedule, path=path,
                   params=param_count(model))
        row.update(measure(model, length, repeats,
                           run=path == "blockwise" or length <= max_reference_len))
        rows.append(row)
        print(f"# {row}", flush=True)
  _add_ratios(rows)
  return rows


def _add_ratios(rows):
  """attention ms / hybrid ms for the same length and path (both hybrids)."""
  by = {(r["length"], r["arch"], r["path"]): r for r in rows}
  for r in rows:
    if not r["arch"].startswith("hybrid"):
      continue
    att = by.get((r["length"], "attention", r["path"]))
    if att and r["fwd_ms"] and att["fwd_ms"]:
      r["speedup_vs_attention"] = att["fwd_ms"] / r["fwd_ms"]
      r["memory_ratio"] = att["peak_mib"] / r["peak_mib"]


def best_ratios(rows, arch: str = "hybrid") -> dict[int, float]:
  """Per length: fastest attention path / fastest path of `arch` (hybrid or hybrid_m2)."""
  out = {}
  for length in sorted({r["length"] for r in rows}):
    best = lambda a: min((r["fwd_ms"] for r in rows if r["length"] == length
                          and r["arch"] == a and r["fwd_ms"]), default=None)
    if best(arch) and best("attention"):
      out[length] = best("attention") / best(arch)
  return out


def to_markdown(rows) -> str:
  cols = ["length", "arch", "schedule", "path", "params", "fwd_ms", "peak_mib", "temp_mib",
          "speedup_vs_attention", "memory_ratio"]
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
    for p, style in (("blockwise", "-o"), ("reference", "--s")):
      sel = [r for r in rows if r["arch"] == arch and r["path"] == p]
      timed = [r for r in sel if r["fwd_ms"]]
      if timed:
        axes[0].plot([r["length"] for r in timed], [r["fwd_ms"] for r in timed], style,
                     label=f"{arch} ({p})")
      if sel:
        axes[1].plot([r["length"] for r in sel], [r["peak_mib"] for r in sel], style,
                     label=f"{arch} ({p})")
  for ax, title in zip(axes, ("forward latency (ms, median)", "peak memory (MiB, XLA analysis)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[1024, 2048, 4096, 8192, 16384, 32768])
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--num_layers", type=int, default=8)
  parser.add_argument("--num_heads", type=int, default=4)
  parser.add_argument("--d_ff", type=int, default=192)
  parser.add_argument("--d_state", type=int, default=16)
  parser.add_argument("--vocab", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--block_size", type=int, default=512)
  parser.add_argument("--max_reference_len", type=int, default=4096,
                      help="longest length at which the L x L reference path is run")
  parser.add_argument("--paths", nargs="+", default=["reference", "blockwise"],
                      choices=["reference", "blockwise"])
  parser.add_argument("--archs", nargs="+", default=["hybrid", "attention"], choices=ARCHS)
  parser.add_argument("--ssm_head_dim", type=int, default=32,
                      help="hybrid_m2: SSD channels per head (d_inner = 2 d_model)")
  parser.add_argument("--chunk_size", type=int, default=None,
                      help="scan / SSD chunk size (default: each one's default)")
  parser.add_argument("--plot", default="", help="write a PNG of latency and memory here")
  args = parser.parse_args(argv)
  print(f"backend={jax.default_backend()} d_model={args.d_model} layers={args.num_layers} "
        f"heads={args.num_heads} batch=1 repeats={args.repeats} (median ms)")
  rows = run(tuple(args.lengths), args.d_model, args.num_layers, args.num_heads, args.d_ff,
             args.d_state, args.vocab, args.repeats, args.block_size, args.max_reference_len,
             tuple(args.paths), tuple(args.archs), args.ssm_head_dim, args.chunk_size)
  print(to_markdown(rows))
  for arch in ("hybrid", "hybrid_m2"):
    if arch in args.archs and "attention" in args.archs:
      print(f"\nfastest attention path / fastest {arch} path: " + ", ".join(
          f"L={k}: {v:.2f}x" for k, v in best_ratios(rows, arch).items()))
  if args.plot:
    plot(rows, args.plot)
  return rows


if __name__ == "__main__":
  main()
