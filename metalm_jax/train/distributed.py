"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

On a TPU pod or a SLURM / Kubernetes GPU cluster JAX detects everything by itself
(`--distributed=auto`). On one machine, or where detection is not available, name the
coordinator explicitly; every process runs the same command with its own process id:

  python experiments/train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0

The environment variables METALM_COORDINATOR_ADDRESS, METALM_NUM_PROCESSES and METALM_PROCESS_ID
stand in for the flags. A peer that dies is noticed through the coordination service's heartbeat
(`heartbeat_timeout_seconds`): the surviving processes then exit with an error instead of hanging.
"""
from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)


def initialize(*, mode: str = "off", coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, heartbeat_timeout_seconds: int = 100) -> None:
  """Starts the multi-process runtime; `mode` is 'off', 'auto' or 'explicit' (see module doc)."""
  coordinator_address = coordinator_address or os.environ.get("METALM_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("METALM_NUM_PROCESSES", "0"))
  if process_id < 0:
    process_id = int(os.environ.get("METALM_PROCESS_ID", "-1"))
  if coordinator_address and mode == "off":
    mode = "explicit"
  if mode == "off":
    return
  if mode == "auto":
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  elif mode == "explicit":
    if not coordinator_address or num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(
          f"multi-process start needs --coordinator_address (got {coordinator_address!r}), "
          f"--num_processes >= 1 (got {num_processes}) and 0 <= --process_id < num_processes "
          f"(got {process_id}), or the METALM_* environment variables")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  else:
    raise ValueError(f"--distributed={mode!r}; valid: 'off', 'auto', 'explicit'")
  logger.info("process %d of %d; %d local / %d global devices", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())
