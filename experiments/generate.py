r"""Generate from a trained checkpoint: any family that generates.

  python experiments/generate.py --config=configs/decoder_lm.py --checkpoint=workdirs/demo \
      --prompt="The " --max_new_tokens=40                                   # greedy
  python experiments/generate.py --config=configs/decoder_lm.py --checkpoint=workdirs/demo \
      --prompt="The " --temperature=0.8 --top_p=0.9 --seed=1               # sampling
  python experiments/generate.py --config=configs/metalm_multitask.py --checkpoint=workdirs/mt \
      --prompt_file=prompts.txt --beam_size=4 --length_penalty=0.6         # beam search
  python experiments/generate.py --config=configs/metalm_vl.py:stage=finetune \
      --checkpoint=workdirs/vl_vqa --image=digit.png --prompt="question: which digit is this? answer:"
  python experiments/generate.py --config=configs/mplug.py:stage=caption \
      --checkpoint=workdirs/mplug_caption --image=digit.png --prompt=""     # a caption

--config is the training config (same file, :args and --config.<key>=<value> overrides as
the train.py command); --checkpoint its --workdir (latest step, or --step) or a step folder.
Prompts: --prompt (repeatable) and / or --prompt_file (one per line). Decoder / hybrid /
METALM language models continue the prompt; METALM multitask reads it with its encoder;
METALM vision-language reads the --image then the prompt; mPLUG answers the prompt as a
question about the --image, or captions it when the prompt is empty.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config.",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The training --workdir or a step folder.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for more).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file of prompts, one per line.")
_IMAGE = flags.DEFINE_string("image", None, "An image file (vision-language families).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k likeliest tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample from the top-p probability mass.")
_BEAM = flags.DEFINE_integer("beam_size", 1, "> 1: beam search.")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.0, "GNMT alpha (beam search).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from metalm_jax import cli, generation  # after flags (XLA_FLAGS)

  cli.setup_logging()
  prompts = list(_PROMPT.value)
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise app.UsageError("give --prompt=... (repeatable) or --prompt_file=...")
  with cli.user_errors("generate.py"):
    try:
      decoding = generation.Decoding(
          max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
          top_p=_TOP_P.value, beam_size=_BEAM.value, length_penalty=_LENGTH_PENALTY.value,
          seed=_SEED.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    loaded = generation.load(_CONFIG.value, _CHECKPOINT.value, step=_STEP.value)
    image = None
    if _IMAGE.value:
      channels = dict(_CONFIG.value.model.get("vision_encoder") or {}).get("channels", 3)
      image = generation.read_image(_IMAGE.value, channels)
    try:
      outputs = generation.generate(loaded, prompts, decoding, image=image)
    except ValueError as e:
      if "image" in str(e):
        raise app.UsageError(str(e)) from None
      raise
  for prompt, out in zip(prompts, outputs):
    print(f"{prompt!r} -> {out!r}" if len(prompts) > 1 else f"{prompt}{out}")


if __name__ == "__main__":
  app.run(main)
