"""Training-step model FLOPs utilisation (MFU) of the decoder against this machine's measured
matmul peak in the compute dtype, both measured in the same run.

    python experiments/benchmark.py mfu                       # d 1024, 8 layers, T 256, batch 8
    python experiments/benchmark.py mfu --profile --attention_impl reference xla
    python experiments/benchmark.py mfu --d_model 512 --seq_len 512 --tie 0 1   # decoder_lm small
    python experiments/benchmark.py mfu --dtype bfloat16 --attention_impl cudnn  # GPU only

--dtype: the model's compute dtype (`config.model.dtype`); parameters and optimizer state
stay float32 (`param_dtype`), as `--config.model.dtype=bfloat16` trains. The peak is
measured in the same dtype. `--attention_impl cudnn` (`jax.nn.dot_product_attention`'s cuDNN
kernel) needs a GPU backend and --dtype bfloat16; otherwise the benchmark stops before any
work with a message saying so.

Peak: jitted `a @ b` of n x n matrices in --dtype for n in --peak_sizes (2048, 4096), best of
--peak_repeats calls each (`block_until_ready`); the highest is the peak. It is measured
before and after each row's train steps and the higher of the two is used (the printed
`peak_before_after` shows load changes during a row). Train step: the trainer's own path
(`state_lib.Model`, `make_optimizer` (AdamW + global-norm clipping), `create_train_state`,
`step_lib.make_train_step` on a 1-device mesh, the 'causal_lm' objective) on random tokens,
compiled once; after --warmup steps, --steps steps are timed one by one with
`block_until_ready`: `step_ms` is their median (`mfu_best_step` uses the fastest).

Model FLOPs per token: `flops_per_token(N, ...)` = 6 N + 12 L N_h H T (PaLM appendix B; the
attention term does not discount the causal half, as every attention path here computes the
full T x T product). N is the *matmul* parameter count: the attention and MLP kernels of
every block plus the output projection (the untied head, or the tied table counted once,
since the logits matmul uses it). Not counted: the token table when untied (a gather), the
learned position table (an add) and norm scales/biases (elementwise). `mfu` = tokens/s x
flops_per_token / peak; `mfu_nonembed` uses PaLM's strict non-embedding N (head excluded);
`xla_flops_ratio` = XLA's `cost_analysis()` flops of the compiled step / the analytic count
(the step's elementwise, softmax and optimizer FLOPs are the excess over 1).

--profile explains the gap to the peak:
  fwd_ms / fwdbwd_ms: the loss alone and its gradient, jitted separately; update_ms = step -
    fwdbwd (clipping + AdamW; negative = noise).
  matmul_only_ms: `matmul_only_step`, a jitted chain of exactly the model's dot products at
    the step's shapes (forward + both backward products, attention's QK^T and AV included)
    and nothing else: what the step would take if every non-matmul op were free.
  *_share: a `jax.profiler` trace of 2 steps; the XLA CPU thunks' run time summed per
    category of `classify_hlo` (matmul, attention_elementwise, logits_loss, copy (layout
    transposes), update (outside jvp: clip + AdamW), other (norms, activations, residuals,
    embedding gather/scatter)), as a share of all thunk time (thunk_ms_per_step). Thunks can
    overlap on the 2 cores, so shares are approximate.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from metalm_jax import config as config_lib
from metalm_jax import objectives
from metalm_jax import sharding
from metalm_jax.models.decoder import flops_per_token
from metalm_jax.train import state as state_lib
from metalm_jax.train import optimizer as optimizer_lib
from metalm_jax.train import step as step_lib


# ----------------------------------------------------------------------------- peak

def matmul_peak(sizes=(2048, 4096), repeats: int = 5,
                dtype="float32") -> tuple[float, float]:
  """(best, median) FLOP/s of a jitted [n, n] @ [n, n] in `dtype`, for the size n whose best
  is highest (the peak is the machine's best, so MFU is not flattered by a slow size)."""
  results = []
  for size in sizes:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    f = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(f(a, b))
      times.append(time.perf_counter() - start)
    flops = 2.0 * size ** 3
    results.append((flops / min(times), flops / statistics.median(times)))
  return max(results)


# ----------------------------------------------------------------------------- model

def model_config(*, vocab: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
                 seq_len: int, mlp_activation: str = "swiglu", position: str = "rope",
                 norm: str = "rmsnorm", tie: bool = False,
                 attention_impl: str = "reference", dtype: str = "float32") -> dict:
  """A `config.model` for the decoder (the keys configs/decoder_lm.py sets); `dtype` is the
  compute dtype, parameters stay float32."""
  return dict(name="decoder", vocab_size=vocab, d_model=d_model, num_layers=num_layers,
              num_heads=num_heads, num_kv_heads=num_heads, d_ff=d_ff,
              mlp_activation=mlp_activation, position=position, max_len=max(2048, seq_len),
              dropout_rate=0.0, tie_embeddings=tie, norm=norm,
              attention_impl=attention_impl, dtype=dtype, param_dtype="float32")


def matmul_param_count(params: dict) -> tuple[int, int]:
  """(N used in matmuls, N non-embedding) of a decoder's pure params dict: see the module
  docstring. Kernels of blocks and the head are matmul parameters; the tied token table is
  one (the logits matmul), the untied one and the position table are not."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  blocks = head = tied = 0
  for path, x in flat:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    size = int(np.prod(x.shape))
    if keys[0] == "blocks" and keys[-1] == "kernel":
      blocks += size
    elif keys[0] == "head":
      head += size
    elif keys[0] == "embedder":
      tied += size
  return blocks + (head if head else tied), blocks


def random_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab: int) -> dict:
  """A packed causal-LM batch of random tokens (one document per row, no padding)."""
  tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
              segment_ids=np.ones((batch, seq_len), np.int32),
              weights=np.ones((batch, seq_len), np.float32))


def setup(mconfig: dict, batch: int, seq_len: int, steps: int = 1000):
  """Everything the trainer builds for a train step, on a 1-device mesh."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = sharding.DATA_PARALLEL_RULES
  opt = config_lib.base_config().optimizer
  model = state_lib.Model(mconfig)
  tx = optimizer_lib.make_optimizer(opt, steps)
  schedule = optimizer_lib.learning_rate_schedule(opt, steps)
  state, shardings, rest = state_lib.create_train_state(model, tx, jax.random.key(0), mesh,
                                                        rules)
  batch_shardings = sharding.batch_sharding(mesh, rules)
  train_step = step_lib.make_train_step(model, tx, objectives.get("causal_lm"), schedule,
                                        shardings, rest, batch_shardings, mesh, rules=rules)
  data = jax.device_put(random_batch(np.random.default_rng(0), batch, seq_len,
                                     mconfig["vocab_size"]), batch_shardings)
  return model, state, rest, data, train_step


def _time_steps(train_step, state, rest, data, warmup: int, steps: int):
  """Per-step seconds of `steps` steps after `warmup` ones; returns (times, state)."""
  for _ in range(warmup):
    state, metrics = train_step(state, rest, data)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_step(state, rest, data)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return times, state


def median_s(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_only_step(mconfig: dict, batch: int, seq_len: int):
  """A jitted function doing exactly the decoder's dot products, forward and backward
  (3 matmuls per weight matmul, 6 per attention product), and nothing else; returns
  (fn, args). Times the best the matmuls alone can do at these shapes."""
  d, f, v = mconfig["d_model"], mconfig["d_ff"], mconfig["vocab_size"]
  heads, layers = mconfig["num_heads"], mconfig["num_layers"]
  h = d // heads
  gated = mconfig["mlp_activation"] == "swiglu"
  m = batch * seq_len
  key = jax.random.key(0)
  dtype = jnp.dtype(mconfig.get("dtype", "float32"))  # the step's compute dtype
  mk = lambda *s: (jax.random.normal(key, s, jnp.float32) * 0.01).astype(dtype)
  weights = dict(qkv=mk(layers, d, 3 * d), o=mk(layers, d, d),
                 wi=mk(layers, d, (2 if gated else 1) * f), wo=mk(layers, f, d), head=mk(d, v))
  x, x_ff = mk(m, d), mk(m, f)
  q = mk(batch * heads, seq_len, h)
  p = mk(batch * heads, seq_len, seq_len)

  def dense(x, w):  # forward + the two backward matmuls of x @ w
    y = x @ w
    return y, y @ w.T, x.T @ y

  def fn(weights, x, x_ff, q, p):
    out = []
    for i in range(layers):
      for w in (weights["qkv"][i], weights["o"][i], weights["wi"][i], weights["wo"][i]):
        out.append(sum(jnp.sum(t) for t in dense(x if w.shape[0] == d else x_ff, w)))
      s = jnp.einsum("bqh,bkh->bqk", q, q)  # QK^T forward, and its two backward products
      out.append(jnp.sum(s) + jnp.sum(jnp.einsum("bqk,bkh->bqh", p, q))
                 + jnp.sum(jnp.einsum("bqk,bqh->bkh", p, q)))
      o = jnp.einsum("bqk,bkh->bqh", p, q)  # AV forward, and its two backward products
      out.append(jnp.sum(o) + jnp.sum(jnp.einsum("bqh,bkh->bqk", o, q))
                 + jnp.sum(jnp.einsum("bqk,bqh->bkh", p, o)))
    out.append(sum(jnp.sum(t) for t in dense(x, weights["head"])))
    return sum(out)

  args = (weights, x, x_ff, q, p)
  return jax.jit(fn).lower(*args).compile(), args


def measure(mconfig: dict, *, batch: int, seq_len: int, warmup: int, steps: int,
            peak_sizes: tuple[int, ...], peak_repeats: int, profile: bool = False) -> dict:
  """One row: peak, step time, tokens/s, model FLOPs, MFU (and the profile split); the peak
  in the model's compute dtype."""
  dtype = mconfig.get("dtype", "float32")
  peak_before = matmul_peak(peak_sizes, peak_repeats, dtype)
  model, state, rest, data, train_step = setup(mconfig, batch, seq_len)
  start = time.perf_counter()
  compiled = train_step.lower(state, rest, data).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  times, state = _time_steps(compiled, state, rest, data, warmup, steps)
  peak_after = matmul_peak(peak_sizes, peak_repeats, dtype)
  peak = max(peak_before[0], peak_after[0])
  peak_median = statistics.median([peak_before[1], peak_after[1]])
  n_matmul, n_nonembed = matmul_param_count(model.abstract_params)
  kw = dict(num_layers=mconfig["num_layers"], num_heads=mconfig["num_heads"],
            head_dim=mconfig["d_model"] // mconfig["num_heads"], seq_len=seq_len)
  fpt = flops_per_token(n_matmul, **kw)
  fpt_nonembed = flops_per_token(n_nonembed, **kw)
  tokens = batch * seq_len
  step_s, best_s = statistics.median(times), min(times)
  achieved = tokens * fpt / step_s
  row = dict(d_model=mconfig["d_model"], layers=mconfig["num_layers"],
             heads=mconfig["num_heads"], d_ff=mconfig["d_ff"], mlp=mconfig["mlp_activation"],
             vocab=mconfig["vocab_size"], tie=mconfig["tie_embeddings"],
             attention=mconfig["attention_impl"], dtype=dtype, batch=batch, seq_len=seq_len,
             params=model.param_count(), n_matmul=n_matmul, step_ms=1e3 * step_s,
             best_step_ms=1e3 * best_s, tokens_per_s=tokens / step_s,
             model_gflops=achieved / 1e9, peak_gflops=peak / 1e9,
             peak_median_gflops=peak_median / 1e9,
             peak_before_after=f"{peak_before[0] / 1e9:.0f}/{peak_after[0] / 1e9:.0f}",
             mfu=achieved / peak, mfu_best_step=tokens * fpt / best_s / peak,
             mfu_nonembed=tokens * fpt_nonembed / step_s / peak,
             xla_flops_ratio=xla_flops / (tokens * fpt), compile_s=compile_s)
  if profile:
    row.update(profile_split(model, state, rest, data, compiled, mconfig, batch, seq_len,
                             max(3, steps // 2), step_s))
  return row


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def classify_hlo(hlo: str, *, batch: int, seq_len: int, heads: int, vocab: int) -> dict:
  """{instruction name: category} for the compiled step's HLO text.

  matmul: a dot / convolution, or a fusion whose computation holds one. Otherwise by output
  shape: attention_elementwise (two dims of seq_len, >= B N T^2 elements: mask, softmax and
  their gradients), logits_loss (>= B T V elements: log-softmax / cross-entropy), copy
  (copies / transposes); then by the op's jax name: update (outside `jvp` and its
  `transpose`: clipping, AdamW, parameter update) or other (norms, activations, residuals,
  embedding gather / scatter).
  """
  comps, current, instrs = {}, None, []
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header and " = " not in line:
      current = header.group(1)
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      name, shape, op, rest = m.groups()
      comps[current].append(op)
      instrs.append((name, shape, op, rest))
  out = {}
  for name, shape, op, rest in instrs:
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    ops = comps.get(called.group(1), []) if called else []
    dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0])] if "[" in shape else []
    numel = int(np.prod(dims)) if dims else 0
    op_name = re.search(r'op_name="([^"]*)"', rest)
    op_name = op_name.group(1) if op_name else ""
    if op in ("dot", "convolution") or "dot" in ops or "convolution" in ops:
      kind = "matmul"
    elif dims.count(seq_len) >= 2 and numel >= batch * heads * seq_len ** 2:
      kind = "attention_elementwise"
    elif vocab in dims and numel >= batch * seq_len * vocab:
      kind = "logits_loss"
    elif op in ("copy", "transpose") or name.startswith(("copy", "transpose")):
      kind = "copy"
    elif op_name and "jvp(" not in op_name:
      kind = "update"
    else:
      kind = "other"
    out[name] = kind
  return out


def trace_breakdown(compiled, state, rest, data, mconfig, batch, seq_len, steps=2):
  """Share of the XLA CPU thunks' summed run time per `classify_hlo` category, from a
  `jax.profiler` trace of `steps` train steps (returns (shares, state))."""
  import collections
  import glob
  import tempfile

  from jax._src.lib import _profile_data

  kinds = classify_hlo(compiled.as_text(), batch=batch, seq_len=seq_len,
                       heads=mconfig["num_heads"], vocab=mconfig["vocab_size"])
  totals = collections.Counter()
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(steps):
      state, metrics = compiled(state, rest, data)
    jax.block_until_ready((state, metrics))
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))[-1]
    for plane in _profile_data.ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          if event.name in kinds:
            totals[kinds[event.name]] += event.duration_ns
  total = max(sum(totals.values()), 1)
  shares = {f"{k}_share": totals.get(k, 0) / total
            for k in ("matmul", "attention_elementwise", "logits_loss", "copy", "other",
                      "update")}
  shares["thunk_ms_per_step"] = total / 1e6 / steps
  return shares, state


def profile_split(model, state, rest, data, compiled, mconfig, batch, seq_len, repeats,
                  step_s) -> dict:
  """Seconds of forward, forward+backward and matmuls-only vs the full step, and the
  trace's time shares per op category."""
  objective = objectives.get("causal_lm")
  key = jax.random.key(0)

  def loss(params):
    return objective.loss(model.merge(params, rest), data, deterministic=True, rng=key)[0]

  params = state.params
  fwd = jax.jit(loss).lower(params).compile()
  grad = jax.jit(jax.grad(loss)).lower(params).compile()
  fwd_s = median_s(lambda: fwd(params), repeats)
  grad_s = median_s(lambda: grad(params), repeats)
  mm, args = matmul_only_step(mconfig, batch, seq_len)
  mm_s = median_s(lambda: mm(*args), repeats)
  shares, state = trace_breakdown(compiled, state, rest, data, mconfig, batch, seq_len)
  return dict(fwd_ms=1e3 * fwd_s, fwdbwd_ms=1e3 * grad_s,
              update_ms=1e3 * (step_s - grad_s), matmul_only_ms=1e3 * mm_s,
              matmul_only_over_step=mm_s / step_s, **shares)


COLUMNS = ["d_model", "layers", "heads", "d_ff", "mlp", "vocab", "tie", "attention", "dtype",
           "batch", "seq_len", "params", "n_matmul", "step_ms", "tokens_per_s", "model_gflops",
           "peak_gflops", "peak_before_after", "mfu", "mfu_best_step", "mfu_nonembed",
           "xla_flops_ratio", "compile_s"]
PROFILE_COLUMNS = ["d_model", "layers", "attention", "dtype", "batch", "seq_len", "step_ms",
                   "fwd_ms", "fwdbwd_ms", "update_ms", "matmul_only_ms",
                   "matmul_only_over_step", "thunk_ms_per_step", "matmul_share",
                   "attention_elementwise_share", "logits_loss_share", "copy_share",
                   "other_share", "update_share", "mfu"]


def to_markdown(rows, cols=COLUMNS) -> str:
  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, bool):
      return str(int(v))
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def check_args(attention_impls, dtype: str, backend: str) -> str | None:
  """Why these flags cannot run on `backend` (a message for the command line), or None."""
  if "cudnn" in attention_impls:
    if backend != "gpu":
      return (f"--attention_impl cudnn needs a GPU, but jax's default backend is {backend!r}; "
              "run on a GPU machine (with the cuda extra installed) or use --attention_impl "
              "xla / reference")
    if dtype != "bfloat16":
      return (f"--attention_impl cudnn needs bf16/fp16 inputs, but --dtype is {dtype}; "
              "add --dtype bfloat16")
  return None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d_model", type=int, nargs="+", default=[1024])
  parser.add_argument("--num_layers", type=int, default=8)
  parser.add_argument("--num_heads", type=int, default=8)
  parser.add_argument("--d_ff", type=int, default=0, help="0: 4 d_model (gelu) / 3 d_model "
                      "(swiglu, as configs/decoder_lm.py small)")
  parser.add_argument("--mlp_activation", default="swiglu", choices=["swiglu", "gelu"])
  parser.add_argument("--norm", default="rmsnorm", choices=["rmsnorm", "layernorm"])
  parser.add_argument("--position", default="rope", choices=["rope", "learned", "sinusoidal"])
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--tie", type=int, nargs="+", default=[0], choices=[0, 1])
  parser.add_argument("--attention_impl", nargs="+", default=["xla"],
                      choices=["reference", "xla", "blockwise", "cudnn"],
                      help="cudnn: GPU only, with --dtype bfloat16")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="compute dtype of the model and of the peak matmul (parameters "
                      "and optimizer state stay float32)")
  parser.add_argument("--seq_len", type=int, nargs="+", default=[256])
  parser.add_argument("--batch", type=int, nargs="+", default=[8])
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--peak_sizes", type=int, nargs="+", default=[2048, 4096])
  parser.add_argument("--peak_repeats", type=int, default=5)
  parser.add_argument("--profile", action="store_true",
                      help="also time forward, forward+backward and a matmul-only twin")
  args = parser.parse_args(argv)
  problem = check_args(args.attention_impl, args.dtype, jax.default_backend())
  if problem:
    parser.error(problem)
  print(f"backend={jax.default_backend()} devices={jax.device_count()} {args.dtype}; peak: "
        f"best of {args.peak_repeats} {args.dtype} n^2 matmuls, n in {args.peak_sizes}, before "
        f"+ after each row")
  rows = []
  for d_model in args.d_model:
    d_ff = args.d_ff or (3 * d_model if args.mlp_activation == "swiglu" else 4 * d_model)
    for seq_len in args.seq_len:
      for batch in args.batch:
        for tie in args.tie:
          for impl in args.attention_impl:
            mconfig = model_config(vocab=args.vocab, d_model=d_model,
                                   num_layers=args.num_layers, num_heads=args.num_heads,
                                   d_ff=d_ff, seq_len=seq_len, mlp_activation=args.mlp_activation,
                                   position=args.position, norm=args.norm, tie=bool(tie),
                                   attention_impl=impl, dtype=args.dtype)
            row = measure(mconfig, batch=batch, seq_len=seq_len, warmup=args.warmup,
                          steps=args.steps, peak_sizes=tuple(args.peak_sizes),
                          peak_repeats=args.peak_repeats, profile=args.profile)
            rows.append(row)
            print(f"# {row}", flush=True)
  print(to_markdown(rows))
  if args.profile:
    print()
    print(to_markdown(rows, PROFILE_COLUMNS))
  return rows


if __name__ == "__main__":
  main()
