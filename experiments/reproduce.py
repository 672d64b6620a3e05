r"""Regenerate a paper table: run its configs, write a markdown table of paper vs ours.

    python experiments/reproduce.py --table=mplug --tiny --output_dir=workdirs/reproduce
    python experiments/reproduce.py --table=hybrid_latency --output_dir=workdirs/reproduce
    python experiments/reproduce.py --list

Each table is a function that trains / finetunes / evaluates what the table needs and returns
rows {task, metric, paper, ours, config, data, compute}; the markdown lands in
{output_dir}/{table}[_tiny].md (and .json). `--tiny` runs the same path on the bundled digits data with
the tiny configs (minutes on a CPU; what the test suite runs); the numbers then measure the
code path, not the paper's claim, and the table says so.

Tables (docs/reproducing.md says what each needs at full size):
  metalm_vl       METALM vision-language: zero-shot, few-shot and finetuned VQA
  mplug           mPLUG: captioning, VQA (generation and ranking), retrieval R@1/5/10
  hybrid_latency  hybrid vs attention forward latency as the visual-token count grows
                  (576 -> 37,440 tokens, the paper's resolutions); needs no data, so its
                  full-size run works on any machine
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging

_TABLE = flags.DEFINE_string("table", None, "Which table (see --list).")
_TINY = flags.DEFINE_bool("tiny", False, "The same path on bundled data with tiny configs.")
# Not --workdir / --data_dir: the experiment modules a table imports define those flags.
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "workdirs/reproduce", "Where tables and runs go.")
_DATASET_DIR = flags.DEFINE_string("dataset_dir", None, "Data directory (default: "
                                   "$METALM_DATA_DIR, else ~/.cache/metalm_jax/data).")
_LIST = flags.DEFINE_bool("list", False, "List the tables and exit.")

TINY_NOTE = ("--tiny: tiny configs on the bundled 8x8 digits data (or random tokens); 'ours' "
             "measures this code path, not the paper's benchmark")


def _cpu() -> str:
  """The machine, for the compute column: accelerators by count and kind, or the CPU cores."""
  import jax
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"{os.cpu_count()}-core CPU"
  return f"{jax.device_count()} x {device.device_kind}"


# ---------------------------------------------------------------- tables
def metalm_vl(*, tiny: bool, workdir: str, data_dir: str | None) -> list[dict]:
  """METALM zero-shot / k-shot / finetuned VQA (paper: VQAv2 41.1 zero-shot)."""
  if not tiny:
    raise NotImplementedError(
        "metalm_vl at full size needs VQAv2 / OK-VQA / COCO prepared from their official files "
        "(docs/reproducing.md) and a pretrained paper-size METALM; only --tiny runs here.")
  import metalm_digits  # experiments/ is on sys.path when run as a script
  start = time.time()
  results = metalm_digits.run(
      workdir=os.path.join(workdir, "metalm_vl"), data_dir=data_dir, models=["metalm"],
      size="tiny", seed=0, pretrain_steps=150, finetune_steps=60, batch_size=None, seq_len=48,
      prefix=32, shots=2, eval_split="test", eval_limit=96, support_size=300,
      eval_batch_size=32, log_every=50)[0]
  compute = f"{time.time() - start:.0f} s on {_cpu()}"
  config = "configs/metalm_vl.py:size=tiny (150 + 60 steps)"
  data = "digits_vl test, 96 VQA questions"
  pct = lambda x: round(100 * x, 1)
  return [
      dict(task="VQA zero-shot", metric="VQA acc", paper="41.1 (VQAv2)",
           ours=pct(results["zero_shot"]["accuracy"]), config=config, data=data, compute=compute),
      dict(task="VQA 2-shot", metric="VQA acc", paper="- (4-shot reported on VQAv2)",
           ours=pct(results["2_shot"]["accuracy"]), config=config, data=data, compute=compute),
      dict(task="VQA finetuned", metric="VQA acc", paper="- (VQAv2 finetuned, see paper)",
           ours=pct(results["finetuned"]["accuracy"]), config=config, data=data,
           compute=compute),
  ]


def mplug(*, tiny: bool, workdir: str, data_dir: str | None) -> list[dict]:
  """mPLUG captioning, VQA and retrieval (paper: VQA 79.79 base, COCO CIDEr 141.0 CE)."""
  if not tiny:
    raise NotImplementedError(
        "mplug at full size needs COCO (Karpathy split) and VQAv2 prepared from their official "
        "files (docs/reproducing.md) and days of accelerator time; only --tiny runs here.")
  import mplug_digits
  start = time.time()
  r = mplug_digits.run(
      workdir=os.path.join(workdir, "mplug"), data_dir=data_dir, size="tiny", seed=0,
      pretrain_steps=200, finetune_steps=100, batch_size=None, eval_split="test",
      eval_limit=64, beam_size=3, rerank_k=16, baseline=False, log_every=50)
  compute = f"{time.time() - start:.0f} s on {_cpu()}"
  config = "configs/mplug.py:size=tiny (200 + 100 steps)"
  data = "digits_vl test, 64 images / 64 questions"
  pct = lambda x: round(100 * x, 1)
  ret = r["retrieval"]["itc+itm"]
  return [
      dict(task="captioning", metric="CIDEr-D (x100)", paper="141.0 (COCO Karpathy test, CE)",
           ours=round(100 * r["captioning"]["cider_d"], 1), config=config, data=data,
           compute=compute),
      dict(task="captioning", metric="exact match", paper="-",
           ours=pct(r["captioning"]["exact_match"]), config=config, data=data, compute=compute),
      dict(task="VQA (generation)", metric="VQA acc", paper="79.79 (VQAv2 test-dev, base)",
           ours=pct(r["vqa"]["generate"]["accuracy"]), config=config, data=data,
           compute=compute),
      dict(task="VQA (answer ranking)", metric="VQA acc", paper="79.79 (VQAv2 test-dev, base)",
           ours=pct(r["vqa"]["rank"]["accuracy"]), config=config, data=data, compute=compute),
      dict(task="image-to-text retrieval", metric="R@1 / R@5 / R@10", paper="- (COCO, see paper)",
           ours=" / ".join(str(pct(ret["i2t"][f"R@{k}"])) for k in (1, 5, 10)), config=config,
           data=data, compute=compute),
      dict(task="text-to-image retrieval", metric="R@1 / R@5 / R@10", paper="- (COCO, see paper)",
           ours=" / ".join(str(pct(ret["t2i"][f"R@{k}"])) for k in (1, 5, 10)), config=config,
           data=data, compute=compute),
  ]


# The paper's resolutions as visual tokens (plus 64 text tokens per row).
HYBRID_TOKENS_FULL = (576, 2304, 9792, 37440)
HYBRID_TOKENS_TINY = (576, 2304)


def hybrid_latency(*, tiny: bool, workdir: str, data_dir: str | None) -> list[dict]:
  """Hybrid (Jamba 1:7) vs attention forward latency vs visual tokens (paper: ~4x faster at
  high resolution, the gap widening)."""
  del data_dir
  from benchmarks import hybrid as hybrid_bench
  start = time.time()
  tokens = HYBRID_TOKENS_TINY if tiny else HYBRID_TOKENS_FULL
  rows = hybrid_bench.run(lengths=[t + 64 for t in tokens], paths=("blockwise",), repeats=3,
                          d_model=64, num_layers=8, num_heads=4, d_ff=192)
  compute = f"{time.time() - start:.0f} s on {_cpu()}"
  os.makedirs(workdir, exist_ok=True)  # the raw rows and the latency / memory plot
  name = "hybrid_latency" + ("_tiny" if tiny else "")
  with open(os.path.join(workdir, f"{name}_rows.json"), "w") as f:
    json.dump(rows, f, indent=1)
  hybrid_bench.plot(rows, os.path.join(workdir, f"{name}.png"))
  out = []
  for t in tokens:
    ratio = hybrid_bench.best_ratios(rows).get(t + 64)
    out.append(dict(task=f"{t} visual tokens + 64 text", metric="attention ms / hybrid ms",
                    paper="~4x at high resolution (growing)",
                    ours=None if ratio is None else round(ratio, 2),
                    config="benchmarks/hybrid.py: d 64, 8 layers, blockwise attention",
                    data="none (random tokens)", compute=compute))
  return out


TABLES: dict[str, Callable[..., list[dict]]] = {
    "metalm_vl": metalm_vl, "mplug": mplug, "hybrid_latency": hybrid_latency}
NOT_YET = {
    "metalm_multitask": "METALM's multitask language finetuning (34 NLU/NLG datasets) is not "
                        "built yet: see issue 7.",
}


def markdown(table: str, rows: list[dict], *, tiny: bool) -> str:
  cols = ("task", "metric", "paper", "ours", "config", "data", "compute")
  lines = [f"## {table}" + (" (--tiny)" if tiny else ""), ""]
  if tiny:
    lines += [f"_{TINY_NOTE}._", ""]
  lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in cols) + " |"
            for r in rows]
  return "\n".join(lines) + "\n"


def reproduce(table: str, *, tiny: bool, workdir: str, data_dir: str | None = None) -> str:
  """Runs one table; writes {workdir}/{table}.md and .json; returns the markdown."""
  if table in NOT_YET:
    raise NotImplementedError(f"--table={table}: {NOT_YET[table]}")
  if table not in TABLES:
    raise ValueError(f"unknown --table={table!r}; tables: {sorted(TABLES)} "
                     f"(not yet: {sorted(NOT_YET)})")
  rows = TABLES[table](tiny=tiny, workdir=workdir, data_dir=data_dir)
  text = markdown(table, rows, tiny=tiny)
  os.makedirs(workdir, exist_ok=True)
  suffix = "_tiny" if tiny else ""
  with open(os.path.join(workdir, f"{table}{suffix}.md"), "w") as f:
    f.write(text)
  with open(os.path.join(workdir, f"{table}{suffix}.json"), "w") as f:
    json.dump(rows, f, indent=1)
  return text


def main(argv):
  del argv
  if _LIST.value:
    for name, fn in TABLES.items():
      print(f"{name:16s} {fn.__doc__.splitlines()[0]}")
    for name, why in NOT_YET.items():
      print(f"{name:16s} (not yet) {why}")
    return
  if not _TABLE.value:
    raise app.UsageError(f"--table is required; one of {sorted(TABLES)} (--list describes them)")
  if _TABLE.value not in TABLES and _TABLE.value not in NOT_YET:
    raise app.UsageError(f"unknown --table={_TABLE.value!r}; tables: {sorted(TABLES)} "
                         f"(not yet: {sorted(NOT_YET)})")
  try:
    text = reproduce(_TABLE.value, tiny=_TINY.value, workdir=_OUTPUT_DIR.value,
                     data_dir=_DATASET_DIR.value)
  except NotImplementedError as e:
    raise app.UsageError(str(e)) from None
  logging.info("wrote %s", _OUTPUT_DIR.value)
  print(text)


if __name__ == "__main__":
  app.run(main)
