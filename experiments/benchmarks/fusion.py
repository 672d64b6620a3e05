"""mPLUG fusion cost: skip-connected fusion vs all connected-attention vs all asymmetric layers,
forward and forward+backward time vs the number of visual tokens (issue #5).

    python experiments/benchmark.py fusion                           # P 256 576 2304, mPLUG-base
    python experiments/benchmark.py fusion --plot               # + docs/img/fusion_cost.png
    python experiments/benchmark.py fusion --image_tokens 16 32 --d_model 64 --num_heads 4 \
        --d_ff 128 --repeats 1                                       # tiny: compile-bound

Three `metalm_jax.models.SkipConnectedFusion` networks of --num_layers layers at the same
widths (mPLUG-base by default: d_model 768, 12 heads, FFN 3072), differing only in layer kinds:
  skip        the stride's pattern, 'AAACAA' for 6 layers, stride 3 (mPLUG-base);
  connected   'CCCCCC': connected attention (self-attention + FFN over concat[image; text],
              P + T tokens) in every layer;
  asymmetric  'AAAAAA': asymmetric co-attention in every layer (text self-attention,
              text-to-image cross-attention, FFN on the T text tokens only).
Inputs: random float32 image features [B, P, D] and text features [B, T, D], all text valid.
`fwd_ms`: jitted (image, text) -> fused (image, text); `fwdbwd_ms`: jitted gradient of the
scalar loss mean(image'^2) + mean(text'^2) w.r.t. the parameters and both inputs. Both are
compiled ahead of time and timed with `mfu.median_s` (one warm-up call excluded, median of
--repeats calls, `block_until_ready`).

FLOPs (`fusion_flops`): the matmul FLOPs of the forward, 2 per multiply-add, batch B, widths D
(model) and F (FFN), M = P + T:
  connected layer   8 M D^2 (q, k, v, o)  + 4 M^2 D (QK^T, AV)  + 4 M D F (FFN)
  asymmetric layer  8 T D^2 + 4 T^2 D (text self-attention)
                    + 4 T D^2 (cross q, o) + 4 P D^2 (cross k, v of the image) + 4 T P D
                    + 4 T D F (FFN)
Forward+backward = 3x forward (every matmul has an input and a weight gradient). Norms,
softmax, GELU and biases are not counted; `xla_gflops_fwd` (XLA's `cost_analysis()` of the
compiled forward) checks the count. Note the asymmetric layer's 4 P D^2: its cross-attention
projects the P image tokens to keys and values in every layer, so it is not free of P.

Ratios, per visual-token count: `time_vs_skip_*` = this row's ms / the skip row's ms (the
connected row's is the speed-up of skip-connected fusion over all connected-attention),
`flops_vs_skip` the same for the analytic FLOPs. `--json FILE` (the dispatcher's flag) keeps
the rows.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks.mfu import median_s
from metalm_jax.models.decoder import param_count
from metalm_jax.models.mplug import ASYMMETRIC, CONNECTED, SkipConnectedFusion, fusion_pattern

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PLOT = os.path.join("docs", "img", "fusion_cost.png")  # under REPO
CONFIGS = ("skip", "connected", "asymmetric")


def config_pattern(config: str, num_layers: int, stride: int) -> str:
  """The layer kinds of a benchmarked configuration, e.g. ('skip', 6, 3) -> 'AAACAA'."""
  if config == "skip":
    return fusion_pattern(num_layers, stride)
  if config == "connected":
    return CONNECTED * num_layers
  if config == "asymmetric":
    return ASYMMETRIC * num_layers
  raise ValueError(f"config={config!r} is not one of {CONFIGS}.")


def layer_flops(kind: str, *, batch: int, image_tokens: int, text_tokens: int, d_model: int,
                d_ff: int) -> int:
  """Forward matmul FLOPs of one fusion layer ('A' or 'C'); module docstring."""
  b, p, t, d, f = batch, image_tokens, text_tokens, d_model, d_ff
  if kind == CONNECTED:
    m = p + t
    return b * (8 * m * d * d + 4 * m * m * d + 4 * m * d * f)
  if kind == ASYMMETRIC:
    return b * (8 * t * d * d + 4 * t * t * d + 4 * t * d * d + 4 * p * d * d + 4 * t * p * d
                + 4 * t * d * f)
  raise ValueError(f"layer kind={kind!r} is not {ASYMMETRIC!r} or {CONNECTED!r}.")


def fusion_flops(pattern: str, **sizes) -> int:
  """Forward matmul FLOPs of a fusion network with these layer kinds (sizes: layer_flops')."""
  return sum(layer_flops(kind, **sizes) for kind in pattern)


def _xla_flops(compiled) -> float | None:
  """XLA's flop count of a compiled (or lowered) computation; None if it gives none."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (cost or {}).get("flops")


def fusion_fns(fusion: SkipConnectedFusion, *, batch: int, image_tokens: int,
               text_tokens: int, d_model: int):
  """(forward, grad, args) of a fusion network: forward(*args) -> fused (image, text),
  grad(*args) -> d loss / d (params, image, text) of loss = mean(image'^2) + mean(text'^2);
  args = (params, image [B, P, D], text [B, T, D]) with random float32 features. Works on an
  abstract network (`nnx.eval_shape`) too, for lowering only."""
  graphdef, params, rest = nnx.split(fusion, nnx.Param, ...)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.standard_normal((batch, image_tokens, d_model)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((batch, text_tokens, d_model)), jnp.float32)
  text_valid = jnp.ones((batch, text_tokens), bool)

  def forward(params, image, text):
    return nnx.merge(graphdef, params, rest)(image, text, text_valid=text_valid)

  def loss(params, image, text):
    fused_image, fused_text = forward(params, image, text)
    return jnp.mean(fused_image ** 2) + jnp.mean(fused_text ** 2)

  return forward, jax.grad(loss, argnums=(0, 1, 2)), (params, image, text)


def measure(pattern: str, *, batch: int, image_tokens: int, text_tokens: int, d_model: int,
            num_heads: int, d_ff: int, repeats: int, stride: int = 3) -> dict:
  """Builds the fusion network with these layer kinds; times its forward and gradient."""
  fusion = SkipConnectedFusion(num_layers=len(pattern), stride=stride, d_model=d_model,
                               num_heads=num_heads, d_ff=d_ff, pattern=pattern,
                               rngs=nnx.Rngs(0))
  forward, grad, args = fusion_fns(fusion, batch=batch, image_tokens=image_tokens,
                                   text_tokens=text_tokens, d_model=d_model)
  fwd = jax.jit(forward).lower(*args).compile()
  fwdbwd = jax.jit(grad).lower(*args).compile()
  sizes = dict(batch=batch, image_tokens=image_tokens, text_tokens=text_tokens,
               d_model=d_model, d_ff=d_ff)
  flops = fusion_flops(pattern, **sizes)
  xla = _xla_flops(fwd)
  fwd_s = median_s(lambda: fwd(*args), repeats)
  fwdbwd_s = median_s(lambda: fwdbwd(*args), repeats)
  return dict(params=param_count(fusion), gflops_fwd=flops / 1e9,
              xla_gflops_fwd=None if xla is None else xla / 1e9,
              fwd_ms=1e3 * fwd_s, fwdbwd_ms=1e3 * fwdbwd_s,
              fwd_gflops_per_s=flops / fwd_s / 1e9,
              fwdbwd_gflops_per_s=3 * flops / fwdbwd_s / 1e9)


def run(image_tokens=(256, 576, 2304), text_tokens=32, num_layers=6, stride=3, d_model=768,
        num_heads=12, d_ff=3072, batch=1, repeats=3, configs=CONFIGS) -> list[dict]:
  rows = []
  for p in image_tokens:
    for config in configs:
      pattern = config_pattern(config, num_layers, stride)
      row = dict(image_tokens=p, text_tokens=text_tokens, config=config, pattern=pattern)
      row.update(measure(pattern, batch=batch, image_tokens=p, text_tokens=text_tokens,
                         d_model=d_model, num_heads=num_heads, d_ff=d_ff, repeats=repeats,
                         stride=stride))
      rows.append(row)
      print(f"# {row}", flush=True)
  add_ratios(rows)
  return rows


def add_ratios(rows: list[dict]) -> None:
  """Each row's ms and FLOPs over the skip row's at the same visual-token count."""
  skip = {r["image_tokens"]: r for r in rows if r["config"] == "skip"}
  for r in rows:
    base = skip.get(r["image_tokens"])
    if base is None:
      continue
    r["time_vs_skip_fwd"] = r["fwd_ms"] / base["fwd_ms"]
    r["time_vs_skip_fwdbwd"] = r["fwdbwd_ms"] / base["fwdbwd_ms"]
    r["flops_vs_skip"] = r["gflops_fwd"] / base["gflops_fwd"]


COLUMNS = ["image_tokens", "text_tokens", "config", "pattern", "params", "gflops_fwd",
           "xla_gflops_fwd", "fwd_ms", "fwdbwd_ms", "fwd_gflops_per_s", "fwdbwd_gflops_per_s",
           "time_vs_skip_fwd", "time_vs_skip_fwdbwd", "flops_vs_skip"]


def to_markdown(rows, cols=COLUMNS) -> str:
  fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def summary(rows, target: float = 3.0) -> str:
  """One line per visual-token count: all connected / skip and asymmetric / skip."""
  lines = []
  for p in sorted({r["image_tokens"] for r in rows}):
    by = {r["config"]: r for r in rows if r["image_tokens"] == p}
    if "skip" not in by:
      continue
    parts = []
    for other in ("connected", "asymmetric"):
      if other in by:
        r = by[other]
        parts.append(f"{other} / skip: fwd {r['time_vs_skip_fwd']:.2f}x, fwd+bwd "
                     f"{r['time_vs_skip_fwdbwd']:.2f}x, FLOPs {r['flops_vs_skip']:.2f}x")
    if "connected" in by:
      met = min(by["connected"]["time_vs_skip_fwd"], by["connected"]["time_vs_skip_fwdbwd"])
      parts.append(f"target skip >= {target:g}x faster than connected: "
                   f"{'met' if met >= target else 'NOT met'}")
    lines.append(f"P={p}: " + "; ".join(parts))
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for config in CONFIGS:
    sel = sorted((r for r in rows if r["config"] == config), key=lambda r: r["image_tokens"])
    if not sel:
      continue
    tokens = [r["image_tokens"] for r in sel]
    label = f"{config} ({sel[0]['pattern']})"
    line, = axes[0].plot(tokens, [r["fwdbwd_ms"] for r in sel], "-o", label=f"{label} fwd+bwd")
    axes[0].plot(tokens, [r["fwd_ms"] for r in sel], "--s", color=line.get_color(),
                 label=f"{label} fwd")
  for other, style in (("connected", "-o"), ("asymmetric", "-^")):
    sel = sorted((r for r in rows if r["config"] == other and "flops_vs_skip" in r),
                 key=lambda r: r["image_tokens"])
    if not sel:
      continue
    tokens = [r["image_tokens"] for r in sel]
    line, = axes[1].plot(tokens, [r["time_vs_skip_fwdbwd"] for r in sel], style,
                         label=f"{other} / skip, fwd+bwd time")
    axes[1].plot(tokens, [r["time_vs_skip_fwd"] for r in sel], style.replace("-", "--"),
                 color=line.get_color(), alpha=0.6, label=f"{other} / skip, fwd time")
    axes[1].plot(tokens, [r["flops_vs_skip"] for r in sel], ":", color=line.get_color(),
                 label=f"{other} / skip, FLOPs")
  axes[0].set_yscale("log")
  axes[0].set_title("time (ms, median)")
  axes[1].set_title("ratio to skip-connected")
  tokens = sorted({r["image_tokens"] for r in rows})
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(tokens, [str(p) for p in tokens])
    ax.minorticks_off()
    ax.set_xlabel("visual tokens P (text tokens fixed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="benchmark.py fusion", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--image_tokens", type=int, nargs="+", default=[256, 576, 2304],
                      help="visual tokens P (ViT-B/16 at 256 px -> 256, 384 px -> 576; "
                      "ViT-L/14 at 672 px -> 2304)")
  parser.add_argument("--text_tokens", type=int, default=32)
  parser.add_argument("--num_layers", type=int, default=6)
  parser.add_argument("--stride", type=int, default=3, help="the skip configuration's S")
  parser.add_argument("--d_model", type=int, default=768)
  parser.add_argument("--num_heads", type=int, default=12)
  parser.add_argument("--d_ff", type=int, default=3072)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
  parser.add_argument("--plot", nargs="?", const=os.path.join(REPO, DEFAULT_PLOT), default="",
                      help=f"write a PNG of time and ratios vs visual tokens (default path "
                      f"{DEFAULT_PLOT})")
  args = parser.parse_args(argv)
  print(f"backend={jax.default_backend()} float32 layers={args.num_layers} "
        f"stride={args.stride} d_model={args.d_model} heads={args.num_heads} "
        f"d_ff={args.d_ff} batch={args.batch} text_tokens={args.text_tokens} "
        f"repeats={args.repeats} (median ms, warm-up excluded)")
  rows = run(tuple(args.image_tokens), args.text_tokens, args.num_layers, args.stride,
             args.d_model, args.num_heads, args.d_ff, args.batch, args.repeats,
             tuple(args.configs))
  print(to_markdown(rows))
  print()
  print(summary(rows))
  if args.plot:
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
  return rows


if __name__ == "__main__":
  main()
