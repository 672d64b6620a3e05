r"""Export the decoder of a trained checkpoint as a Hugging Face directory (transformers opens it).

  python experiments/export_hf.py --config=configs/decoder_lm.py --checkpoint=workdirs/demo \
      --out=exports/demo_llama
  python experiments/export_hf.py --config=configs/metalm_vl.py:pretrained=checkpoints \
      --checkpoint=workdirs/metalm_vl_clip_gpt2 --out=exports/gpt2_after_metalm

--config is the training config (as for train.py); --checkpoint its --workdir (latest step, or
--step) or a step folder. The decoder (the whole model of a decoder config, METALM's
`decoder`) is written as config.json + model.safetensors (LoRA factors merged first), as
model_type llama / qwen2 / gpt2 inferred from its layout (`models.hf.decoders.export`), with
the tokenizer files of an 'hf:<dir>' config.data.tokenizer copied beside it. Options with no
Hugging Face counterpart (sinusoidal positions, the 1/sqrt(d) tied-logit scale) are an error
naming the option; nothing is written then.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config.",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The training --workdir or a step folder.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "The directory to write (must not exist or be empty).")
_MODEL_TYPE = flags.DEFINE_string("model_type", None,
                                  "gpt2 | llama | qwen2 | mistral (default: inferred).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
flags.mark_flags_as_required(["config", "checkpoint", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from metalm_jax import cli, generation  # after flags (XLA_FLAGS)

  cli.setup_logging()
  with cli.user_errors("export_hf.py"):
    loaded = generation.load(_CONFIG.value, _CHECKPOINT.value, step=_STEP.value)
    out = generation.export_decoder(loaded, _OUT.value, model_type=_MODEL_TYPE.value,
                                    overwrite=_OVERWRITE.value)
  print(f"exported step {loaded.step}'s decoder to {out}")


if __name__ == "__main__":
  app.run(main)
