"""SSD (Mamba-2): the chunked matmul form == the sequential reference == a float64 NumPy loop,
in values, final states and gradients (float64 and float32), across chunk sizes, lengths that
are not a multiple of the chunk, initial states and packed-sequence resets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalm_jax.ssm import ssd as ssd_lib
from metalm_jax.ssm.ssd import ssd_chunked, ssd_reference, ssd_step

# Prime-ish sizes so a transposed axis cannot hide: 6 heads in 2 groups (3 heads per group).
HEADS, GROUPS, HEAD_DIM, D_STATE = 6, 2, 5, 3
ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def numpy_ssd(x, dt, A, B, C, D=None, h0=None, reset=None):
  """The obvious float64 loop over time, heads and groups. Returns (y, final state)."""
  x, dt, A, B, C = (np.asarray(v, np.float64) for v in (x, dt, A, B, C))
  batch, length, heads, head_dim = x.shape
  groups, n = B.shape[2:]
  per_group = heads // groups
  h = np.zeros((batch, heads, head_dim, n)) if h0 is None else np.array(h0, np.float64)
  y = np.zeros_like(x)
  for t in range(length):
    for hd in range(heads):
      g = hd // per_group
      decay = np.exp(dt[:, t, hd] * A[hd])  # [b]
      if reset is not None:
        decay = decay * (1.0 - np.asarray(reset, np.float64)[:, t])
      h[:, hd] = (decay[:, None, None] * h[:, hd]
                  + (dt[:, t, hd, None] * x[:, t, hd])[:, :, None] * B[:, t, g, None, :])
      y[:, t, hd] = np.einsum("bpn,bn->bp", h[:, hd], C[:, t, g])
  if D is not None:
    y = y + np.asarray(D, np.float64)[:, None] * x
  return y, h


def make_inputs(length, batch=2, seed=0, dtype=np.float64, reset_rate=0.2):
  rng = np.random.default_rng(seed)
  reset = rng.random((batch, length)) < reset_rate
  return dict(
      x=rng.standard_normal((batch, length, HEADS, HEAD_DIM)).astype(dtype),
      dt=np.log1p(np.exp(rng.standard_normal((batch, length, HEADS)) - 1)).astype(dtype),
      A=-np.exp(rng.standard_normal((HEADS,))).astype(dtype),
      B=rng.standard_normal((batch, length, GROUPS, D_STATE)).astype(dtype),
      C=rng.standard_normal((batch, length, GROUPS, D_STATE)).astype(dtype),
      D=rng.standard_normal((HEADS,)).astype(dtype),
      initial_state=rng.standard_normal((batch, HEADS, HEAD_DIM, D_STATE)).astype(dtype),
      reset=reset,
  )


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def assert_close(actual, expected, rtol, name=""):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  scale = max(np.abs(expected).max(), 1e-30)
  err = np.abs(actual - expected).max() / scale
  assert err < rtol, f"{name}: max |diff| / max |expected| = {err:.3g} >= {rtol}"


# (length, chunk_size, use D, initial_state + return_state, reset)
CASES = [
    (1, None, True, True, False),  # length 1
    (13, 4, True, True, True),  # prime length, not a multiple of the chunk, resets
    (16, 4, False, False, False),  # exact multiple, bare
    (11, None, False, True, True),  # length < default chunk: one chunk
    (9, 1, True, True, True),  # chunk of one step: pure state passing
    (12, 5, True, False, True),  # last chunk partial, resets, zero initial state
]


def _call(fn, inp, case, **kw):
  length, chunk, use_d, use_state, use_reset = case
  args = [jnp.asarray(inp[k]) for k in "x dt A B C".split()]
  return fn(*args, D=inp["D"] if use_d else None,
            initial_state=inp["initial_state"] if use_state else None,
            return_state=True, reset=inp["reset"] if use_reset else None, **kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}_Q{c[1]}")
def test_reference_and_chunked_match_numpy_float64(x64, case):
  length, chunk, use_d, use_state, use_reset = case
  inp = make_inputs(length, seed=length)
  y_np, h_np = numpy_ssd(*(inp[k] for k in "x dt A B C".split()),
                         D=inp["D"] if use_d else None,
                         h0=inp["initial_state"] if use_state else None,
                         reset=inp["reset"] if use_reset else None)
  for name, fn, kw in (("reference", ssd_reference, {}),
                       ("ssd_chunked", ssd_chunked, dict(chunk_size=chunk))):
    y, h = jax.jit(lambda i, fn=fn, kw=kw: _call(fn, i, case, **kw))(inp)
    assert y.dtype == jnp.float64
    assert_close(y, y_np, 1e-10, f"{name} y")
    assert_close(h, h_np, 1e-10, f"{name} final state")


def _loss(fn, case, **kw):
  """A nonlinear scalar of y and the final state, so every cotangent is generic."""
  _, _, _, _, use_reset = case

  def loss(x, dt, A, B, C, D, h0, reset):
    y, h = fn(x, dt, A, B, C, D, initial_state=h0, return_state=True,
              reset=reset if use_reset else None, **kw)
    return jnp.sum(jnp.sin(y)) + jnp.sum(h * jnp.cos(h))
  return loss


GRAD_CASES = [c for c in CASES if c[0] > 1] + [(1, None, True, True, False)]


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
@pytest.mark.parametrize("case", GRAD_CASES[:3], ids=lambda c: f"L{c[0]}_Q{c[1]}")
def test_gradients_chunked_equal_reference(case, dtype, rtol):
  with jax.enable_x64(dtype == np.float64):
    inp = make_inputs(case[0], seed=7, dtype=dtype)
    args = [jnp.asarray(inp[k]) for k in ARG_NAMES] + [jnp.asarray(inp["reset"])]
    grad = lambda f: jax.jit(jax.value_and_grad(f, tuple(range(7))))
    ref_val, ref_grads = grad(_loss(ssd_reference, case))(*args)
    val, grads = grad(_loss(ssd_chunked, case, chunk_size=case[1]))(*args)
    assert_close(val, ref_val, rtol, "loss")
    for name, g, g_ref in zip(ARG_NAMES, grads, ref_grads):
      assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g))), name
      assert_close(g, g_ref, rtol, f"d/d{name}")


def test_gradients_match_numpy_finite_differences(x64):
  """Directional derivatives of the NumPy float64 loop (central differences) == ssd's VJP."""
  inp = make_inputs(7, seed=3)
  args = [np.asarray(inp[k], np.float64) for k in ARG_NAMES]
  reset = inp["reset"]

  def np_loss(*a):
    y, h = numpy_ssd(*a[:5], D=a[5], h0=a[6], reset=reset)
    return np.sum(np.sin(y)) + np.sum(h * np.cos(h))

  case = (7, 3, True, True, True)
  grads = jax.jit(jax.grad(_loss(ssd_chunked, case, chunk_size=3), tuple(range(7))))(
      *map(jnp.asarray, args), jnp.asarray(reset))
  rng = np.random.default_rng(1)
  for i, name in enumerate(ARG_NAMES):
    v = rng.standard_normal(args[i].shape)
    eps = 1e-6
    plus, minus = list(args), list(args)
    plus[i] = args[i] + eps * v
    minus[i] = args[i] - eps * v
    fd = (np_loss(*plus) - np_loss(*minus)) / (2 * eps)
    analytic = float(np.sum(np.asarray(grads[i]) * v))
    assert abs(analytic - fd) <= 1e-6 * max(1.0, abs(fd)), (name, analytic, fd)


