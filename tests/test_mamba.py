"""MambaBlock: params + logical names, init, packed rows == separate docs, decode == forward."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from metalm_jax.ssm import MambaBlock
from metalm_jax.ssm.mamba import causal_depthwise_conv, segment_starts, ssm_step
from metalm_jax.ssm.scan import selective_scan

D_MODEL = 11  # prime: a transposed axis cannot hide


def make_block(**kw):
  kw.setdefault("d_state", 5)
  kw.setdefault("chunk_size", 4)
  return MambaBlock(D_MODEL, rngs=nnx.Rngs(0), **kw)


@pytest.fixture(scope="module")
def block():
  return make_block()


def jit_call(block, *args, **kw):
  """block(*args, **kw) under one jit (eager NNX calls dispatch op by op: slow)."""
  graphdef, state = nnx.split(block)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kw))(state, *args)


def inputs(batch, length, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, length, D_MODEL))


def test_shapes_params_and_logical_names(block):
  d_inner = 2 * D_MODEL
  assert (block.d_inner, block.dt_rank, block.d_conv) == (d_inner, math.ceil(D_MODEL / 16), 4)
  shapes = {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(nnx.state(block))}
  assert shapes == {
      "in_proj/kernel": (D_MODEL, 2 * d_inner), "conv_weight": (4, d_inner),
      "conv_bias": (d_inner,), "x_proj/kernel": (d_inner, 1 + 2 * 5),
      "dt_proj/kernel": (1, d_inner), "dt_proj/bias": (d_inner,), "A_log": (d_inner, 5),
      "D": (d_inner,), "out_proj/kernel": (d_inner, D_MODEL)}
  specs = nnx.get_partition_spec(nnx.state(block))
  for path, spec in nnx.to_flat_state(specs):
    spec = spec.get_value() if hasattr(spec, "get_value") else spec
    assert isinstance(spec, P) and len(spec) == len(shapes["/".join(map(str, path))]), path
    assert all(isinstance(name, str) for name in spec), (path, spec)
  flat = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(specs)}
  assert flat["in_proj/kernel"] == P("embed", "ssm_inner")
  assert flat["A_log"] == P("ssm_inner", "ssm_state")
  assert flat["conv_weight"] == P("conv_width", "ssm_inner")
  assert flat["out_proj/kernel"] == P("ssm_inner", "embed")


def test_mamba_init():
  block = make_block(d_state=16)
  np.testing.assert_allclose(np.exp(block.A_log[...]),
                             np.broadcast_to(np.arange(1, 17), (2 * D_MODEL, 16)), rtol=1e-6)
  np.testing.assert_array_equal(block.D[...], 1.0)
  dt = jax.nn.softplus(block.dt_proj.bias[...])
  assert float(dt.min()) >= 1e-3 * (1 - 1e-5) and float(dt.max()) <= 1e-1 * (1 + 1e-5)


def test_forward_shape_and_methods_agree(block):
  u = inputs(2, 13)
  other = nnx.clone(block)
  other.scan_method = "associative"
  ys = {"sequential": jit_call(block, u), "associative": jit_call(other, u)}
  assert ys["sequential"].shape == u.shape and bool(jnp.all(jnp.isfinite(ys["sequential"])))
  np.testing.assert_allclose(ys["sequential"], ys["associative"], rtol=1e-4, atol=1e-5)


def test_causal_conv_matches_numpy():
  x = np.random.default_rng(0).standard_normal((2, 7, 3))
  w = np.random.default_rng(1).standard_normal((4, 3))
  b = np.arange(3.0)
  seg = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
  want = np.zeros_like(x)
  for i in range(2):
    for t in range(7):
      want[i, t] = b + sum(w[3 - j] * x[i, t - j] for j in range(4)
                           if t - j >= 0 and seg[i, t - j] == seg[i, t])
  got = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), jnp.asarray(seg))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(segment_starts(jnp.asarray(seg))[0],
                                [1, 0, 0, 1, 0, 0, 1])


def test_packed_row_equals_separate_documents(block):
  lengths = (5, 3, 4)  # two documents, then padding (segment id 0)
  u = inputs(1, sum(lengths), seed=2)
  seg = jnp.asarray([[1] * 5 + [2] * 3 + [0] * 4])
  packed = jit_call(block, u, segment_ids=seg)
  start = 0
  for n in lengths:
    alone = block(u[:, start:start + n])
    np.testing.assert_allclose(packed[:, start:start + n], alone, rtol=1e-4, atol=1e-5)
    start += n


def test_prefill_then_steps_equal_parallel_forward(block):
  u = inputs(2, 9, seed=3)
  full = jit_call(block, u)
  cache = block.init_cache(2)
  assert cache["conv_state"].shape == (2, 3, 2 * D_MODEL)
  assert cache["ssm_state"].shape == (2, 2 * D_MODEL, 5)
  graphdef, state = nnx.split(block)
  decode = jax.jit(lambda s, u_t, c: nnx.merge(graphdef, s).decode(u_t, c))
  y, cache = decode(state, u[:, :5], cache)  # prefill through the parallel scan
  outs = [y]
  step = lambda u_t, c: decode(state, u_t, c)
  for t in range(5, 9):
    y, cache = step(u[:, t:t + 1], cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-5)


def test_ssm_step_equals_scan_of_length_one():
  rng = np.random.default_rng(0)
  b, d, n = 2, 3, 4
  x, dt, z = (jnp.asarray(rng.standard_normal((b, 1, d)), jnp.float32) for _ in range(3))
  dt = jax.nn.softplus(dt)
  A = -jnp.exp(jnp.asarray(rng.standard_normal((d, n)), jnp.float32))
  B, C = (jnp.asarray(rng.standard_normal((b, 1, n)), jnp.float32) for _ in range(2))
  D = jnp.ones((d,))
  h0 = jnp.asarray(rng.standard_normal((b, d, n)), jnp.float32)
  y, h = selective_scan(x, dt, A, B, C, D, z, initial_state=h0, return_state=True)
  y1, h1 = ssm_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0])
  np.testing.assert_allclose(y1, y[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h1, h, rtol=1e-5, atol=1e-6)


def test_gradients_flow_to_every_param(block):
  u = inputs(1, 6)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(u) ** 2)))(block)
  for path, g in nnx.to_flat_state(grads):
    g = g.get_value()
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, path


def test_bad_arguments(block):
  with pytest.raises(ValueError, match="method='fast' is unknown"):
    make_block(scan_method="fast")
  with pytest.raises(ValueError, match="d_state=0"):
    make_block(d_state=0)
  with pytest.raises(ValueError, match="d_model=11"):
    block(jnp.zeros((1, 3, 7)))
  with pytest.raises(ValueError, match="segment_ids shape"):
    block(jnp.zeros((1, 3, D_MODEL)), segment_ids=jnp.ones((1, 4), jnp.int32))


def test_projections_init_as_pytorch_linear():
  """in_proj / x_proj / out_proj: U(+-1/sqrt(fan_in)) as torch.nn.Linear (std b / sqrt(3)),
  not lecun_normal (std 1/sqrt(fan_in), values up to 2/sqrt(fan_in))."""
  block = MambaBlock(64, d_state=16, rngs=nnx.Rngs(0))
  for name, fan_in in (("in_proj", 64), ("x_proj", 128), ("out_proj", 128)):
    w = np.asarray(getattr(block, name).kernel[...])
    bound = 1 / math.sqrt(fan_in)
    assert np.abs(w).max() <= bound, name
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.1, (name, w.std())


def test_out_proj_rescaled_by_residual_count():
  """The reference's rescale_prenorm_residual: out_proj / sqrt(num_residuals)."""
  plain = MambaBlock(64, rngs=nnx.Rngs(0))
  scaled = MambaBlock(64, num_residuals=16, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(scaled.out_proj.kernel[...], plain.out_proj.kernel[...] / 4,
                             rtol=1e-6)
  np.testing.assert_array_equal(scaled.in_proj.kernel[...], plain.in_proj.kernel[...])


def test_dt_bias_added_in_float32_under_bfloat16():
  """With bfloat16 compute the dt bias (softplus^-1(1e-3..1e-1) = -6.9..-2.3) is added in
  float32: zero input gives exactly softplus(bias); a bfloat16 add would be off by up to ~3%."""
  block = make_block(d_state=16, dtype=jnp.bfloat16)
  dt, _, _ = block._ssm_params(jnp.zeros((1, 3, block.d_inner), jnp.bfloat16))
  assert dt.dtype == jnp.float32
  np.testing.assert_allclose(dt[0, 0], jax.nn.softplus(block.dt_proj.bias[...]), rtol=1e-6)
