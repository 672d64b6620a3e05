"""Data layer: the pydoc_topics TFDS dataset, tokenizers, and the grain LM pipeline."""
import collections
import os
import subprocess
import sys

import grain
import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import orbax.checkpoint as ocp
from pydoc_data import topics as pydoc_topics
import pytest

from metalm_jax.data import datasets
from metalm_jax.data import pipeline
from metalm_jax.data import pydoc_corpus
from metalm_jax.data import tokenizers
from tests import grain_workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, BATCH = 37, 5
SP_VOCAB = 512  # The model that conftest's `pydoc_data_dir` trains.


@pytest.fixture(scope="session")
def data_dir(pydoc_data_dir):
  """The real pydoc_topics dataset, prepared once per session (conftest)."""
  return pydoc_data_dir


@pytest.fixture(scope="session")
def train_source(data_dir):
  return datasets.data_source("pydoc_topics", "train", data_dir)


@pytest.fixture(scope="session")
def validation_source(data_dir):
  return datasets.data_source("pydoc_topics", "validation", data_dir)


@pytest.fixture(scope="session")
def sp_tokenizer(data_dir):
  """The SentencePiece model trained on the train split and cached in data_dir."""
  return tokenizers.get_tokenizer("sentencepiece", dataset="pydoc_topics", data_dir=data_dir,
                                  vocab_size=SP_VOCAB)


def _texts(source):
  return [source[i]["text"].decode("utf-8") for i in range(len(source))]


def _segments(batch):
  """Every (inputs, targets) segment of a batch, as tuples of ints."""
  out = []
  for b in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][b]
    for s in np.unique(seg[seg > 0]):
      where = seg == s
      out.append((tuple(batch["inputs"][b][where]), tuple(batch["targets"][b][where])))
  return out


def _chunks(texts, tokenizer, seq_len):
  """The slow obvious reference: every chunk of every document, as tuples."""
  return [(tuple(c["inputs"]), tuple(c["targets"]))
          for t in texts for c in pipeline.document_chunks(t, tokenizer, seq_len)]


def _assert_equal_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------- dataset

def test_splits_are_nonempty_disjoint_and_cover_every_topic(data_dir):
  topics = {}
  for split in pydoc_corpus.SPLITS:
    source = datasets.data_source("pydoc_topics", split, data_dir)
    topics[split] = [source[i]["topic"].decode() for i in range(len(source))]
    assert topics[split] and all(pydoc_corpus.split_of(t) == split for t in topics[split])
    assert source[0]["text"].decode() == pydoc_topics.topics[topics[split][0]]
  assert not set(topics["train"]) & set(topics["validation"])
  assert sorted(topics["train"] + topics["validation"]) == sorted(pydoc_topics.topics)
  assert 0.05 < len(topics["validation"]) / len(pydoc_topics.topics) < 0.2


def test_prepare_is_idempotent_and_array_record(data_dir):
  builder = datasets.prepare("pydoc_topics", data_dir)
  assert builder.name == "pydoc_topics" and str(builder.version) == "1.0.0"
  assert builder.info.file_format.value == "array_record"


def test_not_prepared_error_names_the_command(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError) as e:
    datasets.data_source("pydoc_topics", "train", str(tmp_path))
  assert isinstance(e.value, FileNotFoundError)
  assert (f"python experiments/prepare_data.py --dataset=pydoc_topics --data_dir={tmp_path}"
          in str(e.value))


def test_bad_dataset_split_and_empty_split_errors(data_dir):
  with pytest.raises(ValueError, match=r"known datasets: \[.*'pydoc_topics'"):
    datasets.data_source("pydoc", "train", data_dir)
  with pytest.raises(ValueError, match="splits: \\['train', 'validation'\\]"):
    datasets.data_source("pydoc_topics", "test", data_dir)
  with pytest.raises(ValueError, match="has no examples"):
    datasets.data_source("pydoc_topics", "train[:0]", data_dir)
  assert len(datasets.data_source("pydoc_topics", "train[:50%]+validation", data_dir)) > 10


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("METALM_DATA_DIR", "/some/dir")
  assert datasets.default_data_dir() == "/some/dir"
  monkeypatch.delenv("METALM_DATA_DIR")
  assert datasets.default_data_dir() == os.path.expanduser("~/.cache/metalm_jax/data")


