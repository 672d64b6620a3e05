"""The Mamba block (Gu & Dao, 2023) in Flax NNX, with packed-sequence resets and decoding.

    x, z = in_proj(u)                          [B, L, d_model] -> 2 x [B, L, d_inner]
    x = silu(causal_depthwise_conv1d(x))       width d_conv, with bias
    dt, B, C = x_proj(x)                       dt_rank, d_state, d_state
    dt = softplus(dt_proj(dt))                 [B, L, d_inner]
    y = selective_scan(x, dt, -exp(A_log), B, C, D, z)     (y * silu(z) inside)
    out = out_proj(y)                          [B, L, d_model]

No norm or residual inside: the decoder block adds pre-norm and the residual.

Packed rows: pass `segment_ids [B, L]` (0 = padding). Where the id changes the SSM state is
reset (its decay is multiplied by 0) and the conv never mixes inputs of different segments,
so a packed row gives the same outputs as running each document alone.

Decoding carries `dict(conv_state [B, d_conv - 1, d_inner], ssm_state [B, d_inner, d_state])`:
constant memory in the sequence length. `decode` with T > 1 is a prefill through the parallel
scan (`return_state`); with T = 1 it is one recurrence step.

Initialisation as the reference (state-spaces/mamba, `Mamba` + `MambaLMHeadModel._init_weights`):
the projections as PyTorch's `nn.Linear` (uniform, bound 1/sqrt(fan_in): `torch_linear_init`);
`out_proj` further divided by sqrt(num_residuals), the reference's `rescale_prenorm_residual`
with n = residual branches in the whole network (`n_residuals_per_layer * n_layer`; the hybrid
passes 2 per layer: mixer and MLP); dt_proj's weight uniform +-dt_rank^-0.5 and its bias the
inverse softplus of a log-uniform dt in [dt_min, dt_max]; A = -(1..d_state) (S4D-real); D = 1.
The dt bias is added in float32 after the projection, also under bfloat16 compute.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from metalm_jax.ssm import scan as scan_lib



def torch_linear_init(scale: float = 1.0):
  """PyTorch `nn.Linear`'s default weight init (kaiming_uniform with a = sqrt(5)), times `scale`:
  U(-b, b) with b = scale / sqrt(fan_in), fan_in = the kernel's input axis ([in, out] kernels)."""
  return nnx.initializers.variance_scaling(scale ** 2 / 3.0, "fan_in", "uniform")


def causal_depthwise_conv(x, weight, bias, segment_ids=None):
  """Causal depthwise conv1d: out_t = bias + sum_k weight[k] * x_{t - (W-1) + k}.

  Args:
    x: [batch, length, channels].
    weight: [W, channels] (weight[-1] multiplies the current step).
    bias: [channels].
    segment_ids: optional [batch, length]; inputs of another segment count as zeros.

  Returns:
    [batch, length, channels].
  """
  width = weight.shape[0]
  length = x.shape[1]
  out = x * weight[-1] + bias
  for shift in range(1, width):
    if shift >= length:
      break
    x_shift = jnp.pad(x, ((0, 0), (shift, 0), (0, 0)))[:, :length]
    if segment_ids is not None:
      seg_shift = jnp.pad(segment_ids, ((0, 0), (shift, 0)), constant_values=-1)[:, :length]
      x_shift = x_shift * (seg_shift == segment_ids)[..., None].astype(x.dtype)
    out = out + x_shift * weight[width - 1 - shift]
  return out


def segment_starts(segment_ids):
  """[batch, length] ints -> bool, True where a new segment starts (position 0 included)."""
  previous = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  return segment_ids != previous


def ssm_step(h, x, dt, A, B, C, D=None, z=None):
  """One recurrence step (decoding). h [b, d, n]; x, dt, z [b, d]; B, C [b, n]; D [d].

  Returns (y [b, d], h_next [b, d, n]), equal to `selective_scan` on a length-1 sequence.
  """
  h = jnp.exp(dt[..., None] * A) * h + (dt * x)[..., None] * B[:, None, :]
  y = jnp.einsum("bdn,bn->bd", h, C)
  if D is not None:
    y = y + D * x
  if z is not None:
    y = y * jax.nn.silu(z)
  return y, h


