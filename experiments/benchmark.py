r"""Benchmarks by name: `python experiments/benchmark.py NAME [--json FILE] [NAME's flags]`.

  python experiments/benchmark.py scan --lengths 1024 4096 16384          # selective scan vs mambapy
  python experiments/benchmark.py scan --methods sequential ssd           # Mamba-1 scan vs Mamba-2 SSD
  python experiments/benchmark.py hybrid --json results.jsonl             # hybrid vs attention forward
  python experiments/benchmark.py hybrid --archs hybrid hybrid_m2 attention   # ... Mamba-1 vs Mamba-2
  python experiments/benchmark.py decode --archs attention hybrid hybrid_m2   # decode step + cache bytes
  python experiments/benchmark.py mfu --profile                           # train-step MFU vs matmul peak
  python experiments/benchmark.py gpt2                                    # train step vs torch GPT-2
  python experiments/benchmark.py aot --sizes small 1b                    # compile for 256 devices
  python experiments/benchmark.py compile --depths 2 8 32              # compile time vs depth, scan
  python experiments/benchmark.py fusion --plot                          # mPLUG skip vs connected fusion
  python experiments/benchmark.py hybrid --help                           # a benchmark's own flags

Each benchmark prints a markdown table to stdout; `--json FILE` also appends one JSON object
per row (with the benchmark name, backend and date) to FILE. Run as a plain process (no
virtual devices, no pytest); the numbers are for the default backend. To add a benchmark,
write a module with `main(argv) -> list[dict]` and add it to BENCHMARKS.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BENCHMARKS = {
    "scan": "experiments.benchmarks.scan",
    "hybrid": "experiments.benchmarks.hybrid",
    "decode": "experiments.benchmarks.decode",
    "mfu": "experiments.benchmarks.mfu",
    "gpt2": "experiments.benchmarks.gpt2",
    "aot": "experiments.benchmarks.aot",
    "compile": "experiments.benchmarks.compile",
    "fusion": "experiments.benchmarks.fusion",
}


def _pop_json(argv: list[str]) -> tuple[str | None, list[str]]:
  """Removes `--json FILE` / `--json=FILE` from argv."""
  rest, path, it = [], None, iter(argv)
  for arg in it:
    if arg == "--json":
      path = next(it, None)
      if path is None:
        raise SystemExit("--json needs a file name")
    elif arg.startswith("--json="):
      path = arg.split("=", 1)[1]
    else:
      rest.append(arg)
  return path, rest


def main(argv: list[str] | None = None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
    print(__doc__)
    if argv and argv[0] not in ("-h", "--help"):
      raise SystemExit(f"unknown benchmark {argv[0]!r}; known: {sorted(BENCHMARKS)}")
    return []
  name = argv[0]
  json_path, rest = _pop_json(argv[1:])
  rows = importlib.import_module(BENCHMARKS[name]).main(rest)
  if json_path:
    import jax

    stamp = dict(benchmark=name, backend=jax.default_backend(),
                 date=datetime.date.today().isoformat())
    with open(json_path, "a") as f:
      for row in rows:
        f.write(json.dumps(dict(stamp, **row), default=str) + "\n")
  return rows


if __name__ == "__main__":
  main()
