r"""mPLUG (Li et al. 2022): ViT + text encoder + skip-connected fusion + seq2seq decoder.

  python experiments/prepare_data.py --dataset=digits_vl                        # once
  python experiments/train.py --config=configs/mplug.py --workdir=workdirs/mplug_pretrain
  python experiments/train.py --config=configs/mplug.py:stage=vqa --workdir=workdirs/mplug_vqa \
      --config.init_from.checkpoint=workdirs/mplug_pretrain
  python experiments/train.py --config=configs/mplug.py:stage=caption --workdir=workdirs/mplug_cap \
      --config.init_from.checkpoint=workdirs/mplug_pretrain
  python experiments/reproduce.py --table=mplug_digits     # the three stages + a scratch baseline
  python experiments/train.py --config=configs/mplug.py:size=base,pretrained=checkpoints,data=official \
      --workdir=workdirs/mplug_base_clip_bert    # from CLIP ViT-B/16 + BERT-base (docs/pretrained.md)

Arguments (comma-separated `key=value`):
  size      tiny (default: 8x8 digits on a CPU) | test (smallest, for the test suite) |
            base (ViT-B/16 224px, d 768, 12 heads, FFN 3072, 6-layer text encoder, fusion
            F=6 S=3 'AAACAA', 12-layer decoder, queue 65,536) | large (ViT-L/14 1024-wide,
            projected to 768; fusion S=6: no connected layer)
  stage     pretrain (default: ITC + ITM + MLM + PrefixLM on image-caption pairs, with the
            momentum encoders and ITC queues in the train state; evaluated by retrieval and
            zero-shot captioning) | caption (seq2seq finetuning: image + [CLS] -> caption;
            CIDEr-D / BLEU-4 / ROUGE-L) | vqa (image + question -> answer; VQA accuracy by
            generation and by answer-list ranking)
  data      digits (default: the bundled digits_vl) | official (COCO Karpathy captions and
            VQAv2, prepared in config.data.data_dir; docs/reproducing.md)
  pretrained  a directory of Hugging Face checkpoints (docs/pretrained.md): start as the paper
            does, from CLIP's ViT (B/16 at size=base, L/14 at size=large; its last layer
            dropped) and the first text-encoder layers of BERT-base (uncased, with its WordPiece
            tokenizer and [MASK]); fusion, decoder and heads start fresh. '' (default) =
            everything from scratch.
  runlocal  1 = a few steps and a few evaluation examples: a smoke run.

Pretrain -> finetune is two runs: the finetune's `config.init_from.checkpoint` names the
pretraining workdir (params only). `config.mplug` holds the pretraining objective's settings:
loss weights, momentum distillation alpha (0.4, ramped from 0 over `alpha_warmup_steps`), EMA
decay (0.995), queue size, MLM mask rate (0.15).
"""
import ml_collections

from metalm_jax import config as config_lib

