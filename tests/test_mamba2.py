"""Mamba2Block: parity with a float64 NumPy re-implementation of the reference Mamba-2 forward
(state-spaces/mamba `Mamba2.forward` with `mamba_chunk_scan_combined`, written as its plain
recurrence) using the block's own parameters; decode token by token == the full forward;
packed rows == separate documents; the reference init."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from metalm_jax.ssm.mamba2 import Mamba2Block, gated_rms_norm, mamba2_params

D_MODEL = 12
KW = dict(d_state=5, head_dim=4, num_groups=2, chunk_size=4)  # d_inner 24: 6 heads, 2 groups


def make_block(**kw):
  return Mamba2Block(D_MODEL, rngs=nnx.Rngs(0), **{**KW, **kw})


@pytest.fixture(scope="module")
def block():
  return make_block()


def jit_call(block, *args, **kw):
  graphdef, state = nnx.split(block)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kw))(state, *args)


def inputs(batch, length, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, length, D_MODEL))


def numpy_mamba2(params, u, *, d_state, head_dim, num_groups, d_conv=4, eps=1e-5):
  """float64 NumPy Mamba-2 forward, step by step, from a dict of the block's parameters.

  As the reference: zxbcdt = in_proj(u); xBC = silu(conv1d(xBC)) (causal, depthwise, bias);
  dt = softplus(dt + dt_bias); A = -exp(A_log); per head h_t = exp(dt A) h + dt x B^T,
  y = h C + D x; y = RMSNorm_group(y * silu(z)) * weight; out_proj.
  """
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  u = np.asarray(u, np.float64)
  batch, length, _ = u.shape
  d_inner = p["out_proj"].shape[0]
  heads = d_inner // head_dim
  gn = num_groups * d_state
  silu = lambda v: v / (1.0 + np.exp(-v))
  zxbcdt = u @ p["in_proj"]
  z, xbc, dt = np.split(zxbcdt, [d_inner, 2 * d_inner + 2 * gn], axis=-1)
  conv = np.zeros_like(xbc)
  for t in range(length):  # PyTorch Conv1d(padding=d_conv-1)[..., :L]: weight[k] * x_{t-W+1+k}
    conv[:, t] = p["conv_bias"]
    for k in range(d_conv):
      s = t - (d_conv - 1) + k
      if s >= 0:
        conv[:, t] += p["conv_weight"][k] * xbc[:, s]
  xbc = silu(conv)
  x, b, c = np.split(xbc, [d_inner, d_inner + gn], axis=-1)
  x = x.reshape(batch, length, heads, head_dim)
  b = b.reshape(batch, length, num_groups, d_state)
  c = c.reshape(batch, length, num_groups, d_state)
  dt = np.log1p(np.exp(dt + p["dt_bias"]))
  a = -np.exp(p["A_log"])
  h = np.zeros((batch, heads, head_dim, d_state))
  y = np.zeros_like(x)
  for t in range(length):
    for hd in range(heads):
      g = hd // (heads // num_groups)
      h[:, hd] = (np.exp(dt[:, t, hd] * a[hd])[:, None, None] * h[:, hd]
                  + (dt[:, t, hd, None] * x[:, t, hd])[:, :, None] * b[:, t, g, None, :])
      y[:, t, hd] = np.einsum("bpn,bn->bp", h[:, hd], c[:, t, g])
  y = (y + p["D"][:, None] * x).reshape(batch, length, d_inner)
  y = y * silu(z)
  yg = y.reshape(batch, length, num_groups, d_inner // num_groups)
  yg = yg / np.sqrt(np.mean(yg ** 2, axis=-1, keepdims=True) + eps)
  y = yg.reshape(batch, length, d_inner) * p["norm_weight"]
  return y @ p["out_proj"]


def block_params(block):
  flat = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(block))}
  return {"in_proj": flat["in_proj/kernel"], "out_proj": flat["out_proj/kernel"],
          **{k: flat[k] for k in ("conv_weight", "conv_bias", "dt_bias", "A_log", "D",
                                  "norm_weight")}}


def test_shapes_params_and_logical_names(block):
  d_inner, heads, gn = 24, 6, 2 * 5
  shapes = {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(nnx.state(block))}
  assert shapes == {
      "in_proj/kernel": (D_MODEL, 2 * d_inner + 2 * gn + heads),
      "conv_weight": (4, d_inner + 2 * gn), "conv_bias": (d_inner + 2 * gn,),
      "dt_bias": (heads,), "A_log": (heads,), "D": (heads,), "norm_weight": (d_inner,),
      "out_proj/kernel": (d_inner, D_MODEL)}
  assert sum(math.prod(s) for s in shapes.values()) == mamba2_params(D_MODEL, **{
      k: KW[k] for k in ("d_state", "head_dim", "num_groups")})
  specs = {"/".join(map(str, k)): v.get_value()
           for k, v in nnx.to_flat_state(nnx.get_partition_spec(nnx.state(block)))}
  assert specs["in_proj/kernel"] == P("embed", "ssm_in_proj")
  assert specs["out_proj/kernel"] == P("ssm_inner", "embed")
  assert specs["A_log"] == specs["D"] == specs["dt_bias"] == P("ssm_heads")
  assert specs["conv_weight"] == P("conv_width", "ssm_conv")


@pytest.mark.parametrize("length", [1, 7, 13])
def test_forward_matches_numpy_reference(block, length):
  """The block == a float64 NumPy Mamba-2 forward with the block's own parameters."""
  u = inputs(2, length, seed=length)
  want = numpy_mamba2(block_params(block), u, **{k: KW[k] for k in
                                                  ("d_state", "head_dim", "num_groups")})
  got = jit_call(block, u)
  assert got.shape == u.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_decode_token_by_token_equals_forward(block):
  u = inputs(2, 11, seed=3)
  full = jit_call(block, u)
  graphdef, state = nnx.split(block)
  decode = jax.jit(lambda s, u_t, c: nnx.merge(graphdef, s).decode(u_t, c))
  cache = block.init_cache(2)
  assert cache["conv_state"].shape == (2, 3, 24 + 2 * 10)
  assert cache["ssm_state"].shape == (2, 6, 4, 5)
  outs = []
  for t in range(11):
    y, cache = decode(state, u[:, t:t + 1], cache)
    outs.append(y)
    assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, block.init_cache(2))
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-5)
  # A prefill through ssd, then steps, gives the same again.
  cache = block.init_cache(2)
  y0, cache = decode(state, u[:, :6], cache)
  rest = [decode(state, u[:, t:t + 1], cache) for t in (6,)]
  np.testing.assert_allclose(jnp.concatenate([y0, rest[0][0]], axis=1), full[:, :7],
                             rtol=1e-4, atol=1e-5)


