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
  """METALM vision-language: zero-/few-shot VQA and captioning, finetuned VQA, captioning
  and NLVR2 (paper: VQAv2 41.1 / OK-VQA 11.4 zero-shot)."""
  if not tiny:
    raise NotImplementedError(
        "metalm_vl at full size needs VQAv2 / OK-VQA / COCO Karpathy / NLVR2 prepared from "
        "their official files (docs/reproducing.md, Datasets) and a pretrained paper-size "
        "METALM (configs/metalm_vl.py:size=paper; its image-text pretraining corpora have no "
        "builder here); only --tiny runs here.")
  import metalm_digits  # experiments/ is on sys.path when run as a script
  from metalm_jax.data import datasets as datasets_lib
  from metalm_jax.data import vl_pipeline
  from metalm_jax.evaluation import caption_metrics
  from metalm_jax.train import state as state_lib
  start, seed, shots = time.time(), 0, 2
  pretrain_steps, finetune_steps = 150, 60
  data_dir = data_dir or datasets_lib.default_data_dir()
  datasets_lib.prepare(vl_pipeline.DATASET, data_dir)
  tokenizer = vl_pipeline.get_vl_tokenizer("sentencepiece", data_dir=data_dir)
  config = metalm_digits.experiment_config("tiny", seq_len=48, prefix=32, batch_size=None)
  model = state_lib.Model(config.model)
  pretrain, finetune, encode_text = metalm_digits.OBJECTIVES["metalm"]
  train_source = datasets_lib.data_source(vl_pipeline.DATASET, "train", data_dir)
  limits = {"vqa": 96, "caption": 64, "nlvr2": 64}
  queries = {t: metalm_digits.load_examples(data_dir, "test", task=t, limit=n)
             for t, n in limits.items()}
  support = metalm_digits.load_examples(data_dir, "train", read=600)
  params, rest, _ = metalm_digits.train(config, model, pretrain, train_source, tokenizer,
                                        steps=pretrain_steps, seed=seed, log_every=50,
                                        name="metalm_vl pretrain")

  def score(task, params, k=0):
    r = metalm_digits.evaluate(model, params, rest, tokenizer, queries[task],
                               encode_text=encode_text, shots=k, support=support if k else None,
                               batch_size=32, seed=seed)
    if task == "caption":  # CIDEr-D x100 over the test images' reference captions
      return round(100 * caption_metrics.cider_d(r["references"], r["predictions"]), 1)
    return round(100 * r["accuracy"], 1)

  ours = {("vqa", 0): score("vqa", params), ("vqa", shots): score("vqa", params, shots),
          ("caption", 0): score("caption", params),
          ("caption", shots): score("caption", params, shots)}
  for task in ("vqa", "caption", "nlvr2"):  # one finetune per task, from the pretrained model
    tuned, _, _ = metalm_digits.train(config, model, finetune, train_source, tokenizer,
                                      steps=finetune_steps, seed=seed + 1, tasks=[task],
                                      init_params=params, log_every=50,
                                      name=f"metalm_vl finetune {task}")
    ours[(task, "finetuned")] = score(task, tuned)
  compute = f"{time.time() - start:.0f} s on {_cpu()}"
  config_name = (f"configs/metalm_vl.py:size=tiny ({pretrain_steps} pretrain + "
                 f"{finetune_steps} finetune steps per task)")
  data = {t: f"digits_vl test, {len(q)} {t} examples" for t, q in queries.items()}
  row = lambda task, metric, paper, key, t: dict(task=task, metric=metric, paper=paper,
                                                 ours=ours[key], config=config_name,
                                                 data=data[t], compute=compute)
  na = "n/a in --tiny (digits_vl has one VQA set; full size: the ok_vqa builder)"
  return [
      row("VQA zero-shot", "VQA acc", "41.1 (VQAv2)", ("vqa", 0), "vqa"),
      dict(task="OK-VQA zero-shot", metric="VQA acc", paper="11.4 (OK-VQA)", ours=na,
           config=config_name, data="-", compute="-"),
      row(f"VQA {shots}-shot", "VQA acc", "- (up to 4 shots in the paper)", ("vqa", shots),
          "vqa"),
      row("captioning zero-shot", "CIDEr-D (x100)", "- (COCO, see paper)", ("caption", 0),
          "caption"),
      row(f"captioning {shots}-shot", "CIDEr-D (x100)", "- (COCO, see paper)",
          ("caption", shots), "caption"),
      row("VQA finetuned", "VQA acc", "- (VQAv2 finetuned, see paper)", ("vqa", "finetuned"),
          "vqa"),
      dict(task="OK-VQA finetuned", metric="VQA acc", paper="- (see paper)", ours=na,
           config=config_name, data="-", compute="-"),
      row("NLVR2 finetuned", "accuracy", "- (NLVR2 test-P, see paper)",
          ("nlvr2", "finetuned"), "nlvr2"),
      row("COCO captioning finetuned", "CIDEr-D (x100)", "- (COCO Karpathy test, see paper)",
          ("caption", "finetuned"), "caption"),
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
  try:
    text = reproduce(_TABLE.value, tiny=_TINY.value, workdir=_OUTPUT_DIR.value,
                     data_dir=_DATASET_DIR.value)
  except NotImplementedError as e:
    raise app.UsageError(str(e)) from None
  logging.info("wrote %s", _OUTPUT_DIR.value)
  print(text)


if __name__ == "__main__":
  app.run(main)
