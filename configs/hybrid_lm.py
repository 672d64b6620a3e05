r"""Hybrid Transformer-Mamba LM (Jamba's 1:7 schedule) or its pure-attention twin, on pydoc_topics.

  python experiments/prepare_data.py --dataset=pydoc_topics          # once (make demo does it)
  python experiments/train.py --config=configs/hybrid_lm.py --workdir=workdirs/hybrid_tiny
  python experiments/train.py --config=configs/hybrid_lm.py:mamba=2 --workdir=workdirs/hybrid2_tiny
  python experiments/train.py --config=configs/hybrid_lm.py:arch=attention --workdir=workdirs/attn_tiny
  python experiments/train.py --config=configs/hybrid_lm.py:schedule=MMMAMMMM --workdir=...
  python experiments/train.py --config=configs/hybrid_lm.py:schedule=MM2MM2AM2MM2 --workdir=...
  python experiments/long_context.py          # trains both at length L, evaluates at 2L..16L

Mamba-1 or Mamba-2 (`mamba=1|2`, or per layer in an explicit schedule: 'M' / 'M2'):
  mamba=1 (default)  the S6 selective scan (`ssm.MambaBlock`): a [d_inner, d_state] diagonal A,
            d_state 16; on CPU a sequential scan (one fused step per token).
  mamba=2   SSD (`ssm.Mamba2Block`, Dao & Gu 2024): one scalar A per head of `ssm_head_dim`
            channels, B / C shared by `ssm_num_groups` groups, a gated RMSNorm before out_proj;
            run as chunked matmuls (`chunk_size`): its cost grows with d_state only in the
            per-chunk state terms, so it affords a larger state (d_state 64 here, 64-128 in
            the paper), and GPU / TPU matrix units do the work. Pick it for large states and
            accelerators. On this project's 2-core CPU at equal state size (docs/benchmarks.md)
            the SSD scan is 1.2-2.2x faster than Mamba-1's forward from 4k to 32k tokens and
            its fwd+bwd / fwd is 2.1-2.4x (Mamba-1: 4.3-6.6x); inside a narrow (d_model 64)
            hybrid the Mamba-2 layers are faster up to 8k tokens and slightly slower beyond.
  Both keep a constant decoding state; the attention twin's d_ff matches either one's
  parameter count.

Arguments (comma-separated `key=value`):
  size      tiny (default: CPU, minutes) | small | test (smallest, for the test suite)
  arch      hybrid (default) | attention: every layer attention, RoPE, and a wider MLP so the
            parameter count equals the hybrid's (within one MLP column per layer)
  schedule  jamba (default: attention at layer i iff i % attn_period == attn_offset) or an
            explicit string of 'A' / 'M' / 'M2' tokens, one per layer (arch=hybrid only)
  mamba     1 (default) | 2: the Mamba layer of the jamba schedule (see above)
  runlocal  1 = shrink steps/batches for a smoke run on a laptop.
"""
import ml_collections

from metalm_jax import config as config_lib

SIZES = {
    "test": dict(d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=64, d_state=8,
                 m2_d_state=16, m2_head_dim=16, attn_period=4, attn_offset=2, dropout=0.0,
                 seq_len=32, batch=8, steps=6, lr=3e-3, vocab=512),
    "tiny": dict(d_model=128, num_layers=8, num_heads=4, num_kv_heads=4, d_ff=384, d_state=16,
                 m2_d_state=64, m2_head_dim=64, attn_period=8, attn_offset=4, dropout=0.1,
                 seq_len=128, batch=16, steps=300, lr=3e-3, vocab=1024),
    "small": dict(d_model=512, num_layers=16, num_heads=8, num_kv_heads=8, d_ff=1536,
                  d_state=16, m2_d_state=64, m2_head_dim=64, attn_period=8, attn_offset=4,
                  dropout=0.1, seq_len=512, batch=32, steps=20_000, lr=1e-3, vocab=8192),
}
ARCHS = ("hybrid", "attention")
MAMBA = ("1", "2")


def ssm_d_state(s: dict, schedule: str) -> int:
  """One d_state for every SSM layer: Mamba-2's (larger) when the schedule has M2 layers."""
  from metalm_jax.models.hybrid import schedule_layers

  return s["m2_d_state"] if "M2" in schedule_layers(schedule) else s["d_state"]


def attention_twin_d_ff(s: dict, schedule: str) -> int:
  """d_ff of the all-attention model whose parameter count equals the hybrid's."""
  from metalm_jax.models.hybrid import mamba_layer_extra_params, schedule_layers

  kinds, d_state = schedule_layers(schedule), ssm_d_state(s, schedule)
  extra = sum(kinds.count(kind) * mamba_layer_extra_params(
      s["d_model"], s["num_heads"], num_kv_heads=s["num_kv_heads"], d_state=d_state,
      mamba_version=version, ssm_head_dim=s["m2_head_dim"])
      for kind, version in (("M", 1), ("M2", 2)))
  return s["d_ff"] + round(extra / (s["num_layers"] * 3 * s["d_model"]))  # SwiGLU: 3 D x F


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, size="tiny", arch="hybrid", schedule="jamba",
                                      mamba="1", runlocal="0")
  if args["size"] not in SIZES:
    raise ValueError(f"size={args['size']!r}; valid sizes: {sorted(SIZES)}")
  if args["arch"] not in ARCHS:
    raise ValueError(f"arch={args['arch']!r}; valid: {ARCHS}")
  if args["mamba"] not in MAMBA:
    raise ValueError(f"mamba={args['mamba']!r}; valid: {MAMBA} (Mamba-1 or Mamba-2 layers)")
  s = SIZES[args["size"]]
  from metalm_jax.models.hybrid import resolve_schedule

  hybrid_schedule = resolve_schedule(s["num_layers"], args["schedule"],
                                     attn_period=s["attn_period"], attn_offset=s["attn_offset"],
                                     mamba_version=int(args["mamba"]))
  hybrid = args["arch"] == "hybrid"
  config = config_lib.base_config()
  config.model = ml_collections.ConfigDict(dict(
      name="hybrid", vocab_size=s["vocab"], d_model=s["d_model"], num_layers=s["num_layers"],
      num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"],
      d_ff=s["d_ff"] if hybrid else attention_twin_d_ff(s, hybrid_schedule),
      schedule=hybrid_schedule if hybrid else "attention",
      attn_period=s["attn_period"], attn_offset=s["attn_offset"],
      d_state=ssm_d_state(s, hybrid_schedule), d_conv=4, expand=2,
      scan_method="auto", mamba_version=int(args["mamba"]), ssm_head_dim=s["m2_head_dim"],
      ssm_num_groups=1, chunk_size=None,
      mlp_activation="swiglu", position="none" if hybrid else "rope",
      max_len=max(2048, s["seq_len"]), dropout_rate=s["dropout"], tie_embeddings=False,
      norm="rmsnorm", attention_impl="reference", blockwise_threshold=2048, block_size=512,
      remat_policy="none", dtype="float32", param_dtype="float32"))
  config.data.vocab_size = s["vocab"]
  config_lib.set_schedule(config, seq_len=s["seq_len"], batch=s["batch"], steps=s["steps"],
                          lr=s["lr"], test=args["size"] == "test",
                          runlocal=args["runlocal"] == "1")
  return config_lib.finalize(config)
