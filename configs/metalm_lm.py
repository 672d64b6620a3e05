r"""METALM semi-causal language model on the bundled Python-documentation corpus (pydoc_topics).

  python experiments/prepare_data.py --dataset=pydoc_topics          # once
  python experiments/train.py --config=configs/metalm_lm.py --workdir=workdirs/metalm_lm
  python experiments/train.py --config=configs/metalm_lm.py:mode=causal --workdir=workdirs/causal
  python experiments/train.py --config=configs/metalm_lm.py:size=paper --workdir=...  # GPU/TPU

Arguments (comma-separated `key=value`):
  size       tiny (default: CPU, minutes) | paper (the paper's 1.3B decoder + 24-layer
             encoder, for real hardware) | test (smallest, for the test suite)
  mode       dual (default: semi-causal LM, encoder docked) | single (one stack with the
             semi-causal mask) | causal (the equal-decoder causal-only baseline)
  connector  linear (default) | mlp | resampler
  spans      random (default) | length_aware | saliency: which spans go to the encoder
             (config.spans.strategy; docs/training.md "Which spans go to the encoder").
  runlocal   1 = 20 steps, a smoke run.

Spans (objective `semi_causal_lm`): 25% of the tokens in spans of seq_len/32 .. seq_len/16
tokens (the paper's 64-128 at seq_len 2048; 4-8 for tiny), at most 8 per row; so
model.max_span_len = seq_len // 16. The paper used DeepNorm and a pretrained 24-layer
encoder with all but its last 2 layers frozen (`trainable_encoder_layers=2`, applied by the
trainer through `train.optimizer.trainable_mask`); this config trains the encoder from
scratch with pre-LN,
learned positions and a relative position bias, and sets trainable_encoder_layers=-1.
The paper's data (the Pile, vocab 64k) is not available here: size=paper still names the
bundled corpus and its SentencePiece vocabulary.
"""
import ml_collections

from metalm_jax import config as config_lib
from metalm_jax import masking

SIZES = {
    "test": dict(dec=dict(d_model=32, num_layers=2, num_heads=4, d_ff=64),
                 enc=dict(d_model=24, num_layers=2, num_heads=4, d_ff=48, relative_buckets=8),
                 seq_len=64, batch=8, steps=6, lr=3e-3, vocab=512, dropout=0.0,
                 position="rope", max_len=128),
    "tiny": dict(dec=dict(d_model=128, num_layers=4, num_heads=4, d_ff=384),
                 enc=dict(d_model=96, num_layers=2, num_heads=4, d_ff=256, relative_buckets=16),
                 seq_len=128, batch=16, steps=300, lr=3e-3, vocab=1024, dropout=0.1,
                 position="rope", max_len=2048),
    # Hao et al. 2022, language-only: decoder 24 x 2048 (32 heads), sinusoidal positions,
    # length 2048; encoder 24 x 1024 (16 heads), max length 512, relative bias; Adam 6e-4,
    # batch 1024, 300k steps.
    "paper": dict(dec=dict(d_model=2048, num_layers=24, num_heads=32, d_ff=8192),
                  enc=dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096,
                           relative_buckets=32),
                  seq_len=2048, batch=1024, steps=300_000, lr=6e-4, vocab=65536, dropout=0.1,
                  position="sinusoidal", max_len=2048),
}
MODES = ("dual", "single", "causal")
CONNECTORS = {"linear": dict(kind="linear"), "mlp": dict(kind="mlp", num_layers=2),
              "resampler": dict(kind="resampler", num_layers=1, num_heads=4)}


def model_config(size: str, mode: str = "dual", connector: str = "linear") -> dict:
  """The `config.model` dict of a METALM language model (also used by tests)."""
  for name, value, valid in (("size", size, SIZES), ("mode", mode, MODES),
                             ("connector", connector, CONNECTORS)):
    if value not in valid:
      raise ValueError(f"{name}={value!r}; valid: {sorted(valid)}")
  s = SIZES[size]
  max_span_len = masking.default_span_settings(s["seq_len"])["max_len"]
  model = dict(
      name="metalm", mode=mode, max_span_len=max_span_len, bos_id=1, pad_id=0,
      trainable_encoder_layers=-1, dtype="float32", param_dtype="float32",
      decoder=dict(vocab_size=s["vocab"], mlp_activation="swiglu", position=s["position"],
                   max_len=s["max_len"], dropout_rate=s["dropout"], norm="rmsnorm",
                   **s["dec"]))
  if mode == "dual":
    model["text_encoder"] = dict(norm_position="pre", layer_norm_eps=1e-6,
                                 type_vocab_size=0, max_len=max(512, max_span_len + 1)
                                 if size == "paper" else max_span_len + 1,
                                 dropout_rate=s["dropout"], **s["enc"])
    connector_kwargs = dict(CONNECTORS[connector])
    if connector == "resampler":
      connector_kwargs["num_latents"] = max_span_len
    model["connector"] = connector_kwargs
  return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, size="tiny", mode="dual", connector="linear",
                                      spans="random", runlocal="0")
  s = SIZES.get(args["size"])
  if s is None:
    raise ValueError(f"size={args['size']!r}; valid sizes: {sorted(SIZES)}")
  config = config_lib.base_config()
  config.model = ml_collections.ConfigDict(
      model_config(args["size"], args["mode"], args["connector"]))
  config.objective = "semi_causal_lm"
  if args["spans"] not in masking.SPAN_STRATEGIES:
    raise ValueError(f"spans={args['spans']!r}; valid: {list(masking.SPAN_STRATEGIES)}")
  config.spans.strategy = args["spans"]
  config.data.vocab_size = min(s["vocab"], 8192)  # what the bundled corpus supports
  config_lib.set_schedule(config, seq_len=s["seq_len"], batch=s["batch"], steps=s["steps"],
                          lr=s["lr"], test=args["size"] == "test",
                          runlocal=args["runlocal"] == "1")
  return config_lib.finalize(config)
