"""Clean stops: SIGTERM / SIGINT and a wall-clock deadline become a request the loop honours.

The training loop checks `stop.requested()` after every step; when set, it writes a checkpoint
at the step just finished and exits normally (exit code 0 from the CLI). A second SIGINT while
a stop is pending raises KeyboardInterrupt at once (for an impatient Ctrl-C).

With several processes every process must stop at the same step (they save one checkpoint
together), so the flag is agreed across processes with an all-gather: any process asking to
stop stops them all.
"""
from __future__ import annotations

import signal
import threading
import time

import jax
import numpy as np

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager installing the handlers; `reason` says why a stop was requested."""

  def __init__(self, *, deadline_minutes: float = 0.0):
    self._deadline = time.monotonic() + deadline_minutes * 60 if deadline_minutes > 0 else None
    self._signal: int | None = None
    self._previous = {}

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self._signal == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt("second SIGINT: stopping without a checkpoint")
    self._signal = signum

  def local_reason(self) -> str | None:
    if self._signal is not None:
      return signal.Signals(self._signal).name
    if self._deadline is not None and time.monotonic() >= self._deadline:
      return "deadline"
    return None

  def requested(self) -> str | None:
    """The reason to stop now (signal name or 'deadline'), agreed across processes, or None."""
    reason = self.local_reason()
    if jax.process_count() == 1:
      return reason
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(reason is not None))
    if reason is None and np.any(flags):
      reason = "peer stop request"
    return reason