def test_float32_keeps_dtype_and_is_close_to_float64():
  inp = make_inputs(21, dtype=np.float32)
  case = (21, 8, True, True, True)
  y, h = jax.jit(lambda i: _call(ssd_chunked, i, case, chunk_size=8))(inp)
  assert y.dtype == jnp.float32
  y_np, h_np = numpy_ssd(*(inp[k] for k in "x dt A B C".split()), D=inp["D"],
                         h0=inp["initial_state"], reset=inp["reset"])
  assert_close(y, y_np, 1e-4, "y")
  assert_close(h, h_np, 1e-4, "final state")


def test_chunk_size_does_not_change_the_result():
  inp = make_inputs(24, batch=1, dtype=np.float32)
  case = (24, None, True, True, True)
  ys = [jax.jit(lambda i, q=q: _call(ssd_chunked, i, case, chunk_size=q)[0])(inp)
        for q in (1, 2, 5, 8, 24, 100)]
  for y in ys[1:]:
    assert_close(y, ys[0], 1e-5)


def test_packed_row_equals_separate_sequences():
  """A reset drops the state: the second sequence of a packed row == it run alone."""
  inp = make_inputs(10, batch=1, dtype=np.float32, reset_rate=0.0)
  reset = np.zeros((1, 10), bool)
  reset[0, 6] = True
  args = [jnp.asarray(inp[k]) for k in "x dt A B C".split()]
  packed = ssd_chunked(*args, chunk_size=4, reset=jnp.asarray(reset))
  alone = ssd_chunked(*(a[:, 6:] if a.ndim > 1 else a for a in args), chunk_size=4)
  assert_close(packed[:, 6:], alone, 1e-5)
  assert_close(packed[:, :6], ssd_chunked(*(a[:, :6] if a.ndim > 1 else a for a in args)), 1e-5)


def test_step_equals_ssd_of_length_one():
  inp = make_inputs(1, dtype=np.float32)
  args = [jnp.asarray(inp[k]) for k in "x dt A B C".split()]
  y, h = ssd_chunked(*args, D=inp["D"], initial_state=inp["initial_state"], return_state=True)
  x, dt, A, B, C = args
  y1, h1 = ssd_step(jnp.asarray(inp["initial_state"]), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0],
                    jnp.asarray(inp["D"]))
  assert_close(y1, y[:, 0], 1e-5, "y")
  assert_close(h1, h, 1e-5, "state")


def test_bad_arguments_raise_clear_errors():
  inp = make_inputs(4, dtype=np.float32)
  x, dt, A, B, C = (jnp.asarray(inp[k]) for k in "x dt A B C".split())
  with pytest.raises(ValueError, match="chunk_size=0"):
    ssd_chunked(x, dt, A, B, C, chunk_size=0)
  with pytest.raises(ValueError, match=r"x must be \[batch, length, heads, head_dim\]"):
    ssd_chunked(x[0], dt, A, B, C)
  with pytest.raises(ValueError, match="groups=4 .* must divide heads=6"):
    ssd_chunked(x, dt, A, jnp.zeros((2, 4, 4, 3)), C)
  with pytest.raises(ValueError, match="A has shape"):
    ssd_chunked(x, dt, A[:3], B, C)
  with pytest.raises(ValueError, match="dt has shape"):
    ssd_reference(x, dt[..., :2], A, B, C)
  with pytest.raises(ValueError, match="initial_state has shape"):
    ssd_chunked(x, dt, A, B, C, initial_state=jnp.zeros((2, 6, 5, 4)))
  with pytest.raises(ValueError, match="reset has shape"):
    ssd_chunked(x, dt, A, B, C, reset=jnp.zeros((2, 5), bool))
  assert ssd_lib.DEFAULT_CHUNK_SIZE >= 1
