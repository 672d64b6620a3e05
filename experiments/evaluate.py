r"""Run a config's evaluators on a checkpoint of `experiments/train.py`, for any model family.

  python experiments/evaluate.py --config=configs/decoder_lm.py --checkpoint=workdirs/tiny
  python experiments/evaluate.py --config=configs/mplug.py:stage=vqa --checkpoint=workdirs/vqa \
      --evals=vqa --config.evals.vqa.limit=0
  python experiments/evaluate.py --config=configs/decoder_lm.py:size=small \
      --checkpoint=workdirs/small/checkpoints/4000 --split=test --num_batches=0

--config is the training config (same file, args and --config.<key>=<value> overrides as the
train.py command; its `config.evals` say what runs); --checkpoint is the training --workdir
(its latest checkpoint, or --step), its `checkpoints/` folder, or one step folder. The
default run reproduces the metrics the trainer logged at that step. Writes the result as JSON
to --output (default `<workdir>/eval_step<step>_<names>.json`).
"""
from __future__ import annotations

import json
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config "
                                          "(configs/*.py[:args], plus the same overrides).",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The training --workdir, its "
                                  "checkpoints/ folder, or a step folder checkpoints/<step>.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
_EVALS = flags.DEFINE_list("evals", None, "Names of config.evals entries to run (default: all).")
_SPLIT = flags.DEFINE_string("split", None, "Split of the 'loss' evaluators (default: theirs); "
                             "TFDS expressions like 'train[:10%]' work.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", None, "Batches of the 'loss' evaluators "
                                    "(default: theirs); 0 = the whole split.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON result path.")
_ALLOW_MISMATCH = flags.DEFINE_bool("allow_config_mismatch", False,
                                    "Evaluate even if config.model differs from the one the "
                                    "checkpoint was trained with (shapes must still agree).")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from metalm_jax import cli  # after flags (XLA_FLAGS)
  from metalm_jax.train import evaluate, metrics

  cli.setup_logging()
  with cli.user_errors("evaluate.py"):
    result = evaluate.evaluate(
        _CONFIG.value, _CHECKPOINT.value, step=_STEP.value,
        names=tuple(_EVALS.value) if _EVALS.value else None, split=_SPLIT.value,
        num_batches=_NUM_BATCHES.value, allow_config_mismatch=_ALLOW_MISMATCH.value,
        config_name=config_flags.get_config_filename(flags.FLAGS["config"]),
        config_overrides=config_flags.get_override_values(flags.FLAGS["config"]))
  import jax
  if jax.process_index() == 0:
    result["output"] = cli.write_json(result, _OUTPUT.value or evaluate.default_output(result))
  print(json.dumps(result["evals"], indent=2))
  for name, scalars in result["evals"].items():
    own = [r for r in metrics.read_metrics(result["workdir"], name) if r["step"] == result["step"]]
    if own and _SPLIT.value is None and _NUM_BATCHES.value is None:
      shown = {k: own[-1][k] for k in scalars if k in own[-1]}
      print(f"the trainer's {name} at step {result['step']}: {shown}")
  logging.info("wrote %s", result.get("output"))


if __name__ == "__main__":
  app.run(main)
