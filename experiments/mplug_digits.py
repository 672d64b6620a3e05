r"""mPLUG end to end on the bundled digits data: pretraining with ITC + ITM + MLM + PrefixLM,
then image-text retrieval, captioning, and VQA finetuning (generation and answer ranking).

    python experiments/mplug_digits.py --workdir=workdirs/mplug_digits
    python experiments/mplug_digits.py --quick ...   # a smoke run: a few steps, few queries

Steps:
  1. pretrain `configs/mplug.py` (--size) for --pretrain_steps on the train split's
     image-caption pairs; pair_ids = the digit, so the 10 captions' duplicates are
     positives of each other in ITC and never sampled as ITM negatives;
  2. retrieval on --eval_split (every image against every caption, a caption is correct for
     an image showing its digit): ITC ranking, then the top --rerank_k re-ranked by ITM;
     R@1/5/10 both directions;
  3. zero-shot captioning of the --eval_split images (beam search from [CLS] alone: the
     PrefixLM split at s = 0), exact match with the reference caption;
  4. finetune on the train split's VQA examples for --finetune_steps (question to the
     encoder, answer from the decoder) and report VQA accuracy on --eval_split by beam-search
     generation and by ranking the answer list (every distinct train answer);
  5. the same VQA finetuning from random initialisation (--baseline), to show what
     pretraining buys.

Results go to {workdir}/results.json and results.md (the table in docs/results.md).
"""
from __future__ import annotations

import collections
import json
import os
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from metalm_jax import config as config_lib
from metalm_jax import evaluation
from metalm_jax import objectives
from metalm_jax import sharding
from metalm_jax.data import datasets
from metalm_jax.data import digits
from metalm_jax.data import vl_pipeline
from metalm_jax.evaluation import caption_metrics
from metalm_jax.data import prompts as prompts_lib
from metalm_jax.inference import mplug as mplug_inference
from metalm_jax.models import mplug as mplug_model
from metalm_jax.objectives import mplug as mplug_objectives
from metalm_jax.train import mplug as mplug_train
from metalm_jax.train import state as state_lib
from metalm_jax.train import step as step_lib

mplug_config = config_lib.config_module("mplug")

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/mplug_digits", "Where results go.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "digits_vl data directory (default: "
                                "$METALM_DATA_DIR, else ~/.cache/metalm_jax/data). Prepared "
                                "here if missing.")
_SIZE = flags.DEFINE_enum("size", "tiny", sorted(mplug_config.SIZES), "configs/mplug.py size.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation, data order and sampling seed.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 600, "Pretraining steps.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 300, "VQA finetuning steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Batch size (default: the config's).")
_EVAL_SPLIT = flags.DEFINE_enum("eval_split", "test", list(digits.SPLITS), "Evaluation split.")
_EVAL_LIMIT = flags.DEFINE_integer("eval_limit", 0, "Evaluate the first N images / questions "
                                   "only (0 = all).")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 3, "Beams for captioning and VQA generation.")
_RERANK_K = flags.DEFINE_integer("rerank_k", 16, "Retrieval candidates re-ranked by ITM.")
_BASELINE = flags.DEFINE_bool("baseline", True, "Also finetune VQA from random init.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Log the training losses every N steps.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 3 + 2 steps, 16 images / questions.")


# ---------------------------------------------------------------- data -> arrays
def encoder_tokens(tokenizer, texts: Sequence[str], max_len: int) -> np.ndarray:
  """[CLS] (= BOS) text [EOS], padded to the longest: int32 [N, <= max_len] (short rows keep
  the encoder and fusion cheap; max_len is the model's position table)."""
  encoded = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(t), [tokenizer.eos_id]])
             for t in texts]
  length = max(len(ids) for ids in encoded)
  if length > max_len:
    raise ValueError(f"a text needs {length} tokens but the model's text length is {max_len}; "
                     "raise config.model.text_encoder.max_len.")
  out = np.full((len(texts), length), tokenizer.pad_id, np.int32)
  for i, ids in enumerate(encoded):
    out[i, :len(ids)] = ids
  return out


