r"""Train short, infer long: a hybrid (Jamba 1:7) and its equal-size attention twin are trained
at length L on pydoc_topics, then evaluated at L, 2L, ..., 16L.

    python experiments/long_context.py                         # L=64, 300 steps each (CPU, ~15 min)
    python experiments/long_context.py --seq_len 128 --steps 600 --size tiny \
        --workdir workdirs/long_context --plot docs/img/long_context.png

Both models come from configs/hybrid_lm.py (`arch=hybrid`: no positional encoding;
`arch=attention`: RoPE) and train with `metalm_jax.train.train_and_evaluate` (a second run on
the same --workdir resumes / reuses the checkpoints). Evaluation packs the validation split
into rows of n*L tokens (documents chunked at n*L, positions restart per chunk) and reports
token-weighted cross-entropy over all tokens, and over the tokens at positions >= L only (the
part the model never saw in training). Attention past `blockwise_threshold` runs blockwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from metalm_jax import config as config_lib  # noqa: E402
from metalm_jax import families, objectives  # noqa: E402
from metalm_jax.data import datasets, pipeline  # noqa: E402
from metalm_jax.train import checkpoint as checkpoint_lib  # noqa: E402
from metalm_jax.train import state as state_lib  # noqa: E402
from metalm_jax.train import trainer  # noqa: E402


def load_config(arch: str, size: str, seq_len: int, steps: int, data_dir: str, mamba: int = 1):
  module = config_lib.config_module("hybrid_lm")
  config = ml_collections.ConfigDict(
      module.get_config(f"size={size},arch={arch},mamba={mamba}").to_dict())
  config.data.seq_len = seq_len
  config.data.data_dir = data_dir
  config.num_train_steps = steps
  config.optimizer.warmup_steps = max(1, steps // 20)
  config.eval_every_steps = config.checkpoint_every_steps = max(1, steps // 3)
  config.log_every_steps = max(1, steps // 10)
  config.progress_bar = False
  return config


def restore_model(config, workdir: str):
  """The trained module from the workdir's latest checkpoint."""
  model = state_lib.Model(config.model)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=10, async_save=False)
  restored = ckpt.manager.restore(ckpt.latest_step(), args=checkpoint_lib.ocp.args.Composite(
      state=checkpoint_lib.ocp.args.StandardRestore()))["state"]
  ckpt.close()
  _, rest = model.init(jax.random.key(0))
  return model.merge(restored["params"], rest)


def _loss_sums(model, batch, train_len: int):
  """(sum ce * w, sum w, the same two over positions >= train_len) of one packed batch."""
  logits, _ = model(batch["inputs"], positions=batch["positions"],
                    segment_ids=batch["segment_ids"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w = batch["weights"]
  far = w * (batch["positions"] >= train_len)
  return jnp.stack([(ce * w).sum(), w.sum(), (ce * far).sum(), far.sum()])


def evaluate(module, config, seq_len: int, batch_size: int) -> dict:
  """Token-weighted validation loss at rows of seq_len tokens (all / positions >= train L)."""
  from flax import nnx

  source = datasets.data_source("pydoc_topics", "validation", config.data.data_dir)
  tokenizer = families.build(config).tokenizer
  graphdef, state = nnx.split(module)
  fn = jax.jit(lambda state, batch: _loss_sums(nnx.merge(graphdef, state), batch,
                                               config.data.seq_len))
  totals = np.zeros(4)
  for batch in pipeline.eval_batches(source, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                     prepare=objectives.get(config.objective).prepare):
    totals += np.asarray(jax.device_get(fn(state, {k: jnp.asarray(v) for k, v in
                                                   batch.items()})))
  return dict(loss=float(totals[0] / totals[1]), tokens=int(totals[1]),
              loss_beyond_train_len=float(totals[2] / totals[3]) if totals[3] else None)


def plot(rows, train_len: int, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for arch, style in (("hybrid", "-o"), ("attention", "-s")):
    sel = [r for r in rows if r["arch"] == arch]
    ax.plot([r["eval_len"] for r in sel], [r["loss"] for r in sel], style, label=f"{arch}: all")
    far = [r for r in sel if r["loss_beyond_train_len"] is not None]
    ax.plot([r["eval_len"] for r in far], [r["loss_beyond_train_len"] for r in far],
            style.replace("-", ":"), label=f"{arch}: positions >= {train_len}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel(f"evaluation length (trained at {train_len})")
  ax.set_ylabel("validation cross-entropy (nats/token)")
  ax.set_title("train short, infer long (pydoc_topics)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def to_markdown(rows) -> str:
  cols = ["arch", "params", "train_len", "eval_len", "loss", "loss_beyond_train_len", "tokens"]
  fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=64, help="training length L")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--size", default="tiny", choices=["test", "tiny", "small"])
  parser.add_argument("--mamba", type=int, default=1, choices=[1, 2],
                      help="the hybrid's Mamba layers: 1 (selective scan) or 2 (SSD)")
  parser.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
  parser.add_argument("--eval_tokens_per_batch", type=int, default=8192,
                      help="evaluation batch size = this // (n * L), at least 1")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--workdir", default="workdirs/long_context")
  parser.add_argument("--plot", default="")
  parser.add_argument("--json", default="", help="append the rows as JSON lines here")
  args = parser.parse_args(argv)
  data_dir = args.data_dir or datasets.default_data_dir()
  rows = []
  for arch in ("hybrid", "attention"):
    config = load_config(arch, args.size, args.seq_len, args.steps, data_dir, args.mamba)
    workdir = os.path.abspath(os.path.join(args.workdir, arch))
    result = trainer.train_and_evaluate(config, workdir)
    print(f"# {arch}: trained {result['step']} steps, eval loss {result['eval_loss']:.4f}",
          flush=True)
    module = restore_model(config, workdir)
    params = state_lib.Model(config.model).param_count()
    for n in args.multipliers:
      length = n * args.seq_len
      row = dict(arch=arch, schedule=config.model.schedule, params=params,
                 train_len=args.seq_len, eval_len=length)
      row.update(evaluate(module, config, length,
                          max(1, args.eval_tokens_per_batch // length)))
      rows.append(row)
      print(f"# {row}", flush=True)
  print(to_markdown(rows))
  if args.plot:
    plot(rows, args.seq_len, args.plot)
  if args.json:
    with open(args.json, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return rows


if __name__ == "__main__":
  main()
