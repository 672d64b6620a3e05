"""GPT-2 / LLaMA / Mistral / Qwen2 checkpoints <-> our Decoder: logits match transformers.

Tiny random transformers models (every parameter drawn N(0, 0.2), so biases and norm scales
are exercised too) are saved with `save_pretrained`, imported with `hf.load` and compared on
a batch; the export writes our Decoder back and transformers opens it. Nothing downloads.
"""
import json
import os

import numpy as np
import pytest

from tests.hf_dirs import reference_packages  # noqa: E402

torch, transformers = reference_packages()
pytest.importorskip("safetensors", reason="pip install safetensors==0.8.0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from metalm_jax.models import hf  # noqa: E402
from metalm_jax.models.decoder import Decoder, stack_layer_params  # noqa: E402
from metalm_jax.models.hf import decoders  # noqa: E402

ATOL = 1e-4
VOCAB, LENGTH = 61, 11
LLAMA_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
        bos_token_id=0, eos_token_id=0),
    "llama_untied": lambda: transformers.LlamaConfig(**LLAMA_SHAPE, rms_norm_eps=1e-5),
    "llama_tied_bias": lambda: transformers.LlamaConfig(
        **LLAMA_SHAPE, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        head_dim=12),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_SHAPE, rope_theta=1e6),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_SHAPE, sliding_window=None,
                                                  rope_theta=5e5),
}


