"""data.text_task_pipeline (multitask rows, mixing) and inference.metalm_text (greedy decoding)."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalm_jax import config as config_lib
from metalm_jax import masking
from metalm_jax.data import text_task_pipeline as ttp
from metalm_jax.data import tokenizers
from metalm_jax.inference import metalm_text
from metalm_jax.objectives import semi_causal_lm
from metalm_jax.train import state as state_lib

TOK = tokenizers.ByteTokenizer()


def _example(inputs="question: first word? context: hello world", targets="hello"):
  return {"inputs": inputs, "targets": targets, "references": [targets], "task": "squad_v1"}


def test_row_layout_spans_and_scored_positions():
  row = ttp.encode_example(_example(), TOK, seq_len=96, max_span_len=16, max_input_tokens=64,
                           task_index=3)
  prompt = np.concatenate([[TOK.bos_id], TOK.encode(_example()["inputs"])])
  n = len(prompt)
  assert int(row["input_length"]) == n and int(row["task"]) == 3
  np.testing.assert_array_equal(row["inputs"][:n], prompt)
  # Consecutive spans of <= 16 tokens cover exactly the prompt.
  assert row["span_lengths"].sum() == n and row["span_lengths"].max() == 16
  starts = np.arange(0, n, 16)
  assert len(starts) == 3  # 43 prompt positions: spans of 16, 16, 11
  np.testing.assert_array_equal(row["span_starts"][:3], starts)
  np.testing.assert_array_equal(row["span_lengths"], [16, 16, 11, 0])
  np.testing.assert_array_equal(row["span_ids"][:n] > 0, np.ones(n, bool))
  assert not row["span_ids"][n:].any()
  # Scored: the last prompt position (predicts the first target token) and the target.
  target = np.concatenate([TOK.encode(" hello"), [TOK.eos_id]])
  scored = np.nonzero(row["weights"])[0]
  np.testing.assert_array_equal(scored, np.arange(n - 1, n - 1 + len(target)))
  np.testing.assert_array_equal(row["targets"][scored], target)
  # semi_causal_lm.loss keeps exactly these positions (only a span's last position scores).
  kept = row["weights"] * np.asarray(masking.span_loss_weights(jnp.asarray(row["span_ids"])))
  np.testing.assert_array_equal(np.nonzero(kept)[0], scored)


def test_long_text_is_cut_and_too_small_rows_are_errors():
  row = ttp.encode_example(_example(inputs="x " * 100, targets="y " * 100), TOK, seq_len=96,
                           max_span_len=16, max_input_tokens=64)
  assert int(row["input_length"]) == 64 and row["span_lengths"].sum() == 64
  assert row["segment_ids"].sum() == 95  # the target fills the rest of the row
  with pytest.raises(ValueError, match="no room to predict"):
    ttp.prompt_row(np.ones(96, np.int32), seq_len=96, max_span_len=16, max_spans=6)
  with pytest.raises(ValueError, match="max_spans=2"):
    ttp.prompt_row(np.ones(40, np.int32), seq_len=96, max_span_len=16, max_spans=2)


def test_mixing_is_examples_proportional_with_a_cap():
  w = ttp.mixing_weights({"a": 100, "b": 10_000, "c": 50}, cap=1000)
  assert w == pytest.approx({"a": 100 / 1150, "b": 1000 / 1150, "c": 50 / 1150})
  with pytest.raises(ValueError, match="needs examples"):
    ttp.mixing_weights({"a": 0}, cap=None)
  sources = {"a": [_example(targets="a")] * 10, "b": [_example(targets="b")] * 40}
  make = lambda seed: iter(ttp.multitask_dataset(
      sources, TOK, seq_len=96, batch_size=50, max_span_len=16, max_input_tokens=64,
      seed=seed, mixing_cap=20))
  batches = [next(make(0)) for _ in range(2)]
  np.testing.assert_array_equal(batches[0]["inputs"], batches[1]["inputs"])  # deterministic
  it = make(0)
  counts = collections.Counter(np.concatenate([next(it)["task"] for _ in range(12)]).tolist())
  assert counts[0] / 600 == pytest.approx(1 / 3, abs=0.05)  # 10 : min(40, 20)
  assert set(counts) == {0, 1}


@pytest.fixture(scope="module")
def tiny_metalm():
  config = config_lib.config_module("metalm_multitask").get_config("size=tiny")
  with config.unlocked():
    config.model = config_lib.config_module("metalm_lm").model_config("test")
    config.model.max_span_len = 16
    config.model.text_encoder.max_len = 17
    config.model.decoder.vocab_size = 512
  model = state_lib.Model(config.model)
  params, rest = model.init(jax.random.key(0))
  return model, params, rest


def test_greedy_predictor_reads_prompts_as_training_rows_do(tiny_metalm):
  model, params, rest = tiny_metalm
  texts = ["question: what is it? context: a b c", "summarize: " + "words " * 12]
  predictor = metalm_text.TextGreedyPredictor(
      model, params, rest, TOK, seq_len=96, max_span_len=16, max_input_tokens=64,
      max_new_tokens=3, batch_size=4)
  ids = predictor.generate_ids(texts)
  assert ids.shape == (2, 3)
  # The first generated token is the argmax at the prompt's last position of the training
  # row (random weights: any token, but the same one).
  module = model.merge(params, rest)
  for text, got in zip(texts, ids[:, 0]):
    row = ttp.encode_example(_example(inputs=text, targets="z"), TOK, seq_len=96,
                             max_span_len=16, max_input_tokens=64)
    batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
    logits, _ = module(batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"], span_ids=batch["span_ids"],
                       span_starts=batch["span_starts"], span_lengths=batch["span_lengths"],
                       deterministic=True)
    assert int(got) == int(jnp.argmax(logits[0, int(row["input_length"]) - 1]))
  # The semi-causal loss runs on the same rows.
  loss, metrics = semi_causal_lm.loss(module, batch)
  assert np.isfinite(float(loss)) and float(metrics["span_fraction"]) > 0