def decoder_rows(tokenizer, texts: Sequence[str], max_len: int) -> dict:
  """Teacher forcing rows [BOS] text -> text [EOS]: inputs, targets, weights [N, L], L the
  longest (<= max_len)."""
  encoded = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(t), [tokenizer.eos_id]])
             for t in texts]
  length = max(len(ids) for ids in encoded) - 1
  if length > max_len:
    raise ValueError(f"an answer needs {length} decoder positions; raise decoder.max_len.")
  rows = {k: np.full((len(texts), length), tokenizer.pad_id, np.int32)
          for k in ("decoder_inputs", "decoder_targets")}
  rows["decoder_weights"] = np.zeros((len(texts), length), np.float32)
  for i, ids in enumerate(encoded):
    n = len(ids) - 1
    rows["decoder_inputs"][i, :n], rows["decoder_targets"][i, :n] = ids[:-1], ids[1:]
    rows["decoder_weights"][i, :n] = 1.0
  return rows


def load_split(data_dir: str, split: str, tokenizer, *, image_size: int, channels: int,
               text_len: int, limit: int = 0) -> dict:
  """A split as arrays: {'caption': images, text, pair_ids, labels, texts; 'vqa': images,
  text (question), decoder rows, answers, questions}."""
  source = datasets.data_source(vl_pipeline.DATASET, split, data_dir)
  by_task = collections.defaultdict(list)
  for i in range(len(source)):
    ex = source[i]
    task = prompts_lib.as_text(ex["task"])
    if task in ("caption", "vqa") and (not limit or len(by_task[task]) < limit):
      by_task[task].append(ex)
  image = lambda ex: vl_pipeline.preprocess_image(ex["image"], image_size=image_size,
                                                  num_channels=channels)
  caps = by_task["caption"]
  captions = [prompts_lib.as_text(ex["answer"]) for ex in caps]
  labels = np.array([int(ex["label"]) for ex in caps], np.int32)
  vqa = by_task["vqa"]
  questions = [prompts_lib.as_text(ex["question"]) for ex in vqa]
  answers = [prompts_lib.as_text(ex["answer"]) for ex in vqa]
  return {
      "caption": {"images": np.stack([image(ex) for ex in caps]),
                  "text": encoder_tokens(tokenizer, captions, text_len),
                  "pair_ids": labels, "labels": labels, "texts": captions},
      "vqa": dict({"images": np.stack([image(ex) for ex in vqa]),
                   "text": encoder_tokens(tokenizer, questions, text_len),
                   "questions": questions, "answers": answers},
                  **decoder_rows(tokenizer, answers, text_len)),
  }


def sample_batch(arrays: dict, keys: Sequence[str], batch_size: int,
                 rng: np.random.Generator) -> dict:
  """A random batch (without replacement) of the named arrays."""
  idx = rng.choice(len(arrays[keys[0]]), batch_size, replace=False)
  return {k: arrays[k][idx] for k in keys}


# ---------------------------------------------------------------- training
def pretrain(config, model: state_lib.Model, data: dict, *, steps: int, seed: int,
             log_every: int) -> tuple[dict, object, dict]:
  """mPLUG pretraining on image-caption pairs; returns (params, rest, log)."""
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  tx = state_lib.make_optimizer(config.optimizer, steps)
  schedule = state_lib.learning_rate_schedule(config.optimizer, steps)
  state, shardings, rest = mplug_train.create_pretrain_state(
      model, tx, jax.random.key(seed), mesh, rules, queue_size=config.mplug.queue_size)
  keys = ("images", "text", "pair_ids")
  rng = np.random.default_rng(seed)
  example = sample_batch(data, keys, config.batch_size, rng)
  batch_shardings = mplug_train.batch_shardings(mesh, rules, example)
  step = mplug_train.make_pretrain_step(
      model, tx, schedule, shardings, rest, batch_shardings, mesh,
      loss_weights=dict(config.mplug.loss_weights), alpha=config.mplug.alpha,
      alpha_warmup_steps=config.mplug.alpha_warmup_steps,
      momentum_decay=config.mplug.momentum_decay, mask_rate=config.mplug.mask_rate)
  start, history = time.time(), []
  for i in range(steps):
    batch = jax.device_put(sample_batch(data, keys, config.batch_size, rng), batch_shardings)
    state, metrics = step(state, rest, batch)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      history.append(dict(m, step=i + 1))
      logging.info("pretrain %d/%d loss %.3f itc %.3f itm %.3f (acc %.2f) mlm %.3f (acc %.2f) "
                   "prefix_lm %.3f (acc %.2f) temp %.4f (%.0f s)", i + 1, steps, m["loss"],
                   m.get("itc", 0), m.get("itm", 0), m.get("itm_accuracy", 0),
                   m.get("mlm", 0), m.get("mlm_accuracy", 0), m.get("prefix_lm", 0),
                   m.get("prefix_lm_accuracy", 0), m["temperature"], time.time() - start)
  jax.block_until_ready(state.params)
  return state.params, rest, {"seconds": time.time() - start, "history": history}


