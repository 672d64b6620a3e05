r"""Train any config: `python experiments/train.py --config=configs/<name>.py[:args] --workdir=DIR`.

  python experiments/train.py --config=configs/decoder_lm.py --workdir=workdirs/tiny
  python experiments/train.py --config=configs/decoder_lm.py:size=small --workdir=workdirs/small \
      --config.optimizer.learning_rate=1e-3 --config.num_train_steps=5000

Running it again on the same --workdir resumes from the latest checkpoint (same data order).
Override any config key with --config.<key>=<value>; unknown keys are errors.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  from metalm_jax.train import train_and_evaluate  # after flags: jax reads XLA_FLAGS on import

  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print({k: v for k, v in result.items()})


if __name__ == "__main__":
  app.run(main)
