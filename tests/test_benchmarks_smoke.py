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