VQA_OBJECTIVE = objectives.Objective("mplug_seq2seq", loss=mplug_objectives.seq2seq_loss)


def finetune(config, model: state_lib.Model, data: dict, *, steps: int, seed: int,
             init_params=None, log_every: int, name: str) -> tuple[dict, object, dict]:
  """Seq2seq finetuning (the ordinary train step); fresh or given parameters."""
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  tx = state_lib.make_optimizer(config.optimizer, steps)
  schedule = state_lib.learning_rate_schedule(config.optimizer, steps)
  state, shardings, rest = state_lib.create_train_state(model, tx, jax.random.key(seed), mesh,
                                                        rules)
  if init_params is not None:
    params = jax.tree.map(jnp.copy, init_params)
    state = jax.device_put(state.replace(params=params, opt_state=tx.init(params)), shardings)
  keys = ("images", "text", "decoder_inputs", "decoder_targets", "decoder_weights")
  batch_shardings = sharding.batch_sharding(mesh, rules, ndim=1)
  step = step_lib.make_train_step(model, tx, VQA_OBJECTIVE, schedule, shardings, rest,
                                  batch_shardings, mesh, rules=rules)
  rng = np.random.default_rng(seed + 1)
  start, history = time.time(), []
  for i in range(steps):
    batch = jax.device_put(sample_batch(data, keys, config.batch_size, rng), batch_shardings)
    state, metrics = step(state, rest, batch)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      loss = float(metrics["loss"])
      history.append({"step": i + 1, "loss": loss,
                      "token_accuracy": float(metrics["token_accuracy"])})
      logging.info("%s %d/%d loss %.4f (%.0f s)", name, i + 1, steps, loss, time.time() - start)
  jax.block_until_ready(state.params)
  return state.params, rest, {"seconds": time.time() - start, "history": history}


# ---------------------------------------------------------------- evaluation
UNK_ID = 3  # both tokenizers' unknown id


def decode_texts(tokenizer, tokens: np.ndarray) -> list[str]:
  """Generated ids -> texts; ids above the tokenizer's vocabulary (the model's [MASK], which
  an undertrained model may emit) decode as unknown."""
  tokens = np.asarray(tokens)
  tokens = np.where(tokens >= tokenizer.vocab_size, UNK_ID, tokens)
  return [tokenizer.decode(row) for row in tokens]


def batched(n: int, batch_size: int):
  for i in range(0, n, batch_size):
    yield slice(i, min(i + batch_size, n))


def evaluate_retrieval(module, data: dict, *, k: int) -> dict:
  """R@1/5/10 both directions, ITC alone and ITC + ITM re-ranking."""
  caps = data["caption"]
  out = mplug_inference.retrieve(module, caps["images"], caps["text"], k=k)
  relevant = caps["labels"][:, None] == caps["labels"][None, :]  # [images, texts]
  result = {}
  for stage, (i2t, t2i) in {"itc": ("itc_i2t", "itc_t2i"), "itc+itm": ("i2t", "t2i")}.items():
    result[stage] = {"i2t": evaluation.retrieval_recall(out[i2t], relevant),
                     "t2i": evaluation.retrieval_recall(out[t2i], relevant.T)}
  result["num_images"] = result["num_texts"] = int(len(caps["labels"]))
  return result


def evaluate_captioning(module, tokenizer, data: dict, *, beam_size: int, max_new: int,
                        batch_size: int = 64) -> dict:
  """Beam-search captions from the image alone; normalised exact match with the reference."""
  caps = data["caption"]
  cls = np.full((len(caps["labels"]), 1), tokenizer.bos_id, np.int32)
  predictions = []
  for s in batched(len(cls), batch_size):
    tokens, _ = mplug_inference.generate(module, caps["images"][s], cls[s],
                                         max_new_tokens=max_new, beam_size=beam_size)
    predictions += decode_texts(tokenizer, np.asarray(tokens)[:, 0])
  exact = [evaluation.vqa_score(p, r) for p, r in zip(predictions, caps["texts"])]
  scores = caption_metrics.caption_scores([[r] for r in caps["texts"]], predictions)
  return {"exact_match": float(np.mean(exact)), "num_images": len(predictions),
          "bleu4": scores["BLEU-4"], "cider_d": scores["CIDEr-D"], "rouge_l": scores["ROUGE-L"],
          "samples": list(zip(predictions[:5], caps["texts"][:5]))}


