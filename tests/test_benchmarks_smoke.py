"""Fast checks of the mfu / gpt2 / aot benchmarks' bookkeeping (no timing, tiny shapes)."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.benchmarks import aot, mfu
from metalm_jax import sharding
from metalm_jax.train import state as state_lib

TINY = dict(vocab=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, seq_len=16)


@pytest.mark.parametrize("tie", [False, True])
def test_matmul_param_count(tie):
  model = state_lib.Model(mfu.model_config(**TINY, tie=tie))
  n_matmul, n_blocks = mfu.matmul_param_count(model.abstract_params)
  per_block = 4 * 32 * 32 + 3 * 32 * 64  # q, k, v, o + SwiGLU wi, wi_gate, wo
  assert n_blocks == 2 * per_block
  assert n_matmul == n_blocks + 64 * 32  # the head, or the tied table once


def test_analytic_flops_match_xla_cost_analysis():
  model, state, rest, data, step = mfu.setup(mfu.model_config(**TINY), 2, 16)
  cost = step.lower(state, rest, data).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n_matmul, _ = mfu.matmul_param_count(model.abstract_params)
  analytic = 2 * 16 * mfu.flops_per_token(n_matmul, num_layers=2, num_heads=4, head_dim=8,
                                          seq_len=16)
  # XLA also counts softmax, norms and AdamW: a few % above the matmul count at this size.
  assert 1.0 <= cost["flops"] / analytic < 1.3


def test_classify_hlo():
  hlo = """
