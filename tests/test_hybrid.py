"""Hybrid Transformer-Mamba decoder: schedules, decoding, packing, generation, sharded training."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from metalm_jax import config as config_lib
from metalm_jax import families, models, sharding
from metalm_jax.data import datasets, pipeline
from metalm_jax.inference.generate import generate
from metalm_jax.models.hybrid import HybridDecoder, resolve_schedule, schedule_layers
from metalm_jax.train import state as state_lib
from tests.test_config import load_config
from tests.test_train import _one_step

VOCAB = 37


def tiny(schedule="MAMA", **kw):
  kw = dict(dict(vocab_size=VOCAB, d_model=14, num_layers=len(schedule_layers(schedule)),
                 num_heads=2, num_kv_heads=1, head_dim=6, d_ff=22, d_state=5,
                 schedule=schedule), **kw)
  return HybridDecoder(**kw, rngs=nnx.Rngs(0))


def _tokens(batch=2, length=11, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (batch, length)), jnp.int32)


# ----------------------------------------------------------------------------- schedules

def test_schedules_jamba_rule_explicit_and_named():
  assert resolve_schedule(8) == "MMMMAMMM"  # Jamba defaults: period 8, offset 4 (1:7)
  assert resolve_schedule(16, attn_period=8, attn_offset=3) == "MMMAMMMM" * 2
  assert resolve_schedule(4, "MAMM") == "MAMM"
  assert resolve_schedule(3, "attention") == "AAA"
  assert resolve_schedule(3, "mamba") == "MMM"


def test_mamba2_schedules():
  assert resolve_schedule(8, mamba_version=2) == "M2M2M2M2AM2M2M2"
  assert schedule_layers(resolve_schedule(8, mamba_version=2)) == ("M2",) * 4 + ("A",) + (
      "M2",) * 3
  assert resolve_schedule(3, "mamba", mamba_version=2) == "M2M2M2"
  assert resolve_schedule(4, "MM2AM") == "MM2AM"
  assert schedule_layers("MM2AM") == ("M", "M2", "A", "M")
  with pytest.raises(ValueError, match="has 4 layers but num_layers=3"):
    resolve_schedule(3, "MM2AM")
  with pytest.raises(ValueError, match="mamba_version=3"):
    resolve_schedule(3, mamba_version=3)
  model = tiny("M2AMM2", ssm_head_dim=7, ssm_num_groups=2)
  assert model.layer_kinds == ("M2", "A", "M", "M2") and model.schedule == "M2AMM2"
  assert {type(layer.mixer).__name__ for layer in (model.layers[0], model.layers[3])} == {
      "Mamba2Block"}
  assert type(model.layers[2].mixer).__name__ == "MambaBlock"
  cache = model.init_cache(3, 50)
  assert cache["layers"][0]["ssm_state"].shape == (3, 4, 7, 5)  # 28 / 7 heads of 7, N 5
  assert cache["layers"][2]["ssm_state"].shape == (3, 28, 5)


def test_out_proj_init_rescaled_by_two_residuals_per_layer():
  """rescale_prenorm_residual: the Mamba out_proj init / sqrt(2 * num_layers)."""
  import math

  for kind in ("M", "M2"):
    model = tiny(kind * 8, d_model=64, ssm_head_dim=16)
    w = np.concatenate([np.asarray(layer.mixer.out_proj.kernel[...]).ravel()
                        for layer in model.layers])
    bound = 1 / math.sqrt(128) / math.sqrt(16)
    assert np.abs(w).max() <= bound and abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.05, kind


@pytest.mark.parametrize("schedule,num_layers,match", [
    ("MAXM", 4, r"bad characters: \['X'\]"),
    ("MAM", 4, "has 3 layers but num_layers=4"),
    ("", 4, "must be 'jamba'"),
])
def test_bad_schedules_are_clear_errors(schedule, num_layers, match):
  with pytest.raises(ValueError, match=match):
    resolve_schedule(num_layers, schedule)


def test_bad_jamba_rule_and_position_are_errors():
  with pytest.raises(ValueError, match="attn_offset < attn_period"):
    resolve_schedule(8, attn_period=4, attn_offset=4)
  with pytest.raises(ValueError, match="position='alibi'"):
    tiny(position="alibi")


def test_every_param_has_logical_axis_names():
  state = nnx.state(tiny(), nnx.Param)
  leaves = jax.tree.leaves(state)
  specs = jax.tree.leaves(nnx.get_partition_spec(state),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(leaves) == len(specs) > 0
  for value, spec in zip(leaves, specs):
    assert len(spec) == value.ndim and all(isinstance(n, str) for n in spec), (spec, value.shape)
  assert {"ssm_inner", "heads", "embed", "vocab", "mlp"} <= {n for s in specs for n in s}


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("schedule,position,threshold", [
    ("MAMA", "none", None), ("MAMA", "rope", 4), ("M2AMM2", "none", None)])
def test_step_by_step_and_prefill_decoding_equal_parallel_forward(schedule, position,
                                                                  threshold):
  """Mixed KV + SSM cache; threshold=4 runs the A layers blockwise (lazy masks) too."""
  model = tiny(schedule, position=position, blockwise_threshold=threshold, block_size=3,
               ssm_head_dim=7, chunk_size=4)
  tokens = _tokens()
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    m = nnx.merge(graphdef, state)
    full, _ = m(tokens)
    def step(cache, token):  # token [B]
      logits, cache = m.decode(token[:, None], cache)
      return cache, logits[:, 0]
    _, steps = jax.lax.scan(step, m.init_cache(2, 11), tokens.T)
    cache = m.init_cache(2, 11)
    first, cache = m.decode(tokens[:, :6], cache)
    rest, cache = m.decode(tokens[:, 6:], cache)
    return full, steps.swapaxes(0, 1), jnp.concatenate([first, rest], 1), cache["index"]

  full, stepped, prefilled, index = run(state, tokens)
  np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(prefilled, full, rtol=1e-5, atol=1e-5)
  assert int(index) == 11


def test_cache_holds_kv_for_attention_and_fixed_state_for_mamba():
  model = tiny("MAMA")
  assert model.schedule == "MAMA"
  cache = model.init_cache(3, 50)
  a, m = cache["layers"][1], cache["layers"][0]
  assert a["k"].shape == (3, 50, 1, 6)
  assert m["conv_state"].shape == (3, 3, 28) and m["ssm_state"].shape == (3, 28, 5)


def test_generate_greedy_matches_parallel_argmax():
  """Greedy generation (prefill + cached steps) agrees with teacher forcing its own output."""
  model = tiny("AMMA")
  prompt = _tokens(length=4, seed=1)
  out = generate(model, prompt, max_new_tokens=3, rng=jax.random.key(0))
  assert out.shape == (2, 7)
  np.testing.assert_array_equal(out[:, :4], prompt)
  logits, _ = model(out)
  np.testing.assert_array_equal(out[:, 4:], jnp.argmax(logits[:, 3:6], -1))


@pytest.mark.parametrize("schedule", ["MAMM", "M2AM2M"])
def test_packed_documents_do_not_leak(schedule):
  """A row packing two documents gives each document's logits as if it were alone."""
  model = tiny(schedule, position="rope", ssm_head_dim=7, chunk_size=4)
  a, b = _tokens(1, 5, seed=2), _tokens(1, 6, seed=3)
  seg = jnp.asarray([[1] * 5 + [2] * 6])
  pos = jnp.asarray([list(range(5)) + list(range(6))])
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    m = nnx.merge(graphdef, state)
    packed = m(jnp.concatenate([a, b], 1), segment_ids=seg, positions=pos)[0]
    alone = m(jnp.concatenate([a, b[:, :5]], 0))[0]  # both documents, 5 tokens each
    return packed, alone, m(b)[0]

  packed, alone, b_alone = run(state)
  np.testing.assert_allclose(packed[0, :5], alone[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 5:], b_alone[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- configs, mesh

@pytest.mark.parametrize("mamba", ["1", "2"])
def test_configs_validate_and_twins_have_equal_parameter_counts(mamba):
  counts = {}
  for arch in ("hybrid", "attention"):
    config = load_config("hybrid_lm", f"size=test,arch={arch},mamba={mamba}")
    config_lib.validate(config)
    counts[arch] = state_lib.Model(config.model).param_count()
  assert load_config("hybrid_lm", f"size=tiny,mamba={mamba}").model.schedule == (
      "MMMMAMMM" if mamba == "1" else "M2M2M2M2AM2M2M2")
  assert abs(counts["hybrid"] - counts["attention"]) / counts["hybrid"] < 0.01, counts
  with pytest.raises(ValueError, match="has 3 layers"):
    load_config("hybrid_lm", "size=test,schedule=MAM")
  with pytest.raises(ValueError, match="mamba='3'"):
    load_config("hybrid_lm", "size=test,mamba=3")


@pytest.mark.parametrize("mamba", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device(pydoc_data_dir, devices8, mamba):
  """A (2, 2, 2) mesh step == one device (mamba=2: the 'ssm_heads' rule on 'tensor')."""
  config = ml_collections.ConfigDict(load_config("hybrid_lm", f"size=test,mamba={mamba}")
                                     .to_dict())
  config.data.data_dir = pydoc_data_dir
  tokenizer = families.build(config).tokenizer
  source = datasets.data_source("pydoc_topics", "train", pydoc_data_dir)
  batch = next(iter(pipeline.lm_dataset(source, tokenizer, seq_len=config.data.seq_len,
                                        batch_size=config.batch_size, seed=0)))
  mesh1 = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices8[:1])
  mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices8)
  losses1, norms1, params1, _ = _one_step(config, mesh1, batch)
  losses8, norms8, params8, shardings8 = _one_step(config, mesh8, batch)
  specs = {str(s.spec) for s in jax.tree.leaves(shardings8.params)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  np.testing.assert_allclose(norms8, norms1, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               params8, params1)


def test_registry_builds_hybrid():
  model = models.build_model("hybrid", rngs=nnx.Rngs(0), vocab_size=VOCAB, d_model=14,
                             num_layers=2, num_heads=2, d_ff=22, schedule="MA")
  assert isinstance(model, HybridDecoder)


# ----------------------------------------------------------------------------- smoke (slow)

@pytest.mark.slow
def test_benchmarks_and_long_context_smoke(pydoc_data_dir, tmp_path):
  import json
  import sys

  sys.path.insert(0, ".")
  from experiments import benchmark, long_context

  out = tmp_path / "rows.jsonl"
  tiny_widths = ["--d_model", "16", "--num_heads", "2", "--d_ff", "24", "--d_state", "4",
                 "--vocab", "32"]
  rows = benchmark.main(["hybrid", "--lengths", "32", "--repeats", "1", "--json", str(out)]
                        + tiny_widths)
  assert {(r["arch"], r["path"]) for r in rows} == {
      (a, p) for a in ("hybrid", "attention") for p in ("reference", "blockwise")}
  assert all(r["fwd_ms"] > 0 and r["peak_mib"] > 0 for r in rows)
  rows = benchmark.main(["decode", "--contexts", "32", "--steps", "2"] + tiny_widths)
  assert {r["schedule"] for r in rows} == {"AAAAAAAA", "MMMMAMMM", "MMMMMMMM"}
  rows = benchmark.main(["scan", "--lengths", "17", "--d_inner", "8", "--repeats", "1",
                         "--methods", "sequential"])
  assert any(r["method"] == "sequential" for r in rows)
  assert len(out.read_text().splitlines()) == 4
  assert json.loads(out.read_text().splitlines()[0])["benchmark"] == "hybrid"
  rows = long_context.main(["--size", "test", "--seq_len", "16", "--steps", "2",
                            "--multipliers", "1", "2", "--data_dir", pydoc_data_dir,
                            "--workdir", str(tmp_path / "lc")])
  assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
