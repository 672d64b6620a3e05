r"""METALM vision-language (ViT + bidirectional encoder docked to a causal decoder).

  python experiments/prepare_data.py --dataset=digits_vl               # once
  python experiments/train.py --config=configs/metalm_vl.py --workdir=workdirs/metalm_vl
  python experiments/train.py --config=configs/metalm_vl.py:stage=finetune \
      --workdir=workdirs/metalm_vl_vqa --config.init_from.checkpoint=workdirs/metalm_vl
  python experiments/train.py --config=configs/metalm_vl.py:stage=finetune,peft=lora \
      --workdir=workdirs/metalm_vl_vqa_lora --config.init_from.checkpoint=workdirs/metalm_vl
  python experiments/train.py --config=configs/metalm_vl.py:model=causal --workdir=...
  python experiments/train.py --config=configs/metalm_vl.py:pretrained=checkpoints,decoder=gpt2,data=official \
      --workdir=workdirs/metalm_vl_clip_gpt2      # CLIP ViT-B/16 + GPT-2 (docs/pretrained.md)
  python experiments/reproduce.py --table=metalm_digits   # METALM vs the causal baseline

Arguments (comma-separated `key=value`):
  size      tiny (default: 8x8 digits, or 16px RGB official images, on a CPU) | test (the
            smallest, for the test suite) | paper (224px,
            12-layer encoder, 24-layer decoder; for real hardware)
  model     metalm (default: semi-causal; the encoder sees the images + a random-length text
            prefix, the decoder predicts the rest; queries put the prompt in the encoder) |
            causal (the equal-size causal-only baseline: the encoder sees the images alone)
  stage     pretrain (default: all tasks of the data, or COCO captions; evaluated zero- and
            k-shot) | finetune (one task, answer-only loss; start it from a pretraining run
            with --config.init_from.checkpoint)
  data      digits (default: the bundled digits_vl) | official (COCO Karpathy, VQAv2, OK-VQA,
            NLVR2 prepared in config.data.data_dir; docs/reproducing.md)
  task      the finetuning task: vqa (default) | caption | nlvr2 (digits); vqav2 | ok_vqa |
            coco | nlvr2 (official)
  pretrained  a directory of Hugging Face checkpoints (docs/pretrained.md): dock CLIP's
            ViT (its last layer dropped, frozen) and a pretrained decoder instead of training
            them from scratch; the text encoder and the connector start fresh and the
            decoder's tokenizer replaces SentencePiece. '' (default) = everything from scratch.
  decoder   with pretrained: gpt2 (default) | tinyllama | qwen2 (DECODERS: the repo ids)
  vit       with pretrained: b16 (default, CLIP ViT-B/16) | l14 (CLIP ViT-L/14)
  spans     (pretrain, model=metalm) which text prefix joins the image span
            (config.spans.strategy, masking.prefix_length): random (default: uniform, the
            paper) | length_aware (a fraction of the text) | saliency (ends after a rare token)
  peft      (finetune only) lora | bitfit: parameter-efficient finetuning (config.peft;
            docs/training.md): LoRA r=8, alpha=16 on the attention and MLP kernels, or only
            biases and norms; '' (default) trains every parameter.
  runlocal  1 = a few steps and a few evaluation examples: a smoke run.

Rows (`metalm_jax.data.vl_pipeline`): images [B, N, S, S, C] + text; the model lays a row out as
N image spans of T = vision_encoder.num_tokens() positions followed by the text
(`MetaLM.vl_layout`; an NLVR2 row's statement sits between its two images, one span each),
so model.max_span_len = T + the text prefix an encoder span can hold.
"""
import ml_collections

from metalm_jax import config as config_lib
from metalm_jax import masking