%fused_dot (p0: f32[4,8], p1: f32[8,16]) -> f32[4,16] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,8], b: f32[8,16]) -> f32[4,16] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,16]{1,0} parameter(1)
  %ynn_fusion.1 = f32[4,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(train_step)/jvp(x)/dot_general"}
  %exp_fusion = f32[2,4,16,16]{3,2,1,0} exponential(%a), metadata={op_name="jit(train_step)/jvp()/exp"}
  %copy.3 = f32[8,4]{0,1} copy(%a), metadata={op_name="jit(train_step)/transpose(jvp())/add_any"}
  %add_fusion = f32[8,16]{1,0} add(%b, %b), metadata={op_name="jit(train_step)/add"}
  ROOT %neg = f32[4,16]{1,0} negate(%ynn_fusion.1), metadata={op_name="jit(train_step)/jvp()/neg"}
}
"""
  kinds = mfu.classify_hlo(hlo, batch=2, seq_len=16, heads=4, vocab=1000)
  assert kinds["ynn_fusion.1"] == "matmul"
  assert kinds["exp_fusion"] == "attention_elementwise"
  assert kinds["copy.3"] == "copy"
  assert kinds["add_fusion"] == "update"
  assert kinds["neg"] == "other"


def test_gpt2_parameter_counts_differ_by_biases_only():
  pytest.importorskip("transformers")
  from experiments.benchmarks import gpt2

  tmodel = gpt2.torch_gpt2(vocab=64, d_model=32, num_layers=2, num_heads=4, seq_len=16)
  mconfig = mfu.model_config(**dict(TINY, d_ff=128), mlp_activation="gelu", position="learned",
                             norm="layernorm", tie=True)
  mconfig["max_len"] = 16
  ours = state_lib.Model(mconfig).param_count()
  assert sum(p.numel() for p in tmodel.parameters()) - ours == 9 * 32 * 2


def test_aot_mesh_and_shard_bytes(devices8):
  assert aot.mesh_shape("dp", 256, 16, 4) == {"data": 256, "fsdp": 1, "tensor": 1}
  assert aot.mesh_shape("fsdp", 256, 16, 4) == {"data": 16, "fsdp": 16, "tensor": 1}
  assert aot.mesh_shape("fsdp_tp", 256, 4, 4) == {"data": 16, "fsdp": 4, "tensor": 4}
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices8)
  tree = {"w": jax.ShapeDtypeStruct((8, 6), np.float32), "s": jax.ShapeDtypeStruct((), np.int32)}
  shardings = {"w": NamedSharding(mesh, P("fsdp", "tensor")), "s": NamedSharding(mesh, P())}
  assert aot.shard_bytes(tree, shardings) == 4 * 3 * 4 + 4


def test_mfu_cudnn_off_gpu_stops_before_any_work(capsys):
  if jax.default_backend() == "gpu":
    pytest.skip("checks the message on a machine without a GPU")
  with pytest.raises(SystemExit):
    mfu.main(["--attention_impl", "cudnn", "--dtype", "bfloat16"])
  assert "--attention_impl cudnn needs a GPU" in capsys.readouterr().err
  assert "add --dtype bfloat16" in mfu.check_args(["cudnn"], "float32", "gpu")
  assert mfu.check_args(["cudnn"], "bfloat16", "gpu") is None


def test_mfu_bfloat16_peak_and_model():
  """--dtype bfloat16: a bf16 peak matmul, bf16 compute with float32 parameters (no train
  step compiled here: bf16 training is tested in test_optimizer_features)."""
  best, median = mfu.matmul_peak((64,), 1, "bfloat16")
  assert best >= median > 0
  mconfig = mfu.model_config(**TINY, dtype="bfloat16")
  assert mconfig["dtype"] == "bfloat16" and mconfig["param_dtype"] == "float32"
  model = state_lib.Model(mconfig)
  assert {x.dtype for x in jax.tree.leaves(model.abstract_params)} == {np.dtype("float32")}


def test_fusion_flops_match_xla_cost_analysis():
  """fusion benchmark: analytic FLOPs vs XLA's count of the benchmarked forward and gradient,
  lowered from an abstract network (nothing is initialised, compiled or run)."""
  from flax import nnx

  from experiments.benchmarks import fusion
  from metalm_jax.models import SkipConnectedFusion

  sizes = dict(batch=2, image_tokens=37, text_tokens=7, d_model=48, d_ff=96)
  patterns = [fusion.config_pattern(c, 3, 2) for c in fusion.CONFIGS]
  assert patterns == ["AAC", "CCC", "AAA"]
  for pattern in patterns:
    net = nnx.eval_shape(lambda: SkipConnectedFusion(
        num_layers=3, stride=2, d_model=48, num_heads=4, d_ff=96, pattern=pattern,
        rngs=nnx.Rngs(0)))
    forward, grad, args = fusion.fusion_fns(net, batch=2, image_tokens=37, text_tokens=7,
                                            d_model=48)
    analytic = fusion.fusion_flops(pattern, **sizes)
    # XLA also counts softmax, norms, GELU and biases: ~10-15% above the matmuls here.
    assert 1.0 <= fusion._xla_flops(jax.jit(forward).lower(*args)) / analytic < 1.25
    if pattern == "AAC":  # forward + backward = 3x the forward's matmuls
      assert 3.0 <= fusion._xla_flops(jax.jit(grad).lower(*args)) / analytic < 3.75


def test_fusion_ratios_summary_and_plot(tmp_path):
  from experiments.benchmarks import fusion

  rows = [dict(image_tokens=p, config=c, pattern=fusion.config_pattern(c, 6, 3),
               fwd_ms=ms, fwdbwd_ms=3 * ms, gflops_fwd=g)
          for p, scale in ((16, 1), (64, 4))
          for c, ms, g in (("skip", 2.0 * scale, 10.0), ("connected", 8.0 * scale, 37.0),
                           ("asymmetric", 1.0 * scale, 5.0))]
  fusion.add_ratios(rows)
  connected = rows[1]
  assert connected["time_vs_skip_fwd"] == connected["time_vs_skip_fwdbwd"] == 4.0
  assert connected["flops_vs_skip"] == 3.7 and rows[2]["time_vs_skip_fwd"] == 0.5
  assert "fwd 4.00x" in fusion.summary(rows) and ": met" in fusion.summary(rows)
  assert "NOT met" in fusion.summary(rows, target=5.0)
  assert fusion.to_markdown(rows).count("\n") == len(rows) + 1
  path = tmp_path / "img" / "fusion_cost.png"
  fusion.plot(rows, str(path))
  assert path.stat().st_size > 0


# ------------------------------------------------ Mamba-2 / SSD rows (issue 22): tiny, no timing
TINY_HYBRID = dict(d_model=16, num_layers=8, num_heads=2, d_ff=24, d_state=4, vocab=32)


def test_scan_benchmark_ssd_rows_equal_state_size():
  from experiments.benchmarks import scan

  inputs = scan._inputs(9, 8, 3, 1)
  x, dt, a, b, c, d, gy = scan.ssd_inputs(inputs, head_dim=4)
  assert x.shape == (1, 9, 2, 4) and dt.shape == (1, 9, 2) and a.shape == (2,)
  assert b.shape == c.shape == (1, 9, 1, 3) and x.size * 3 == inputs[0].size * 3  # same state
  rows = scan.run(lengths=(9,), d_inner=8, d_state=3, repeats=1,
                  methods=("sequential", "ssd", "ssd_reference"), ssd_head_dim=4,
                  chunk_sizes={"ssd": [4]}, mambapy=False)
  by = {r["method"]: r for r in rows}
  assert set(by) == {"sequential", "ssd", "ssd_reference"} and by["ssd"]["chunk_size"] == 4
  assert by["ssd"]["heads"] == 2 and by["ssd"]["vs_sequential_fwd"] > 0
  assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in rows)
  assert "vs_sequential_fwdbwd" in scan.to_markdown(rows)


def test_hybrid_benchmark_three_archs_equal_parameter_counts():
  from flax import nnx

  from experiments.benchmarks import hybrid
  from metalm_jax.models.decoder import param_count

  counts = {arch: param_count(nnx.eval_shape(lambda a=arch: hybrid.build(
      a, path="blockwise", block_size=8, ssm_head_dim=8, **TINY_HYBRID)))
      for arch in hybrid.ARCHS}
  assert all(abs(n / counts["hybrid"] - 1) < 0.01 for n in counts.values()), counts
  rows = hybrid.run(lengths=(16,), repeats=1, paths=("blockwise",),
                    archs=("hybrid_m2", "attention"), ssm_head_dim=8, block_size=8,
                    **TINY_HYBRID)  # the Mamba-1 hybrid's row: test_hybrid's slow smoke test
  assert [r["schedule"] for r in rows] == ["M2M2M2M2AM2M2M2", "AAAAAAAA"]
  assert all(r["fwd_ms"] > 0 for r in rows) and rows[0]["speedup_vs_attention"] > 0
  assert set(hybrid.best_ratios(rows, "hybrid_m2")) == {16}


def test_decode_benchmark_mamba2_cache_is_constant():
  from experiments.benchmarks import decode

  rows = decode.run(contexts=(16, 64), steps=1, archs=("hybrid_m2", "mamba2"),
                    ssm_head_dim=8, **TINY_HYBRID)
  m2 = [r for r in rows if r["arch"] == "mamba2"]
  assert m2[0]["cache_mib"] == m2[1]["cache_mib"] and m2[0]["attn_cache_mib"] == 0
  # conv_state (d_conv - 1) x (d_inner + 2 d_state) + ssm_state d_inner x d_state, float32
  assert m2[0]["bytes_per_mamba_layer"] == 4 * (3 * (32 + 8) + 32 * 4)
  hyb = [r for r in rows if r["arch"] == "hybrid_m2"]
  assert hyb[1]["attn_cache_mib"] == 4 * hyb[0]["attn_cache_mib"]
