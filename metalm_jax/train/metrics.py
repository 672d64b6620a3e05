"""Metric writing: metrics.jsonl, TensorBoard event files, a progress bar, a loss plot."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping

import numpy as np

logger = logging.getLogger(__name__)


class MetricWriter:
  """Writes scalars to `{workdir}/metrics.jsonl` and TensorBoard event files (process 0 only).

  Each jsonl line is `{"step": int, "split": "train" | <evaluator name>, "time": unix,
  <metric>: float, ...}` ('eval' is the held-out loss evaluator of `config.evals`).
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, "time": time.time()}
    row.update({k: float(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r["split"] == split]


class Progress:
  """A tqdm bar over steps showing loss, throughput and ETA (disabled when not a TTY or off).

  Throughput is `units_per_step` (tokens for language models, examples for image-text
  families: `unit`) per second.
  """

  def __init__(self, *, initial: int, total: int, enabled: bool, units_per_step: int,
               unit: str = "tokens"):
    self.units_per_step, self.unit = units_per_step, unit
    self._bar = None
    self._last = (time.perf_counter(), initial)
    if enabled:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=0.5)

  def update(self, step: int, scalars: Mapping[str, float] | None = None) -> float:
    """Advances to `step`; returns units/s since the previous call."""
    now = time.perf_counter()
    t0, s0 = self._last
    self._last = (now, step)
    tps = (step - s0) * self.units_per_step / max(now - t0, 1e-9)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if scalars is not None:
        shown = {k: f"{v:.3f}" for k, v in scalars.items() if k in ("loss", "eval_ppl")}
        self._bar.set_postfix(shown, **{f"{self.unit[:3]}_s": f"{tps:,.0f}"})
    return tps

  def write(self, message: str):
    if self._bar is not None:
      self._bar.write(message)
    else:
      logger.info(message)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def plot_loss_curve(workdir: str, path: str | None = None) -> str | None:
  """Plots train loss and eval loss/perplexity from metrics.jsonl to a PNG; returns its path."""
  train, evals = read_metrics(workdir, "train"), read_metrics(workdir, "eval")
  if not train:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path = path or os.path.join(workdir, "loss_curve.png")
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
  if evals:
    axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    axes[1].plot([r["step"] for r in evals], [r["perplexity"] for r in evals], "o-", color="C1")
  axes[0].set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
  axes[0].legend()
  axes[1].set(xlabel="step", ylabel="perplexity", title="eval perplexity", yscale="log")
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def host_scalars(tree) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in tree.items()}
