"""Hugging Face text models and tokenizers: BERT / RoBERTa / XLM-R -> TextEncoder parity with
transformers (tiny random models, no download), and the 'hf:<dir>' tokenizer kind on tiny
tokenizers built here with the `tokenizers` library."""
import json
import os
import pickle

import numpy as np
import pytest

from tests.hf_dirs import reference_packages  # noqa: E402

torch, transformers = reference_packages()
hf_tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers==0.23.3")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from metalm_jax.data import datasets  # noqa: E402
from metalm_jax.data import pipeline  # noqa: E402
from metalm_jax.data import tokenizers  # noqa: E402
from metalm_jax.data import vl_pipeline  # noqa: E402
from metalm_jax.models import hf  # noqa: E402
from metalm_jax.models import hf_import  # noqa: E402
from metalm_jax.models.hf import bert  # noqa: E402
from metalm_jax.models.text_encoder import TextEncoder  # noqa: E402

VOCAB, LENGTH = 61, 11
TINY = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=24, layer_norm_eps=1e-7)


def _save(tmp_path, model_cls, config_cls, **config):
  torch.manual_seed(0)
  model = model_cls(config_cls(**TINY, **config)).eval()
  model.save_pretrained(tmp_path, safe_serialization=True)
  return str(tmp_path)


def _batch(pad_id):
  """ids [2, LENGTH] (no real token is pad_id) with row 1 right-padded after 6 tokens."""
  rng = np.random.default_rng(0)
  ids = rng.integers(pad_id + 1, VOCAB, (2, LENGTH))
  mask = (np.arange(LENGTH)[None] < np.array([[LENGTH], [6]])).astype(np.int64)
  return np.where(mask == 1, ids, pad_id), mask


