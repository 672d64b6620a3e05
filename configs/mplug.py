r"""mPLUG (Li et al. 2022): ViT + text encoder + skip-connected fusion + seq2seq decoder,
pretrained with ITC / ITM / MLM / PrefixLM.

  python experiments/mplug_digits.py --size=tiny     # pretrain, retrieval, captioning, VQA

mPLUG pretraining keeps momentum encoders and feature queues in its train state
(`metalm_jax.train.mplug`), so it runs through `experiments/mplug_digits.py`, not
`experiments/train.py`.

Arguments (comma-separated `key=value`):
  size   tiny (default: 8x8 digits on a CPU) | base (ViT-B/16 224px, d 768, 12 heads, FFN
         3072, 6-layer text encoder, fusion F=6 S=3 'AAACAA', 12-layer decoder, queue
         65,536) | large (ViT-L/14 1024-wide, projected to 768; fusion S=6: no connected
         layer)

`config.mplug` holds the pretraining objective's settings: loss weights, momentum
distillation alpha (0.4), EMA decay (0.995), queue size, MLM mask rate (0.15).
"""
import ml_collections

from metalm_jax import config as config_lib

SIZES = {
    # 8x8 grey digits, patch 2: 16 patches + [CLS]. The SentencePiece tokenizer of the digits
    # templates has 320 ids; the top id (383) is [MASK].
    "tiny": dict(image_size=8, patch_size=2, channels=1, d_model=64, heads=4, d_ff=128,
                 vit=dict(d_model=64, num_layers=2), text_layers=2, fusion_layers=6,
                 stride=3, decoder_layers=2, itc_dim=32, queue=256, vocab=384, text_len=32,
                 batch=32, steps=600, lr=1e-3, warmup=30, dropout=0.0),
    # Paper base: CLIP ViT-B/16, BERT-base (6 text + 6 fusion layers), 12-layer decoder.
    "base": dict(image_size=224, patch_size=16, channels=3, d_model=768, heads=12, d_ff=3072,
                 vit=dict(d_model=768, num_layers=12), text_layers=6, fusion_layers=6,
                 stride=3, decoder_layers=12, itc_dim=256, queue=65536, vocab=30522,
                 text_len=40, batch=1024, steps=200_000, lr=1e-4, warmup=1000, dropout=0.1),
    # Paper large: CLIP ViT-L/14 (1024 wide, 24 layers) projected to the 768-wide BERT.
    "large": dict(image_size=224, patch_size=14, channels=3, d_model=768, heads=12, d_ff=3072,
                  vit=dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
                  text_layers=6, fusion_layers=6, stride=6, decoder_layers=12, itc_dim=256,
                  queue=65536, vocab=30522, text_len=40, batch=1024, steps=200_000, lr=1e-4,
                  warmup=1000, dropout=0.1),
}


def model_config(size: str) -> dict:
  """The `config.model` dict of an mPLUG model (also used by tests and benchmarks)."""
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid sizes: {sorted(SIZES)}")
  s = SIZES[size]
  layer = dict(num_heads=s["heads"], d_ff=s["d_ff"])
  vit = dict(dict(layer), **s["vit"])
  return dict(
      name="mplug", vocab_size=s["vocab"], d_model=s["d_model"], itc_dim=s["itc_dim"],
      temperature=0.07, dropout_rate=s["dropout"], pad_id=0, bos_id=1, eos_id=2,
      dtype="float32", param_dtype="float32",
      vision_encoder=dict(image_size=s["image_size"], patch_size=s["patch_size"],
                          channels=s["channels"], **vit),
      text_encoder=dict(num_layers=s["text_layers"], max_len=s["text_len"], **layer),
      fusion=dict(num_layers=s["fusion_layers"], stride=s["stride"], **layer),
      decoder=dict(num_layers=s["decoder_layers"], max_len=s["text_len"], **layer))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, size="tiny")
  s = SIZES.get(args["size"])
  if s is None:
    raise ValueError(f"size={args['size']!r}; valid sizes: {sorted(SIZES)}")
  config = config_lib.base_config()
  config.model = ml_collections.ConfigDict(model_config(args["size"]))
  config.mplug = config_lib.mplug_defaults()
  config.mplug.queue_size = s["queue"]
  config.data.dataset = "digits_vl"
  config.data.vocab_size = min(s["vocab"] - 1, 320)
  config.data.seq_len = s["text_len"]
  config.batch_size = s["batch"]
  config.num_train_steps = s["steps"]
  config.optimizer.learning_rate = s["lr"]
  config.optimizer.warmup_steps = s["warmup"]
  config.optimizer.weight_decay = 0.02
  config.log_every_steps = 50
  return config_lib.finalize(config)
