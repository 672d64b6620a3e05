"""Each objective's defining property, the special-token convention, and weighted mixes."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax import objectives
from metalm_jax.models.decoder import Decoder
from metalm_jax.objectives import (denoising, masked_lm, mixture, permutation_lm, prefix_lm,
                                   rows, span_corruption, special_tokens)

VOCAB = 500 + special_tokens.NUM_RESERVED


def make_row(lengths, length, rng):
  """A packed row of random documents with `lengths` input slots each, then padding."""
  row = {k: np.zeros(length, np.int32) for k in ("inputs", "targets", "segment_ids",
                                                 "positions")}
  cursor = 0
  for segment, n in enumerate(lengths, 1):
    tokens = rng.integers(3, 500, n + 1)
    s = slice(cursor, cursor + n)
    row["inputs"][s], row["targets"][s] = tokens[:-1], tokens[1:]
    row["segment_ids"][s], row["positions"][s] = segment, np.arange(n)
    cursor += n
  row["weights"] = (row["segment_ids"] > 0).astype(np.float32)
  return row


def segments_of(row):
  """[(sequence fed + last target, number of bidirectional positions, weights)] per segment."""
  out = []
  for start, end in rows.segment_spans(row["segment_ids"]):
    seq = rows.chunk_tokens(row, start, end)
    out.append((seq, int(row["bidirectional"][start:end].sum()), row["weights"][start:end]))
  return out


@pytest.fixture(scope="module")
def model():
  return Decoder(vocab_size=VOCAB, d_model=12, num_layers=2, num_heads=2, d_ff=22,
                 rngs=nnx.Rngs(0))


def test_registry_has_every_objective():
  for name in ("causal_lm", "masked_lm", "span_corruption", "prefix_lm", "permutation_lm",
               "bart_token_masking", "bart_token_deletion", "bart_text_infilling",
               "bart_document_rotation", "bart_denoising"):
    assert objectives.get(name).name == name


def test_special_tokens_resolve_to_the_top_of_the_vocabulary():
  ids = np.array([5, special_tokens.MASK, special_tokens.sentinel(0),
                  special_tokens.sentinel(3)], np.int32)
  np.testing.assert_array_equal(special_tokens.resolve(ids, 1000), [5, 999, 998, 995])
  assert special_tokens.describe(998, 1000) == "<extra_id_0>"
  special_tokens.check_vocab(512 + special_tokens.NUM_RESERVED, 512)
  with pytest.raises(ValueError, match="vocab_size >= 640"):
    special_tokens.check_vocab(512, 512)
  with pytest.raises(ValueError, match="outside"):
    special_tokens.sentinel(special_tokens.NUM_SENTINELS)


def test_masked_lm_picks_15_percent_with_80_10_10():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 500, 1000).astype(np.int32)
  valid = np.ones(1000, bool)
  valid[-13:] = False
  corrupted, picked = masked_lm.mask_tokens(tokens, valid, rng, vocab_size=500)
  assert picked.sum() == round(0.15 * 987) and not picked[-13:].any()
  np.testing.assert_array_equal(corrupted[~picked], tokens[~picked])
  masked = corrupted[picked] == special_tokens.MASK
  changed = (corrupted[picked] != tokens[picked]) & ~masked
  assert masked.sum() == round(0.8 * picked.sum())
  assert abs(changed.sum() - 0.1 * picked.sum()) <= 3  # a random token may equal the original


def test_masked_lm_row_is_bidirectional_and_keeps_the_original():
  row = make_row([30, 9], 47, np.random.default_rng(1))
  out = masked_lm.prepare(row, np.random.default_rng(2))
  np.testing.assert_array_equal(out["targets"], row["inputs"])
  np.testing.assert_array_equal(out["bidirectional"], row["segment_ids"] > 0)
  assert out["weights"].sum() == round(0.15 * 39)


def test_masked_lm_masks_anew_every_epoch(pydoc_data_dir):
  from metalm_jax.data import datasets, pipeline, tokenizers
  tok = tokenizers.get_tokenizer("sentencepiece", data_dir=pydoc_data_dir, vocab_size=512)
  source = datasets.data_source("pydoc_topics", "validation", pydoc_data_dir)
  ds = pipeline.lm_dataset(source, tok, seq_len=64, batch_size=1, seed=0, shuffle=False,
                           num_epochs=2, prepare=masked_lm.prepare)
  by_row = collections.defaultdict(list)
  for batch in ds:
    by_row[batch["targets"][0].tobytes()].append(batch["inputs"][0])
  repeated = [v for v in by_row.values() if len(v) == 2]
  assert len(repeated) > 10
  differ = [not np.array_equal(a, b) for a, b in repeated]
  assert np.mean(differ) > 0.9


def test_span_corruption_source_and_target_rebuild_the_original():
  rng = np.random.default_rng(3)
  for trial in range(20):
    row = make_row(rng.integers(2, 60, 3).tolist(), 200, rng)
    out = span_corruption.prepare(row, np.random.default_rng(trial))
    originals = [rows.chunk_tokens(row, s, e) for s, e in rows.segment_spans(row["segment_ids"])]
    for original, (seq, num_source, weights) in zip(originals, segments_of(out)):
      source, target = seq[:num_source], seq[num_source:]
      rebuilt = span_corruption.reconstruct(source, target)
      m = span_corruption.fitting_length(len(original) - 1, 0.15, 3.0)
      np.testing.assert_array_equal(rebuilt, original[:m])
      num_noise, num_spans = span_corruption.num_noise_and_spans(m, 0.15, 3.0)
      sentinels = source[special_tokens.is_sentinel(source)]
      np.testing.assert_array_equal(sentinels, special_tokens.sentinel(np.arange(num_spans)))
      assert len(target) == num_noise + num_spans
      # the loss covers exactly the target tokens (predicted from the previous position)
      np.testing.assert_array_equal(np.flatnonzero(weights), np.arange(num_source - 1,
                                                                       len(seq) - 1))


def test_span_corruption_noise_density_and_mean_span_length():
  rng = np.random.default_rng(4)
  masks = [span_corruption.random_spans_noise_mask(500, rng) for _ in range(20)]
  noise = np.concatenate(masks)
  starts = sum(int((m & ~np.concatenate([[False], m[:-1]])).sum()) for m in masks)
  assert noise.mean() == pytest.approx(0.15, abs=0.002)
  assert noise.sum() / starts == pytest.approx(3.0, abs=0.1)


def test_bart_noising_functions():
  rng = np.random.default_rng(5)
  tokens = rng.integers(10, 500, 200).astype(np.int32)
  masked = denoising.token_masking(tokens, rng)
  assert (masked == special_tokens.MASK).sum() == 60
  keep = masked != special_tokens.MASK
  np.testing.assert_array_equal(masked[keep], tokens[keep])
  deleted = denoising.token_deletion(tokens, rng)
  assert len(deleted) == 140 and _is_subsequence(deleted, tokens)
  spans = denoising.infilling_spans(200, rng)
  assert sum(n for _, n in spans) == 60
  infilled = denoising.text_infilling(tokens, np.random.default_rng(6))
  assert (infilled == special_tokens.MASK).sum() == len(
      denoising.infilling_spans(200, np.random.default_rng(6)))
  assert _is_subsequence(infilled[infilled != special_tokens.MASK], tokens)
  assert (infilled != special_tokens.MASK).sum() == 140
  rotated = denoising.document_rotation(tokens, rng)
  assert any(np.array_equal(np.roll(tokens, -k), rotated) for k in range(200))


def test_infilling_poisson_span_lengths():
  rng = np.random.default_rng(7)
  lengths = [n for _ in range(50) for _, n in denoising.infilling_spans(1000, rng)[:-1]]
  assert np.mean(lengths) == pytest.approx(3.0, abs=0.25)
  assert 0 in lengths  # 0-length spans insert a [MASK]


def test_sentence_permutation_preserves_the_multiset_of_sentences():
  rng = np.random.default_rng(8)
  tokens = rng.integers(10, 60, 300).astype(np.int32)
  tokens[-1] = 11  # the document ends a sentence
  ends = {10, 11}
  permuted = denoising.sentence_permutation(tokens, rng, sentence_end_ids=ends)
  key = lambda ss: sorted(tuple(s.tolist()) for s in ss)
  before = denoising.split_sentences(tokens, ends)
  assert len(before) > 5
  assert key(denoising.split_sentences(permuted, ends)) == key(before)
  assert not np.array_equal(permuted, tokens)
  with pytest.raises(ValueError, match="sentence_end_ids"):
    denoising.make({"sentence_permutation": 1.0})
  with pytest.raises(ValueError, match="unknown"):
    denoising.make({"token_shuffling": 1.0})


def test_bart_row_decodes_the_original_after_a_bidirectional_noised_source():
  prepare = denoising.make({"token_masking": 1, "token_deletion": 1, "text_infilling": 1,
                            "sentence_permutation": 1, "document_rotation": 1},
                           sentence_end_ids={10, 11, 12})
  rng = np.random.default_rng(9)
  for trial in range(20):
    row = make_row(rng.integers(2, 60, 3).tolist(), 200, rng)
    out = prepare(row, np.random.default_rng(trial))
    originals = [rows.chunk_tokens(row, s, e) for s, e in rows.segment_spans(row["segment_ids"])]
    for original, (seq, num_source, weights) in zip(originals, segments_of(out)):
      target = seq[num_source:]
      np.testing.assert_array_equal(target, original[:len(target)])
      assert np.flatnonzero(weights)[0] == num_source - 1 and weights[num_source - 1:].all()


def test_prefix_lm_prefix_is_bidirectional_and_never_leaks_a_target():
  row = make_row([40, 17, 3], 64, np.random.default_rng(10))
  out = prefix_lm.prepare(row, np.random.default_rng(11))
  mask = np.asarray(prefix_lm.prefix_attention_mask(jnp.asarray(out["bidirectional"][None])))[0, 0]
  same = out["segment_ids"][:, None] == out["segment_ids"][None, :]
  for start, end in rows.segment_spans(out["segment_ids"]):
    p = int(out["bidirectional"][start:end].sum())
    assert 1 <= p <= end - start and out["bidirectional"][start:start + p].all()
    assert mask[start:start + p, start:start + p].all()  # the prefix is bidirectional
    np.testing.assert_array_equal(np.flatnonzero(out["weights"][start:end]),
                                  np.arange(p - 1, end - start))
  # a position carrying loss never attends to a later position of its document (the target)
  for i in np.flatnonzero(out["weights"]):
    assert not (mask[i] & same[i])[i + 1:].any()


def test_permutation_lm_ranks_are_valid_orderings():
  row = make_row([30, 12, 1], 48, np.random.default_rng(12))
  out = permutation_lm.prepare(row, np.random.default_rng(13))
  content, query = (np.asarray(m)[0, 0] for m in permutation_lm.permutation_masks(
      jnp.asarray(out["perm_rank"][None]), jnp.asarray(out["segment_ids"][None])))
  for start, end in rows.segment_spans(out["segment_ids"]):
    n = end - start
    rank = out["perm_rank"][start:end]
    np.testing.assert_array_equal(np.sort(rank), np.arange(n))
    order = start + np.argsort(rank)  # positions in factorisation order
    c = content[np.ix_(order, order)]
    np.testing.assert_array_equal(c, np.tril(np.ones((n, n), bool)))  # a total order
    np.testing.assert_array_equal(query[np.ix_(order, order)], np.tril(np.ones((n, n), bool), -1))
    assert not content[start:end, :start].any() and not content[start:end, end:].any()
    assert out["weights"][start:end].sum() == max(1, round(n / 6))
    assert (rank[out["weights"][start:end] > 0] >= n - max(1, round(n / 6))).all()


def test_permutation_lm_query_stream_never_sees_its_own_or_later_tokens(model):
  rng = np.random.default_rng(14)
  row = make_row([19], 19, rng)
  out = permutation_lm.prepare(row, rng)
  batch = {k: jnp.asarray(v[None]) for k, v in out.items()}
  run = lambda tokens: permutation_lm.two_stream(
      model, tokens, positions=batch["positions"], perm_rank=batch["perm_rank"],
      segment_ids=batch["segment_ids"])
  logits = run(batch["inputs"])
  rank = out["perm_rank"]
  i = int(np.argmax(rank == 10))  # a position in the middle of the order
  later_or_self = np.flatnonzero(rank >= 10)
  changed = batch["inputs"].at[0, later_or_self].set(7)
  np.testing.assert_allclose(run(changed)[0, i], logits[0, i], atol=1e-5)
  earlier = int(np.argmax(rank == 3))
  assert not np.allclose(run(batch["inputs"].at[0, earlier].set(7))[0, i], logits[0, i])


# prefix_lm and the BART objectives share masked_lm's and span_corruption's loss.
@pytest.mark.parametrize("name", ["masked_lm", "span_corruption", "permutation_lm",
                                  "causal_lm:2,masked_lm:1"])
def test_every_loss_is_finite_and_differentiable(model, name):
  objective = objectives.get(name)
  rng = np.random.default_rng(15)
  rows_ = [objective.prepare(make_row([20, 9], 31, rng), rng) for _ in range(2)]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows_])) for k in rows_[0]}
  graphdef, params = nnx.split(model)
  (value, metrics), grads = jax.value_and_grad(
      lambda p: objective.loss(nnx.merge(graphdef, p), batch), has_aux=True)(params)
  assert np.isfinite(float(value)) and float(metrics["tokens"]) > 0
  assert {"loss", "accuracy", "tokens"} <= set(metrics)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_mixture_spec_parsing_and_errors():
  assert mixture.parse("causal_lm:0.7, masked_lm:0.3") == [("causal_lm", 0.7), ("masked_lm", 0.3)]
  assert objectives.get("masked_lm,prefix_lm").name == "masked_lm,prefix_lm"
  with pytest.raises(ValueError, match="not registered"):
    objectives.get("causal_lm:0.5,maskd_lm:0.5")
  with pytest.raises(ValueError, match="not a number"):
    objectives.get("causal_lm:half")
  with pytest.raises(ValueError, match="positive"):
    objectives.get("causal_lm:0.5,masked_lm:0")
  with pytest.raises(ValueError, match="twice"):
    objectives.get("causal_lm:1,causal_lm:2")


def test_mixture_samples_rows_by_weight_and_combines_token_weighted(model):
  mixed = objectives.get("causal_lm:3,span_corruption:1")
  rng = np.random.default_rng(16)
  out = [mixed.prepare(make_row([25, 6], 33, rng), rng) for _ in range(400)]
  chosen = np.array([r["span_corruption/weights"].sum() > 0 for r in out])
  assert all((r["causal_lm/weights"].sum() > 0) != c for r, c in zip(out, chosen))
  assert chosen.mean() == pytest.approx(0.25, abs=0.07)
  batch = {k: jnp.asarray(np.stack([r[k] for r in out[:4]])) for k in out[0]}
  value, metrics = mixed.loss(model, batch)
  parts = [objectives.get(n).loss(model, {k.split("/", 1)[1]: v for k, v in batch.items()
                                          if k.startswith(n + "/")})[1]
           for n in ("causal_lm", "span_corruption")]
  expected = sum(m["loss"] * m["tokens"] for m in parts) / sum(m["tokens"] for m in parts)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["span_corruption/tokens"], parts[1]["tokens"])


def _is_subsequence(short, long) -> bool:
  it = iter(np.asarray(long).tolist())
  return all(any(x == y for y in it) for x in np.asarray(short).tolist())