def _reference(path, ids, mask):
  model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def _worst(ours, reference, mask):
  real = mask.astype(bool)
  return max(float(np.abs(np.asarray(a) - b)[real].max()) for a, b in zip(ours, reference))


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
def test_encoder_hidden_states_match_transformers(tmp_path, kind):
  """Every hidden state at the real positions, padding in row 1, within 1e-4."""
  if kind == "bert":
    path = _save(tmp_path, transformers.BertModel, transformers.BertConfig,
                 max_position_embeddings=LENGTH + 2)
  else:
    model_cls, config_cls = {
        "roberta": (transformers.RobertaModel, transformers.RobertaConfig),
        "xlm-roberta": (transformers.XLMRobertaModel, transformers.XLMRobertaConfig)}[kind]
    path = _save(tmp_path, model_cls, config_cls, max_position_embeddings=LENGTH + 2,
                 type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
  kwargs = hf.module_kwargs(path)
  assert kwargs["position_offset"] == (0 if kind == "bert" else 2)
  encoder = hf.load(path)
  assert isinstance(encoder, TextEncoder)
  ids, mask = _batch(kwargs["pad_id"])
  hidden, out = encoder(jnp.asarray(ids))  # valid = ids != pad_id
  reference = _reference(path, ids, mask)
  assert len(out["hidden_states"]) == len(reference) == 3
  assert _worst(out["hidden_states"], reference, mask) <= 1e-4
  assert _worst([hidden], reference[-1:], mask) <= 1e-4


def test_masked_lm_checkpoint_prefix_and_first_layers(tmp_path):
  """A RobertaForMaskedLM ('roberta.' prefix, lm_head ignored), importing 1 layer of 2."""
  path = _save(tmp_path, transformers.RobertaForMaskedLM, transformers.RobertaConfig,
               max_position_embeddings=LENGTH + 2, type_vocab_size=1, pad_token_id=1)
  encoder = hf.load(path, num_layers=1)
  ids, mask = _batch(1)
  _, out = encoder(jnp.asarray(ids))
  reference = _reference(path, ids, mask)
  assert _worst(out["hidden_states"], reference[:2], mask) <= 1e-4


def test_roberta_length_limit_counts_the_offset(tmp_path):
  path = _save(tmp_path, transformers.RobertaModel, transformers.RobertaConfig,
               max_position_embeddings=LENGTH + 2, type_vocab_size=1, pad_token_id=1)
  encoder = hf.load(path)
  encoder(jnp.full((1, LENGTH), 5))
  with pytest.raises(ValueError, match="max_len=13 - position_offset=2"):
    encoder(jnp.full((1, LENGTH + 1), 5))


def test_facade_reads_roberta_and_checks_the_offset(tmp_path):
  path = _save(tmp_path, transformers.RobertaModel, transformers.RobertaConfig,
               max_position_embeddings=LENGTH + 2, type_vocab_size=1, pad_token_id=1)
  kwargs = hf_import.encoder_kwargs(path)
  encoder = hf_import.load_into(TextEncoder(**kwargs, rngs=nnx.Rngs(0)), path)
  ids, mask = _batch(1)
  _, out = encoder(jnp.asarray(ids))
  assert _worst(out["hidden_states"], _reference(path, ids, mask), mask) <= 1e-4
  with pytest.raises(ValueError, match="position"):
    hf_import.load_into(TextEncoder(**dict(kwargs, position_offset=0), rngs=nnx.Rngs(0)), path)


def test_default_offset_keeps_positions_and_parameters():
  kw = dict(vocab_size=11, d_model=8, num_layers=1, num_heads=2, d_ff=8, max_len=6)
  plain, shifted = (TextEncoder(**kw, **extra, rngs=nnx.Rngs(0))
                    for extra in ({}, {"position_offset": 2}))
  shape = lambda m: nnx.state(m, nnx.Param).to_pure_dict()  # noqa: E731
  assert str(jax_shapes(shape(plain))) == str(jax_shapes(shape(shifted)))
  tokens = jnp.asarray([[1, 2, 3, 4]])
  # Shifting the table by the offset gives back the unshifted encoder.
  table = plain.position_embeddings.embedding[...]
  shifted.position_embeddings.embedding[...] = jnp.roll(table, 2, axis=0)
  np.testing.assert_allclose(np.asarray(plain(tokens)[0]), np.asarray(shifted(tokens)[0]),
                             atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="position_offset=6"):
    TextEncoder(**kw, position_offset=6, rngs=nnx.Rngs(0))


def jax_shapes(tree):
  return {k: jax_shapes(v) if isinstance(v, dict) else tuple(v.shape) for k, v in tree.items()}


@pytest.mark.parametrize("key, value", [("hidden_act", "gelu_new"),
                                        ("position_embedding_type", "relative_key"),
                                        ("is_decoder", True), ("model_type", "electra")])
def test_unsupported_settings_name_key_and_value(key, value):
  config = dict(model_type="bert", hidden_size=16, num_attention_heads=4, num_hidden_layers=2,
                intermediate_size=24, vocab_size=VOCAB, max_position_embeddings=16)
  config[key] = value
  with pytest.raises(hf.HFImportError, match=f"{key}={value!r}"):
    bert.module_kwargs(config)


# ---------------------------------------------------------------- tokenizers

WORDS = ["the", "quick", "brown", "fox", "jump", "##s", "over", "lazy", "dog", ".", ",",
         "hello", "world", "!"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece_dir(path, *, with_config=True):
  """A tiny lower-casing BERT WordPiece tokenizer saved with padding + truncation on."""
  models, normalizers, pre_tokenizers, decoders = (
      hf_tokenizers.models, hf_tokenizers.normalizers, hf_tokenizers.pre_tokenizers,
      hf_tokenizers.decoders)
  vocab = {w: i for i, w in enumerate(WORDPIECE_SPECIALS + WORDS)}
  tok = hf_tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.add_special_tokens(WORDPIECE_SPECIALS)
  tok.enable_padding(pad_id=0, pad_token="[PAD]", length=16)
  tok.enable_truncation(max_length=4)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  if with_config:
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump({"do_lower_case": True, "pad_token": "[PAD]", "unk_token": "[UNK]",
                 "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": {"content": "[MASK]", "__type": "AddedToken"}}, f)
  return str(path)


def _byte_bpe_dir(path):
  """A tiny GPT-2-style byte-level BPE: <|endoftext|> is bos = eos; config.json vocab larger."""
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 3, trainer)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": None}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "gpt2", "vocab_size": 320, "bos_token_id": 0, "eos_token_id": 0}, f)
  return str(path)


def test_wordpiece_specials_round_trip_and_no_fixed_padding(tmp_path):
  tok = tokenizers.get_tokenizer("hf:" + _wordpiece_dir(tmp_path))
  assert isinstance(tok, tokenizers.HFTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)  # [PAD], [CLS], [SEP]
  assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id) == (2, 3, 4, 1)
  assert tok.vocab_size == len(WORDPIECE_SPECIALS) + len(WORDS) and tok.model_vocab_size is None
  text = "the quick brown fox jumps over the lazy dog."
  ids = tok.encode("The quick brown fox jumps over the lazy dog.")
  assert ids.dtype == np.int32 and len(ids) == 11  # no [CLS]/[SEP], no padding, no truncation
  assert tok.decode(ids) == text
  assert tok.decode(np.r_[tok.bos_id, ids, tok.eos_id, 0, 0, 9]) == text
  assert tok.decode(np.r_[tok.bos_id, tok.encode("Hello"), tok.mask_id]) == "hello [MASK]"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([5, 99])