# COCO Karpathy train (image, caption) pairs: one epoch is the paper-size pretraining's ramp.
COCO_TRAIN_PAIRS = 566_747
SIZES = {
    # The smallest, for the test suite (one layer of each kind, fusion 'AC').
    "test": dict(image_size=8, patch_size=4, channels=1, d_model=32, heads=2, d_ff=64,
                 vit=dict(d_model=32, num_layers=1), text_layers=1, fusion_layers=2,
                 stride=1, decoder_layers=1, itc_dim=16, queue=64, vocab=384, text_len=32,
                 batch=16, steps=6, finetune_steps=6, lr=1e-3, warmup=1, dropout=0.0,
                 alpha_warmup=0),
    # 8x8 grey digits, patch 2: 16 patches + [CLS]. The SentencePiece tokenizer of the digits
    # templates has 320 ids; the top id (383) is [MASK].
    "tiny": dict(image_size=8, patch_size=2, channels=1, d_model=64, heads=4, d_ff=128,
                 vit=dict(d_model=64, num_layers=2), text_layers=2, fusion_layers=6,
                 stride=3, decoder_layers=2, itc_dim=32, queue=256, vocab=384, text_len=32,
                 batch=32, steps=600, finetune_steps=300, lr=1e-3, warmup=30, dropout=0.0,
                 alpha_warmup=0),
    # Paper base: CLIP ViT-B/16, BERT-base (6 text + 6 fusion layers), 12-layer decoder.
    "base": dict(image_size=224, patch_size=16, channels=3, d_model=768, heads=12, d_ff=3072,
                 vit=dict(d_model=768, num_layers=12), text_layers=6, fusion_layers=6,
                 stride=3, decoder_layers=12, itc_dim=256, queue=65536, vocab=30522,
                 text_len=40, batch=1024, steps=200_000, finetune_steps=8_000, lr=1e-4,
                 warmup=1000, dropout=0.1, alpha_warmup=-(-COCO_TRAIN_PAIRS // 1024)),
    # Paper large: CLIP ViT-L/14 (1024 wide, 24 layers) projected to the 768-wide BERT.
    "large": dict(image_size=224, patch_size=14, channels=3, d_model=768, heads=12, d_ff=3072,
                  vit=dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
                  text_layers=6, fusion_layers=6, stride=6, decoder_layers=12, itc_dim=256,
                  queue=65536, vocab=30522, text_len=40, batch=1024, steps=200_000,
                  finetune_steps=8_000, lr=1e-4, warmup=1000, dropout=0.1,
                  alpha_warmup=-(-COCO_TRAIN_PAIRS // 1024)),
}
STAGES = ("pretrain", "caption", "vqa")
DATA = ("digits", "official")
# Evaluation settings: generation beams, retrieval candidates re-ranked by ITM (k_test; ALBEF /
# mPLUG: 256 on COCO) and VQA answers scored in full (128), per data kind.
EVAL = {"digits": dict(beam_size=3, k_test=16, rank_k=16, answer_list_size=0, limit=0),
        "official": dict(beam_size=5, k_test=256, rank_k=128, answer_list_size=3129, limit=0)}


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


# Pretrained checkpoints (Hugging Face repo ids under the `pretrained` directory) and the
# published values used while they are not downloaded yet (the run then stops with the list).
PRETRAINED_VIT = {"large": "openai/clip-vit-large-patch14"}  # every other size: ViT-B/16
DEFAULT_VIT = "openai/clip-vit-base-patch16"
BERT = "google-bert/bert-base-uncased"
BERT_IDS = dict(pad_id=0, bos_id=101, eos_id=102, mask_id=103)  # [PAD] [CLS] [SEP] [MASK]


def pretrained_model_config(size: str, root: str) -> dict:
  """`config.model` of mPLUG started from CLIP's ViT and BERT-base (`pretrained=` argument):
  vocab_size and d_model come from BERT, the special ids from its tokenizer."""
  model = model_config(size)
  for key in ("vocab_size", "d_model", "pad_id", "bos_id", "eos_id"):
    model.pop(key)
  bert = f"{root}/{BERT}"
  model.update(config_lib.pretrained_special_ids(bert, BERT_IDS))
  model["vision_encoder"] = dict(init_from=f"hf:{root}/{PRETRAINED_VIT.get(size, DEFAULT_VIT)}",
                                 num_layers=-1)
  text = model["text_encoder"]
  model["text_encoder"] = dict(init_from=f"hf:{bert}", num_layers=text["num_layers"],
                               max_len=text["max_len"])
  return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, size="tiny", stage="pretrain", data="digits",
                                      pretrained="", runlocal="0")
  s = SIZES.get(args["size"])
  if s is None:
    raise ValueError(f"size={args['size']!r}; valid sizes: {sorted(SIZES)}")
  for key, valid in (("stage", STAGES), ("data", DATA)):
    if args[key] not in valid:
      raise ValueError(f"{key}={args[key]!r}; valid: {list(valid)}")
  stage, official = args["stage"], args["data"] == "official"
  config = config_lib.base_config()
  config.family = "mplug"
  pretrained = args["pretrained"]
  config.model = ml_collections.ConfigDict(
      pretrained_model_config(args["size"], pretrained) if pretrained
      else model_config(args["size"]))
  if official and not pretrained:
    config.model.vision_encoder.channels = 3
  config.data.seq_len = s["text_len"]
  config.data.image_preprocessing = "clip" if official or pretrained else "digits"
  if pretrained:
    config.data.tokenizer = config.model.text_encoder.init_from  # BERT's WordPiece
  # Paper sizes on official data decode and resize 1,024 JPEGs a step: grain worker processes.
  config.data.worker_count = 8 if official and args["size"] in ("base", "large") else 0
  # The tokenizer's size; the model's vocabulary has one more id on top: [MASK].
  config.data.vocab_size = min(s["vocab"] - 1, 320) if not official else s["vocab"] - 1
  config.batch_size = s["batch"]
  config.optimizer.learning_rate = s["lr"]
  config.optimizer.warmup_steps = s["warmup"]
  config.optimizer.weight_decay = 0.02
  ev = EVAL[args["data"]]
  if stage == "pretrain":
    config.objective = "mplug_pretrain"
    config.mplug = config_lib.mplug_defaults()
    config.mplug.queue_size = s["queue"]
    # ALBEF ramps alpha from 0 over the first epoch: the momentum model starts as a copy of
    # a random init, so its soft targets mean nothing at first. Paper sizes: one epoch of COCO
    # Karpathy train at batch 1024 (554 steps); tiny: no ramp (the digits runs of
    # docs/results.md).
    config.mplug.alpha_warmup_steps = s["alpha_warmup"]
    config.data.dataset = "coco_karpathy" if official else "digits_vl"
    config.data.tasks = ("caption",)
    config.num_train_steps = s["steps"]
    config.evals = ml_collections.ConfigDict({
        "retrieval": dict(type="retrieval", split="test", limit=ev["limit"],
                          k_test=ev["k_test"], every_steps=-1),
        "zero_shot_caption": dict(type="captioning", split="test", limit=ev["limit"],
                                  beam_size=ev["beam_size"], every_steps=-1),
    })
  else:
    config.objective = "mplug_seq2seq"
    config.num_train_steps = s["finetune_steps"]
    config.optimizer.warmup_steps = max(1, s["warmup"] // 2)
    config.data.tasks = (stage,)
    if stage == "caption":
      config.data.dataset = "coco_karpathy" if official else "digits_vl"
      config.evals = ml_collections.ConfigDict({
          "caption": dict(type="captioning", split="test", limit=ev["limit"],
                          beam_size=ev["beam_size"], every_steps=-1)})
    else:
      config.data.dataset = "vqav2" if official else "digits_vl"
      split = "validation" if official else "test"
      config.evals = ml_collections.ConfigDict({
          "vqa": dict(type="vqa", split=split, limit=ev["limit"], beam_size=ev["beam_size"],
                      every_steps=-1),
          "vqa_rank": dict(type="vqa", split=split, limit=ev["limit"], mode="rank",
                           rank_k=ev["rank_k"], answer_list_size=ev["answer_list_size"],
                           every_steps=-1)})
  config.eval_every_steps = config.checkpoint_every_steps = max(1, config.num_train_steps // 4)
  config.log_every_steps = max(1, min(50, config.num_train_steps // 10))
  config.sample.max_new_tokens = 0
  if args["runlocal"] == "1":
    config_lib.set_runlocal(config)
  return config_lib.finalize(config)

