"""The Mamba-2 block (Dao & Gu 2024) in Flax NNX: multi-head SSM by state-space duality.

    z, xBC, dt = in_proj(u)                    [B, L, d_model] -> d_inner, d_inner + 2 G N, H
    xBC = silu(causal_depthwise_conv1d(xBC))   width d_conv, with bias, over x, B and C
    x, B, C = split(xBC)                       x [B, L, H, P]; B, C [B, L, G, N]
    dt = softplus(dt + dt_bias)                [B, L, H], the bias added in float32
    y = ssd_chunked(x, dt, -exp(A_log), B, C, D)   one scalar decay per head (ssm.ssd)
    y = rmsnorm_g(y * silu(z)) * norm_weight   gated RMSNorm, per group of d_inner / G channels
    out = out_proj(y)                          [B, L, d_model]

H = d_inner / head_dim heads (P = head_dim), G groups share B and C (G divides H), N = d_state.
No outer norm or residual: the hybrid layer adds pre-norm and the residual.

Initialisation as the reference (state-spaces/mamba `Mamba2` + `_init_weights`): in_proj and
out_proj as PyTorch's Linear (`torch_linear_init`), out_proj divided by sqrt(num_residuals);
conv as PyTorch's Conv1d; dt_bias the inverse softplus of a log-uniform dt in [dt_min, dt_max]
(floored at dt_init_floor); A_log = log U(A_init_range) per head; D = 1; norm weight 1.

Packed rows: `segment_ids [B, L]` (0 = padding) reset the SSM state where the id changes and
keep the conv from mixing documents. Decoding carries `dict(conv_state [B, d_conv - 1,
conv_dim], ssm_state [B, H, P, N])` with conv_dim = d_inner + 2 G N: constant in the context
length; `decode` with T = 1 is one recurrence step (`ssd_step`), T > 1 a prefill via `ssd`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from metalm_jax.ssm import ssd as ssd_lib
from metalm_jax.ssm.mamba import causal_depthwise_conv, segment_starts, torch_linear_init


def gated_rms_norm(y, z, weight, *, groups: int = 1, eps: float = 1e-5):
  """RMSNorm(y * silu(z)) * weight, statistics per group of channels, in float32.

  y, z [..., d]; weight [d]; groups divides d. Returns float32 [..., d] (the reference's
  `RMSNormGated(norm_before_gate=False, group_size=d // groups)`).
  """
  x = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  shape = x.shape
  x = x.reshape(shape[:-1] + (groups, shape[-1] // groups))
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return x.reshape(shape) * weight.astype(jnp.float32)


class Mamba2Block(nnx.Module):
  """Mamba-2 mixer: [batch, length, d_model] -> [batch, length, d_model] (module docstring)."""

  def __init__(self, d_model: int, *, d_state: int = 64, d_conv: int = 4, expand: int = 2,
               head_dim: int = 64, num_groups: int = 1, chunk_size: int | None = None,
               dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
               A_init_range: tuple[float, float] = (1.0, 16.0), norm_eps: float = 1e-5,
               num_residuals: int = 1, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv),
                        ("expand", expand), ("head_dim", head_dim), ("num_groups", num_groups),
                        ("num_residuals", num_residuals)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Mamba2Block {name}={value!r} must be a positive int.")
    d_inner = expand * d_model
    if d_inner % head_dim:
      raise ValueError(f"Mamba2Block head_dim={head_dim} must divide d_inner = expand * d_model "
                       f"= {d_inner}; pick a head_dim that divides it.")
    heads = d_inner // head_dim
    if heads % num_groups:
      raise ValueError(f"Mamba2Block num_groups={num_groups} must divide the number of heads "
                       f"{heads} (= d_inner {d_inner} / head_dim {head_dim}).")
    if not 0 < dt_min <= dt_max:
      raise ValueError(f"Mamba2Block needs 0 < dt_min={dt_min} <= dt_max={dt_max}.")
    if not 0 < A_init_range[0] <= A_init_range[1]:
      raise ValueError(f"Mamba2Block A_init_range={A_init_range} must be 0 < low <= high.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
      raise ValueError(f"Mamba2Block chunk_size={chunk_size!r} must be a positive int or None.")
    self.d_model, self.d_state, self.d_conv, self.d_inner = d_model, d_state, d_conv, d_inner
    self.head_dim, self.num_heads, self.num_groups = head_dim, heads, num_groups
    self.conv_dim = d_inner + 2 * num_groups * d_state
    self.chunk_size, self.norm_eps, self.dtype = chunk_size, norm_eps, dtype

    def linear(d_in, d_out, axes, scale=1.0):
      return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=nnx.with_partitioning(torch_linear_init(scale), axes),
                        rngs=rngs)

    # One projection for [z, x, B, C, dt] as the reference (its output axis mixes roles, so it
    # is not split over 'tensor': logical name 'ssm_in_proj', replicated by every rule set).
    self.in_proj = linear(d_model, 2 * d_inner + 2 * num_groups * d_state + heads,
                          ("embed", "ssm_in_proj"))
    bound = 1.0 / math.sqrt(d_conv)  # PyTorch Conv1d's default (depthwise: fan_in = d_conv)
    uniform = lambda key, shape: jax.random.uniform(key, shape, param_dtype, -bound, bound)
    self.conv_weight = nnx.Param(uniform(rngs.params(), (d_conv, self.conv_dim)),
                                 out_sharding=("conv_width", "ssm_conv"))
    self.conv_bias = nnx.Param(uniform(rngs.params(), (self.conv_dim,)),
                               out_sharding=("ssm_conv",))
    dt = jnp.exp(jax.random.uniform(rngs.params(), (heads,), jnp.float32) *
                 (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_init_floor)
    self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype),
                             out_sharding=("ssm_heads",))
    a = jax.random.uniform(rngs.params(), (heads,), jnp.float32, *A_init_range)
    self.A_log = nnx.Param(jnp.log(a).astype(param_dtype), out_sharding=("ssm_heads",))
    self.D = nnx.Param(jnp.ones((heads,), param_dtype), out_sharding=("ssm_heads",))
    self.norm_weight = nnx.Param(jnp.ones((d_inner,), param_dtype), out_sharding=("ssm_inner",))
    self.out_proj = linear(d_inner, d_model, ("ssm_inner", "embed"), num_residuals ** -0.5)

  # --------------------------------------------------------------------------- pieces

  def _split_in_proj(self, u):
    """u [B, T, d_model] -> z [B, T, d_inner], xBC [B, T, conv_dim], dt [B, T, H]."""
    return jnp.split(self.in_proj(u), [self.d_inner, self.d_inner + self.conv_dim], axis=-1)

  def _conv(self, xbc, segment_ids=None):
    return causal_depthwise_conv(xbc, self.conv_weight[...].astype(xbc.dtype),
                                 self.conv_bias[...].astype(xbc.dtype), segment_ids)

  def _ssm_inputs(self, xbc, dt):
    """xBC after conv + SiLU [B, T, conv_dim], dt [B, T, H] ->
    x [B, T, H, P], dt (float32, softplus) [B, T, H], B, C [B, T, G, N]."""
    lead = xbc.shape[:2]
    gn = self.num_groups * self.d_state
    x, b, c = jnp.split(xbc, [self.d_inner, self.d_inner + gn], axis=-1)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    return (x.reshape(lead + (self.num_heads, self.head_dim)), dt,
            b.reshape(lead + (self.num_groups, self.d_state)),
            c.reshape(lead + (self.num_groups, self.d_state)))

  def _A(self):
    return -jnp.exp(self.A_log[...].astype(jnp.float32))

  def _output(self, y, z):
    """y [B, T, H, P], z [B, T, d_inner] -> out_proj(gated_rms_norm(y, z)) [B, T, d_model]."""
    y = y.reshape(z.shape)
    y = gated_rms_norm(y, z, self.norm_weight[...], groups=self.num_groups, eps=self.norm_eps)
    return self.out_proj(y.astype(self.dtype))

  # --------------------------------------------------------------------------- forward

  def __call__(self, u, segment_ids=None):
    """u [B, L, d_model] (segment_ids [B, L], 0 = padding) -> [B, L, d_model]."""
    if u.ndim != 3 or u.shape[-1] != self.d_model:
      raise ValueError(f"Mamba2Block expects [batch, length, d_model={self.d_model}]; "
                       f"got shape {u.shape}.")
    if segment_ids is not None and segment_ids.shape != u.shape[:2]:
      raise ValueError(f"segment_ids shape {segment_ids.shape} != [batch, length] "
                       f"{u.shape[:2]}.")
    z, xbc, dt = self._split_in_proj(u)
    x, dt, b, c = self._ssm_inputs(jax.nn.silu(self._conv(xbc, segment_ids)), dt)
    reset = None if segment_ids is None else segment_starts(segment_ids)
    y = ssd_lib.ssd_chunked(x, dt, self._A(), b, c, self.D[...], chunk_size=self.chunk_size,
                            reset=reset)
    return self._output(y, z)

  # --------------------------------------------------------------------------- decoding

  def init_cache(self, batch_size: int, dtype=jnp.float32):
    """Zero cache: conv_state [B, d_conv-1, conv_dim], ssm_state [B, H, P, N]."""
    return dict(conv_state=jnp.zeros((batch_size, self.d_conv - 1, self.conv_dim), dtype),
                ssm_state=jnp.zeros((batch_size, self.num_heads, self.head_dim, self.d_state),
                                    dtype))

  def decode(self, u, cache):
    """Continues the sequences in `cache` by u [B, T, d_model] -> (y [B, T, d_model], cache).

    T = 1 is one recurrence step (`ssd_step`); T > 1 (prefill) runs `ssd` from the cached state.
    """
    if u.ndim != 3 or u.shape[-1] != self.d_model:
      raise ValueError(f"Mamba2Block.decode expects [batch, T, d_model={self.d_model}]; "
                       f"got shape {u.shape}.")
    conv_state, ssm_state = cache["conv_state"], cache["ssm_state"]
    steps = u.shape[1]
    z, xbc, dt = self._split_in_proj(u)
    window = jnp.concatenate([conv_state.astype(xbc.dtype), xbc], axis=1)
    new_conv_state = window[:, window.shape[1] - (self.d_conv - 1):].astype(conv_state.dtype)
    x, dt, b, c = self._ssm_inputs(jax.nn.silu(self._conv(window)[:, -steps:]), dt)
    if steps == 1:
      y, h = ssd_lib.ssd_step(ssm_state, x[:, 0], dt[:, 0], self._A(), b[:, 0], c[:, 0],
                              self.D[...])
      y = y[:, None]
    else:
      y, h = ssd_lib.ssd_chunked(x, dt, self._A(), b, c, self.D[...],
                                 chunk_size=self.chunk_size, initial_state=ssm_state,
                                 return_state=True)
    return self._output(y, z), dict(conv_state=new_conv_state,
                                    ssm_state=h.astype(ssm_state.dtype))


def mamba2_params(d_model: int, *, d_state: int = 64, d_conv: int = 4, expand: int = 2,
                  head_dim: int = 64, num_groups: int = 1) -> int:
  """Parameter count of one Mamba2Block (for equal-size comparisons)."""
  d_inner = expand * d_model
  heads = d_inner // head_dim
  conv_dim = d_inner + 2 * num_groups * d_state
  return (d_model * (d_inner + conv_dim + heads) + (d_conv + 1) * conv_dim + 3 * heads
          + d_inner + d_inner * d_model)
