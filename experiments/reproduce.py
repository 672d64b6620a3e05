r"""Regenerate a paper table: run (or resume) its stages, write paper vs ours as markdown.

    python experiments/reproduce.py --table=mplug --tiny --output_dir=workdirs/reproduce
    python experiments/reproduce.py --table=metalm_vl --data_dir=$DATA      # official data
    python experiments/reproduce.py --table=hybrid_latency
    python experiments/reproduce.py --list

A training table is a config (`configs/tables/<table>.py`): stages that are ordinary
experiments/train.py runs (pretrain -> finetune, each in <output_dir>/<table>/<stage>), and
rows read from the stages' evaluators (`metalm_jax.tables`). Killed and run again, it resumes
at the stage and step where it stopped. `--tiny` runs the same path on generated or bundled
data with tiny configs (minutes on a CPU); the numbers then measure the code path, not the
paper's claim, and the table says so. The markdown and JSON land in
<output_dir>/<table>[_tiny].md / .json. docs/reproducing.md says what each table needs at
full size. The hybrid tables are benchmarks (no training, no data).
"""
from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags

_TABLE = flags.DEFINE_string("table", None, "Which table (see --list).")
_TINY = flags.DEFINE_bool("tiny", False, "The same path on bundled data with tiny configs.")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "Smoke run: every stage's runlocal config.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "workdirs/reproduce", "Where tables and runs go.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: $METALM_DATA_DIR, "
                                "else ~/.cache/metalm_jax/data).")
_STAGES = flags.DEFINE_list("stages", None, "Run only these stages (default: all).")
_LIST = flags.DEFINE_bool("list", False, "List the tables and exit.")
_SEED = flags.DEFINE_integer("seed", None, "The digits tables: every stage's config.seed.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "metalm_multitask at full size: the "
                                  "experiments/train.py workdir of the METALM to finetune.")

# ---------------------------------------------------------------- benchmark tables
# The paper's resolutions as visual tokens (plus 64 text tokens per row); video: frames x 576
# visual tokens per frame (a 336px CLIP ViT-L/14 frame, unpooled).
HYBRID_TOKENS = {"full": (576, 2304, 9792, 37440), "tiny": (576, 2304)}
HYBRID_FRAMES = {"full": (8, 16, 32, 64), "tiny": (2, 4)}
TOKENS_PER_FRAME = 576
HYBRID_CONFIG = "benchmarks/hybrid.py: d 64, 8 layers (Jamba 1:7), blockwise attention"
BENCHMARKS = {
    "hybrid_latency": "hybrid (Jamba 1:7) vs attention forward latency as the visual-token "
                      "count grows (576 -> 37,440 tokens)",
    "hybrid_frames": "the same as the video frame count grows (8 -> 64 frames of 576 tokens)",
}


def _device() -> str:
  import jax
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"{os.cpu_count()}-core CPU"
  return f"{jax.device_count()} x {device.device_kind}"


def benchmark_rows(table: str, *, tiny: bool, output_dir: str) -> list[dict]:
  """Attention / hybrid forward-latency ratios; the raw rows and the plot go to output_dir."""
  from benchmarks import hybrid as hybrid_bench  # experiments/ is on sys.path as a script
  size = "tiny" if tiny else "full"
  if table == "hybrid_latency":
    labels = {f"{t} visual tokens + 64 text": t for t in HYBRID_TOKENS[size]}
    paper = "~4x at high resolution (growing)"
  else:
    labels = {f"{n} frames x {TOKENS_PER_FRAME} tokens + 64 text": n * TOKENS_PER_FRAME
              for n in HYBRID_FRAMES[size]}
    paper = "faster, the gap growing with frames"
  start = time.time()
  raw = hybrid_bench.run(lengths=[t + 64 for t in labels.values()], paths=("blockwise",),
                         repeats=3, d_model=64, num_layers=8, num_heads=4, d_ff=192)
  compute = f"{time.time() - start:.0f} s on {_device()}"
  name = table + ("_tiny" if tiny else "")
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, f"{name}_rows.json"), "w") as f:
    json.dump(raw, f, indent=1)
  hybrid_bench.plot(raw, os.path.join(output_dir, f"{name}.png"))
  ratios = hybrid_bench.best_ratios(raw)
  return [dict(task=label, metric="attention ms / hybrid ms", paper=paper,
               ours=None if ratios.get(t + 64) is None else round(ratios[t + 64], 2),
               config=HYBRID_CONFIG, data="none (random tokens)", compute=compute)
          for label, t in labels.items()]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from metalm_jax import cli, tables  # after flags (XLA_FLAGS)
  from metalm_jax.data import datasets

  cli.setup_logging()
  known = tables.names() + sorted(BENCHMARKS)
  if _LIST.value:
    for name in tables.names():
      print(f"{name:18s} {tables.summary(name)}")
    for name, doc in BENCHMARKS.items():
      print(f"{name:18s} {doc}")
    return
  if _TABLE.value not in known:
    raise app.UsageError(f"--table={_TABLE.value!r}; tables: {known} (--list describes them)")
  suffix = "_tiny" if _TINY.value else ""
  with cli.user_errors("reproduce.py"):
    if _TABLE.value in BENCHMARKS:
      rows = benchmark_rows(_TABLE.value, tiny=_TINY.value, output_dir=_OUTPUT_DIR.value)
      spec = _benchmark_spec(_TABLE.value, _TINY.value)
    else:
      arg = f"tiny={int(_TINY.value)},runlocal={int(_RUNLOCAL.value)}"
      if _PRETRAINED.value:
        arg += f",pretrained={_PRETRAINED.value}"
      if _SEED.value is not None:
        arg += f",seed={_SEED.value}"
      try:
        spec = tables.load(_TABLE.value, arg)
      except ValueError as e:  # a table argument that does not fit (says what to pass)
        raise app.UsageError(str(e)) from None
      try:
        tables.run(spec, output_dir=_OUTPUT_DIR.value, data_dir=_DATA_DIR.value,
                   stages=tuple(_STAGES.value) if _STAGES.value else None)
      except datasets.DatasetNotPreparedError as e:
        raise app.UsageError(f"{e}\n(--tiny runs the {_TABLE.value} table's whole path on "
                             "generated or bundled data.)") from None
      rows = tables.rows(spec, output_dir=_OUTPUT_DIR.value)
    text = tables.write(spec, rows, output_dir=_OUTPUT_DIR.value, suffix=suffix)
  print(text)


def _benchmark_spec(name: str, tiny: bool):
  import ml_collections
  return ml_collections.ConfigDict(dict(
      name=name, title=name + (" (--tiny)" if tiny else ""),
      note="--tiny: the two smallest sizes" if tiny else ""))


if __name__ == "__main__":
  app.run(main)
