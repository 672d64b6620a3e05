r"""Regenerate a paper table: run its configs, write a markdown table of paper vs ours.

    python experiments/reproduce.py --table=mplug --tiny --output_dir=workdirs/reproduce
    python experiments/reproduce.py --table=hybrid_latency --output_dir=workdirs/reproduce
    python experiments/reproduce.py --list

Each table is a function that trains / finetunes / evaluates what the table needs and returns
rows {task, metric, paper, ours, config, data, compute}; the markdown lands in
{output_dir}/{table}[_tiny].md (and .json). `--tiny` runs the same path with
the tiny configs on bundled or generated data (the digits written as official COCO / VQAv2 /
OK-VQA / NLVR2 files, read by the official builders; minutes on a CPU; what the test suite
runs); the numbers then measure the code path, not the paper's claim, and the table says so.

Tables (docs/reproducing.md says what each needs at full size):
  metalm_multitask  METALM multitask language finetuning: SQuAD EM / F1, SuperGLUE accuracy,
                  CNN/DM ROUGE-L (--tiny: the same builders on generated files)
  metalm_vl       METALM vision-language: zero-/few-shot VQA and captioning; finetuned VQA,
                  captioning and NLVR2
  mplug           mPLUG: captioning, VQA (generation and ranking), retrieval R@1/5/10
  hybrid_latency  hybrid vs attention forward latency as the visual-token count grows
                  (576 -> 37,440 tokens, the paper's resolutions); needs no data, so its
                  full-size run works on any machine
  hybrid_frames   the same as the frame count grows (8 -> 64 frames of 576 tokens)
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
# Not --checkpoint: experiments/metalm_multitask.py defines that flag.
_PRETRAINED = flags.DEFINE_string("pretrained", None, "metalm_multitask at full size: the "
                                  "experiments/train.py workdir of a pretrained METALM language "
                                  "model (configs/metalm_lm.py:size=paper).")

TINY_NOTE = ("--tiny: tiny configs on bundled or generated data (the 8x8 digits written as "
             "official COCO / VQAv2 / OK-VQA / NLVR2 files, Python's help pages as SQuAD / "
             "SuperGLUE / CNN-DM files, random tokens); 'ours' measures this code path, not "
             "the paper's benchmark")


def _cpu() -> str:
  """The machine, for the compute column: accelerators by count and kind, or the CPU cores."""
  import jax
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"{os.cpu_count()}-core CPU"
  return f"{jax.device_count()} x {device.device_kind}"


# ---------------------------------------------------------------- tables
# --tiny vision-language tables: the digits written as official files, prepared with the
# official builders in <data_dir>/digits_official (apart from any real download).
DIGITS_OFFICIAL = "digits_official"
VL_DATASETS = ("coco_karpathy", "vqav2", "ok_vqa", "nlvr2")


def digits_official_data(data_dir: str | None) -> str:
  """<data_dir>/digits_official with coco_karpathy, vqav2, ok_vqa and nlvr2 prepared from the
  bundled digits written in the official formats (`data.digits_official`); built once."""
  from metalm_jax.data import datasets as datasets_lib
  from metalm_jax.data import digits_official
  root = os.path.join(data_dir or datasets_lib.default_data_dir(), DIGITS_OFFICIAL)
  manual = os.path.join(root, "downloads", "manual")
  missing = [n for n in VL_DATASETS if not datasets_lib.get_builder(n, root).is_prepared()]
  if missing:
    logging.info("Writing the digits as official files to %s and preparing %s", manual,
                 missing)
    digits_official.write_official_files(manual)
    for name in missing:
      datasets_lib.prepare(name, root, manual_dir=manual)
  return root


# Settings of the official-data runs: --tiny (CI-sized, on digits_official_data) and full
# size (the scripts' paper-scale settings; their module docstrings give the compute).
METALM_VL_RUN = {
    "tiny": dict(size="tiny", seed=0, pretrain_steps=300, finetune_steps=100, shots=2,
                 eval_limit=64, log_every=100),
    "full": dict(size="paper", seed=0, pretrain_steps=350_000, finetune_steps=20_000, shots=4,
                 eval_limit=0, threads=16, log_every=1000),
}
MPLUG_RUN = {
    "tiny": dict(size="tiny", seed=0, pretrain_steps=300, caption_steps=100, vqa_steps=100,
                 image_size=8, vocab_size=300, eval_limit=64, answer_list_size=64,
                 beam_size=3, rerank_k=16, answer_rank_k=16, eval_batch_size=64,
                 log_every=100),
    "full": dict(size="base", seed=0, pretrain_steps=10_000, caption_steps=3_000,
                 vqa_steps=4_000, eval_limit=0, beam_size=5, rerank_k=256, answer_rank_k=128,
                 log_every=1000),
}


def _tiny_data(rows: list[dict], tiny: bool) -> list[dict]:
  """--tiny rows name the generated data they were scored on."""
  return [dict(r, data=f"digits as official files: {r['data']}") if tiny else r for r in rows]


def metalm_vl(*, tiny: bool, workdir: str, data_dir: str | None) -> list[dict]:
  """METALM vision-language: zero-/few-shot VQAv2, OK-VQA and captioning; finetuned VQAv2,
  OK-VQA, NLVR2 and COCO captioning (paper: VQAv2 41.1 / OK-VQA 11.4 zero-shot)."""
  import metalm_vl_official  # experiments/ is on sys.path when run as a script
  start = time.time()
  if tiny:
    data_dir = digits_official_data(data_dir)
  results = metalm_vl_official.run_official(workdir=os.path.join(workdir, "metalm_vl"),
                                            data_dir=data_dir,
                                            **METALM_VL_RUN["tiny" if tiny else "full"])
  return _tiny_data(metalm_vl_official.rows(results, f"{time.time() - start:.0f} s on "
                                            f"{_cpu()}"), tiny)


def mplug(*, tiny: bool, workdir: str, data_dir: str | None) -> list[dict]:
  """mPLUG: COCO captioning, VQAv2 (generation and answer ranking), retrieval R@1/5/10
  (paper: VQA 79.79 base, COCO CIDEr 141.0 CE)."""
  import mplug_official
  start = time.time()
  if tiny:
    data_dir = digits_official_data(data_dir)
  results = mplug_official.run_official(workdir=os.path.join(workdir, "mplug"),
                                        data_dir=data_dir,
                                        **MPLUG_RUN["tiny" if tiny else "full"])
  return _tiny_data(mplug_official.rows(results, f"{time.time() - start:.0f} s on {_cpu()}"),
                    tiny)


def metalm_multitask(*, tiny: bool, workdir: str, data_dir: str | None) -> list[dict]:
  """METALM multitask language finetuning: SQuAD EM / F1, SuperGLUE accuracy, CNN/DM
  ROUGE-L (paper: 34 NLU / NLG datasets)."""
  import metalm_multitask as experiment
  multitask = experiment.multitask
  pretrained = None if tiny else _PRETRAINED.value
  if not tiny and not pretrained:
    raise NotImplementedError(
        "metalm_multitask at full size finetunes a pretrained paper-size METALM: pass "
        "--pretrained=<the experiments/train.py workdir of configs/metalm_lm.py:size=paper> "
        "(the paper pretrains on the Pile, which is not here; no weights are downloaded), "
        "with the text datasets prepared from their official files in --dataset_dir "
        "(squad_v1, superglue/{boolq,cb,rte,copa}, cnn_dailymail; docs/reproducing.md). "
        "--tiny runs the whole path on generated data.")
  start = time.time()
  r = experiment.run(workdir=os.path.join(workdir, "metalm_multitask"), data_dir=data_dir,
                     size="tiny" if tiny else "paper", checkpoint=pretrained)
  compute = f"{time.time() - start:.0f} s on {_cpu()}"
  size = "tiny" if tiny else "paper"
  steps = (f"{r['pretrain_steps']} pretrain + " if tiny else f"from {pretrained}, ")
  config = (f"configs/metalm_multitask.py:size={size} ({steps}{r['finetune_steps']} "
            "multitask steps, greedy)")
  names = {"exact_match": "exact match", "f1": "F1", "accuracy": "accuracy",
           "rouge_l": "ROUGE-L F1"}
  rows = []
  for task, result in r["tasks"].items():
    dataset = multitask.TASKS[task]["dataset"]
    data = (f"pydoc_tasks validation ({dataset} format), {result['num_examples']} examples"
            if tiny else f"{dataset} validation, {result['num_examples']} examples")
    for key, metric in names.items():
      if key in result:
        paper = multitask.TASKS[task]["paper"]
        rows.append(dict(task=task, metric=metric,
                         paper="- (in the 34-dataset mixture, see paper)" if paper is None
                         else paper, ours=round(result[key], 1), config=config, data=data,
                         compute=compute))
  return rows


# The paper's resolutions as visual tokens (plus 64 text tokens per row).
HYBRID_TOKENS_FULL = (576, 2304, 9792, 37440)
HYBRID_TOKENS_TINY = (576, 2304)
# Video: frames x 576 visual tokens per frame (a 336px CLIP ViT-L/14 frame, unpooled); the
# paper trains on 8 frames and infers on 16-64.
TOKENS_PER_FRAME = 576
HYBRID_FRAMES_FULL = (8, 16, 32, 64)
HYBRID_FRAMES_TINY = (2, 4)
HYBRID_CONFIG = "benchmarks/hybrid.py: d 64, 8 layers (Jamba 1:7), blockwise attention"


def _hybrid_rows(name: str, visual_tokens: dict[str, int], *, workdir: str) -> dict:
  """Attention / hybrid forward-latency ratio per {label: visual tokens} (+ 64 text tokens);
  writes the raw rows and the latency / memory plot to `workdir`."""
  from benchmarks import hybrid as hybrid_bench
  start = time.time()
  rows = hybrid_bench.run(lengths=[t + 64 for t in visual_tokens.values()],
                          paths=("blockwise",), repeats=3, d_model=64, num_layers=8,
                          num_heads=4, d_ff=192)
  compute = f"{time.time() - start:.0f} s on {_cpu()}"
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"{name}_rows.json"), "w") as f:
    json.dump(rows, f, indent=1)
  hybrid_bench.plot(rows, os.path.join(workdir, f"{name}.png"))
  ratios = hybrid_bench.best_ratios(rows)
  return {label: (None if ratios.get(t + 64) is None else round(ratios[t + 64], 2), compute)
          for label, t in visual_tokens.items()}


def hybrid_latency(*, tiny: bool, workdir: str, data_dir: str | None) -> list[dict]:
  """Hybrid (Jamba 1:7) vs attention forward latency vs visual tokens (paper: ~4x faster at
  high resolution, the gap widening)."""
  del data_dir
  tokens = HYBRID_TOKENS_TINY if tiny else HYBRID_TOKENS_FULL
  measured = _hybrid_rows("hybrid_latency" + ("_tiny" if tiny else ""),
                          {f"{t} visual tokens + 64 text": t for t in tokens}, workdir=workdir)
  return [dict(task=label, metric="attention ms / hybrid ms",
               paper="~4x at high resolution (growing)", ours=ratio, config=HYBRID_CONFIG,
               data="none (random tokens)", compute=compute)
          for label, (ratio, compute) in measured.items()]


def hybrid_frames(*, tiny: bool, workdir: str, data_dir: str | None) -> list[dict]:
  """Hybrid vs attention forward latency vs video frames (576 visual tokens each; paper:
  train on 8 frames, infer on 16-64, the gap widening)."""
  del data_dir
  frames = HYBRID_FRAMES_TINY if tiny else HYBRID_FRAMES_FULL
  measured = _hybrid_rows(
      "hybrid_frames" + ("_tiny" if tiny else ""),
      {f"{n} frames x {TOKENS_PER_FRAME} tokens + 64 text": n * TOKENS_PER_FRAME
       for n in frames}, workdir=workdir)
  return [dict(task=label, metric="attention ms / hybrid ms",
               paper="faster, the gap growing with frames", ours=ratio,
               config=HYBRID_CONFIG, data="none (random tokens)", compute=compute)
          for label, (ratio, compute) in measured.items()]


TABLES: dict[str, Callable[..., list[dict]]] = {
    "metalm_vl": metalm_vl, "mplug": mplug, "hybrid_latency": hybrid_latency,
    "hybrid_frames": hybrid_frames, "metalm_multitask": metalm_multitask}


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
  if table not in TABLES:
    raise ValueError(f"unknown --table={table!r}; tables: {sorted(TABLES)}")
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
    return
  if not _TABLE.value:
    raise app.UsageError(f"--table is required; one of {sorted(TABLES)} (--list describes them)")
  if _TABLE.value not in TABLES:
    raise app.UsageError(f"unknown --table={_TABLE.value!r}; tables: {sorted(TABLES)}")
  from metalm_jax.data import datasets as datasets_lib
  try:
    text = reproduce(_TABLE.value, tiny=_TINY.value, workdir=_OUTPUT_DIR.value,
                     data_dir=_DATASET_DIR.value)
  except NotImplementedError as e:
    raise app.UsageError(str(e)) from None
  except datasets_lib.DatasetNotPreparedError as e:  # full size without the official data
    raise app.UsageError(f"{e}\n(--tiny runs the {_TABLE.value} table's whole path on the "
                         "bundled data, written in the official formats.)") from None
  logging.info("wrote %s", _OUTPUT_DIR.value)
  print(text)


if __name__ == "__main__":
  app.run(main)