def test_prepare_data_cli(data_dir):
  """Reuses the session's prepared data; prints the split sizes."""
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "prepare_data.py"),
       f"--data_dir={data_dir}"], capture_output=True, text=True, check=True).stdout
  assert "train: " in out and "validation: " in out


# ---------------------------------------------------------------- tokenizers

@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(st.text())
def test_byte_tokenizer_round_trip(text):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
  assert ids.min(initial=3) >= 3 and ids.max(initial=3) < tok.vocab_size == 259
  assert tok.decode(ids) == text


def test_decode_stops_at_eos_and_drops_pad_bos(sp_tokenizer):
  for tok in (tokenizers.ByteTokenizer(), sp_tokenizer):
    ids = tok.encode("naïve → x")
    row = np.concatenate([[tok.bos_id], ids, [tok.eos_id], tok.encode("after"), [0, 0]])
    assert tok.decode(row) == "naïve → x"
    with pytest.raises(ValueError, match="outside"):
      tok.decode([tok.vocab_size + 3])


def test_sentencepiece_is_cached_lossless_and_deterministic(data_dir, sp_tokenizer, tmp_path):
  path = tokenizers.sentencepiece_model_path(data_dir, "pydoc_topics", SP_VOCAB)
  assert sp_tokenizer.model_path == path and sp_tokenizer.vocab_size == SP_VOCAB
  assert (sp_tokenizer.pad_id, sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (0, 1, 2)
  mtime = os.path.getmtime(path)
  again = tokenizers.get_tokenizer("sentencepiece", data_dir=data_dir, vocab_size=SP_VOCAB)
  assert os.path.getmtime(path) == mtime  # Loaded, not retrained.
  held_out = _texts(datasets.data_source("pydoc_topics", "validation", data_dir))
  for text in held_out + ["tab\there,  two spaces\n\nnew paragraph ☃ 日本"]:
    ids = again.encode(text)
    assert ids.dtype == np.int32 and again.decode(ids) == text
  assert sum(len(sp_tokenizer.encode(t)) for t in held_out) < 0.6 * sum(map(len, held_out))
  # Same texts -> byte-identical models (concurrent trainers write the same file).
  paths = [str(tmp_path / name) for name in ("a.model", "b.model")]
  for p in paths:
    tokenizers.train_sentencepiece(held_out, p, vocab_size=431)
  with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
    assert a.read() == b.read()
  assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]  # Temporary files renamed.


def test_corrupt_sentencepiece_model_says_delete_it(data_dir, tmp_path):
  os.makedirs(tmp_path / "tokenizers")
  path = tokenizers.sentencepiece_model_path(str(tmp_path), "pydoc_topics", 512)
  for content in (b"not a model", b""):
    with open(path, "wb") as f:
      f.write(content)
    with pytest.raises(ValueError, match="delete the file") as e:
      tokenizers.get_tokenizer("sentencepiece", data_dir=str(tmp_path), vocab_size=512)
    assert path in str(e.value)


def test_unknown_tokenizer_kind():
  with pytest.raises(ValueError, match="kinds: \\['byte', 'sentencepiece'\\]"):
    tokenizers.get_tokenizer("wordpiece")


# ---------------------------------------------------------------- pipeline

def test_document_chunks_keep_every_next_token_pair_once():
  tok = tokenizers.ByteTokenizer()
  for text in ("", "a", "x" * (SEQ_LEN - 1), "y" * SEQ_LEN, "z" * (3 * SEQ_LEN + 2)):
    tokens = np.concatenate([[1], tok.encode(text), [2]])
    chunks = pipeline.document_chunks(text.encode(), tok, SEQ_LEN)
    assert all(1 <= len(c["inputs"]) == len(c["targets"]) <= SEQ_LEN for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c["inputs"] for c in chunks]), tokens[:-1])
    np.testing.assert_array_equal(np.concatenate([c["targets"] for c in chunks]), tokens[1:])


