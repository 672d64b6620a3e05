"""data.text_task_pipeline: multitask rows, mixing, process sharding, the eval pass.

(Generation from these prompts is tested in tests/test_generation.py.)"""
import collections

import jax.numpy as jnp
import numpy as np
import pytest

from metalm_jax import masking
from metalm_jax.data import text_task_pipeline as ttp
from metalm_jax.data import tokenizers

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