def test_wordpiece_without_config_files_uses_the_well_known_names(tmp_path):
  tok = tokenizers.HFTokenizer(_wordpiece_dir(tmp_path, with_config=False))
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 2, 3, 4)


def test_byte_level_bpe_bos_equals_eos_and_pickles(tmp_path):
  tok = tokenizers.get_tokenizer("hf:" + _byte_bpe_dir(tmp_path))
  assert tok.bos_id == tok.eos_id == tok.pad_id == 0
  assert tok.cls_id is None and tok.sep_id is None and tok.mask_id is None
  assert tok.model_vocab_size == 320 and tok.vocab_size < 320
  text = "Hello, wörld! 🙂\n  the lazy fox"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  # A leading BOS (= EOS) does not end the text; the next EOS does.
  assert tok.decode(np.r_[tok.bos_id, ids, tok.eos_id, tok.eos_id, 5]) == text
  assert tok.decode([tok.bos_id, tok.eos_id]) == ""
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(again.encode(text), ids)
  assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size,
          again.model_vocab_size) == (0, 0, 0, tok.vocab_size, 320)


def test_hf_kind_errors_and_vl_tokenizer(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    tokenizers.get_tokenizer(f"hf:{tmp_path}/missing")
  (tmp_path / "vocab.txt").write_text("[PAD]\n")
  with pytest.raises(ValueError, match="tokenizer.json not found.*save_pretrained"):
    tokenizers.get_tokenizer(f"hf:{tmp_path}")
  with pytest.raises(ValueError, match="names no directory"):
    tokenizers.get_tokenizer("hf:")
  with pytest.raises(ValueError, match="hf:<dir>"):
    tokenizers.get_tokenizer("wordpiece")
  path = _wordpiece_dir(tmp_path / "wp")
  assert isinstance(vl_pipeline.get_vl_tokenizer("hf:" + path), tokenizers.HFTokenizer)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "</s>"}, f)
  with pytest.raises(ValueError, match="eos_token='</s>'"):
    tokenizers.HFTokenizer(path)


def test_lm_pipeline_batches_with_an_hf_tokenizer(tmp_path, pydoc_data_dir):
  """Packed LM batches on the bundled pydoc_topics data, documents framed by BOS ... EOS."""
  tok = tokenizers.get_tokenizer("hf:" + _byte_bpe_dir(tmp_path))
  source = datasets.data_source("pydoc_topics", "validation[:8]", pydoc_data_dir)
  batch = next(iter(pipeline.lm_dataset(source, tok, seq_len=32, batch_size=2, seed=0,
                                        num_epochs=1)))
  assert {k: v.shape for k, v in batch.items()} == {k: (2, 32) for k in pipeline.FEATURES}
  seg, inp = batch["segment_ids"], batch["inputs"]
  starts = (batch["positions"] == 0) & (seg > 0)
  assert starts.any() and np.all(inp[seg > 0] < tok.vocab_size)
  text = source[0]["text"].decode("utf-8")
  assert tok.decode(np.r_[tok.bos_id, tok.encode(text), tok.eos_id]) == text


def test_lm_family_reads_an_hf_tokenizer_kind(tmp_path, pydoc_data_dir):
  """config.data.tokenizer = 'hf:<dir>' through the lm family (tokenizer, vocab check, batches)."""
  from metalm_jax import families
  from tests.conftest import tiny_config

  path = _byte_bpe_dir(tmp_path)
  family = families.build(tiny_config(pydoc_data_dir, **{"data.tokenizer": "hf:" + path}))
  assert isinstance(family.tokenizer, tokenizers.HFTokenizer) and family.tokenizer.path == path
  family.check_model(None)
  batch = next(iter(family.train_dataset(batch_size=2, process_index=0, process_count=1)))
  assert batch["inputs"].shape == (2, family.config.data.seq_len)
  missing = families.build(tiny_config(pydoc_data_dir,
                                       **{"data.tokenizer": f"hf:{tmp_path}/missing"}))
  with pytest.raises(ValueError, match="missing.*does not exist"):
    missing.tokenizer  # noqa: B018