SIZES = {
    # The smallest, for the test suite: patch 4 (4 patches + CLS), one layer each.
    "test": dict(image_size=8, patch_size=4, channels=1, official_image=(8, 4), prefix=32,
                 seq_len=72, official_seq_len=64, batch=16, steps=6, finetune_steps=6,
                 lr=2e-3, vocab=320,
                 official_vocab=512, dropout=0.0, warmup=1, eval_batch=16, support=200,
                 vit=dict(d_model=32, num_layers=1, num_heads=2, d_ff=64),
                 enc=dict(d_model=32, num_layers=1, num_heads=2, d_ff=64),
                 dec=dict(d_model=48, num_layers=1, num_heads=2, d_ff=96),
                 connector=dict(kind="linear")),
    # digits: 8x8 grey, patch 2: 16 patches + CLS = 17 image tokens; official: 16px RGB, patch 4.
    "tiny": dict(image_size=8, patch_size=2, channels=1, official_image=(16, 4), prefix=32,
                 seq_len=72, official_seq_len=64, batch=16, steps=600, finetune_steps=250,
                 lr=2e-3, vocab=320,
                 official_vocab=512, dropout=0.1, warmup=20, eval_batch=32, support=1500,
                 vit=dict(d_model=64, num_layers=2, num_heads=4, d_ff=128),
                 enc=dict(d_model=64, num_layers=2, num_heads=4, d_ff=128),
                 dec=dict(d_model=96, num_layers=3, num_heads=4, d_ff=256),
                 connector=dict(kind="mlp", num_layers=2)),
    # Hao et al. 2022, vision-language: 224px ViT/16 (196 patches + CLS) inside a 12-layer
    # VLMo-base-sized encoder (768, 12 heads), decoder 24 x 1024 (16 heads), a 3-layer FFN
    # connector; AdamW (0.9, 0.98), lr 1e-4, wd 0.01, 2.5k warmup, batch 256, 350k steps.
    "paper": dict(image_size=224, patch_size=16, channels=3, official_image=(224, 16),
                  prefix=64, seq_len=72, official_seq_len=64, batch=256, steps=350_000,
                  finetune_steps=20_000,
                  lr=1e-4, vocab=16384, official_vocab=16384, dropout=0.1, warmup=2500,
                  eval_batch=32, support=2048,
                  vit=dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072),
                  enc=dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072),
                  dec=dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
                  connector=dict(kind="mlp", num_layers=3)),
}
# Pretrained checkpoints: Hugging Face repo ids, read from <pretrained>/<repo id>, and the
# published values a config needs before they are downloaded (the missing directory then stops
# the run with what to fetch).
VITS = {"b16": ("openai/clip-vit-base-patch16", dict(image_size=224, patch_size=16, use_cls=True)),
        "l14": ("openai/clip-vit-large-patch14", dict(image_size=224, patch_size=14, use_cls=True))}
DECODERS = {"gpt2": "openai-community/gpt2", "tinyllama": "TinyLlama/TinyLlama_v1.1",
            "qwen2": "Qwen/Qwen2-0.5B"}
MODELS = {"metalm": ("semi_causal_vl", "semi_causal_vl_finetune"),
          "causal": ("causal_vl", "causal_vl_finetune")}
STAGES = ("pretrain", "finetune")
DATA = ("digits", "official")
# Finetuning tasks -> (dataset, the digits task filter, the evaluator).
TASKS = {
    "digits": {"vqa": ("digits_vl", "vqa"), "caption": ("digits_vl", "caption"),
               "nlvr2": ("digits_vl", "nlvr2")},
    "official": {"vqav2": ("vqav2", "vqa"), "ok_vqa": ("ok_vqa", "vqa"),
                 "coco": ("coco_karpathy", "caption"), "nlvr2": ("nlvr2", "nlvr2")},
}
# Official evaluation splits (VQAv2 validation: test-dev answers are on the server).
OFFICIAL_SPLIT = {"vqav2": "validation", "ok_vqa": "validation", "coco_karpathy": "test",
                  "nlvr2": "validation"}


