"""mPLUG: skip-connected fusion, seq2seq decoder, ITC / ITM / MLM / PrefixLM, the train state."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from metalm_jax import config as config_lib
from metalm_jax import evaluation
from metalm_jax import families
from metalm_jax import models
from metalm_jax import sharding
from metalm_jax.inference import mplug as mplug_inference
from metalm_jax.models import mplug
from metalm_jax.objectives import mplug as obj
from metalm_jax.families import mplug as mplug_family
from metalm_jax.train import state as state_lib
from metalm_jax.train import optimizer as optimizer_lib
from metalm_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_mplug_config_module():
  return config_lib.config_module("mplug")


# The smallest model with both layer kinds ("AC"): compile time is dominated by per-parameter
# optimizer ops, so few layers keep the one compilation of everything cheap.
TEST_MODEL = dict(
    name="mplug", vocab_size=40, d_model=16, itc_dim=8,
    vision_encoder=dict(image_size=8, patch_size=4, channels=1, d_model=16, num_layers=1,
                        num_heads=2, d_ff=32),
    text_encoder=dict(num_layers=1, num_heads=2, d_ff=32, max_len=12),
    fusion=dict(num_layers=2, stride=1, num_heads=2, d_ff=32),
    decoder=dict(num_layers=1, num_heads=2, d_ff=32, max_len=12))


def build(**overrides) -> mplug.MPlug:
  kwargs = dict(TEST_MODEL, **overrides)
  kwargs.pop("name")
  return mplug.MPlug(**kwargs, rngs=nnx.Rngs(0))


def caption_batch(batch=8, length=12, seed=0):
  """[CLS] caption [EOS] pad rows of varying length, random images, pair ids with repeats."""
  rng = np.random.default_rng(seed)
  text = np.zeros((batch, length), np.int32)
  for i in range(batch):
    n = 2 + i % 5
    text[i, 0], text[i, 1:1 + n], text[i, 1 + n] = 1, rng.integers(4, 39, n), 2
  return {"images": rng.uniform(size=(batch, 8, 8, 1)).astype(np.float32), "text": text,
          "pair_ids": (np.arange(batch) % 4).astype(np.int32)}


# ---------------------------------------------------------------- fusion
def test_fusion_pattern():
  assert mplug.fusion_pattern(6, 3) == "AAACAA"
  assert "C" not in mplug.fusion_pattern(6, 6)
  assert mplug.fusion_pattern(7, 2) == "AACACAC"
  fusion = models.SkipConnectedFusion(num_layers=6, stride=3, d_model=8, num_heads=2, d_ff=16,
                                      rngs=nnx.Rngs(0))
  assert fusion.pattern == "AAACAA"
  assert [type(l).__name__[0] for l in fusion.layers] == list("AAACAA")
  with pytest.raises(ValueError, match="stride"):
    mplug.fusion_pattern(6, 0)
  with pytest.raises(ValueError, match="pattern"):
    models.SkipConnectedFusion(num_layers=3, stride=3, d_model=8, num_heads=2, d_ff=16,
                               pattern="AAX", rngs=nnx.Rngs(0))


def test_asymmetric_layer_leaves_image_untouched_connected_layer_updates_it():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  valid = jnp.array([[True, True, False], [True, True, True]])
  layer = mplug.AsymmetricCoAttentionLayer(8, 2, 16, rngs=nnx.Rngs(0))
  image_out, text_out = nnx.jit(lambda m, i, t: m(i, t, text_valid=valid))(layer, image, text)
  np.testing.assert_array_equal(np.asarray(image_out), np.asarray(image))  # bit-identical
  assert not np.allclose(text_out, text)
  connected = mplug.ConnectedAttentionLayer(8, 2, 16, rngs=nnx.Rngs(1))
  run = nnx.jit(lambda m, i, t: m(i, t, text_valid=valid))
  image_c, text_c = run(connected, image, text)
  assert image_c.shape == image.shape and text_c.shape == text.shape
  assert not np.allclose(image_c, image)
  # A padding text key never influences the image: change it, the image output stays.
  text2 = text.at[0, 2].set(100.0)
  image_c2, _ = run(connected, image, text2)
  np.testing.assert_allclose(image_c2[0], image_c[0], atol=1e-6)


def test_decoder_cache_matches_teacher_forcing():
  model = build()
  batch = caption_batch(batch=3)
  images, tokens = jnp.asarray(batch["images"]), jnp.asarray(batch["text"])
  decoder_tokens = tokens[:, :5]

  @nnx.jit
  def both(model):
    full = model(images, tokens, decoder_tokens)
    memory, valid = model.encode(images, tokens)
    cache = model.decoder.init_cache(memory, valid, 8)
    steps = []
    for t in range(5):
      logits, cache = model.decoder.decode(decoder_tokens[:, t:t + 1], cache)
      steps.append(logits)
    return full, jnp.concatenate(steps, axis=1)

  full, cached = both(model)
  np.testing.assert_allclose(cached, full, atol=2e-5)


# ---------------------------------------------------------------- ITC, queues, EMA
def numpy_itc(image, text, image_m, text_m, queue_image, queue_text, queue_ids, tau, ids,
              alpha):
  """Slow reference: loops over rows; float64."""
  def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())

  image_all = np.concatenate([image_m, queue_image])
  text_all = np.concatenate([text_m, queue_text])
  ids_all = np.concatenate([ids, queue_ids])
  total = {"i2t": 0.0, "t2i": 0.0}
  for i in range(len(ids)):
    pos = np.array([ids[i] == j and j != -1 for j in ids_all], np.float64)
    hard = pos / pos.sum()
    for name, q, q_m, keys in (("i2t", image[i], image_m[i], text_all),
                               ("t2i", text[i], text_m[i], image_all)):
      soft = np.exp(log_softmax(keys @ q_m / tau))
      target = alpha * soft + (1 - alpha) * hard
      total[name] -= float(np.sum(log_softmax(keys @ q / tau) * target))
  return (total["i2t"] + total["t2i"]) / (2 * len(ids))


def test_itc_loss_equals_numpy_reference():
  rng = np.random.default_rng(0)
  unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(rng.normal(size=s))
  b, q, e = 6, 5, 8
  image, text, image_m, text_m = (unit(b, e) for _ in range(4))
  queues = {"image": unit(q, e), "text": unit(q, e), "ids": np.array([0, -1, 3, 2, -1])}
  ids = np.array([0, 1, 1, 2, 3, 4])  # 1 twice in the batch; 0, 2, 3 also in the queue
  for alpha in (0.0, 0.4):
    loss, _ = obj.itc_loss(*(jnp.asarray(x, jnp.float32) for x in (image, text, image_m, text_m)),
                           {k: jnp.asarray(v) for k, v in queues.items()}, jnp.float32(0.07),
                           jnp.asarray(ids), alpha)
    expected = numpy_itc(image, text, image_m, text_m, queues["image"], queues["text"],
                         queues["ids"], 0.07, ids, alpha)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_queue_wraparound_keeps_newest_entries():
  queues = obj.init_queues(5, 2, jax.random.key(0))
  assert queues["ids"].tolist() == [-1] * 5
  written = []
  for step in range(4):  # 4 batches of 3 rows into 5 slots: wraps three times
    feats = jnp.full((3, 2), float(step)) + jnp.arange(3.0)[:, None] / 10
    ids = jnp.arange(3) + 10 * step
    queues = obj.enqueue(queues, feats, -feats, ids)
    written += list(zip(ids.tolist(), feats[:, 0].tolist()))
  assert int(queues["ptr"]) == 12 % 5
  newest = written[-5:]
  assert sorted(queues["ids"].tolist()) == sorted(i for i, _ in newest)
  for slot, (i, value) in enumerate(zip(queues["ids"].tolist(), queues["image"][:, 0].tolist())):
    assert (i, pytest.approx(value)) in [(j, pytest.approx(v)) for j, v in newest]
    assert queues["text"][slot, 0] == pytest.approx(-value)
  with pytest.raises(ValueError, match="queue_size"):
    obj.enqueue(queues, jnp.zeros((6, 2)), jnp.zeros((6, 2)), jnp.arange(6))


def test_ema_update_formula():
  m = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(3.0)}}
  p = {"a": jnp.array([5.0, -2.0]), "b": {"c": jnp.array(0.0)}}
  out = obj.ema_update(m, p, 0.995)
  np.testing.assert_allclose(out["a"], [0.995 * 1 + 0.005 * 5, 0.995 * 2 - 0.005 * 2], rtol=1e-6)
  np.testing.assert_allclose(out["b"]["c"], 0.995 * 3, rtol=1e-6)


# ---------------------------------------------------------------- ITM negatives
def test_hard_negatives_never_positive_and_follow_softmax():
  ids = jnp.array([0, 0, 1, 2, 2, 2, 3, 4])
  pos = obj.positives(ids, ids)
  sim = jax.random.normal(jax.random.key(0), (8, 8)) * 2
  draws = jax.vmap(lambda k: obj.sample_hard_negatives(k, sim, pos)[0])(
      jax.random.split(jax.random.key(1), 4000))
  draws = np.asarray(draws)
  assert not np.asarray(pos)[np.arange(8)[None, :], draws].any()
  # Frequencies follow softmax(similarity) over the negatives (row 0).
  logits = np.where(np.asarray(pos[0]), -np.inf, np.asarray(sim[0]))
  expected = np.exp(logits - logits.max())
  expected /= expected.sum()
  observed = np.bincount(draws[:, 0], minlength=8) / len(draws)
  np.testing.assert_allclose(observed, expected, atol=0.03)
  # A row whose every column is a positive has no negative: flagged, left out of ITM.
  all_pos = jnp.ones((3, 3), bool)
  _, has = obj.sample_hard_negatives(jax.random.key(2), jnp.zeros((3, 3)), all_pos)
  assert not np.asarray(has).any()
  _, _, labels, weights = obj.itm_pairs(jax.random.key(3), sim, sim.T, ids)
  assert labels.tolist() == [1] * 8 + [0] * 16 and weights.tolist() == [1.0] * 24


# ---------------------------------------------------------------- MLM and PrefixLM inputs
def test_mlm_mask_rates_and_protected_tokens():
  tokens = jnp.asarray(np.tile(caption_batch(8, 12)["text"], (64, 1)))
  corrupted, picked = obj.mlm_mask(jax.random.key(0), tokens, mask_id=39, vocab_size=40)
  tokens, corrupted, picked = map(np.asarray, (tokens, corrupted, picked))
  maskable = (tokens > 2)
  assert not picked[~maskable].any() and (corrupted[~maskable] == tokens[~maskable]).all()
  assert (corrupted[~picked] == tokens[~picked]).all()
  assert abs(picked.sum() / maskable.sum() - 0.15) < 0.02
  masked = (corrupted == 39) & picked
  assert abs(masked.sum() / picked.sum() - 0.8) < 0.05


def test_prefix_split_reassembles_the_caption():
  text = jnp.asarray(caption_batch(8, 12)["text"])
  split = {k: np.asarray(v) for k, v in obj.prefix_split(jax.random.key(0), text).items()}
  for row, tokens in enumerate(np.asarray(text)):
    prefix = split["encoder_tokens"][row][split["encoder_tokens"][row] != 0]
    target = split["decoder_targets"][row][split["decoder_weights"][row] > 0]
    np.testing.assert_array_equal(np.concatenate([prefix, target]), tokens[tokens != 0])
    assert target[-1] == 2 and len(target) >= 2  # at least one caption token, then [EOS]
    inputs = split["decoder_inputs"][row][split["decoder_weights"][row] > 0]
    np.testing.assert_array_equal(inputs, np.concatenate([[1], target[:-1]]))


# ---------------------------------------------------------------- the train state and step
def pretrain_config(**overrides):
  """configs/mplug.py (pretraining) with TEST_MODEL; `overrides` as {'a.b': value}."""
  config = ml_collections.ConfigDict(load_mplug_config_module().get_config("runlocal=1").to_dict())
  config.model = ml_collections.ConfigDict(TEST_MODEL)
  config.mplug.queue_size = 12
  config.batch_size = 8
  config.optimizer.warmup_steps = 1
  for key, value in overrides.items():
    config_lib.set_dotted(config, key, value)
  return config


def test_pretrain_step_on_8_device_mesh(devices8):
  """All four objectives, one jitted trainer step of the mplug family on a (data 2, fsdp 2,
  tensor 2) mesh: finite losses, momentum = EMA of the updated params, the queue written with
  the batch, the temperature clamped in the parameter."""
  config = pretrain_config()
  family = families.build(config)
  model = state_lib.Model(config.model)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices8)
  rules = sharding.FSDP_TP_RULES
  tx = optimizer_lib.make_optimizer(config.optimizer, 4)
  state, shardings, rest = state_lib.create_train_state(
      model, tx, jax.random.key(0), mesh, rules, init_extra=family.init_extra)
  batch = caption_batch(batch=8)
  batch_shardings = sharding.batch_sharding(mesh, rules, ndim=1)
  step = step_lib.make_train_step(
      model, tx, family, optimizer_lib.learning_rate_schedule(config.optimizer, 4), shardings,
      rest, batch_shardings, mesh, rules=rules)
  old_momentum = jax.device_get(state.extra["momentum"])
  np.testing.assert_array_equal(jax.tree.leaves(old_momentum)[0],
                                jax.tree.leaves(jax.device_get(
                                    mplug_family.momentum_subset(state.params)))[0])
  state, metrics = step(state, rest, jax.device_put(batch, batch_shardings))
  metrics = jax.device_get(metrics)
  for name in ("itc", "itm", "mlm", "prefix_lm", "loss", "grad_norm"):
    assert np.isfinite(metrics[name]), name
  np.testing.assert_allclose(metrics["loss"], sum(metrics[k] for k in obj.OBJECTIVES), rtol=1e-5)
  new_params = jax.device_get(mplug_family.momentum_subset(state.params))
  expected = jax.tree.map(lambda m, p: 0.995 * m + 0.005 * p, old_momentum, new_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(state.extra["momentum"]), expected)
  queues = state.extra["queues"]
  assert int(queues["ptr"]) == 8 and queues["ids"].tolist()[:8] == [0, 1, 2, 3] * 2
  # Sharded as planned: a ViT weight is split over fsdp, the momentum copy like it.
  qkernel = state.params["vision_encoder"]["layers"][0]["attention"]["query"]["kernel"]
  mkernel = state.extra["momentum"]["vision_encoder"]["layers"][0]["attention"]["query"]["kernel"]
  assert "fsdp" in str(qkernel.sharding.spec) and mkernel.sharding == qkernel.sharding


def test_temperature_is_clamped_in_the_parameter_and_keeps_its_gradient():
  """ALBEF clamps the learned temperature in place after each update: a value pushed past
  the bound comes back to it, and at the bound its gradient is not frozen (a clip at use
  would give it zero gradient once it overshoots)."""
  config = pretrain_config()
  family = families.build(config)
  high = config.model.get("max_temperature", 0.5)
  params = {"temperature": jnp.asarray(0.9), "other": jnp.ones(3)}
  clamped, extra = family.after_update(params, None, None, jnp.asarray(0))
  assert float(clamped["temperature"]) == pytest.approx(high) and extra is None
  model = build(temperature=0.07)
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()
  pure["temperature"] = jnp.asarray(high, jnp.float32)
  batch = caption_batch(batch=4)
  queues = obj.init_queues(12, 8, jax.random.key(1))

  def itc_only(temperature):
    p = dict(pure, temperature=temperature)
    nnx.replace_by_pure_dict(state, p)
    module = nnx.merge(graphdef, state)
    loss, _ = obj.pretrain_loss(module, module, batch, queues, jax.random.key(0),
                                loss_weights={"itc": 1.0}, alpha=0.0, deterministic=True)
    return loss

  at = jnp.asarray(high, jnp.float32)
  grad = float(jax.grad(itc_only)(at))
  eps = 1e-3  # the loss keeps depending on the temperature on both sides of the bound
  slope = (float(itc_only(at + eps)) - float(itc_only(at - eps))) / (2 * eps)
  assert abs(grad) > 1e-6 and grad == pytest.approx(slope, rel=2e-2)


def test_inference_helpers_and_retrieval_recall():
  model = build()
  batch = caption_batch(batch=4)
  images, text = batch["images"], batch["text"]
  tokens, scores = mplug_inference.generate(model, images, text[:, :1], max_new_tokens=5,
                                            beam_size=2)
  assert tokens.shape == (4, 2, 5) and scores.shape == (4, 2)
  answers = jnp.array([[5, 2, 0], [6, 7, 2]])
  s = mplug_inference.answer_scores(model, images, text, answers)
  assert s.shape == (4, 2) and np.all(np.asarray(s) < 0)
  out = mplug_inference.retrieve(model, images, text, k=2)
  assert out["i2t"].shape == (4, 4)
  # Re-ranking only reorders each query's top k; the rest stay below them.
  for q in range(4):
    top = set(np.argsort(-out["itc_i2t"][q])[:2])
    assert set(np.argsort(-out["i2t"][q])[:2]) == top
  recall = evaluation.retrieval_recall(np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]]),
                                       np.array([[False, False, True], [False, False, True]]),
                                       ks=(1, 2, 3))
  assert recall == {"R@1": 0.0, "R@2": 0.5, "R@3": 1.0}
  with pytest.raises(ValueError, match="no relevant"):
    evaluation.retrieval_recall(np.zeros((1, 2)), np.zeros((1, 2), bool))


# ---------------------------------------------------------------- configs
def test_configs_and_errors():
  module = load_mplug_config_module()
  for size, pattern in (("tiny", "AAACAA"), ("base", "AAACAA"), ("large", "AAAAAA")):
    config = module.get_config(f"size={size}")
    assert dict(config.model.fusion)["stride"] == {"AAACAA": 3, "AAAAAA": 6}[pattern]
    assert mplug.fusion_pattern(config.model.fusion.num_layers,
                                config.model.fusion.stride) == pattern
  base = module.get_config("size=base")
  assert (base.model.d_model, base.model.fusion.num_heads, base.model.fusion.d_ff,
          base.model.decoder.num_layers, base.model.text_encoder.num_layers,
          base.mplug.queue_size, base.mplug.alpha, base.mplug.momentum_decay) == (
              768, 12, 3072, 12, 6, 65536, 0.4, 0.995)
  # The distillation weight ramps from 0 over the first epoch (COCO at batch 1024) by default
  # at the paper's sizes; the digits runs keep it constant.
  assert base.mplug.alpha_warmup_steps == module.get_config(
      "size=large").mplug.alpha_warmup_steps == 554
  assert module.get_config("size=tiny").mplug.alpha_warmup_steps == 0
  bad = ml_collections.ConfigDict(base.to_dict())
  bad.mplug.loss_weights.itcc = 1.0
  with pytest.raises(config_lib.ConfigError, match="itcc"):
    config_lib.validate(bad)
  other = config_lib.base_config()
  other.mplug = config_lib.mplug_defaults()
  with pytest.raises(config_lib.ConfigError, match="only read for"):
    config_lib.validate(other)
  with pytest.raises(ValueError, match="loss weight is 0"):
    obj.pretrain_loss(build(), build(), caption_batch(), obj.init_queues(8, 8, jax.random.key(0)),
                      jax.random.key(0), loss_weights={}, alpha=0.4)
  with pytest.raises(ValueError, match="unknown mPLUG objective"):
    obj.pretrain_loss(build(), build(), caption_batch(), obj.init_queues(8, 8, jax.random.key(0)),
                      jax.random.key(0), loss_weights={"itx": 1.0}, alpha=0.4)
