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

so `ssd` runs four batched matmuls per chunk and a short `lax.scan` over chunks (state
passing); every exponent is <= 0, so nothing overflows. Packed rows: `reset` [b, L] (True
where a new sequence starts) drops the state entering that step, i.e. the masks also require
no reset in (s, t]. A length that is not a multiple of Q is padded with dt = 0, x = 0 steps
(decay 1, no input), so the final state is exact.

`ssd_reference` is the slow obvious recurrence (one `lax.scan` step per token, JAX autodiff)
that the tests hold `ssd` equal to, in values and gradients; `ssd_step` is one token of it
(decoding).

Shapes: x [b, L, H, P]; dt [b, L, H] (positive: softplus already applied); A [H]; B, C
[b, L, G, N]; D [H]; states [b, H, P, N]; reset [b, L] bool.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 64


# ----------------------------------------------------------------------------- reference

def ssd_reference(x, dt, A, B, C, D=None, *, initial_state=None, return_state=False,
                  reset=None):
  """The recurrence one token at a time (`lax.scan`, JAX autodiff): the slow reference.

  Arguments and results as `ssd` (no chunk size).
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

  Returns (y [b, H, P] in x's dtype, h_next [b, H, P, N] in the compute dtype), equal to `ssd`
  on a length-1 sequence from state h.
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
  xs = chunks(x, groups, r, head_dim)
  dts = chunks(dt, groups, r)
  bs, cs = chunks(B, groups, d_state), chunks(C, groups, d_state)
  seg = None if reset is None else jnp.cumsum(chunks(reset).astype(jnp.int32), axis=2)
  y, h_last = _chunked(xs, dts, A.astype(cdt).reshape(groups, r), bs, cs,
                       h0.reshape(batch, groups, r, head_dim, d_state), seg)
  y = y.reshape(batch, num_chunks * q, heads, head_dim)[:, :length]
  y = _skip(y, x, D)
  if return_state:
    return y, h_last.reshape(batch, heads, head_dim, d_state)
  return y


def _chunked(x, dt, A, B, C, h0, seg):
  """x [b, c, Q, G, R, P]; dt [b, c, Q, G, R]; A [G, R]; B, C [b, c, Q, G, N];
  h0 [b, G, R, P, N]; seg [b, c, Q] int (resets so far inside the chunk) or None.

  Returns y [b, c, Q, G, R, P] (without D) and the final state [b, G, R, P, N].
  """
  q = x.shape[2]
  log_a = jnp.moveaxis(dt * A, 2, -1)  # [b, c, G, R, Q]
  cum = jnp.cumsum(log_a, axis=-1)
  dt_s = jnp.moveaxis(dt, 2, -1)  # [b, c, G, R, Q]

  # Masks (True = the path t <- s carries): causal, and with resets no reset in (s, t].
  causal = jnp.tril(jnp.ones((q, q), bool))
  if seg is None:
    same = causal  # [Q, Q]
    from_start = to_end = end_open = None
  else:
    seg_ = seg[:, :, None, None]  # [b, c, 1, 1, Q]
    same = causal & (seg_[..., :, None] == seg_[..., None, :])  # [b, c, 1, 1, Q, Q]
    from_start = seg_ == 0  # the state entering the chunk reaches t
    to_end = seg_ == seg_[..., -1:]  # step s reaches the chunk's last state
    end_open = (seg[:, :, -1] == 0)[:, :, None, None]  # the entering state passes the chunk

  # 1. Intra-chunk (the dual, quadratic form): y_t = sum_s (C_t.B_s) exp(cum_t - cum_s) dt_s x_s.
  diff = cum[..., :, None] - cum[..., None, :]  # [b, c, G, R, Q(t), Q(s)]
  decay_ts = jnp.exp(jnp.where(same, diff, -jnp.inf))
  cb = jnp.einsum("bctgn,bcsgn->bcgts", C, B)  # [b, c, G, Q, Q]
  weights = cb[:, :, :, None] * decay_ts * dt_s[..., None, :]
  y = jnp.einsum("bcgrts,bcsgrp->bctgrp", weights, x)

  # 2. Each chunk's own contribution to its last state: sum_s exp(cum_Q - cum_s) dt_s x_s B_s^T.
  to_end_decay = jnp.exp(cum[..., -1:] - cum)  # [b, c, G, R, Q]
  if to_end is not None:
    to_end_decay = jnp.where(to_end, to_end_decay, 0.0)
  chunk_states = jnp.einsum("bcgrs,bcsgrp,bcsgn->bcgrpn", to_end_decay * dt_s, x, B)

  # 3. State passing across chunks: h_enter[c + 1] = exp(cum_Q[c]) h_enter[c] + chunk_states[c].
  chunk_decay = jnp.exp(cum[..., -1])  # [b, c, G, R]
  if end_open is not None:
    chunk_decay = jnp.where(end_open, chunk_decay, 0.0)

  def pass_state(h, inputs):
    decay, new = inputs
    return decay[..., None, None] * h + new, h

  h_last, h_enter = jax.lax.scan(pass_state, h0, (jnp.moveaxis(chunk_decay, 1, 0),
                                                  jnp.moveaxis(chunk_states, 1, 0)))
  h_enter = jnp.moveaxis(h_enter, 0, 1)  # [b, c, G, R, P, N]

  # 4. The entering state's contribution: exp(cum_t) C_t h_enter.
  from_start_decay = jnp.exp(cum)  # [b, c, G, R, Q]
  if from_start is not None:
    from_start_decay = jnp.where(from_start, from_start_decay, 0.0)
  y_off = jnp.einsum("bctgn,bcgrpn->bctgrp", C, h_enter)
  y = y + y_off * jnp.moveaxis(from_start_decay, -1, 2)[..., None]
  return y, h_last


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
