"""Paths as users give them, and the file operations of a workdir.

A path a user types (`--workdir=runs/x`, `--config.init_from=...`, `--config.sample.out=...`)
is taken as given: a relative one is resolved against the current directory once, at the entry
points (gdistill.main, train_and_evaluate, evaluate_workdir, sample_to_file, compile_check.run,
gdistill.load), so everything below sees absolute paths (orbax refuses relative ones). A remote
path (`gs://bucket/run`, any `scheme://`) is left exactly as it is: orbax, tfds and TensorBoard
read and write them natively, and the small files gdistill writes itself (config.json,
metrics.jsonl, PNG grids, evaluation tables) go through etils.epath here, which does too.

  resolve("runs/x")          -> "/current/dir/runs/x"
  resolve("gs://bucket/run") -> "gs://bucket/run"
  resolve("")                -> ""            (unset stays unset)
"""
from __future__ import annotations

import io
import json
import os
import re
import uuid
from typing import Any

from etils import epath

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_remote(path: str) -> bool:
  """True for 'gs://...', 's3://...', any 'scheme://' path."""
  return bool(_REMOTE.match(str(path)))


def resolve(path: str) -> str:
  """The absolute form of a user-given path: '~' expanded, relative paths against the current
  directory, normalised; remote paths and '' unchanged. Idempotent."""
  path = str(path)
  if not path or is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
  """os.path.join, which also keeps 'gs://bucket/x' intact ('gs://bucket/x/y')."""
  return os.path.join(base, *parts)


def _p(path: str) -> epath.Path:
  return epath.Path(path)


def exists(path: str) -> bool:
  return _p(path).exists()


def isdir(path: str) -> bool:
  return _p(path).is_dir()


def makedirs(path: str) -> None:
  if path:
    _p(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names in a directory ([] if it does not exist)."""
  p = _p(path)
  return sorted(x.name for x in p.iterdir()) if p.is_dir() else []


def remove(path: str) -> None:
  p = _p(path)
  if p.exists():
    p.unlink()


def parent(path: str) -> str:
  return os.path.dirname(path.rstrip("/"))


def read_text(path: str) -> str:
  return _p(path).read_text()


def read_bytes(path: str) -> bytes:
  return _p(path).read_bytes()


def read_json(path: str) -> Any:
  return json.loads(read_text(path))


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes `path.tmp-<unique>` then renames it over `path`: readers see the old file or the
  new one, never a partial one (a rename on local disks; copy + delete on object stores)."""
  makedirs(parent(path))
  tmp = _p(f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  tmp.write_bytes(data)
  tmp.replace(_p(path))


def write_text_atomic(path: str, text: str) -> None:
  write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str, obj: Any, *, sort_keys: bool = False) -> None:
  """JSON (indent 2) written atomically (write_bytes_atomic)."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str))


def append_text(path: str, text: str) -> None:
  """Appends to a text file (creating it). Object stores cannot append: there the file is
  rewritten whole (metrics.jsonl stays small)."""
  makedirs(parent(path))
  if is_remote(path):
    old = read_text(path) if exists(path) else ""
    _p(path).write_text(old + text)
    return
  with open(path, "a") as f:
    f.write(text)


def save_npz_atomic(path: str, arrays: dict) -> None:
  """np.savez (no pickle) written atomically."""
  import numpy as np
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes_atomic(path, buf.getvalue())


def load_npz(path: str) -> dict:
  """All arrays of an .npz (allow_pickle=False), read into memory."""
  import numpy as np
  with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def save_figure(fig, path: str, **kwargs) -> None:
  """matplotlib figure -> PNG at path (local or remote)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **kwargs)
  write_bytes_atomic(path, buf.getvalue())
