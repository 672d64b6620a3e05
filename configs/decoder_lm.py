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


def parse_args(arg: str | None, **defaults) -> dict:
  """'size=small,runlocal=1' -> {'size': 'small', 'runlocal': '1'}; unknown keys are errors."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} must look like key=value")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    out[key] = value
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_args(arg, size="tiny", runlocal="0")
  if args["size"] not in SIZES:
    raise ValueError(f"size={args['size']!r}; valid sizes: {sorted(SIZES)}")
  s = SIZES[args["size"]]
  config = config_lib.base_config()
  config.model = ml_collections.ConfigDict(dict(
      name="decoder", vocab_size=s["vocab"], d_model=s["d_model"], num_layers=s["num_layers"],
      num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"], d_ff=s["d_ff"],
      mlp_activation="swiglu", position="rope", max_len=max(2048, s["seq_len"]),
      dropout_rate=s["dropout"], tie_embeddings=False, norm="rmsnorm", attention_impl="reference",
      dtype="float32", param_dtype="float32"))
  config.data.vocab_size = s["vocab"]
  config.data.seq_len = s["seq_len"]
  config.batch_size = s["batch"]
  config.num_train_steps = s["steps"]
  config.optimizer.learning_rate = s["lr"]
  config.optimizer.warmup_steps = max(1, s["steps"] // 20)
  config.eval_every_steps = max(1, s["steps"] // 6)
  config.checkpoint_every_steps = max(1, s["steps"] // 6)
  config.log_every_steps = max(1, min(20, s["steps"] // 10))
  if args["size"] == "test":
    config.eval_batches = 2
    config.sample.max_new_tokens = 8
    config.progress_bar = False
  if args["runlocal"] == "1":
    config.num_train_steps = 20
    config.eval_every_steps = config.checkpoint_every_steps = 10
    config.log_every_steps = 5
    config.eval_batches = 2
  return config_lib.finalize(config)