def evaluate_vqa(module, tokenizer, data: dict, answer_list: Sequence[str], *, beam_size: int,
                 max_new: int, text_len: int, batch_size: int = 64) -> dict:
  """VQA accuracy by generation and by answer-list ranking; per question."""
  vqa = data["vqa"]
  n = len(vqa["answers"])
  answer_tokens = encoder_tokens(tokenizer, answer_list, text_len)[:, 1:]  # answer [EOS], pad
  generated, ranked = [], []
  for s in batched(n, batch_size):
    tokens, _ = mplug_inference.generate(module, vqa["images"][s], vqa["text"][s],
                                         max_new_tokens=max_new, beam_size=beam_size)
    generated += decode_texts(tokenizer, np.asarray(tokens)[:, 0])
    scores = np.asarray(mplug_inference.answer_scores(module, vqa["images"][s], vqa["text"][s],
                                                      answer_tokens))
    ranked += [answer_list[j] for j in scores.argmax(axis=1)]
  result = {}
  for mode, preds in (("generate", generated), ("rank", ranked)):
    scores = [evaluation.vqa_score(p, r) for p, r in zip(preds, vqa["answers"])]
    result[mode] = {"accuracy": float(np.mean(scores)), "per_question": {
        q: float(np.mean([s for s, u in zip(scores, vqa["questions"]) if u == q]))
        for q in digits.VQA_QUESTIONS if q in vqa["questions"]}}
  result["num_questions"] = n
  result["samples"] = list(zip(vqa["questions"][:6], generated[:6], ranked[:6],
                               vqa["answers"][:6]))
  return result


# ---------------------------------------------------------------- the experiment
def experiment_config(size: str, batch_size: int | None):
  config = mplug_config.get_config(f"size={size}")
  if batch_size:
    with config.unlocked():
      config.batch_size = batch_size
  return config


def markdown(results: dict) -> str:
  pct = lambda x: f"{100 * x:.1f}"
  r = results["retrieval"]
  lines = [
      f"mPLUG `{results['size']}` ({results['params']:,} parameters, fusion "
      f"'{results['fusion_pattern']}'): pretraining {results['pretrain_steps']} steps "
      f"({results['pretrain']['seconds']:.0f} s), VQA finetuning {results['finetune_steps']} "
      f"steps, evaluated on the {results['eval_split']} split.", "",
      "| retrieval (" + f"{r['num_images']} images x {r['num_texts']} captions) | i2t R@1 | "
      "R@5 | R@10 | t2i R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|---|"]
  for stage in ("itc", "itc+itm"):
    i2t, t2i = r[stage]["i2t"], r[stage]["t2i"]
    lines.append(f"| {stage} | " + " | ".join(pct(d[f"R@{k}"]) for d in (i2t, t2i)
                                               for k in (1, 5, 10)) + " |")
  lines += ["", "| VQA (" + f"{results['vqa']['num_questions']} questions) | generation "
            "| answer ranking | per question, ranking (which / even-odd / >5) |",
            "|---|---|---|---|"]
  for name in ("vqa", "vqa_baseline"):
    if name in results:
      v = results[name]
      per_q = " / ".join(pct(v["rank"]["per_question"].get(q, float("nan")))
                         for q in digits.VQA_QUESTIONS)
      label = "pretrained + finetuned" if name == "vqa" else "finetuned from scratch"
      lines.append(f"| {label} | {pct(v['generate']['accuracy'])} | "
                   f"{pct(v['rank']['accuracy'])} | {per_q} |")
  c = results["captioning"]
  lines += ["", f"Zero-shot captioning (beam {results['beam_size']}, from the image alone): "
            f"exact match {pct(c['exact_match'])}% of {c['num_images']} images; CIDEr-D "
            f"{100 * c['cider_d']:.1f}, BLEU-4 {pct(c['bleu4'])}, ROUGE-L {pct(c['rouge_l'])} "
            "(one reference per image)."]
  return "\n".join(lines)


