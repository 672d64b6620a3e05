"""Micro-benchmarks, run as plain processes: `python -m experiments.benchmarks.<name>`."""
