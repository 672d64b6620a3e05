"""selective_scan: every method == a float64 NumPy loop, in values and gradients (x64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalm_jax.ssm import scan as scan_lib
from metalm_jax.ssm import selective_scan, selective_scan_reference

METHODS = ("sequential", "chunked", "associative")
RTOL = 1e-5


def numpy_scan(x, dt, A, B, C, D=None, z=None, h0=None, reset=None):
  """The obvious float64 loop. Returns (y [b, L, d], final state [b, d, n])."""
  x, dt, A, B, C = (np.asarray(v, np.float64) for v in (x, dt, A, B, C))
  batch, length, d_inner = x.shape
  h = np.zeros((batch, d_inner, A.shape[1])) if h0 is None else np.array(h0, np.float64)
  y = np.zeros_like(x)
  for t in range(length):
    decay = np.exp(dt[:, t, :, None] * A)
    if reset is not None:
      decay = decay * (1.0 - np.asarray(reset, np.float64)[:, t, None, None])
    h = decay * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
    y[:, t] = np.einsum("bdn,bn->bd", h, C[:, t])
  if D is not None:
    y = y + np.asarray(D, np.float64) * x
  if z is not None:
    z = np.asarray(z, np.float64)
    y = y * z / (1.0 + np.exp(-z))
  return y, h


def make_inputs(length, batch=2, d_inner=5, d_state=3, seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  return dict(
      x=rng.standard_normal((batch, length, d_inner)).astype(dtype),
      dt=np.log1p(np.exp(rng.standard_normal((batch, length, d_inner)))).astype(dtype),
      A=-np.exp(rng.standard_normal((d_inner, d_state))).astype(dtype),
      B=rng.standard_normal((batch, length, d_state)).astype(dtype),
      C=rng.standard_normal((batch, length, d_state)).astype(dtype),
      D=rng.standard_normal((d_inner,)).astype(dtype),
      z=rng.standard_normal((batch, length, d_inner)).astype(dtype),
      initial_state=rng.standard_normal((batch, d_inner, d_state)).astype(dtype),
      reset=rng.random((batch, length)) < 0.2,
  )


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def assert_close(actual, expected, rtol=RTOL, name=""):
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = max(np.abs(expected).max(), 1e-30)
  err = np.abs(actual - expected).max() / scale
  assert err < rtol, f"{name}: max |diff| / max |expected| = {err:.3g} >= {rtol}"


# (length, chunk_size, use D, use z, initial_state + return_state, reset)
CASES = [
    (1, None, True, True, True, False),  # length 1
    (13, 4, True, True, True, True),  # prime length, not a multiple of the chunk, resets
    (8, 4, False, False, False, False),  # exact multiple, bare scan
    (11, None, False, True, True, False),  # length < default chunk
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}_k{c[1]}")
def test_forward_matches_numpy(x64, method, case):
  length, chunk, use_d, use_z, use_state, use_reset = case
  inp = make_inputs(length)
  kw = dict(D=inp["D"] if use_d else None, z=inp["z"] if use_z else None)
  state = dict(initial_state=inp["initial_state"]) if use_state else {}
  reset = inp["reset"] if use_reset else None
  args = [jnp.asarray(inp[k]) for k in "x dt A B C".split()]
  out = selective_scan(*args, **kw, **state, return_state=use_state, reset=reset,
                       method=method, chunk_size=chunk)
  y_ref, h_ref = numpy_scan(*args, **kw, h0=state.get("initial_state"), reset=reset)
  y = out[0] if use_state else out
  assert y.shape == inp["x"].shape and y.dtype == jnp.float64
  assert_close(y, y_ref, name="y")
  if use_state:
    assert out[1].shape == inp["initial_state"].shape
    assert_close(out[1], h_ref, name="final state")


def _loss(scan_fn, reset, **kw):
  """Scalar of y and the final state, nonlinear so that every cotangent is generic."""

  def loss(x, dt, A, B, C, D, z, h0):
    y, h = scan_fn(x, dt, A, B, C, D, z, initial_state=h0, return_state=True, reset=reset,
                   **kw)
    return jnp.sum(jnp.sin(y)) + jnp.sum(h * jnp.cos(h))
  return loss


ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "initial_state")


@pytest.mark.parametrize("length,chunk,use_reset", [(1, None, False), (13, 4, True)])
def test_gradients_match_reference(x64, length, chunk, use_reset):
  inp = make_inputs(length)
  args = [jnp.asarray(inp[k]) for k in ARG_NAMES]
  reset = inp["reset"] if use_reset else None
  argnums = tuple(range(len(args)))
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(f, argnums))
  ref_val, ref_grads = value_and_grad(_loss(selective_scan_reference, reset))(*args)
  for method in METHODS:
    val, grads = value_and_grad(
        _loss(selective_scan, reset, method=method, chunk_size=chunk))(*args)
    assert_close(val, ref_val, name=f"{method} loss")
    for name, g, g_ref in zip(ARG_NAMES, grads, ref_grads):
      assert g.shape == g_ref.shape
      assert_close(g, g_ref, name=f"{method} d/d{name}")


@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_gradients_match_numpy_finite_differences(x64, method):
  """Directional derivatives of the NumPy float64 loop (central differences) == VJP."""
  length = 7
  inp = make_inputs(length, seed=3)
  args = [np.asarray(inp[k], np.float64) for k in ARG_NAMES]
  reset = inp["reset"]

  def np_loss(*a):
    y, h = numpy_scan(*a[:5], D=a[5], z=a[6], h0=a[7], reset=reset)
    return np.sum(np.sin(y)) + np.sum(h * np.cos(h))

  grads = jax.jit(jax.grad(_loss(selective_scan, reset, method=method, chunk_size=3),
                           tuple(range(8))))(*map(jnp.asarray, args))
  rng = np.random.default_rng(1)
  for i, name in enumerate(ARG_NAMES):
    v = rng.standard_normal(args[i].shape)
    eps = 1e-6
    plus = list(args)
    minus = list(args)
    plus[i] = args[i] + eps * v
    minus[i] = args[i] - eps * v
    fd = (np_loss(*plus) - np_loss(*minus)) / (2 * eps)
    analytic = float(np.sum(np.asarray(grads[i]) * v))
    assert abs(analytic - fd) <= 1e-6 * max(1.0, abs(fd)), (name, analytic, fd)


def test_float32_close_to_float64_and_keeps_dtype():
  inp = make_inputs(9, dtype=np.float32)
  args = [jnp.asarray(inp[k]) for k in "x dt A B C D z".split()]
  y_ref, _ = numpy_scan(*args)
  for method in METHODS:
    y = jax.jit(lambda *a, m=method: selective_scan(*a, method=m, chunk_size=4))(*args)
    assert y.dtype == jnp.float32
    assert_close(y, y_ref, rtol=1e-4, name=method)


def test_jit_and_auto_method():
  inp = make_inputs(6, dtype=np.float32)
  args = [jnp.asarray(inp[k]) for k in "x dt A B C".split()]
  assert scan_lib.resolve_method("auto") == (
      "sequential" if jax.default_backend() == "cpu" else "chunked")
  y = jax.jit(lambda *a: selective_scan(*a))(*args)
  assert_close(y, numpy_scan(*args)[0], rtol=1e-4)


def test_bad_arguments_raise_clear_errors():
  inp = make_inputs(4, dtype=np.float32)
  x, dt, A, B, C = (jnp.asarray(inp[k]) for k in "x dt A B C".split())
  with pytest.raises(ValueError, match="method='parallel' is unknown"):
    selective_scan(x, dt, A, B, C, method="parallel")
  with pytest.raises(ValueError, match="chunk_size=0"):
    selective_scan(x, dt, A, B, C, chunk_size=0)
  with pytest.raises(ValueError, match=r"x must be \[batch, length, d_inner\]"):
    selective_scan(x[0], dt, A, B, C)
  with pytest.raises(ValueError, match="A must be"):
    selective_scan(x, dt, A.T, B, C)
  with pytest.raises(ValueError, match="B has shape"):
    selective_scan(x, dt, A, B[:, :3], C)
  with pytest.raises(ValueError, match="dt has shape"):
    selective_scan(x, dt[..., :2], A, B, C)
  with pytest.raises(ValueError, match="initial_state has shape"):
    selective_scan(x, dt, A, B, C, initial_state=jnp.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match="reset has shape"):
    selective_scan(x, dt, A, B, C, reset=jnp.zeros((2, 5), bool))