def _randomize(model, seed=0):
  """Every parameter N(0, 0.2): zero biases / unit norm scales would hide mapping errors."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
  return model


def _save(config, path):
  model = _randomize(transformers.AutoModelForCausalLM.from_config(config).eval())
  model.save_pretrained(path, safe_serialization=True)
  return model


def _tokens(seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (2, LENGTH))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_matches_transformers(name, tmp_path):
  reference = _save(CONFIGS[name](), tmp_path)
  tokens = _tokens()
  decoder = hf.load(str(tmp_path))
  logits, _ = decoder(jnp.asarray(tokens))
  expected = _hf_logits(reference, tokens)
  assert np.abs(expected).max() > 0.5  # not a trivially small comparison
  assert _max_diff(logits, expected) <= ATOL


def test_import_kwargs_carry_the_layout(tmp_path):
  transformers.Qwen2Config(**LLAMA_SHAPE, rope_theta=1e6).save_pretrained(tmp_path)
  kwargs = hf.module_kwargs(str(tmp_path))
  assert kwargs["attention_bias"] == "qkv" and kwargs["rope_theta"] == 1e6
  assert kwargs["num_kv_heads"] == 2 and kwargs["head_dim"] == 8
  assert kwargs["scale_tied_logits"] is False


def test_kv_cache_decode_equals_full_forward(tmp_path):
  """Imported LLaMA (GQA): an 8-token prefill then 3 single steps give the full logits."""
  _save(CONFIGS["llama_untied"](), tmp_path)
  decoder = hf.load(str(tmp_path))
  tokens = jnp.asarray(_tokens(1))
  full, _ = decoder(tokens)
  cache = decoder.init_cache(2, 16)
  steps, cache = decoder.decode(tokens[:, :8], cache)
  for t in range(8, LENGTH):
    step, cache = decoder.decode(tokens[:, t:t + 1], cache)
    steps = jnp.concatenate([steps, step], axis=1)
  assert _max_diff(steps, full) <= ATOL


def test_import_scanned_and_fewer_layers(tmp_path):
  """Imported params stack into scan_layers; num_layers=1 keeps the first layer only."""
  _save(CONFIGS["qwen2"](), tmp_path)
  path, tokens = str(tmp_path), jnp.asarray(_tokens())
  unrolled, _ = hf.load(path)(tokens)
  kwargs = dict(hf.module_kwargs(path), scan_layers=True)
  scanned = nnx.eval_shape(lambda: Decoder(**kwargs, rngs=nnx.Rngs(0)))
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray,
                                               stack_layer_params(hf.import_params(path))))
  nnx.update(scanned, state)
  assert _max_diff(scanned(tokens)[0], unrolled) <= ATOL
  assert len(hf.load(path, num_layers=1).blocks) == 1


def _our_decoder(kwargs, seed=0):
  """A Decoder whose every parameter (biases, norms too) is random."""
  decoder = Decoder(**kwargs, rngs=nnx.Rngs(seed))
  state = nnx.state(decoder, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(decoder, jax.tree.unflatten(treedef, leaves))
  return decoder


EXPORTS = {
    "llama": dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  d_ff=40, rope_theta=5e5, norm_epsilon=1e-5, max_len=64),
    "llama_scanned": dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, d_ff=40,
                          head_dim=12, tie_embeddings=True, scale_tied_logits=False,
                          scan_layers=True, max_len=64),
    "qwen2": dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1,
                  d_ff=40, attention_bias="qkv", rope_theta=1e6, max_len=64),
    "gpt2": dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, d_ff=48,
                 norm="layernorm", position="learned", mlp_activation="gelu",
                 attention_bias="all", mlp_bias=True, tie_embeddings=True,
                 scale_tied_logits=False, norm_epsilon=1e-5, max_len=64),
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_round_trip(name, tmp_path):
  kwargs = EXPORTS[name]
  decoder = _our_decoder(kwargs)
  tokens = _tokens(2)
  ours, _ = decoder(jnp.asarray(tokens))
  out = decoders.export(decoder, kwargs, str(tmp_path / "export"))
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert json.load(open(os.path.join(out, "config.json")))["model_type"] == name.split("_")[0]
  model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
  assert _max_diff(ours, _hf_logits(model, tokens)) <= ATOL
  again, _ = hf.load(out)(jnp.asarray(tokens))  # and back in
  assert _max_diff(again, ours) <= ATOL


def test_export_pure_params_and_zero_biases(tmp_path):
  """Pure params + kwargs export too; GPT-2 biases our layers lack are written as zeros."""
  kwargs = dict(EXPORTS["gpt2"], attention_bias="none", mlp_bias=False,
                tie_embeddings=False)
  decoder = _our_decoder(kwargs, seed=3)
  tokens = _tokens(3)
  params = nnx.state(decoder, nnx.Param).to_pure_dict()
  out = decoders.export(params, kwargs, str(tmp_path / "gpt2"))
  model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
  assert _max_diff(decoder(jnp.asarray(tokens))[0], _hf_logits(model, tokens)) <= ATOL
  with pytest.raises(FileExistsError, match="overwrite=True"):
    decoders.export(params, kwargs, out)
  decoders.export(params, kwargs, out, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["gpt2"]  # no temporary directories left


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
])
def test_unsupported_rope_scaling_is_named(rope, tmp_path):
  config = dict(LLAMA_SHAPE, model_type="llama", **rope)
  (tmp_path / "config.json").write_text(json.dumps(config))
  key = next(iter(rope))
  with pytest.raises(hf.HFImportError, match=f"{key}=.*not supported.*default"):
    hf.load(str(tmp_path))


def test_mistral_sliding_window_is_refused(tmp_path):
  transformers.MistralConfig(**LLAMA_SHAPE, sliding_window=16).save_pretrained(tmp_path)
  with pytest.raises(hf.HFImportError, match="sliding_window=16.*max_position_embeddings=64"):
    hf.module_kwargs(str(tmp_path))


def test_unexpected_tensors_are_an_error(tmp_path):
  """Weights with biases the config does not announce are not silently dropped."""
  _save(CONFIGS["qwen2"](), tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
  with pytest.raises(hf.HFImportError, match="not mapped.*q_proj.bias"):
    hf.import_params(str(tmp_path))


@pytest.mark.parametrize("change, option", [
    (dict(tie_embeddings=True), "scale_tied_logits=True"),
    (dict(position="sinusoidal"), "position='sinusoidal'"),
    (dict(norm="layernorm"), r"\(norm, position, mlp_activation\)"),
])
def test_unexportable_option_is_named(change, option, tmp_path):
  kwargs = dict(EXPORTS["llama"], **change)
  decoder = nnx.eval_shape(lambda: Decoder(**kwargs, rngs=nnx.Rngs(0)))
  with pytest.raises(decoders.HFExportError, match=option):
    decoders.export(nnx.state(decoder, nnx.Param).to_pure_dict(), kwargs, str(tmp_path / "x"))
  assert not os.listdir(tmp_path)  # nothing half-written


def test_export_to_mismatched_model_type_is_named(tmp_path):
  kwargs = dict(EXPORTS["qwen2"], mlp_bias=True)
  with pytest.raises(decoders.HFExportError, match="mlp_bias=True.*qwen2"):
    decoders.export({"blocks": {}}, kwargs, str(tmp_path / "x"))
