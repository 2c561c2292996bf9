"""Preemption: SIGTERM asks the loop to checkpoint at the next step boundary and exit 0.

One process: a SIGTERM handler sets a flag that the loop polls. Several processes: JAX's
preemption sync point (needs jax.distributed) makes every process stop at the same step.
"""
from __future__ import annotations

import signal
import threading

import jax

_flag = threading.Event()
_installed = False


class Preempted(SystemExit):
  """Raised after the checkpoint is written; main() exits 0."""

  def __init__(self, msg: str):
    super().__init__(0)
    self.msg = msg

  def __str__(self):
    return self.msg


def _handler(signum, frame):
  del frame
  _flag.set()
  print(f"received signal {signum}: checkpointing at the next step boundary", flush=True)


def install() -> None:
  """Installs the SIGTERM handler (main thread only; a no-op elsewhere)."""
  global _installed
  if _installed or threading.current_thread() is not threading.main_thread():
    return
  signal.signal(signal.SIGTERM, _handler)
  _installed = True


def requested() -> bool:
  return _flag.is_set()


def reset() -> None:
  _flag.clear()


class Guard:
  """should_stop(step) is True at the step where the run must checkpoint and stop."""

  def __init__(self):
    install()
    self._multi = jax.process_count() > 1

  def should_stop(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      try:
        # All processes agree on the step: never OR in the local flag here.
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception:  # preemption service not running (no jax.distributed)
        self._multi = False
    return _flag.is_set()
