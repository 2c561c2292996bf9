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
_calls = 0  # should_stop calls in this process: the sync point's id (several processes)


class Preempted(SystemExit):
  """Raised after the checkpoint is written; main() exits 0."""

  def __init__(self, msg: str):
    super().__init__(0)
    self.msg = msg

  def __str__(self):
    return self.msg


def _handler(signum, frame):
  """Only sets the flag: the handler runs between two bytecodes of the main thread, which may
  be inside a write to the console, so printing here could raise ('reentrant call inside
  BufferedWriter'). The loop reports the stop ('preempted at step N') where it stops."""
  del signum, frame
  _flag.set()


def _sync_service_running() -> bool:
  """True when jax.distributed runs JAX's preemption sync manager (it owns SIGTERM then)."""
  try:
    from jax._src import distributed
    return distributed.global_state.preemption_sync_manager is not None
  except Exception:  # pylint: disable=broad-except  (private API moved: fall back)
    return False


def install() -> None:
  """Installs the SIGTERM handler (main thread only; a no-op elsewhere).

  With several processes under jax.distributed the preemption sync manager's own notifier
  receives SIGTERM (a Python handler would hide it), so nothing is installed then.
  """
  global _installed
  if _installed or threading.current_thread() is not threading.main_thread():
    return
  if jax.process_count() > 1 and _sync_service_running():
    return
  signal.signal(signal.SIGTERM, _handler)
  _installed = True


def requested() -> bool:
  return _flag.is_set()


def reset() -> None:
  _flag.clear()


class Guard:
  """should_stop(step) is True at the step where the run must checkpoint and stop.

  One process: the SIGTERM flag. Several processes: JAX's preemption sync point, which needs
  the same increasing ids on every process: it gets a per-process count of should_stop calls
  (every process runs the same loops, so the counts agree across stages and evaluation),
  not the loop's step, which restarts with each stage.
  """

  def __init__(self):
    install()
    self._multi = jax.process_count() > 1 and _sync_service_running()

  def should_stop(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      # All processes agree on the step: never OR in the local flag here.
      global _calls
      _calls += 1
      return bool(multihost_utils.reached_preemption_sync_point(_calls))
    return _flag.is_set()
