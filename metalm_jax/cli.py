"""What the command-line entry points in `experiments/` share: logging, user errors, JSON.

    setup_logging()                  # our INFO lines; third-party INFO only with --verbosity
    with user_errors("train.py"):    # a user error: its message, exit 1, no traceback
      ...

A *user* error (a wrong config key, a dataset not prepared, a missing or mismatched
checkpoint, a missing manual download) is the user's to fix: the message says how, and a
traceback would only bury it. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

# Third-party loggers that print INFO lines per file / step (orbax through absl, grain, tfds).
_NOISY = ("absl", "orbax", "grain", "tensorflow_datasets", "jax._src")


def setup_logging(verbosity: int | None = None) -> None:
  """INFO for metalm_jax; WARNING for third-party libraries (orbax logs ~10 INFO lines per
  checkpoint) unless absl's --verbosity >= 1 (or `verbosity`) asks for their INFO too."""
  if verbosity is None:
    try:
      from absl import flags
      verbosity = flags.FLAGS.verbosity if flags.FLAGS.is_parsed() else 0
    except (ImportError, AttributeError):
      verbosity = 0
  third_party = logging.INFO if verbosity >= 1 else logging.WARNING
  logging.getLogger().setLevel(logging.INFO)  # the root: our loggers inherit INFO
  for name in _NOISY:  # absl's own logger included: orbax logs through it
    logging.getLogger(name).setLevel(third_party)
  logging.getLogger("metalm_jax").setLevel(logging.INFO)


def user_error_types() -> tuple[type[BaseException], ...]:
  """The exception types that are user errors (imported lazily: light CLIs stay light)."""
  from metalm_jax import checks
  from metalm_jax.config import ConfigError
  from metalm_jax.data import datasets
  from metalm_jax.data.official import ManualFilesMissingError
  from metalm_jax.train import checkpoint, restore
  return (ConfigError, checks.KwargsError, datasets.DatasetNotPreparedError,
          ManualFilesMissingError, restore.CheckpointNotFoundError, restore.ConfigMismatchError,
          checkpoint.CheckpointMismatchError, checkpoint.CheckpointCorruptError,
          checkpoint.WorkerCountMismatchError, checkpoint.CheckpointSaveError, PermissionError)


@contextlib.contextmanager
def user_errors(program: str):
  """Turns a user error into `<program>: <Type>: <message>` on stderr and exit status 1."""
  try:
    yield
  except user_error_types() as e:
    print(f"{program}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def write_json(obj, path: str) -> str:
  """Writes `obj` as indented JSON to `path` atomically (a temp file, then a rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
    f.write("\n")
  os.replace(tmp, path)
  return path
