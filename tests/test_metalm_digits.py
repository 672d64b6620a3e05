"""experiments/metalm_digits.py: prompt -> row layout, greedy predict_fn wiring, smoke run."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from metalm_jax.data import vl_pipeline
from metalm_jax.data import prompts
from metalm_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "metalm_digits.py")


def _load_script():
  spec = importlib.util.spec_from_file_location("metalm_digits_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


md = _load_script()


def _example(label, question="which digit is this?", answer="seven", level=255):
  image = np.zeros((8, 8, 1), np.uint8)
  image[label % 8, :, 0] = level
  return {"task": "vqa", "question": question, "answer": answer, "image": image,
          "image2": np.zeros((8, 8, 1), np.uint8), "num_images": 1, "index": label,
          "index2": -1}


def test_build_rows_gives_every_shot_its_own_span():
  tok = vl_pipeline.get_vl_tokenizer("byte")
  demo, query = _example(1, answer="one"), _example(2)
  prompt = prompts.few_shot_prompt([demo], query)
  t, cap = 3, 100
  kw = dict(num_image_tokens=t, max_span_len=cap, length=256, num_spans=3)
  semi = md.build_rows([prompt], tok, encode_text=True, **kw)
  causal = md.build_rows([prompt], tok, encode_text=False, **kw)
  demo_ids = [tok.bos_id, *tok.encode(prompts.prompt_text(demo) + " one"), tok.eos_id]
  query_ids = [tok.bos_id, *tok.encode(prompts.prompt_text(query))]
  q0 = t + len(demo_ids)  # the query's image span starts after the demonstration
  np.testing.assert_array_equal(semi["span_starts"][0], [0, q0, 0])
  np.testing.assert_array_equal(semi["span_lengths"][0],
                                [t + len(demo_ids), t + len(query_ids), 0])
  np.testing.assert_array_equal(causal["span_lengths"][0], [t, t, 0])
  end = q0 + t + len(query_ids)
  assert semi["ends"][0] == end == md.prompt_extent(prompt, tok, t)[0]
  np.testing.assert_array_equal(semi["inputs"][0, t:q0], demo_ids)
  np.testing.assert_array_equal(semi["inputs"][0, q0 + t:end], query_ids)
  np.testing.assert_array_equal(semi["segment_ids"][0], np.arange(256) < end)
  np.testing.assert_array_equal(semi["images"][0, 1], vl_pipeline.preprocess_image(
      query["image"]))
  with pytest.raises(ValueError, match="positions"):
    md.build_rows([prompt], tok, encode_text=True, **dict(kw, length=end - 1))


def test_untrained_predictor_matches_the_training_layout_and_answers_every_prompt():
  """The greedy predict_fn on an untrained tiny MetaLM: its zero-shot rows give the same
  next-token logits as the training layout (`MetaLM.vl_layout` with the prompt as prefix),
  and `evaluate_vqa` gets one answer per prompt."""
  tok = vl_pipeline.get_vl_tokenizer("byte")
  config = md.experiment_config("tiny", seq_len=80, prefix=32, batch_size=None)
  with config.unlocked():  # one layer each (a quick compile); the byte tokenizer's vocabulary
    config.model.decoder.vocab_size = tok.vocab_size
    for part in ("decoder", "text_encoder", "vision_encoder"):
      config.model[part].num_layers = 1
  model = state_lib.Model(config.model)
  params, rest = jax.jit(model.init)(jax.random.key(0))  # jitted: eager init is slow
  t = model.merge(params, rest).vision_encoder.num_tokens()
  queries = [_example(i, answer=a) for i, a in enumerate(["seven", "two", "nine"])]

  def forward(module, rows):
    logits, _ = module(rows["inputs"], positions=rows["positions"],
                       segment_ids=rows["segment_ids"], span_starts=rows["span_starts"],
                       span_lengths=rows["span_lengths"], images=rows["images"])
    return logits

  @jax.jit
  def training_layout_logits(params, rest, batch):
    module = model.merge(params, rest)  # image-first rows, the whole prompt in the span
    return forward(module, module.vl_layout(batch, batch["prompt_length"]))

  batch = {k: np.stack([vl_pipeline.encode_example(ex, tok, seq_len=80)[k] for ex in queries])
           for k in vl_pipeline.FEATURE_DTYPES}
  plen = batch["prompt_length"]
  ref = np.asarray(training_layout_logits(params, rest, batch))[np.arange(3), 2 * t + plen - 1]
  rows = md.build_rows([prompts.zero_shot_prompt(ex) for ex in queries], tok,
                       num_image_tokens=t, max_span_len=config.model.max_span_len,
                       encode_text=True, length=128, num_spans=1)
  got = jax.jit(lambda p, r, x: forward(model.merge(p, r), x))(params, rest, rows)
  got = np.asarray(got)[np.arange(3), rows["ends"] - 1]
  np.testing.assert_allclose(got, ref, atol=2e-4, rtol=2e-4)

  # Two batches of 2 (the last padded), one compilation; few-shot runs in the slow test.
  result = md.evaluate(model, params, rest, tok, queries, encode_text=True, batch_size=2)
  assert result["num_examples"] == 3 and len(result["predictions"]) == 3
  assert all(isinstance(p, str) for p in result["predictions"])
  assert set(result["per_question"]) == {"which digit is this?"}


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path):
  """The script's main path in --quick mode (a few steps per model) writes its tables."""
  workdir = tmp_path / "work"
  subprocess.run([sys.executable, SCRIPT, "--quick", f"--workdir={workdir}",
                  f"--data_dir={tmp_path / 'data'}"], check=True, cwd=ROOT, timeout=900)
  results = json.loads((workdir / "results.json").read_text())["results"]
  assert [r["model"] for r in results] == ["metalm", "causal"]
  assert results[0]["params"] == results[1]["params"]  # equal size
  for r in results:
    assert r["pretrain_steps"] == 4 and r["finetune_steps"] == 2
    for key in ("zero_shot", "2_shot", "finetuned"):
      assert 0.0 <= r[key]["accuracy"] <= 1.0 and r[key]["num_examples"] == 8
  assert "| metalm |" in (workdir / "results.md").read_text()