def test_packed_row_equals_separate_documents(block):
  lengths = (5, 6, 3)  # two documents, then padding (segment id 0)
  u = inputs(1, sum(lengths), seed=2)
  seg = jnp.asarray([[1] * 5 + [2] * 6 + [0] * 3])
  packed = jit_call(block, u, segment_ids=seg)
  start = 0
  for n in lengths[:2]:
    alone = jit_call(block, u[:, start:start + n])
    np.testing.assert_allclose(packed[:, start:start + n], alone, rtol=1e-4, atol=1e-5)
    start += n


def test_reference_init():
  block = Mamba2Block(64, d_state=16, head_dim=8, rngs=nnx.Rngs(1), num_residuals=8)
  a = np.exp(np.asarray(block.A_log[...]))
  assert a.shape == (16,) and 1.0 <= a.min() and a.max() <= 16.0
  dt = jax.nn.softplus(block.dt_bias[...])
  assert float(dt.min()) >= 1e-3 * (1 - 1e-5) and float(dt.max()) <= 1e-1 * (1 + 1e-5)
  np.testing.assert_array_equal(block.D[...], 1.0)
  np.testing.assert_array_equal(block.norm_weight[...], 1.0)
  w_in = np.asarray(block.in_proj.kernel[...])  # PyTorch Linear: U(+-1/sqrt(fan_in))
  assert np.abs(w_in).max() <= 1 / math.sqrt(64)
  assert abs(w_in.std() / (1 / math.sqrt(3 * 64)) - 1) < 0.05
  w_out = np.asarray(block.out_proj.kernel[...])  # ... / sqrt(num_residuals)
  assert np.abs(w_out).max() <= 1 / math.sqrt(128) / math.sqrt(8)
  assert abs(w_out.std() / (1 / math.sqrt(3 * 128 * 8)) - 1) < 0.1


def test_bfloat16_compute_keeps_dt_in_float32():
  """dt_bias (softplus^-1 of 1e-3 .. 1e-1: -6.9 .. -2.3) is added in float32 after the
  bfloat16 projection: with zero input the step sizes are exactly softplus(dt_bias)."""
  block = make_block(dtype=jnp.bfloat16)
  xbc = jnp.zeros((1, 2, block.conv_dim), jnp.bfloat16)
  _, dt, _, _ = block._ssm_inputs(xbc, jnp.zeros((1, 2, block.num_heads), jnp.bfloat16))
  assert dt.dtype == jnp.float32
  np.testing.assert_allclose(dt[0, 0], jax.nn.softplus(block.dt_bias[...]), rtol=1e-6)
  y = jit_call(block, inputs(1, 5).astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_gated_rms_norm_groups():
  y = jax.random.normal(jax.random.PRNGKey(0), (3, 8))
  z = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
  w = jnp.arange(1.0, 9.0)
  out = gated_rms_norm(y, z, w, groups=2)
  gated = np.asarray(y * jax.nn.silu(z)).reshape(3, 2, 4)
  want = gated / np.sqrt((gated ** 2).mean(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, want.reshape(3, 8) * np.asarray(w), rtol=1e-5)


def test_gradients_flow_to_every_param(block):
  u = inputs(1, 6)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(u) ** 2)))(block)
  for path, g in nnx.to_flat_state(grads):
    g = g.get_value()
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, path


def test_bad_arguments(block):
  with pytest.raises(ValueError, match="head_dim=5 must divide d_inner"):
    make_block(head_dim=5)
  with pytest.raises(ValueError, match="num_groups=4 must divide the number of heads 6"):
    make_block(num_groups=4)
  with pytest.raises(ValueError, match="chunk_size=0"):
    make_block(chunk_size=0)
  with pytest.raises(ValueError, match="d_model=12"):
    block(jnp.zeros((1, 3, 7)))
  with pytest.raises(ValueError, match="segment_ids shape"):
    block(jnp.zeros((1, 3, D_MODEL)), segment_ids=jnp.ones((1, 4), jnp.int32))
