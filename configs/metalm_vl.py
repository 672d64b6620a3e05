r"""METALM vision-language model (ViT + bidirectional encoder docked to a causal decoder).

  python experiments/prepare_data.py --dataset=digits_vl               # once
  python experiments/train.py --config=configs/metalm_vl.py --workdir=workdirs/metalm_vl
  python experiments/train.py --config=configs/metalm_vl.py:objective=causal_vl --workdir=...

Arguments (comma-separated `key=value`):
  size       tiny (default: 8x8 digits on a CPU) | paper (224px, 12-layer encoder, 24-layer
             decoder; for real hardware)
  objective  semi_causal_vl (default: the encoder sees the images + a random-length text
             prefix, the decoder predicts the rest) | causal_vl (the equal-size causal-only
             baseline: the encoder sees the images alone) | semi_causal_vl_finetune (images
             + the whole prompt to the encoder, the answer is the target)
  runlocal   1 = 20 steps, a smoke run.

Data: `config.data.dataset = 'digits_vl'`, the bundled real-image dataset whose pipeline
(`metalm_jax.data.vl_pipeline`: images [B, N, S, S, C], image_mask, text inputs / targets /
weights, prompt_length, text_length) is built separately from this model config. The model
lays a row out as N image spans of T = vision_encoder.num_tokens() positions followed by the
text (`MetaLM.vl_layout`), so model.max_span_len = T + the longest text prefix.
"""
import ml_collections

from metalm_jax import config as config_lib

SIZES = {
    # 8x8 grey digits, patch 2: 16 patches + CLS = 17 image tokens.
    "tiny": dict(image_size=8, patch_size=2, channels=1, prefix=16, seq_len=32, batch=16,
                 steps=400, lr=2e-3, vocab=320, dropout=0.1, warmup=20,
                 vit=dict(d_model=64, num_layers=2, num_heads=4, d_ff=128),
                 enc=dict(d_model=64, num_layers=2, num_heads=4, d_ff=128),
                 dec=dict(d_model=96, num_layers=3, num_heads=4, d_ff=256),
                 connector=dict(kind="mlp", num_layers=2)),
    # Hao et al. 2022, vision-language: 224px ViT/16 (196 patches + CLS) inside a 12-layer
    # VLMo-base-sized encoder (768, 12 heads), decoder 24 x 1024 (16 heads), a 3-layer FFN
    # connector; AdamW (0.9, 0.98), lr 1e-4, wd 0.01, 2.5k warmup, batch 256, 350k steps.
    "paper": dict(image_size=224, patch_size=16, channels=3, prefix=64, seq_len=256,
                  batch=256, steps=350_000, lr=1e-4, vocab=65536, dropout=0.1, warmup=2500,
                  vit=dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072),
                  enc=dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072),
                  dec=dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
                  connector=dict(kind="mlp", num_layers=3)),
}
OBJECTIVES = ("semi_causal_vl", "causal_vl", "semi_causal_vl_finetune")


def model_config(size: str) -> dict:
  """The `config.model` dict of a METALM vision-language model (also used by tests)."""
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid sizes: {sorted(SIZES)}")
  s = SIZES[size]
  num_image_tokens = (s["image_size"] // s["patch_size"]) ** 2 + 1
  max_span_len = num_image_tokens + s["prefix"]
  return dict(
      name="metalm", mode="dual", max_span_len=max_span_len, bos_id=1, pad_id=0,
      trainable_encoder_layers=-1, dtype="float32", param_dtype="float32",
      decoder=dict(vocab_size=s["vocab"], mlp_activation="swiglu", position="rope",
                   max_len=2048, dropout_rate=s["dropout"], norm="rmsnorm", **s["dec"]),
      text_encoder=dict(norm_position="pre", layer_norm_eps=1e-6, type_vocab_size=0,
                        max_len=max_span_len + 1, dropout_rate=s["dropout"], **s["enc"]),
      vision_encoder=dict(image_size=s["image_size"], patch_size=s["patch_size"],
                          channels=s["channels"], use_cls=True, dropout_rate=s["dropout"],
                          **s["vit"]),
      connector=dict(s["connector"]))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, size="tiny", objective="semi_causal_vl", runlocal="0")
  if args["objective"] not in OBJECTIVES:
    raise ValueError(f"objective={args['objective']!r}; valid: {OBJECTIVES}")
  s = SIZES.get(args["size"])
  if s is None:
    raise ValueError(f"size={args['size']!r}; valid sizes: {sorted(SIZES)}")
  config = config_lib.base_config()
  config.model = ml_collections.ConfigDict(model_config(args["size"]))
  config.objective = args["objective"]
  config.data.dataset = "digits_vl"  # pipeline: metalm_jax.data.vl_pipeline
  config.data.vocab_size = min(s["vocab"], 320)  # the digits templates' SentencePiece size
  config.data.seq_len = s["seq_len"]
  config.batch_size = s["batch"]
  config.num_train_steps = s["steps"]
  config.optimizer.learning_rate = s["lr"]
  config.optimizer.warmup_steps = s["warmup"]
  config.optimizer.weight_decay = 0.01
  config.optimizer.b2 = 0.98
  config.eval_every_steps = max(1, s["steps"] // 8)
  config.checkpoint_every_steps = max(1, s["steps"] // 4)
  config.log_every_steps = max(1, min(20, s["steps"] // 10))
  config.sample.max_new_tokens = 0  # no text-only sample for a vision-language model
  if args["runlocal"] == "1":
    config.num_train_steps = 20
    config.eval_every_steps = config.checkpoint_every_steps = 10
    config.log_every_steps = 5
    config.eval_batches = 2
  return config_lib.finalize(config)
