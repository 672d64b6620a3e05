"""CLIP vision towers imported into VisionEncoder match Hugging Face transformers (PyTorch).

Tiny random CLIPVisionModel / CLIPModel checkpoints are written with `save_pretrained` (no
download) and imported with `hf.load`; every hidden state and the output agree to 1e-4.
Pixels: HF reads [B, C, H, W], we read [B, H, W, C].
"""
import json
import logging
import os

import numpy as np
import pytest

from tests.hf_dirs import reference_packages  # noqa: E402

torch, transformers = reference_packages()
pytest.importorskip("safetensors", reason="pip install safetensors==0.8.0")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from metalm_jax.models import hf  # noqa: E402
from metalm_jax.models.hf import clip  # noqa: E402
from metalm_jax.models.text_encoder import GeluFfn  # noqa: E402
from metalm_jax.models.vision_encoder import VisionEncoder  # noqa: E402

ATOL = 1e-4
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
              num_hidden_layers=3, num_attention_heads=4)


def _randomise(model):
  """Non-trivial LayerNorm weights and biases (HF initialises them to 1 / 0)."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(0.1 * torch.randn(param.shape, generator=gen))
  return model


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("clip_vision")
  model = _randomise(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
  model.eval().save_pretrained(path, safe_serialization=True)
  return str(path), model


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
  torch.manual_seed(1)
  path = tmp_path_factory.mktemp("clip_full")
  config = transformers.CLIPConfig(
      vision_config=dict(VISION, hidden_act="gelu", num_hidden_layers=2),
      text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=20, bos_token_id=0,
                       eos_token_id=1, pad_token_id=1),
      projection_dim=8)
  model = _randomise(transformers.CLIPModel(config))
  model.eval().save_pretrained(path, safe_serialization=True)
  return str(path), model.vision_model


def _pixels(size=32, batch=2, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def _reference(model, pixels):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    post = model.post_layernorm if hasattr(model, "post_layernorm") else (
        model.vision_model.post_layernorm)
    hidden = [h.numpy() for h in out.hidden_states]
    return hidden, post(out.last_hidden_state).numpy(), out.pooler_output.numpy()


def _ours(encoder, pixels):
  return encoder.encode(jnp.asarray(pixels.transpose(0, 2, 3, 1)))


def _max_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("which", ["vision_dir", "full_dir"])
def test_every_hidden_state_matches_transformers(which, request):
  path, model = request.getfixturevalue(which)
  encoder = hf.load(path)
  assert isinstance(encoder, VisionEncoder) and encoder.pre_norm is not None
  pixels = _pixels()
  tokens, out = _ours(encoder, pixels)
  hidden, normed, pooled = _reference(model, pixels)
  # HF hidden_states[0] is the embedding output after pre_layrnorm, as ours.
  assert len(out["hidden_states"]) == len(hidden) == model.config.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(out["hidden_states"], hidden)):
    assert _max_diff(a, b) <= ATOL, (i, _max_diff(a, b))
  assert tokens.shape == (2, encoder.num_tokens(), VISION["hidden_size"]) == normed.shape
  assert _max_diff(tokens, normed) <= ATOL  # post_layernorm on every token
  assert _max_diff(tokens[:, 0], pooled) <= ATOL  # row 0 is HF's pooler_output


def test_module_kwargs_describe_the_clip_layout(vision_dir, full_dir):
  kw = hf.module_kwargs(vision_dir[0])
  assert kw == dict(image_size=32, patch_size=8, d_model=32, num_layers=3, num_heads=4, d_ff=48,
                    channels=3, use_cls=True, layer_norm_eps=1e-5, pre_norm=True,
                    patch_bias=False, activation="quick_gelu")
  full = hf.module_kwargs(full_dir[0])
  assert full["activation"] == "gelu" and full["num_layers"] == 2
  assert "bias" not in hf.import_params(vision_dir[0])["patch_embedding"]


def test_dropping_the_last_layer_is_hf_penultimate_state(vision_dir):
  path, model = vision_dir
  encoder = hf.load(path, num_layers=2)
  assert len(encoder.layers) == 2
  pixels = _pixels(seed=3)
  tokens, out = _ours(encoder, pixels)
  hidden, _, _ = _reference(model, pixels)
  assert _max_diff(out["hidden_states"][-1], hidden[-2]) <= ATOL
  with torch.no_grad():
    expected = model.post_layernorm(torch.from_numpy(hidden[-2])).numpy()
  assert _max_diff(tokens, expected) <= ATOL
  with pytest.raises(hf.HFImportError, match="num_layers=4"):
    hf.import_params(path, num_layers=4)


def test_another_image_size_interpolates_positions(vision_dir):
  encoder = hf.load(vision_dir[0])
  tokens = encoder(jnp.asarray(_pixels(size=48, batch=1).transpose(0, 2, 3, 1)))
  assert tokens.shape == (1, 1 + 6 * 6, 32) == (1, encoder.num_tokens(48), 32)
  assert np.isfinite(np.asarray(tokens)).all()


def test_unsupported_activation_and_missing_weights_are_named(vision_dir, tmp_path):
  config = json.load(open(os.path.join(vision_dir[0], "config.json")))
  (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_act="relu")))
  with pytest.raises(hf.HFImportError, match=r"hidden_act='relu'.*quick_gelu"):
    hf.module_kwargs(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.HFImportError, match=r"no model\.safetensors.*holds: config\.json"):
    hf.load(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(dict(config, image_size=[32, 48])))
  with pytest.raises(hf.HFImportError, match=r"image_size=\[32, 48\]"):
    hf.module_kwargs(str(tmp_path))


def test_image_stats_from_preprocessor_config_or_clip_defaults(tmp_path, caplog):
  with caplog.at_level(logging.INFO, logger=clip.__name__):
    mean, std = clip.image_stats(str(tmp_path))
  assert "OpenAI CLIP" in caplog.text
  np.testing.assert_allclose(mean, [0.48145466, 0.4578275, 0.40821073])
  np.testing.assert_allclose(std, [0.26862954, 0.26130258, 0.27577711])
  (tmp_path / "preprocessor_config.json").write_text(
      json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]}))
  mean, std = clip.image_stats(str(tmp_path))
  assert mean.tolist() == [0.5] * 3 and std.tolist() == [0.25, 0.5, 1.0]


@pytest.mark.parametrize("ours, theirs", [("gelu", "gelu"), ("quick_gelu", "quick_gelu"),
                                          ("gelu_tanh", "gelu_pytorch_tanh")])
def test_activations_match_transformers(ours, theirs):
  x = np.linspace(-6, 6, 101, dtype=np.float32)
  expected = transformers.activations.ACT2FN[theirs](torch.from_numpy(x)).numpy()
  assert _max_diff(GeluFfn.ACTIVATIONS[ours](jnp.asarray(x)), expected) <= 1e-6


def test_default_vision_encoder_tree_is_unchanged():
  vit = VisionEncoder(image_size=8, patch_size=4, d_model=8, num_layers=1, num_heads=2, d_ff=8,
                      rngs=nnx.Rngs(0))
  tree = nnx.state(vit, nnx.Param).to_pure_dict()
  assert "pre_norm" not in tree and set(tree["patch_embedding"]) == {"kernel", "bias"}
  assert vit.layers[0].ffn.activation == "gelu"
  with pytest.raises(ValueError, match="activation='relu'"):
    VisionEncoder(image_size=8, patch_size=4, d_model=8, num_layers=1, num_heads=2, d_ff=8,
                  activation="relu", rngs=nnx.Rngs(0))
