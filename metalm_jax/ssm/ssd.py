"""Mamba-2's state-space duality (SSD, Dao & Gu 2024): the multi-head SSM as chunked matmuls.

Per batch row, head h (one scalar decay A_h < 0 per head), head channel p and state n:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T      h: [heads, head_dim, d_state]
    y_t = h_t C_t + D x_t                           y: [heads, head_dim]

B and C are shared by the heads of a group: G groups, heads H = G R, head h = g R + r reads
group g = h // R (the reference's `repeat(B, 'b l g n -> b l (g r) n')`).

Because A is a scalar per head, the map from inputs to outputs inside a window of Q steps is
one masked matrix (the "dual" form): with log decays a_t = dt_t A and their running sums
cs_t = a_1 + ... + a_t inside the chunk,

    y_t = sum_{s <= t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s        (intra-chunk, Q x Q matmul)
        + exp(cs_t) C_t h_start                                     (the state entering it)
    h_end = exp(cs_Q) h_start + sum_s exp(cs_Q - cs_s) dt_s x_s B_s^T

so `ssd_chunked` runs four batched matmuls per chunk and a short `lax.scan` over chunks
(state passing); every exponent is <= 0, so nothing overflows. Its backward is a custom VJP
of the same shape (batched matmuls, elementwise products, a reverse scan over chunks).
Packed rows: `reset` [b, L] (True where a new sequence starts) drops the state entering that
step, i.e. the masks also require no reset in (s, t]. A length that is not a multiple of Q
is padded with dt = 0, x = 0 steps (decay 1, no input), so the final state is exact.

`ssd_reference` is the slow obvious recurrence (one `lax.scan` step per token, JAX autodiff)
that the tests hold `ssd_chunked` equal to, in values and gradients; `ssd_step` is one token of it
(decoding).

Shapes: x [b, L, H, P]; dt [b, L, H] (positive: softplus already applied); A [H]; B, C
[b, L, G, N]; D [H]; states [b, H, P, N]; reset [b, L] bool.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Measured on the 2-core CPU (docs/benchmarks.md): 32 beat 16 and 64 at 4k and 16k tokens.
# GPU / TPU matrix units want larger chunks (the reference's default is 256): pass chunk_size.
DEFAULT_CHUNK_SIZE = 32


# ----------------------------------------------------------------------------- reference

def ssd_reference(x, dt, A, B, C, D=None, *, initial_state=None, return_state=False,
                  reset=None):
  """The recurrence one token at a time (`lax.scan`, JAX autodiff): the slow reference.

  Arguments and results as `ssd_chunked` (no chunk size).
  """
  _check_shapes(x, dt, A, B, C, D, initial_state, reset)
  cdt = _compute_dtype(x)
  batch, _, heads, head_dim = x.shape
  groups, d_state = B.shape[2:]
  h0 = (jnp.zeros((batch, heads, head_dim, d_state), cdt) if initial_state is None
        else initial_state.astype(cdt))
  keep = (jnp.ones(x.shape[:2], cdt) if reset is None else 1 - reset.astype(cdt))
  A = A.astype(cdt)

  def step(h, inputs):
    x_t, dt_t, b_t, c_t, keep_t = inputs
    h, y = _step(h, x_t, dt_t, A, _heads(b_t, heads), _heads(c_t, heads), keep_t)
    return h, y

  tm = lambda v: jnp.swapaxes(v, 0, 1).astype(cdt)
  h_last, y = jax.lax.scan(step, h0, (tm(x), tm(dt), tm(B), tm(C), tm(keep)))
  y = _skip(jnp.swapaxes(y, 0, 1), x, D)
  return (y, h_last) if return_state else y


def ssd_step(h, x, dt, A, B, C, D=None):
  """One token (decoding): h [b, H, P, N]; x [b, H, P]; dt [b, H]; B, C [b, G, N]; D [H].

  Returns (y [b, H, P] in x's dtype, h_next [b, H, P, N] in the compute dtype), equal to
  `ssd_chunked` on a length-1 sequence from state h.
  """
  cdt = _compute_dtype(x)
  heads = x.shape[1]
  h, y = _step(h.astype(cdt), x.astype(cdt), dt.astype(cdt), A.astype(cdt),
               _heads(B.astype(cdt), heads), _heads(C.astype(cdt), heads), None)
  if D is not None:
    y = y + D.astype(cdt)[:, None] * x.astype(cdt)
  return y.astype(x.dtype), h


def _step(h, x, dt, A, B, C, keep):
  """h [b, H, P, N]; x [b, H, P]; dt [b, H]; B, C [b, H, N] (per head); keep [b] or None."""
  decay = jnp.exp(dt * A)  # [b, H]
  if keep is not None:
    decay = decay * keep[:, None]
  h = decay[..., None, None] * h + (dt[..., None] * x)[..., None] * B[:, :, None, :]
  return h, jnp.einsum("bhpn,bhn->bhp", h, C)


def _heads(v, heads):
  """[..., G, N] -> [..., H, N]: each group's row repeated for its H / G heads."""
  return jnp.repeat(v, heads // v.shape[-2], axis=-2)


# ----------------------------------------------------------------------------- chunked

def ssd_chunked(x, dt, A, B, C, D=None, *, chunk_size=None, initial_state=None,
                return_state=False, reset=None):
  """Multi-head SSM y = SSD(x) by chunked matrix products (module docstring).

  Args:
    x: [batch, length, heads, head_dim] inputs.
    dt: [batch, length, heads] step sizes, already positive (softplus applied).
    A: [heads] decays (negative for a stable SSM: A = -exp(A_log)).
    B, C: [batch, length, groups, d_state]; groups must divide heads.
    D: optional [heads] skip: y += D * x.
    chunk_size: steps per chunk Q (None: DEFAULT_CHUNK_SIZE; at most the length). The
      intra-chunk matmuls cost O(L Q) per head, the state passing O(L / Q) scan steps.
    initial_state: optional [batch, heads, head_dim, d_state] state before the first step.
    return_state: also return the final state [batch, heads, head_dim, d_state].
    reset: optional [batch, length] bool, True where a new sequence starts (packed rows).

  Returns:
    y [batch, length, heads, head_dim] in x's dtype (computed in at least float32), and the
    final state (compute dtype) when `return_state`.
  """
  _check_shapes(x, dt, A, B, C, D, initial_state, reset)
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"ssd chunk_size={chunk_size!r} must be a positive int (or None).")
  cdt = _compute_dtype(x)
  batch, length, heads, head_dim = x.shape
  groups, d_state = B.shape[2:]
  h0 = (jnp.zeros((batch, heads, head_dim, d_state), cdt) if initial_state is None
        else initial_state.astype(cdt))
  q = min(chunk_size or DEFAULT_CHUNK_SIZE, length)
  num_chunks = -(-length // q)
  pad = num_chunks * q - length

  def chunks(v, *split):  # [b, L, ...] -> [b, c, Q, ...], padded with zeros
    v = jnp.pad(v.astype(cdt), ((0, 0), (0, pad)) + ((0, 0),) * (v.ndim - 2))
    return v.reshape((batch, num_chunks, q) + split)

  r = heads // groups
  # x in "group-natural" layout [b, c, G, Q, R, P] (for G = 1 the input's own memory order);
  # dt [b, c, G, R, Q] head-major; B, C [b, c, G, Q, N]; states [b, G, N, R, P] (state axis
  # first, so the state contractions read x in its natural order and need no transposing
  # copy: only the per-head Q x Q product needs x head-major).
  xs = jnp.moveaxis(chunks(x, groups, r, head_dim), 3, 2)
  dts = jnp.moveaxis(chunks(dt, groups, r), 2, 4)
  bs = jnp.moveaxis(chunks(B, groups, d_state), 2, 3)
  cs = jnp.moveaxis(chunks(C, groups, d_state), 2, 3)
  masks = None if reset is None else _reset_masks(chunks(reset))
  h0 = jnp.moveaxis(h0.reshape(batch, groups, r, head_dim, d_state), 4, 2)
  y, h_last = _ssd_chunks(xs, dts, A.astype(cdt).reshape(groups, r), bs, cs, h0, masks)
  y = jnp.moveaxis(y, 2, 3).reshape(batch, num_chunks * q, heads, head_dim)[:, :length]
  y = _skip(y, x, D)
  if return_state:
    return y, jnp.moveaxis(h_last, 2, 4).reshape(batch, heads, head_dim, d_state)
  return y


def _reset_masks(reset):
  """reset [b, c, Q] (0 / 1) -> float masks, 1 where a path carries (no reset in between):
  intra [b, c, 1, 1, Q(t), Q(s)] (s <= t, none in (s, t]), from_start [b, c, 1, 1, Q] (none
  in [0, t]), to_end [b, c, 1, 1, Q] (none in (s, Q-1]), through [b, c, 1, 1] (none at all)."""
  seg = jnp.cumsum(reset.astype(jnp.int32), axis=2)[:, :, None, None]  # [b, c, 1, 1, Q]
  q = seg.shape[-1]
  causal = jnp.tril(jnp.ones((q, q), bool))
  f = lambda m: m.astype(reset.dtype)
  return (f(causal & (seg[..., :, None] == seg[..., None, :])), f(seg == 0),
          f(seg == seg[..., -1:]), f(seg[..., -1] == 0))


def _sum(v, axis):
  """Sum over one axis as a contraction with ones (a dot): for the autodiff version of this
  backward XLA:CPU built YNNPACK reduce fusions that took ~40% of its time (profiled)."""
  ones = jnp.ones((v.shape[axis],), v.dtype)
  return jnp.tensordot(jnp.moveaxis(v, axis, -1), ones, axes=1)


def _cumsum(v, reverse=False):
  """Cumulative sum over the last axis (a chunk, Q <= a few hundred) as a matmul with a
  triangular ones matrix: XLA:CPU lowers `jnp.cumsum` to a slow reduce-window."""
  q = v.shape[-1]
  tri = jnp.triu(jnp.ones((q, q), v.dtype))  # tri[s, t] = 1 for s <= t
  return jnp.matmul(v, tri.T if reverse else tri, precision=jax.lax.Precision.HIGHEST)


def _local(dt, A, masks, q):
  """The chunk-local decay pieces shared by the forward and backward passes.

  cum [b, c, G, R, Q]: log decay from the chunk's start; e_end = exp(cum_Q - cum_s) and
  e_start = exp(cum_t) with their reset masks; through = exp(cum_Q) [b, c, G, R]; intra (bool)
  the (t, s) paths inside a chunk. Every exponent is <= 0.
  """
  cum = _cumsum(dt * A[..., None])
  if masks is None:
    intra = jnp.tril(jnp.ones((q, q), bool))
    from_start = to_end = through_mask = None
  else:
    intra, from_start, to_end, through_mask = masks
    intra = intra > 0
  e_end = jnp.exp(cum[..., -1:] - cum)
  e_start = jnp.exp(cum)
  through = jnp.exp(cum[..., -1])
  if masks is not None:
    e_end, e_start, through = e_end * to_end, e_start * from_start, through * through_mask
  return cum, intra, e_end, e_start, through


def _gq(v):
  """[b, c, G, R, Q] (head-major) -> [b, c, G, Q, R, 1] to scale group-natural arrays."""
  return jnp.swapaxes(v, -1, -2)[..., None]


def _forward_parts(x, dt, A, B, C, h0, masks):
  """The chunked forward; also returns what the backward pass reuses.

  x [b, c, G, Q, R, P] (group-natural); dt [b, c, G, R, Q]; A [G, R]; B, C [b, c, G, Q, N];
  h0 [b, G, N, R, P]; masks from `_reset_masks` or None.
  Returns y [b, c, G, Q, R, P], the final state, and a dict of intermediates.
  """
  q = x.shape[3]
  cum, intra, e_end, e_start, through = _local(dt, A, masks, q)
  x_h = jnp.swapaxes(x, 3, 4)  # [b, c, G, R, Q, P]: the one transposing copy of x
  # 1. intra-chunk: W[t, s] = (C_t . B_s) exp(cum_t - cum_s) dt_s, y = W x, per head.
  decay = jnp.exp(jnp.where(intra, cum[..., :, None] - cum[..., None, :], -jnp.inf))
  cb = jnp.einsum("bcgtn,bcgsn->bcgts", C, B)
  w = cb[:, :, :, None] * decay * dt[..., None, :]  # [b, c, G, R, Q, Q]
  y_h = jnp.einsum("bcgrts,bcgrsp->bcgrtp", w, x_h)
  # 2. each chunk's own final state, S[n, (r, p)] = sum_s B_s[n] u_s x_s[(r, p)].
  ux = _gq(e_end * dt) * x
  chunk_states = jnp.einsum("bcgsn,bcgsrp->bcgnrp", B, ux)
  # 3. state passing over chunks: h_enter[c + 1] = exp(cum_Q[c]) h_enter[c] + S[c].
  h_last, h_enter = jax.lax.scan(
      lambda h, a: (a[0][:, :, None, :, None] * h + a[1], h), h0,
      (jnp.moveaxis(through, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
  h_enter = jnp.moveaxis(h_enter, 0, 1)  # [b, c, G, N, R, P]
  # 4. the entering state read out: exp(cum_t) C_t h_enter.
  ch = jnp.einsum("bcgtn,bcgnrp->bcgtrp", C, h_enter)
  y = jnp.swapaxes(y_h, 3, 4) + _gq(e_start) * ch
  return y, h_last, dict(x_h=x_h, h_enter=h_enter, through=through)


@jax.custom_vjp
def _ssd_chunks(x, dt, A, B, C, h0, masks):
  """Chunked SSD (shapes in `_forward_parts`) -> (y [b, c, G, Q, R, P], final state
  [b, G, N, R, P]). Custom VJP: every gradient is a batched matmul or an elementwise
  product; autodiff of the forward built reduce fusions ~5x slower on CPU (profiled)."""
  y, h_last, _ = _forward_parts(x, dt, A, B, C, h0, masks)
  return y, h_last


def _ssd_chunks_fwd(x, dt, A, B, C, h0, masks):
  y, h_last, parts = _forward_parts(x, dt, A, B, C, h0, masks)
  return (y, h_last), (x, parts["x_h"], dt, A, B, C, masks, parts["h_enter"],
                       parts["through"])


def _ssd_chunks_bwd(residuals, cotangents):
  x, x_h, dt, A, B, C, masks, h_enter, through = residuals
  gy, g_last = cotangents  # gy [b, c, G, Q, R, P]
  q = x.shape[3]
  cum, intra, e_end, e_start, _ = _local(dt, A, masks, q)
  u = e_end * dt

  # 4. y += e_start * (C h_enter)   (group-natural layout).
  ch = jnp.einsum("bcgtn,bcgnrp->bcgtrp", C, h_enter)
  g_e_start = jnp.swapaxes(_sum(gy * ch, -1), -1, -2)  # [b, c, G, R, Q]
  g_ch = gy * _gq(e_start)
  g_c = jnp.einsum("bcgtrp,bcgnrp->bcgtn", g_ch, h_enter)
  g_h_enter = jnp.einsum("bcgtn,bcgtrp->bcgnrp", C, g_ch)

  # 3. state passing, reversed: g of the state after chunk c is g_S[c].
  def back(g, inp):
    a, h, g_in = inp  # through decay [b, G, R], state entering [b, G, N, R, P], its cotangent
    g_a = _sum(_sum(jnp.swapaxes(g * h, 2, 3), -1), -1)  # [b, G, R]
    return a[:, :, None, :, None] * g + g_in, (g, g_a)

  g_h0, (g_states, g_through) = jax.lax.scan(
      back, g_last, (jnp.moveaxis(through, 1, 0), jnp.moveaxis(h_enter, 1, 0),
                     jnp.moveaxis(g_h_enter, 1, 0)), reverse=True)
  g_states = jnp.moveaxis(g_states, 0, 1)  # [b, c, G, N, R, P]
  g_through = jnp.moveaxis(g_through, 0, 1)  # [b, c, G, R]

  # 2. S = B^T (u x).
  g_ux = jnp.einsum("bcgsn,bcgnrp->bcgsrp", B, g_states)
  g_u = jnp.swapaxes(_sum(g_ux * x, -1), -1, -2)  # [b, c, G, R, Q]
  g_x = g_ux * _gq(u)
  g_b = jnp.einsum("bcgsrp,bcgnrp->bcgsn", _gq(u) * x, g_states)

  # 1. y = W x per head, in the (s, t) orientation (W^T built directly, not transposed).
  gy_h = jnp.swapaxes(gy, 3, 4)  # [b, c, G, R, Q, P]
  intra_st = jnp.swapaxes(intra, -1, -2)
  decay_st = jnp.exp(jnp.where(intra_st, cum[..., None, :] - cum[..., :, None], -jnp.inf))
  cb_st = jnp.einsum("bcgsn,bcgtn->bcgst", B, C)
  w_st = cb_st[:, :, :, None] * decay_st * dt[..., :, None]  # W^T [b, c, G, R, Q(s), Q(t)]
  g_w_st = jnp.einsum("bcgrsp,bcgrtp->bcgrst", x_h, gy_h)
  g_x = g_x + jnp.swapaxes(jnp.einsum("bcgrst,bcgrtp->bcgrsp", w_st, gy_h), 3, 4)
  g_wd = g_w_st * decay_st
  g_cb_st = _sum(g_wd * dt[..., :, None], 3)  # sum over the heads of a group: [b, c, G, s, t]
  g_c = g_c + jnp.einsum("bcgst,bcgsn->bcgtn", g_cb_st, B)
  g_b = g_b + jnp.einsum("bcgst,bcgtn->bcgsn", g_cb_st, C)
  n2 = g_wd * cb_st[:, :, :, None]  # cotangent of (decay * dt_s)
  g_dt_w = _sum(n2, -1)  # sum over t: [b, c, G, R, Q(s)]
  g_diff = n2 * dt[..., :, None]  # cotangent of cum_t - cum_s (0 where masked)

  # cum's cotangent from every exp(.) above, then through the cumsum.
  g_cum = _sum(g_diff, -2) - dt * g_dt_w  # +cum_t (sum over s), -cum_s
  g_end = g_u * dt * e_end  # exp(cum_Q - cum_s)
  g_cum = g_cum - g_end + g_e_start * e_start
  last = _sum(g_end, -1) + g_through * through  # onto cum_Q
  g_cum = g_cum.at[..., -1].add(last)
  g_log_a = _cumsum(g_cum, reverse=True)
  g_dt = g_dt_w + g_u * e_end + g_log_a * A[..., None]
  g_a = jnp.sum(g_log_a * dt, axis=(0, 1, 4))
  g_masks = None if masks is None else jax.tree.map(jnp.zeros_like, masks)
  return g_x, g_dt, g_a, g_b, g_c, g_h0, g_masks


_ssd_chunks.defvjp(_ssd_chunks_fwd, _ssd_chunks_bwd)


# ----------------------------------------------------------------------------- helpers

def _compute_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def _skip(y, x, D):
  """y [b, L, H, P] (compute dtype) -> y + D x, in x's dtype."""
  if D is not None:
    y = y + D.astype(y.dtype)[:, None] * x.astype(y.dtype)
  return y.astype(x.dtype)


def _check_shapes(x, dt, A, B, C, D, initial_state, reset):
  if getattr(x, "ndim", None) != 4:
    raise ValueError(f"ssd: x must be [batch, length, heads, head_dim]; got shape "
                     f"{jnp.shape(x)}.")
  batch, length, heads, head_dim = x.shape
  if length < 1:
    raise ValueError(f"ssd: x has length {length}; needs length >= 1.")
  if getattr(B, "ndim", None) != 4:
    raise ValueError(f"ssd: B must be [batch, length, groups, d_state]; got shape "
                     f"{jnp.shape(B)}.")
  groups, d_state = B.shape[2:]
  if groups < 1 or heads % groups:
    raise ValueError(f"ssd: groups={groups} (B's axis 2) must divide heads={heads}.")
  want = {"dt": ((batch, length, heads), dt), "A": ((heads,), A),
          "B": ((batch, length, groups, d_state), B),
          "C": ((batch, length, groups, d_state), C), "D": ((heads,), D),
          "initial_state": ((batch, heads, head_dim, d_state), initial_state),
          "reset": ((batch, length), reset)}
  for name, (shape, value) in want.items():
    if value is not None and tuple(jnp.shape(value)) != tuple(shape):
      raise ValueError(f"ssd: {name} has shape {tuple(jnp.shape(value))} but x "
                       f"{tuple(x.shape)} and B {tuple(B.shape)} require {tuple(shape)}.")
