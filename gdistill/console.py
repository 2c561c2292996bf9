"""The command line's console: gdistill's own lines on the terminal, the rest in W/logs/.

A run prints its progress lines ('[teacher] step 100/1200 ...', the results table) and, on
failure, one 'error: ...' line. Everything else a run's libraries write - TensorFlow's and
XLA's C++ logs (the oneDNN banner, absl's pre-init warning), Python warnings, absl/orbax/tfds
logging, progress bars - goes to the run's log file, `<workdir>/logs/<mode>-<time>-<pid>.log`,
together with a copy of gdistill's own lines and any traceback. `--verbose` keeps everything on
the terminal instead (no redirection, tracebacks printed).

How (capture, called by gdistill.main first thing, before TensorFlow or a JAX backend starts):
file descriptors 1 and 2 are pointed at the log file, so C/C++ writes land there; Python's
sys.stderr (warnings, logging, tqdm) follows fd 2; sys.stdout becomes a tee to the terminal
(a duplicate of the original fd 1) and the log, so print() from gdistill reaches the user.
error() writes to the terminal's original stderr.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings
from typing import Optional, TextIO

_state: dict = {}


class _Tee(io.TextIOBase):
  """A text stream that writes to several streams (the terminal and the log)."""

  def __init__(self, *streams: TextIO):
    self._streams = streams

  def write(self, s: str) -> int:
    for st in self._streams:
      st.write(s)
      st.flush()
    return len(s)

  def flush(self) -> None:
    for st in self._streams:
      st.flush()

  def isatty(self) -> bool:
    return False

  def fileno(self) -> int:
    return self._streams[0].fileno()


def log_dir(workdir: str) -> str:
  """Where a workdir's run logs go: <workdir>/logs, or a local folder for a remote workdir
  (file descriptors can only point at local files)."""
  from gdistill import paths
  if paths.is_remote(workdir):
    import hashlib
    import tempfile
    tag = hashlib.sha256(workdir.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "gdistill-logs", tag)
  return os.path.join(paths.resolve(workdir), "logs")


def capture(workdir: str, mode: str, *, verbose: bool = False) -> Optional[str]:
  """Sends third-party output to a log file under log_dir(workdir); returns its path (None
  with verbose, where nothing is redirected). Call once, before heavy imports."""
  _quiet_environment(verbose)
  if verbose or _state:
    return _state.get("path")
  directory = log_dir(workdir)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
  sys.stdout.flush()
  sys.stderr.flush()
  term_out = os.fdopen(os.dup(1), "w", buffering=1)
  term_err = os.fdopen(os.dup(2), "w", buffering=1)
  log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(log_fd, 1)
  os.dup2(log_fd, 2)
  os.close(log_fd)
  log_text = os.fdopen(os.dup(2), "w", buffering=1)
  sys.stdout = _Tee(term_out, log_text)
  sys.stderr = log_text
  _state.update(path=path, term_err=term_err, term_out=term_out)
  logging.captureWarnings(True)
  return path


def _quiet_environment(verbose: bool) -> None:
  """Settings that keep libraries from printing to the terminal at all (set before they are
  imported): TensorFlow's C++ logs, and absl logging at WARNING (orbax logs every file it
  writes at INFO)."""
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  if not verbose:
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def log_path() -> Optional[str]:
  return _state.get("path")


def error(message: str) -> None:
  """One error line on the terminal's stderr (and in the log)."""
  line = message if message.startswith("error:") else f"error: {message}"
  term = _state.get("term_err")
  if term is not None:
    term.write(line + "\n")
    term.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
  else:
    print(line, file=sys.stderr, flush=True)


def traceback_hint() -> str:
  """' (traceback in <log>)' when the log holds the traceback, else ''."""
  return f" (traceback in {_state['path']})" if _state.get("path") else ""
