"""Train-step throughput: our decoder vs a PyTorch GPT-2 (`transformers.GPT2LMHeadModel`) of
identical shape, timed alternately in the same process.

    python experiments/benchmark.py gpt2                                  # d 512, 6 layers, T 256
    python experiments/benchmark.py gpt2 --d_model 768 --num_layers 12 --num_heads 12 \\
        --vocab 50257 --seq_len 256 --batch 4 --rounds 4                  # GPT-2 small's shape

Both sides: the same batch x sequence of random tokens, vocab, layers, d_model, heads, MLP
4 d_model with tanh-GELU (GPT-2's 'gelu_new' = jax.nn.gelu's default), pre-LayerNorm
(eps 1e-6 on both), learned absolute positions (table of seq_len rows), tied input/output
embeddings, dropout 0, float32, next-token cross-entropy, then global-norm clipping (1.0) and
an AdamW step (b1 0.9, b2 0.98, eps 1e-8, weight decay 0.1 on matrices only).

Ours: the trainer's path (`mfu.setup`: `state_lib.Model`, `make_optimizer`,
`make_train_step` on a 1-device mesh, 'causal_lm' objective) with `Decoder(position='learned',
mlp_activation='gelu', norm='layernorm', tie_embeddings=True, d_ff=4 d_model)`.
Torch: `GPT2LMHeadModel(GPT2Config(...))` built locally (no download), its default attention
(`sdpa`), `torch.optim.AdamW` (foreach) with a constant learning rate (ours evaluates its
warmup-cosine schedule inside the step, a few scalar ops), `clip_grad_norm_`;
`torch.set_num_threads` = the cores this process may use.

The one shape difference: GPT-2's linear layers carry biases (c_attn, c_proj, c_fc,
mlp.c_proj: 9 d_model per layer) and our decoder's projections have none, so torch has
exactly 9 d_model num_layers more parameters (printed; ~0.1% of the total).

Timing: after --warmup steps each, --rounds rounds of (one ours step, one torch step), each
step timed to completion (`block_until_ready` / torch is synchronous on CPU); medians.
`ratio` = ours tokens/s / torch tokens/s.

What bounds the ratio (same run): `peak_gflops` is `mfu.matmul_peak` (jitted float32 n^2
matmuls, n in 2048 / 4096, best of before and after); `ours_mfu` / `torch_mfu` divide both
sides' model FLOPs (`flops_per_token` with ours' matmul N; GPT-2's biases add no matmul
FLOPs) by step time and peak; `ratio_at_peak` = torch_ms / (step FLOPs / peak) is the ratio a
step running every FLOP at the measured matmul peak would reach; `matmul_only_ms` is
`mfu.matmul_only_step` (just the decoder's dot products, forward + backward, at these shapes)
and `ratio_matmul_only` = torch_ms / matmul_only_ms the ratio if everything but our
matmuls were free.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from experiments.benchmarks import mfu
from metalm_jax.models.decoder import flops_per_token


def torch_gpt2(*, vocab: int, d_model: int, num_layers: int, num_heads: int, seq_len: int):
  """A freshly initialised GPT2LMHeadModel of the given shape, dropout 0."""
  from transformers import GPT2Config, GPT2LMHeadModel

  config = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=d_model,
                      n_layer=num_layers, n_head=num_heads, n_inner=4 * d_model,
                      activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, layer_norm_epsilon=1e-6, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0)
  return GPT2LMHeadModel(config)


def torch_step_fn(model, inputs, targets, *, lr: float, weight_decay: float):
  """A closure doing one AdamW training step of `model` on (inputs, targets) -> loss."""
  import torch
  import torch.nn.functional as F

  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay),
                           dict(params=no_decay, weight_decay=0.0)],
                          lr=lr, betas=(0.9, 0.98), eps=1e-8, foreach=True)
  vocab = model.config.vocab_size
  model.train()

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()

  return step


def measure(*, vocab: int, d_model: int, num_layers: int, num_heads: int, seq_len: int,
            batch: int, warmup: int, rounds: int, attention_impl: str = "reference") -> dict:
  import torch

  torch.manual_seed(0)
  mconfig = mfu.model_config(vocab=vocab, d_model=d_model, num_layers=num_layers,
                             num_heads=num_heads, d_ff=4 * d_model, seq_len=seq_len,
                             mlp_activation="gelu", position="learned", norm="layernorm",
                             tie=True, attention_impl=attention_impl)
  mconfig["max_len"] = seq_len
  peak_before = mfu.matmul_peak(repeats=3)[0]
  model, state, rest, data, train_step = mfu.setup(mconfig, batch, seq_len)
  train_step = train_step.lower(state, rest, data).compile()

  tmodel = torch_gpt2(vocab=vocab, d_model=d_model, num_layers=num_layers,
                      num_heads=num_heads, seq_len=seq_len)
  host = mfu.random_batch(np.random.default_rng(0), batch, seq_len, vocab)
  inputs = torch.from_numpy(np.asarray(host["inputs"], np.int64))
  targets = torch.from_numpy(np.asarray(host["targets"], np.int64))
  tstep = torch_step_fn(tmodel, inputs, targets, lr=3e-4, weight_decay=0.1)

  ours_loss = torch_loss = None
  for _ in range(warmup):
    state, metrics = train_step(state, rest, data)
    ours_loss = float(metrics["loss"])
    torch_loss = float(tstep())
  ours, theirs = [], []
  for _ in range(rounds):
    start = time.perf_counter()
    state, metrics = train_step(state, rest, data)
    jax.block_until_ready((state, metrics))
    ours.append(time.perf_counter() - start)
    start = time.perf_counter()
    tstep()
    theirs.append(time.perf_counter() - start)

  peak = max(peak_before, mfu.matmul_peak(repeats=3)[0])
  mm, mm_args = mfu.matmul_only_step(mconfig, batch, seq_len)
  mm_s = mfu.median_s(lambda: mm(*mm_args), 3)

  tokens = batch * seq_len
  ours_s, torch_s = statistics.median(ours), statistics.median(theirs)
  torch_params = sum(p.numel() for p in tmodel.parameters())
  n_matmul, _ = mfu.matmul_param_count(model.abstract_params)
  step_flops = tokens * flops_per_token(n_matmul, num_layers=num_layers, num_heads=num_heads,
                                        head_dim=d_model // num_heads, seq_len=seq_len)
  return dict(d_model=d_model, layers=num_layers, heads=num_heads, vocab=vocab,
              seq_len=seq_len, batch=batch, attention=attention_impl,
              params_ours=model.param_count(), params_torch=torch_params,
              params_diff=torch_params - model.param_count(), biases=9 * d_model * num_layers,
              ours_ms=1e3 * ours_s, torch_ms=1e3 * torch_s,
              ours_tokens_per_s=tokens / ours_s, torch_tokens_per_s=tokens / torch_s,
              ratio=torch_s / ours_s, ours_loss0=ours_loss, torch_loss0=torch_loss,
              torch_threads=torch.get_num_threads(), peak_gflops=peak / 1e9,
              ours_mfu=step_flops / ours_s / peak, torch_mfu=step_flops / torch_s / peak,
              ratio_at_peak=torch_s * peak / step_flops, matmul_only_ms=1e3 * mm_s,
              ratio_matmul_only=torch_s / mm_s)


COLUMNS = ["d_model", "layers", "heads", "vocab", "seq_len", "batch", "attention", "params_ours",
           "params_torch", "params_diff", "ours_ms", "torch_ms", "ours_tokens_per_s",
           "torch_tokens_per_s", "ratio", "peak_gflops", "ours_mfu", "torch_mfu",
           "matmul_only_ms", "ratio_matmul_only", "ratio_at_peak"]


def main(argv=None):
  import torch

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--num_layers", type=int, default=6)
  parser.add_argument("--num_heads", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--seq_len", type=int, nargs="+", default=[256])
  parser.add_argument("--batch", type=int, nargs="+", default=[8])
  parser.add_argument("--attention_impl", nargs="+", default=["reference"],
                      choices=["reference", "xla", "blockwise"])
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="0: the cores this process may use")
  args = parser.parse_args(argv)
  threads = args.torch_threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  print(f"backend={jax.default_backend()} torch={torch.__version__} threads={threads} "
        f"float32; {args.rounds} alternating rounds after {args.warmup} warm-up steps (medians)")
  rows = []
  for seq_len in args.seq_len:
    for batch in args.batch:
      for impl in args.attention_impl:
        row = measure(vocab=args.vocab, d_model=args.d_model, num_layers=args.num_layers,
                      num_heads=args.num_heads, seq_len=seq_len, batch=batch,
                      warmup=args.warmup, rounds=args.rounds, attention_impl=impl)
        rows.append(row)
        print(f"# {row}", flush=True)
  print(mfu.to_markdown(rows, COLUMNS))
  return rows


if __name__ == "__main__":
  main()
