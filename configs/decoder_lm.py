r"""Causal decoder LM on the bundled Python-documentation corpus (pydoc_topics).

  python experiments/prepare_data.py --dataset=pydoc_topics          # once (make demo does it)
  python experiments/train.py --config=configs/decoder_lm.py --workdir=workdirs/decoder_tiny
  python experiments/train.py --config=configs/decoder_lm.py:size=small --workdir=workdirs/small
  python experiments/train.py --config=configs/decoder_lm.py:size=1b --workdir=...  # GPU/TPU

Arguments (comma-separated `key=value`):
  size      tiny (default: CPU demo, minutes) | small | 1b | test (smallest, for the test suite)
  runlocal  1 = shrink steps/batches for a smoke run on a laptop.
"""
import ml_collections

from metalm_jax import config as config_lib

SIZES = {
    # The bundled corpus is small (~0.1M tokens at vocab 1024): 'tiny' stops, with dropout,
    # before it overfits, so its eval perplexity falls over the whole demo.
    "test": dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, dropout=0.0,
                 seq_len=32, batch=8, steps=6, lr=3e-3, vocab=512),
    "tiny": dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, d_ff=384, dropout=0.1,
                 seq_len=128, batch=16, steps=300, lr=3e-3, vocab=1024),
    "small": dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, d_ff=1536,
                  dropout=0.1, seq_len=512, batch=32, steps=20_000, lr=1e-3, vocab=8192),
    "1b": dict(d_model=2048, num_layers=24, num_heads=32, num_kv_heads=8, d_ff=5632,
               dropout=0.0, seq_len=2048, batch=256, steps=100_000, lr=3e-4, vocab=32768),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, size="tiny", runlocal="0")
  if args["size"] not in SIZES:
    raise ValueError(f"size={args['size']!r}; valid sizes: {sorted(SIZES)}")
  s = SIZES[args["size"]]
  config = config_lib.base_config()
  config.model = ml_collections.ConfigDict(dict(
      name="decoder", vocab_size=s["vocab"], d_model=s["d_model"], num_layers=s["num_layers"],
      num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"], d_ff=s["d_ff"],
      mlp_activation="swiglu", position="rope", max_len=max(2048, s["seq_len"]),
      dropout_rate=s["dropout"], tie_embeddings=False, norm="rmsnorm", attention_impl="reference",
      scan_layers=False, remat_policy="none",  # see docs/training.md (scale options)
      dtype="float32", param_dtype="float32"))
  config.data.vocab_size = s["vocab"]
  config_lib.set_schedule(config, seq_len=s["seq_len"], batch=s["batch"], steps=s["steps"],
                          lr=s["lr"], test=args["size"] == "test",
                          runlocal=args["runlocal"] == "1")
  return config_lib.finalize(config)
