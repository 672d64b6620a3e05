"""Selective-scan speed: every `metalm_jax.ssm.selective_scan` method and Mamba-2's SSD vs
mambapy's pscan.

Run (a plain process: no virtual devices; the numbers are for the default backend):

    cd /work/main && .venv/bin/python -m experiments.benchmarks.scan
    .venv/bin/python -m experiments.benchmarks.scan --lengths 4096 --d_inner 512 --repeats 9
    .venv/bin/python experiments/benchmark.py scan --methods sequential ssd --lengths 1024 4096

`ssd` / `ssd_reference` (Mamba-2, `metalm_jax.ssm.ssd`) run at the same state size: d_inner =
heads x --ssd_head_dim channels, each with a [d_state] state (one group of B / C), so the
state is [d_inner, d_state] as Mamba-1's; dt is one value per head (the first channels' dt),
A one scalar per head. Rows report `vs_sequential_fwd` / `vs_sequential_fwdbwd` (the
sequential Mamba-1 scan's ms / this ms, same run) when the sequential method ran too.

Each case is jitted, warmed up, timed with `block_until_ready` and reported as the median of
`repeats`. Forward+backward is `grad(sum(y * gy))` with respect to x, dt, A, B, C and D.
The mambapy baseline (PyTorch, CPU) computes the same y the way `mambapy.mamba.MambaBlock.
selective_scan` does (exp(dt A), dt B x, `mambapy.pscan.pscan`, C contraction, D skip) with
torch autograd; it is timed in the same run when torch and mambapy import, else skipped with
a note. Install it with `pip install torch==2.13.0 mambapy==1.2.0` (CPU wheel; never unpinned).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from metalm_jax.ssm import scan as scan_lib

from metalm_jax.ssm import ssd as ssd_lib

JAX_METHODS = ("sequential", "chunked", "associative", "reference", "ssd", "ssd_reference")
SLOW_METHODS = ("reference", "associative", "ssd_reference")  # plain autodiff: skipped > 4096


def _inputs(length, d_inner, d_state, batch, seed=0):
  rng = np.random.default_rng(seed)
  f32 = np.float32
  x = rng.standard_normal((batch, length, d_inner)).astype(f32)
  dt = np.log1p(np.exp(rng.standard_normal((batch, length, d_inner)) - 3.0)).astype(f32)
  a = -np.tile(np.arange(1, d_state + 1, dtype=f32), (d_inner, 1))
  b = rng.standard_normal((batch, length, d_state)).astype(f32)
  c = rng.standard_normal((batch, length, d_state)).astype(f32)
  d = np.ones((d_inner,), f32)
  gy = rng.standard_normal((batch, length, d_inner)).astype(f32)
  return x, dt, a, b, c, d, gy


def _time(fn, repeats, warmup=2):
  """Median wall time in ms of fn() (fn must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def ssd_inputs(inputs, head_dim):
  """Mamba-1 scan inputs -> SSD inputs of the same state size (module docstring)."""
  x, dt, a, b, c, d, gy = inputs
  batch, length, d_inner = x.shape
  if d_inner % head_dim:
    raise SystemExit(f"--ssd_head_dim {head_dim} must divide --d_inner {d_inner}")
  heads = d_inner // head_dim
  split = lambda v: v.reshape(batch, length, heads, head_dim)
  a_heads = -np.linspace(1.0, 16.0, heads, dtype=np.float32)
  return (split(x), np.ascontiguousarray(dt[..., :heads]), a_heads, b[:, :, None], c[:, :, None],
          np.ones((heads,), np.float32), split(gy))


def _jax_fns(method, chunk_size):
  if method == "reference":
    scan = scan_lib.selective_scan_reference
  elif method == "ssd_reference":
    scan = ssd_lib.ssd_reference
  elif method == "ssd":
    def scan(*args):
      return ssd_lib.ssd_chunked(*args, chunk_size=chunk_size)
  else:
    def scan(*args):
      return scan_lib.selective_scan(*args, method=method, chunk_size=chunk_size)
  forward = jax.jit(scan)

  def loss(x, dt, a, b, c, d, gy):
    return jnp.sum(scan(x, dt, a, b, c, d) * gy)
  backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
  return forward, backward


def time_jax(method, inputs, repeats, chunk_size=None):
  """(forward ms, forward+backward ms) of one selective_scan method."""
  args = [jnp.asarray(v) for v in inputs]
  forward, backward = _jax_fns(method, chunk_size)
  fwd = _time(lambda: jax.block_until_ready(forward(*args[:6])), repeats)
  bwd = _time(lambda: jax.block_until_ready(backward(*args)), repeats)
  return fwd, bwd


def time_mambapy(inputs, repeats):
  """(forward ms, forward+backward ms) of mambapy's pscan selective scan, or None if absent."""
  try:
    import torch
    from mambapy.pscan import pscan
  except ImportError:
    return None
  x, dt, a, b, c, d, gy = [torch.from_numpy(v) for v in inputs]

  def selective_scan(x, dt, a, b, c, d):  # as mambapy.mamba.MambaBlock.selective_scan
    delta_a = torch.exp(dt.unsqueeze(-1) * a)
    bx = dt.unsqueeze(-1) * b.unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(delta_a, bx)
    return (hs @ c.unsqueeze(-1)).squeeze(3) + d * x

  def forward():
    with torch.no_grad():
      selective_scan(x, dt, a, b, c, d)

  leaves = [v.clone().requires_grad_(True) for v in (x, dt, a, b, c, d)]

  def backward():
    for leaf in leaves:
      leaf.grad = None
    (selective_scan(*leaves) * gy).sum().backward()

  return _time(forward, repeats), _time(backward, repeats)


def _default_chunk(method):
  if method == "ssd":
    return ssd_lib.DEFAULT_CHUNK_SIZE
  return scan_lib.DEFAULT_CHUNK_SIZE.get(method)


def run(lengths=(1024, 4096, 16384), d_inner=512, d_state=16, batch=1, repeats=5,
        methods=JAX_METHODS, chunk_sizes=None, skip_slow=True, ssd_head_dim=64,
        mambapy=True):
  """Times every method (and mambapy) at each length. Returns one dict per (length, method).

  Row keys: length, method, chunk_size, fwd_ms, fwdbwd_ms, bwd_over_fwd, and when mambapy ran:
  speedup_fwd / speedup_fwdbwd (mambapy ms / this ms); when "sequential" ran:
  vs_sequential_fwd / vs_sequential_fwdbwd (sequential ms / this ms). `chunk_sizes` maps a
  method to a list of chunk sizes to try (default: the library default). With `skip_slow`,
  the plain-autodiff paths (SLOW_METHODS) are skipped above length 4096 (seconds, GBs).
  """
  chunk_sizes = chunk_sizes or {}
  rows = []
  for length in lengths:
    inputs = _inputs(length, d_inner, d_state, batch)
    base = time_mambapy(inputs, repeats) if mambapy else None
    if base is not None:
      rows.append(dict(length=length, method="mambapy pscan (torch)", chunk_size=None,
                       fwd_ms=base[0], fwdbwd_ms=base[1], bwd_over_fwd=base[1] / base[0]))
    for method in methods:
      if skip_slow and length > 4096 and method in SLOW_METHODS:
        continue
      args = ssd_inputs(inputs, ssd_head_dim) if method.startswith("ssd") else inputs
      for chunk in chunk_sizes.get(method, [None]):
        fwd, fwdbwd = time_jax(method, args, repeats, chunk)
        row = dict(length=length, method=method, chunk_size=chunk or _default_chunk(method),
                   fwd_ms=fwd, fwdbwd_ms=fwdbwd, bwd_over_fwd=fwdbwd / fwd)
        if method.startswith("ssd"):
          row["heads"] = d_inner // ssd_head_dim
        if base is not None:
          row.update(speedup_fwd=base[0] / fwd, speedup_fwdbwd=base[1] / fwdbwd)
        rows.append(row)
    seq = [r for r in rows if r["length"] == length and r["method"] == "sequential"]
    for r in rows:
      if seq and r["length"] == length and r is not seq[0] and r["method"] in methods:
        r.update(vs_sequential_fwd=seq[0]["fwd_ms"] / r["fwd_ms"],
                 vs_sequential_fwdbwd=seq[0]["fwdbwd_ms"] / r["fwdbwd_ms"])
  if mambapy and not any(r["method"].startswith("mambapy") for r in rows):
    print("note: torch + mambapy not importable; the mambapy baseline was skipped "
          "(pip install torch==2.13.0 mambapy==1.2.0).")
  return rows


def to_markdown(rows):
  cols = ["length", "method", "chunk_size", "fwd_ms", "fwdbwd_ms", "bwd_over_fwd",
          "speedup_fwd", "speedup_fwdbwd", "vs_sequential_fwd", "vs_sequential_fwdbwd"]
  fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
  parser.add_argument("--d_inner", type=int, default=512)
  parser.add_argument("--d_state", type=int, default=16)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--methods", nargs="+", default=list(JAX_METHODS),
                      choices=list(JAX_METHODS))
  parser.add_argument("--chunk_sizes", type=int, nargs="+", default=None,
                      help="chunk sizes to sweep for sequential, chunked and ssd")
  parser.add_argument("--ssd_head_dim", type=int, default=64,
                      help="SSD channels per head (heads = d_inner / this)")
  parser.add_argument("--no_mambapy", action="store_true", help="skip the torch baseline")
  parser.add_argument("--no_skip_slow", action="store_true",
                      help="also time reference/associative above length 4096")
  args = parser.parse_args(argv)
  chunks = ({m: args.chunk_sizes for m in ("sequential", "chunked", "ssd")}
            if args.chunk_sizes else None)
  print(f"backend={jax.default_backend()} d_inner={args.d_inner} d_state={args.d_state} "
        f"batch={args.batch} repeats={args.repeats} (median ms)")
  rows = run(tuple(args.lengths), args.d_inner, args.d_state, args.batch, args.repeats,
             tuple(args.methods), chunks, not args.no_skip_slow, args.ssd_head_dim,
             not args.no_mambapy)
  print(to_markdown(rows))
  return rows


if __name__ == "__main__":
  main()