def test_packed_batches_invariants(validation_source, sp_tokenizer):
  ds = pipeline.lm_dataset(validation_source, sp_tokenizer, seq_len=SEQ_LEN, batch_size=BATCH,
                           seed=3, num_epochs=1)
  batches = list(ds)
  chunks = collections.Counter(_chunks(_texts(validation_source), sp_tokenizer, SEQ_LEN))
  seen = collections.Counter()
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((BATCH, SEQ_LEN), np.dtype(d)) for k, d in pipeline.FEATURES.items()}
    seg, pos, inp, tgt = (batch[k] for k in ("segment_ids", "positions", "inputs", "targets"))
    np.testing.assert_array_equal(batch["weights"], (seg > 0).astype(np.float32))
    assert np.all(inp[seg == 0] == 0) and np.all(tgt[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    np.testing.assert_array_equal(tgt[:, :-1][same], inp[:, 1:][same])  # next token
    np.testing.assert_array_equal(pos[:, 1:][same], pos[:, :-1][same] + 1)
    assert np.all(pos[:, 1:][~same] == 0)  # positions restart at each segment
    for row in seg:  # segments 1, 2, ... in order, padding only at the end
      starts = row[np.r_[True, row[1:] != row[:-1]]]
      nonpad = starts[starts > 0]
      np.testing.assert_array_equal(nonpad, np.arange(1, len(nonpad) + 1))
      assert np.all(np.diff((row == 0).astype(int)) >= 0)
    seen.update(_segments(batch))
  # Each segment is one whole chunk of one document, none twice (one epoch, some dropped).
  assert not seen - chunks
  assert sum(seen.values()) > 0.9 * sum(chunks.values())
  assert np.mean([b["weights"].mean() for b in batches]) > 0.9  # packing fills rows
  assert any(b["segment_ids"].max() > 1 for b in batches)  # several documents per row


def test_document_order_is_new_every_epoch_and_seeded(train_source):
  n = len(train_source)
  def topics(**kw):
    docs = pipeline.process_documents(train_source, num_epochs=2, **kw)
    return [docs[i]["topic"] for i in range(2 * n)]
  order = topics(seed=0, shuffle=True)
  assert sorted(order[:n]) == sorted(order[n:]) and order[:n] != order[n:]
  assert order == topics(seed=0, shuffle=True) and order != topics(seed=1, shuffle=True)
  unshuffled = topics()
  assert unshuffled[:n] == unshuffled[n:] == [train_source[i]["topic"] for i in range(n)]


def test_batches_are_deterministic_per_seed(train_source):
  tok = tokenizers.ByteTokenizer()
  def first(seed):
    it = iter(pipeline.lm_dataset(train_source, tok, seq_len=SEQ_LEN, batch_size=BATCH,
                                  seed=seed))
    return [next(it) for _ in range(3)]
  a = first(0)
  _assert_equal_batches(a, first(0))
  assert not np.array_equal(a[0]["inputs"], first(1)[0]["inputs"])


def test_iterator_state_resumes_exactly(train_source, sp_tokenizer):
  ds = pipeline.lm_dataset(train_source, sp_tokenizer, seq_len=SEQ_LEN, batch_size=BATCH,
                           seed=7)
  it = iter(ds)
  for _ in range(23):  # Deep enough to cross epochs and packing groups.
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(ds)
  resumed.set_state(state)
  _assert_equal_batches([next(resumed) for _ in range(4)], expected)


def test_iterator_state_round_trips_through_orbax(validation_source, tmp_path):
  """How the trainer stores the data position: grain's orbax handler, beside the model."""
  ds = pipeline.lm_dataset(validation_source, tokenizers.ByteTokenizer(), seq_len=SEQ_LEN,
                           batch_size=BATCH, seed=2)
  it = iter(ds)
  for _ in range(11):
    next(it)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.restore(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_equal_batches([next(resumed) for _ in range(3)], expected)


def test_process_shards_are_disjoint_and_complete(validation_source, sp_tokenizer):
  source, tok, kw = validation_source, sp_tokenizer, dict(seq_len=SEQ_LEN, batch_size=BATCH)
  texts = _texts(source)
  per_process = []
  for p in range(2):
    docs = pipeline.process_documents(source, process_index=p, process_count=2)
    assert [docs[i]["topic"] for i in range(len(docs))] == [
        source[i]["topic"] for i in range(p, len(source), 2)]
    own_chunks = collections.Counter(_chunks(texts[p::2], tok, SEQ_LEN))
    evaluated = collections.Counter()
    for batch in pipeline.eval_batches(source, tok, process_index=p, process_count=2, **kw):
      evaluated.update(_segments(batch))
    assert evaluated == own_chunks
    trained = collections.Counter()
    for batch in pipeline.lm_dataset(source, tok, seed=5, num_epochs=1, process_index=p,
                                     process_count=2, **kw):
      trained.update(_segments(batch))
    assert trained and not trained - own_chunks
    per_process.append(evaluated)
  assert per_process[0] + per_process[1] == collections.Counter(_chunks(texts, tok, SEQ_LEN))
  with pytest.raises(ValueError, match="process_index=2"):
    pipeline.process_documents(source, process_index=2, process_count=2)


def test_eval_batches_pad_to_static_shapes_and_equal_counts(validation_source, sp_tokenizer):
  source = validation_source
  kw = dict(seq_len=SEQ_LEN, batch_size=BATCH)
  single = list(pipeline.eval_batches(source, sp_tokenizer, **kw))
  _assert_equal_batches(single, list(pipeline.eval_batches(source, sp_tokenizer, **kw)))
  assert all(b["inputs"].shape == (BATCH, SEQ_LEN) for b in single)
  assert single[-1]["weights"].sum() < BATCH * SEQ_LEN  # padded tail
  assert sum(b["weights"].sum() for b in single) == sum(
      len(c[0]) for c in _chunks(_texts(source), sp_tokenizer, SEQ_LEN))
  count = pipeline.count_eval_batches(source, sp_tokenizer, process_count=3, **kw)
  for p in range(3):
    batches = list(pipeline.eval_batches(source, sp_tokenizer, process_index=p,
                                         process_count=3, **kw))
    assert len(batches) == count
  with pytest.raises(ValueError, match="num_batches=1 is too small"):
    list(pipeline.eval_batches(source, sp_tokenizer, num_batches=1, **kw))


def test_make_global_batch_on_8_devices(devices8, train_source):
  mesh = jax.sharding.Mesh(np.array(devices8), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = next(iter(pipeline.lm_dataset(train_source, tokenizers.ByteTokenizer(),
                                        seq_len=SEQ_LEN, batch_size=8, seed=0)))
  global_batch = pipeline.make_global_batch(batch, sharding)
  for k, v in global_batch.items():
    assert v.shape == (8, SEQ_LEN) and v.dtype == batch[k].dtype and v.sharding == sharding
    assert {s.data.shape for s in v.addressable_shards} == {(1, SEQ_LEN)}
    np.testing.assert_array_equal(np.asarray(v), batch[k])


@pytest.mark.slow
def test_worker_processes_resume_exactly(data_dir, tmp_path):
  """grain workers need absl flags parsed and an importable builder: run as a script."""
  grain_workers.assert_workers_resume(
      tmp_path, "from metalm_jax.data import datasets, pipeline, tokenizers",
      f"""pipeline.lm_dataset(
      datasets.data_source("pydoc_topics", "train", {data_dir!r}),
      tokenizers.get_tokenizer("sentencepiece", data_dir={data_dir!r}, vocab_size={SP_VOCAB}),
      seq_len=16, batch_size=4, seed=1, worker_count=2)""", skip=5, take=3)