def model_config(size: str, data: str = "digits") -> dict:
  """The `config.model` dict of a METALM vision-language model (also used by tests)."""
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid sizes: {sorted(SIZES)}")
  s = SIZES[size]
  image_size, patch = ((s["image_size"], s["patch_size"]) if data == "digits"
                       else s["official_image"])
  channels = s["channels"] if data == "digits" else 3
  num_image_tokens = (image_size // patch) ** 2 + 1
  max_span_len = num_image_tokens + s["prefix"]
  vocab = s["vocab"] if data == "digits" else s["official_vocab"]
  return dict(
      name="metalm", mode="dual", max_span_len=max_span_len, bos_id=1, pad_id=0,
      trainable_encoder_layers=-1, dtype="float32", param_dtype="float32",
      decoder=dict(vocab_size=vocab, mlp_activation="swiglu", position="rope",
                   max_len=2048, dropout_rate=s["dropout"], norm="rmsnorm", **s["dec"]),
      text_encoder=dict(norm_position="pre", layer_norm_eps=1e-6, type_vocab_size=0,
                        max_len=max_span_len + 1, dropout_rate=s["dropout"], **s["enc"]),
      vision_encoder=dict(image_size=image_size, patch_size=patch, channels=channels,
                          use_cls=True, dropout_rate=s["dropout"], **s["vit"]),
      connector=dict(s["connector"]))


def pretrained_model_config(size: str, root: str, decoder: str = "gpt2",
                            vit: str = "b16") -> dict:
  """`config.model` of METALM docked on pretrained parts (`pretrained=` argument): CLIP's ViT
  minus its last layer and a GPT-2 / LLaMA-family decoder from `root`/<repo id>, a fresh
  pre-LN text encoder in the decoder's vocabulary and a fresh 3-layer MLP connector."""
  if decoder not in DECODERS:
    raise ValueError(f"decoder={decoder!r}; valid: {sorted(DECODERS)}")
  if vit not in VITS:
    raise ValueError(f"vit={vit!r}; valid: {sorted(VITS)}")
  s = SIZES[size]
  vit_repo, published = VITS[vit]
  vit_dir, decoder_dir = f"{root}/{vit_repo}", f"{root}/{DECODERS[decoder]}"
  v = config_lib.pretrained_kwargs(vit_dir, "vision_encoder", published)
  max_span_len = (v["image_size"] // v["patch_size"]) ** 2 + int(v["use_cls"]) + s["prefix"]
  ids = config_lib.pretrained_special_ids(decoder_dir, dict(pad_id=0, bos_id=1))
  return dict(
      name="metalm", mode="dual", max_span_len=max_span_len, trainable_encoder_layers=-1,
      dtype="float32", param_dtype="float32", **ids,
      decoder=dict(init_from=f"hf:{decoder_dir}", dropout_rate=s["dropout"]),
      text_encoder=dict(norm_position="pre", layer_norm_eps=1e-6, type_vocab_size=0,
                        max_len=max_span_len + 1, dropout_rate=s["dropout"], **s["enc"]),
      vision_encoder=dict(init_from=f"hf:{vit_dir}", num_layers=-1),
      connector=dict(kind="mlp", num_layers=3))


def evals(size: str, data: str, stage: str, task: str) -> dict:
  """The evaluators of a run: zero- and k-shot after pretraining, the task after finetuning."""
  s = SIZES[size]
  common = dict(every_steps=-1, batch_size=s["eval_batch"], limit=0)
  if data == "digits":
    vqa = dict(type="vqa", split="test", match_question=True, **common)
    if stage == "pretrain":
      return {"vqa": vqa, "vqa_fewshot": dict(vqa, shots=4, support_size=s["support"])}
    kind = TASKS["digits"][task][1]
    return {task: dict(vqa if kind == "vqa" else dict(type="captioning" if kind == "caption"
                                                      else "nlvr2", split="test", **common))}
  out = {}
  if stage == "pretrain":
    for name, dataset in (("vqav2", "vqav2"), ("ok_vqa", "ok_vqa"), ("coco", "coco_karpathy")):
      kind = "captioning" if dataset == "coco_karpathy" else "vqa"
      entry = dict(type=kind, dataset=dataset, split=OFFICIAL_SPLIT[dataset], **common)
      out[name] = entry
      out[f"{name}_fewshot"] = dict(entry, shots=4, support_size=s["support"])
    return out
  dataset, kind = TASKS["official"][task]
  evaluator = {"vqa": "vqa", "caption": "captioning", "nlvr2": "nlvr2"}[kind]
  return {task: dict(type=evaluator, dataset=dataset, split=OFFICIAL_SPLIT[dataset], **common)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, size="tiny", model="metalm", stage="pretrain",
                                      data="digits", task="", peft="", pretrained="",
                                      decoder="gpt2", vit="b16", spans="random",
                                      runlocal="0")
  for key, valid in (("size", SIZES), ("model", MODELS), ("stage", STAGES), ("data", DATA)):
    if args[key] not in valid:
      raise ValueError(f"{key}={args[key]!r}; valid: {sorted(valid)}")
  size, data, stage = args["size"], args["data"], args["stage"]
  if args["peft"] not in ("", "lora", "bitfit"):
    raise ValueError(f"peft={args['peft']!r}; valid: lora, bitfit ('' = full finetuning)")
  if args["peft"] and stage != "finetune":
    raise ValueError(f"peft={args['peft']} freezes the base model: use it with stage=finetune "
                     "(and --config.init_from.checkpoint=<a pretraining workdir>)")
  task = args["task"] or ("vqa" if data == "digits" else "vqav2")
  if task not in TASKS[data]:
    raise ValueError(f"task={task!r} with data={data}; valid: {sorted(TASKS[data])}")
  s = SIZES[size]
  config = config_lib.base_config()
  config.family = "metalm_vl"
  pretrained = args["pretrained"]
  config.model = ml_collections.ConfigDict(
      pretrained_model_config(size, pretrained, args["decoder"], args["vit"]) if pretrained
      else model_config(size, data))
  config.objective = MODELS[args["model"]][0 if stage == "pretrain" else 1]
  dataset, kind = TASKS[data][task]
  if stage == "pretrain":
    config.data.dataset = "digits_vl" if data == "digits" else "coco_karpathy"
    config.data.tasks = () if data == "digits" else ("caption",)
    config.num_train_steps = s["steps"]
  else:
    config.data.dataset = dataset
    config.data.tasks = (kind,)
    config.num_train_steps = s["finetune_steps"]
  # digits rows keep 2 image slots (NLVR2 pairs), as the digits pipeline always did.
  config.data.max_images = 2 if data == "digits" or kind == "nlvr2" else 1
  config.data.image_preprocessing = "digits" if data == "digits" else "rgb"
  if pretrained:  # CLIP's pixels, the decoder's tokenizer; the docked ViT stays frozen
    config.data.image_preprocessing = "clip"
    config.data.tokenizer = config.model.decoder.init_from
    config.optimizer.freeze = ("^vision_encoder/",)
  # Paper size on official data decodes and resizes 256 JPEGs a step: grain worker processes.
  config.data.worker_count = 8 if size == "paper" and data == "official" else 0
  config.data.vocab_size = config.model.decoder.get("vocab_size", SIZES[size]["vocab"])
  # Official texts (NLVR2 statements, VQA questions) take more tokens than the templates;
  # an NLVR2 row holds its statement twice (once paired with each image), so twice the room.
  # digits: seq_len holds the longest template, an NLVR2 row (68 SentencePiece tokens).
  config.data.seq_len = (s["seq_len"] if data == "digits" else
                         s["official_seq_len"] * (2 if kind == "nlvr2" else 1))
  config.batch_size = s["batch"]
  config.optimizer.learning_rate = s["lr"]
  config.optimizer.warmup_steps = s["warmup"]
  config.optimizer.weight_decay = 0.01
  config.optimizer.b2 = 0.98
  config.eval_every_steps = max(1, config.num_train_steps // 4)
  config.checkpoint_every_steps = max(1, config.num_train_steps // 4)
  config.log_every_steps = max(1, min(50, config.num_train_steps // 10))
  config.evals = ml_collections.ConfigDict(dict({"eval": dict(type="loss")},
                                                **evals(size, data, stage, task)))
  config.sample.max_new_tokens = 0  # no text-only sample for a vision-language model
  config.peft.method = args["peft"]
  if args["spans"] not in masking.SPAN_STRATEGIES:
    raise ValueError(f"spans={args['spans']!r}; valid: {list(masking.SPAN_STRATEGIES)}")
  config.spans.strategy = args["spans"]
  if args["runlocal"] == "1":
    config_lib.set_runlocal(config)
  return config_lib.finalize(config)