class MambaBlock(nnx.Module):
  """Mamba mixer: [batch, length, d_model] -> [batch, length, d_model]."""

  def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
               dt_rank: int | None = None, scan_method: str = "auto",
               chunk_size: int | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1,
               num_residuals: int = 1, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv),
                        ("expand", expand), ("num_residuals", num_residuals)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"MambaBlock {name}={value!r} must be a positive int.")
    if not 0 < dt_min <= dt_max:
      raise ValueError(f"MambaBlock needs 0 < dt_min={dt_min} <= dt_max={dt_max}.")
    scan_lib.resolve_method(scan_method)  # validates the name early
    self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
    self.d_inner = d_inner = expand * d_model
    self.dt_rank = dt_rank = dt_rank or math.ceil(d_model / 16)
    self.scan_method, self.chunk_size, self.dtype = scan_method, chunk_size, dtype

    def linear(d_in, d_out, axes, **kw):
      return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                        kernel_init=nnx.with_partitioning(
                            kw.pop("kernel_init", torch_linear_init()), axes), **kw)

    self.in_proj = linear(d_model, 2 * d_inner, ("embed", "ssm_inner"), use_bias=False)
    # PyTorch Conv1d's default init (uniform, bound 1/sqrt(fan_in), fan_in = d_conv).
    bound = 1.0 / math.sqrt(d_conv)
    uniform = lambda key, shape: jax.random.uniform(key, shape, param_dtype, -bound, bound)
    self.conv_weight = nnx.Param(uniform(rngs.params(), (d_conv, d_inner)),
                                 out_sharding=("conv_width", "ssm_inner"))
    self.conv_bias = nnx.Param(uniform(rngs.params(), (d_inner,)), out_sharding=("ssm_inner",))
    self.x_proj = linear(d_inner, dt_rank + 2 * d_state, ("ssm_inner", "ssm_proj"),
                         use_bias=False)
    # Mamba's dt init: weight ~ U(+-dt_rank^-0.5); dt ~ log-uniform [dt_min, dt_max] and the
    # bias is its inverse softplus, so softplus(bias) = dt at init.
    w_bound = dt_rank ** -0.5
    dt_weight_init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -w_bound,
                                                                  w_bound)
    key = rngs.params()
    dt = jnp.exp(jax.random.uniform(key, (d_inner,), jnp.float32) *
                 (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, 1e-4)
    dt_bias = dt + jnp.log(-jnp.expm1(-dt))
    self.dt_proj = linear(dt_rank, d_inner, ("ssm_rank", "ssm_inner"), use_bias=True,
                          kernel_init=dt_weight_init,
                          bias_init=nnx.with_partitioning(
                              lambda *_: dt_bias.astype(param_dtype), ("ssm_inner",)))
    a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32),
                                     (d_inner, d_state)))
    self.A_log = nnx.Param(a_log.astype(param_dtype), out_sharding=("ssm_inner", "ssm_state"))
    self.D = nnx.Param(jnp.ones((d_inner,), param_dtype), out_sharding=("ssm_inner",))
    self.out_proj = linear(d_inner, d_model, ("ssm_inner", "embed"), use_bias=False,
                           kernel_init=torch_linear_init(num_residuals ** -0.5))

  # --------------------------------------------------------------------------- pieces

  def _ssm_params(self, x):
    """x [B, L, d_inner] (after conv + SiLU) -> dt [B, L, d_inner], B, C [B, L, d_state]."""
    dt, b, c = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
    # The projection in the compute dtype, the bias added in float32 (as the reference's
    # kernel adds delta_bias in float32): bfloat16 would round softplus^-1(1e-3) = -6.9 by 0.03.
    dt = jnp.dot(dt, self.dt_proj.kernel[...].astype(dt.dtype)).astype(jnp.float32)
    return jax.nn.softplus(dt + self.dt_proj.bias[...].astype(jnp.float32)), b, c

  def _A(self):
    return -jnp.exp(self.A_log[...].astype(jnp.float32))

  def _conv(self, x, segment_ids=None):
    return causal_depthwise_conv(x, self.conv_weight[...].astype(x.dtype),
                                 self.conv_bias[...].astype(x.dtype), segment_ids)

  # --------------------------------------------------------------------------- forward

  def __call__(self, u, segment_ids=None):
    """u [B, L, d_model] (segment_ids [B, L], 0 = padding) -> [B, L, d_model]."""
    if u.ndim != 3 or u.shape[-1] != self.d_model:
      raise ValueError(f"MambaBlock expects [batch, length, d_model={self.d_model}]; "
                       f"got shape {u.shape}.")
    if segment_ids is not None and segment_ids.shape != u.shape[:2]:
      raise ValueError(f"segment_ids shape {segment_ids.shape} != [batch, length] "
                       f"{u.shape[:2]}.")
    x, z = jnp.split(self.in_proj(u), 2, axis=-1)
    x = jax.nn.silu(self._conv(x, segment_ids))
    dt, b, c = self._ssm_params(x)
    reset = None if segment_ids is None else segment_starts(segment_ids)
    y = scan_lib.selective_scan(x, dt, self._A(), b, c, self.D[...], z,
                                method=self.scan_method, chunk_size=self.chunk_size,
                                reset=reset)
    return self.out_proj(y.astype(self.dtype))

  # --------------------------------------------------------------------------- decoding

  def init_cache(self, batch_size: int, dtype=jnp.float32):
    """Zero decoding cache: conv_state [B, d_conv-1, d_inner], ssm_state [B, d_inner, d_state]."""
    return dict(conv_state=jnp.zeros((batch_size, self.d_conv - 1, self.d_inner), dtype),
                ssm_state=jnp.zeros((batch_size, self.d_inner, self.d_state), dtype))

  def decode(self, u, cache):
    """Continues the sequences in `cache` by u [B, T, d_model] -> (y [B, T, d_model], cache).

    T = 1 is one recurrence step; T > 1 (prefill) runs the parallel scan from the cached state.
    """
    if u.ndim != 3 or u.shape[-1] != self.d_model:
      raise ValueError(f"MambaBlock.decode expects [batch, T, d_model={self.d_model}]; "
                       f"got shape {u.shape}.")
    conv_state, ssm_state = cache["conv_state"], cache["ssm_state"]
    steps = u.shape[1]
    x, z = jnp.split(self.in_proj(u), 2, axis=-1)
    # The conv over [cached last d_conv-1 inputs, new inputs]; keep the newest d_conv-1.
    window = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)
    x = jax.nn.silu(self._conv(window)[:, -steps:])
    new_conv_state = window[:, window.shape[1] - (self.d_conv - 1):].astype(conv_state.dtype)
    dt, b, c = self._ssm_params(x)
    if steps == 1:
      y, h = ssm_step(ssm_state.astype(jnp.float32), x[:, 0].astype(jnp.float32), dt[:, 0],
                      self._A(), b[:, 0].astype(jnp.float32), c[:, 0].astype(jnp.float32),
                      self.D[...].astype(jnp.float32), z[:, 0].astype(jnp.float32))
      y = y[:, None]
    else:
      y, h = scan_lib.selective_scan(x, dt, self._A(), b, c, self.D[...], z,
                                     method=self.scan_method, chunk_size=self.chunk_size,
                                     initial_state=ssm_state, return_state=True)
    new_cache = dict(conv_state=new_conv_state, ssm_state=h.astype(ssm_state.dtype))
    return self.out_proj(y.astype(self.dtype)), new_cache