def run(*, workdir: str, data_dir: str | None, size: str, seed: int, pretrain_steps: int,
        finetune_steps: int, batch_size: int | None, eval_split: str, eval_limit: int,
        beam_size: int, rerank_k: int, baseline: bool, log_every: int) -> dict:
  """The whole experiment; writes {workdir}/results.json and results.md; returns results."""
  start = time.time()
  data_dir = data_dir or datasets.default_data_dir()
  datasets.prepare(vl_pipeline.DATASET, data_dir)
  tokenizer = vl_pipeline.get_vl_tokenizer("sentencepiece", data_dir=data_dir)
  config = experiment_config(size, batch_size)
  if config.model.vocab_size <= tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} leaves no [MASK] id "
                     f"above the tokenizer's {tokenizer.vocab_size}; raise it.")
  vit = config.model.vision_encoder
  load = lambda split, limit=0: load_split(
      data_dir, split, tokenizer, image_size=vit.image_size, channels=vit.channels,
      text_len=config.model.text_encoder.max_len, limit=limit)
  train, evaluation_data = load("train"), load(eval_split, eval_limit)
  model = state_lib.Model(config.model)
  pattern = mplug_model.fusion_pattern(config.model.fusion.num_layers, config.model.fusion.stride)
  logging.info("mPLUG %s: %d parameters, fusion %s", size, model.param_count(), pattern)
  params, rest, pre = pretrain(config, model, train["caption"], steps=pretrain_steps,
                               seed=seed, log_every=log_every)
  module = model.merge(params, rest)
  max_caption = max(len(tokenizer.encode(t)) for t in train["caption"]["texts"]) + 1
  max_answer = max(len(tokenizer.encode(t)) for t in train["vqa"]["answers"]) + 1
  results = {"size": size, "params": model.param_count(), "fusion_pattern": pattern,
             "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps,
             "eval_split": eval_split, "beam_size": beam_size, "rerank_k": rerank_k,
             "batch_size": config.batch_size, "pretrain": pre}
  results["retrieval"] = evaluate_retrieval(module, evaluation_data, k=rerank_k)
  logging.info("retrieval %s", results["retrieval"])
  results["captioning"] = evaluate_captioning(module, tokenizer, evaluation_data,
                                              beam_size=beam_size, max_new=max_caption)
  logging.info("captioning %s", results["captioning"])
  answer_list = sorted(set(train["vqa"]["answers"]))
  vqa_eval = lambda p, r: evaluate_vqa(model.merge(p, r), tokenizer, evaluation_data,
                                       answer_list, beam_size=beam_size, max_new=max_answer,
                                       text_len=config.model.text_encoder.max_len)
  tuned, rest, fine = finetune(config, model, train["vqa"], steps=finetune_steps, seed=seed,
                               init_params=params, log_every=log_every, name="vqa finetune")
  results["finetune"] = fine
  results["vqa"] = vqa_eval(tuned, rest)
  logging.info("VQA %s", {k: results["vqa"][k]["accuracy"] for k in ("generate", "rank")})
  if baseline:
    scratch, rest, base = finetune(config, model, train["vqa"], steps=finetune_steps,
                                   seed=seed, log_every=log_every, name="vqa from scratch")
    results["finetune_baseline"] = base
    results["vqa_baseline"] = vqa_eval(scratch, rest)
    logging.info("VQA from scratch %s",
                 {k: results["vqa_baseline"][k]["accuracy"] for k in ("generate", "rank")})
  results["wall_seconds"] = time.time() - start
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  table = markdown(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return results


def main(argv):
  del argv
  quick = _QUICK.value
  run(workdir=_WORKDIR.value, data_dir=_DATA_DIR.value, size=_SIZE.value, seed=_SEED.value,
      pretrain_steps=3 if quick else _PRETRAIN_STEPS.value,
      finetune_steps=2 if quick else _FINETUNE_STEPS.value,
      batch_size=_BATCH_SIZE.value, eval_split=_EVAL_SPLIT.value,
      eval_limit=16 if quick else _EVAL_LIMIT.value, beam_size=_BEAM_SIZE.value,
      rerank_k=4 if quick else _RERANK_K.value, baseline=_BASELINE.value and not quick,
      log_every=1 if quick else _LOG_EVERY.value)


if __name__ == "__main__":
  app.run(main)
