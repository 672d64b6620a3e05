r"""Train any config: `python experiments/train.py --config=configs/<name>.py[:args] --workdir=DIR`.

  python experiments/train.py --config=configs/decoder_lm.py --workdir=workdirs/tiny
  python experiments/train.py --config=configs/decoder_lm.py:size=small --workdir=workdirs/small \
      --config.optimizer.learning_rate=1e-3 --config.num_train_steps=5000
  python experiments/train.py --config=configs/mplug.py:stage=vqa --workdir=workdirs/vqa \
      --config.init_from.checkpoint=workdirs/mplug_pretrain

Every model family trains here (config.family: lm, metalm_vl, text_tasks, mplug). Running it
again on the same --workdir resumes from the latest checkpoint (same data order); on a
finished run it says so and shows the last metrics. Override any config key with
--config.<key>=<value>; unknown keys are errors. --verbosity=1 shows third-party INFO logs.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "off", ["off", "auto", "explicit"],
                                 "Multi-process start: off, auto (TPU pods, SLURM...), or explicit "
                                 "(with the three flags below). See metalm_jax/train/distributed.py.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's id.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                                  "Seconds without a peer's heartbeat before giving up on it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from metalm_jax import cli  # after flags (XLA_FLAGS)
  from metalm_jax.train import distributed, train_and_evaluate

  cli.setup_logging()
  distributed.initialize(mode=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                         num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                         heartbeat_timeout_seconds=_HEARTBEAT.value)
  with cli.user_errors("train.py"):
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print({k: v for k, v in result.items()})


if __name__ == "__main__":
  app.run(main)
