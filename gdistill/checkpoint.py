"""Checkpoints and stage exports: the only module of gdistill that imports orbax.

The schema is ours. A training state is a dict
`{'step': int32 [], 'params': tree, 'ema': tree | None, 'opt_state': optax state}` of
sharded jax.Arrays; each step also stores a JSON dict `extra` (stage, data seed, config
hash...). Layout of a stage directory (orbax 0.12 CheckpointManager):

  <dir>/<step>/state/   arrays (StandardCheckpointHandler, OCDBT)
  <dir>/<step>/extra/   the JSON dict
  <dir>/<step>.orbax-checkpoint-tmp/   a save in flight or killed: never listed

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` on
commit, so a step directory exists iff the step is committed. Restores are strict:
shapes, dtypes and tree structure must match the target exactly (orbax would silently
cast dtypes); shardings always come from the target, never from the files.

An export (a finished stage) is `<path>/params/` (orbax) plus `<path>/metadata.json`,
written last; an export without metadata.json is incomplete.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from gdistill import paths

log = logging.getLogger(__name__)

_STATE = "state"
_EXTRA = "extra"
_PARAMS_DIR = "params"
_METADATA_FILE = "metadata.json"


class CheckpointMismatchError(ValueError):
  """The stored tree (structure, shapes, dtypes) differs from the restore target."""


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none can be read; nothing was deleted."""


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_str(path) -> str:
  return "/".join(_key_str(k) for k in path)


def tree_summary(tree) -> dict[str, list]:
  """{'params/down_0_0/conv0/kernel': [[3, 3, 8, 16], 'float32'], ...} for every leaf.

  Works on arrays, jax.ShapeDtypeStruct and orbax's stored array metadata alike.
  Tuples and namedtuples give index / field names, the same keys orbax stores them by.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  summary = {}
  for path, leaf in leaves:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    summary[_path_str(path)] = [
        [int(d) for d in np.shape(leaf)], str(np.dtype(dtype))]
  return summary


def _check_matches(stored: dict[str, list], target: dict[str, list], *, what: str):
  """Raises CheckpointMismatchError listing every differing, missing or extra leaf."""
  problems = []
  for path in sorted(set(stored) | set(target)):
    if path not in stored:
      problems.append(f"  {path}: expected {_fmt(target[path])}, missing in the checkpoint")
    elif path not in target:
      problems.append(f"  {path}: found {_fmt(stored[path])} in the checkpoint, not in the target")
    elif stored[path] != target[path]:
      problems.append(f"  {path}: expected {_fmt(target[path])}, found {_fmt(stored[path])}")
  if problems:
    raise CheckpointMismatchError(
        f"{what} does not match the restore target ({len(problems)} mismatches; "
        "nothing is cast or reshaped):\n" + "\n".join(problems))


def _fmt(entry: list) -> str:
  shape, dtype = entry
  return f"shape {tuple(shape)} dtype {dtype}"


def _require_shardings(abstract_tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
  missing = [_path_str(p) for p, x in leaves if getattr(x, "sharding", None) is None]
  if missing:
    raise ValueError(
        "Every leaf of the restore target must be a jax.ShapeDtypeStruct with .sharding "
        f"set (the restore places arrays by it); without: {', '.join(missing)}")


def _stored_summary(item_metadata, where: str) -> dict[str, list]:
  if item_metadata is None:
    raise FileNotFoundError(f"No readable array metadata in {where}")
  return tree_summary(item_metadata)


class StageCheckpointer:
  """Rolling checkpoints of one stage: async saves, strict restores, corruption fallback.

  All processes must call every method (orbax writes collectively).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               create: bool = True):
    self.directory = epath.Path(directory)
    state_handler = ocp.StandardCheckpointHandler()
    extra_handler = ocp.JsonCheckpointHandler()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.StandardSave, state_handler)
    registry.add(_STATE, ocp.args.StandardRestore, state_handler)
    registry.add(_EXTRA, ocp.args.JsonSave, extra_handler)
    registry.add(_EXTRA, ocp.args.JsonRestore, extra_handler)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        create=create,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, handler_registry=registry)

  def all_steps(self) -> list[int]:
    """Committed steps, ascending, read from disk.

    Not the manager's own list: that one includes a step as soon as its async save
    starts, before the commit rename.
    """
    name_format = ocp.step.standard_name_format()
    return sorted(m.step for m in name_format.find_all(self.directory))

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def latest_extra(self) -> tuple[int, dict] | None:
    """(step, extra JSON) of the latest committed checkpoint, without reading its arrays; None
    if there is none or its JSON is unreadable (restore_latest_usable then reports it)."""
    step = self.latest_step()
    if step is None:
      return None
    try:
      return step, dict(self._manager.restore(step, args=ocp.args.Composite(**{
          _EXTRA: ocp.args.JsonRestore()}))[_EXTRA])
    except Exception:  # pylint: disable=broad-except
      return None

  def save(self, step: int, state, extra: dict, *, force: bool = False) -> bool:
    """Starts saving `state` and `extra` at `step`; True if a save was started.

    With async_save it returns after the device->host copy; the commit happens in the
    background (`wait()` blocks on it). Steps beyond `keep` are deleted after commit.
    Returns False without saving if `step` is not after the latest step, unless `force`
    (which still refuses to overwrite an existing step).
    """
    json.dumps(extra)  # Fail here, not in the background thread, if extra is not JSON.
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _EXTRA: ocp.args.JsonSave(dict(extra)),
    })
    return self._manager.save(int(step), args=args, force=force)

  def restore(self, step: int | None, abstract_state) -> tuple[Any, dict]:
    """(state, extra) at `step` (latest if None), placed by the target's shardings.

    Raises CheckpointMismatchError (a ValueError) naming every leaf whose shape or dtype
    differs, or that is missing on either side; FileNotFoundError if no such step.
    """
    _require_shardings(abstract_state)
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"No committed checkpoint in {self.directory}")
      step = steps[-1]
    if step not in steps:
      raise FileNotFoundError(
          f"No committed checkpoint for step {step} in {self.directory}; have {steps}")
    where = f"Checkpoint {self.directory}/{step}"
    metadata = self._manager.metadata(step).item_metadata
    stored = _stored_summary(metadata.get(_STATE) if metadata else None, where)
    _check_matches(stored, tree_summary(abstract_state), what=where)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract_state),
        _EXTRA: ocp.args.JsonRestore(),
    }))
    return restored[_STATE], dict(restored[_EXTRA])

  def restore_latest_usable(self, abstract_state) -> tuple[int, Any, dict] | None:
    """(step, state, extra) of the newest readable checkpoint; None if there is none.

    A checkpoint that orbax fails to read (truncated, garbage) is skipped with a warning
    and the previous retained one is tried. A CheckpointMismatchError is not corruption
    and propagates. If every checkpoint fails, raises NoUsableCheckpointError. Deletes nothing.
    """
    _require_shardings(abstract_state)
    failures = []
    for step in reversed(self.all_steps()):
      try:
        state, extra = self.restore(step, abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        log.warning("Checkpoint step %d in %s is unreadable, trying an older one: %s: %s",
                    step, self.directory, type(e).__name__, e)
        failures.append(f"  step {step}: {type(e).__name__}: {e}")
        continue
      return step, state, extra
    if failures:
      raise NoUsableCheckpointError(
          f"No usable checkpoint in {self.directory} (none deleted):\n" + "\n".join(failures)
          + "\nMove the directory aside to start the stage afresh, or restore it from a backup.")
    return None

  def wait(self):
    """Blocks until every started save is committed (and old steps pruned)."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

  def __enter__(self) -> StageCheckpointer:
    return self

  def __exit__(self, *exc_info):
    self.close()


def _sync(name: str):
  ocp.multihost.sync_global_processes(f"gdistill_checkpoint:{name}")


def save_export(path: str, params, metadata: dict) -> None:
  """Writes a finished stage: `path/params` (orbax, synchronous), then `path/metadata.json`.

  Everything is written under `path.tmp` and renamed to `path` at the end, replacing an
  older export. metadata.json also records `param_summary` (tree_summary of params).
  Only process 0 writes metadata.json and renames; all processes must call this.
  """
  final = epath.Path(path)
  tmp = final.parent / (final.name + ".tmp")
  old = final.parent / (final.name + ".old")
  primary = jax.process_index() == 0
  if primary:
    for stale in (tmp, old):
      if stale.exists():
        stale.rmtree()
  _sync(f"export_clean:{final}")
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(tmp / _PARAMS_DIR, args=ocp.args.StandardSave(params))
  if primary:
    paths.write_json_atomic(str(tmp / _METADATA_FILE),
                            {**metadata, "param_summary": tree_summary(params)}, sort_keys=True)
    if final.exists():
      final.rename(old)
    tmp.rename(final)
    if old.exists():
      old.rmtree()
  _sync(f"export_done:{final}")


class DamagedExportError(ValueError):
  """An export whose metadata.json exists but cannot be read."""


def load_export_metadata(path: str) -> dict:
  """The metadata.json of a complete export (FileNotFoundError if absent or incomplete,
  DamagedExportError if unreadable)."""
  file = epath.Path(path) / _METADATA_FILE
  if not file.exists():
    raise FileNotFoundError(
        f"No complete export at {path}: {file} is missing (the export was never written, "
        "or its save was interrupted)")
  try:
    return json.loads(file.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise DamagedExportError(
        f"{file} is damaged ({type(e).__name__}: {e}); the export cannot be used. Delete "
        f"{path} and rerun its stage (checkpoints under its stage folder are reused), or "
        "restore the folder from a backup.") from None


def load_export(path: str, abstract_params) -> tuple[Any, dict]:
  """(params, metadata) of an export, strict like StageCheckpointer.restore."""
  metadata = load_export_metadata(path)
  _require_shardings(abstract_params)
  params_dir = epath.Path(path) / _PARAMS_DIR
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    stored = _stored_summary(ckptr.handler.metadata(params_dir), f"Export {params_dir}")
    _check_matches(stored, tree_summary(abstract_params), what=f"Export {params_dir}")
    params = ckptr.restore(params_dir, args=ocp.args.StandardRestore(abstract_params))
  return params, metadata


def load_export_local(path: str, device=None) -> tuple[Any, dict]:
  """(params, metadata) of an export on one device, its target built from param_summary.

  For inspection, comparisons and tools that have no model config at hand.
  """
  metadata = load_export_metadata(path)
  summary = metadata.get("param_summary")
  if not summary:
    raise ValueError(f"{path}/metadata.json has no param_summary; use load_export with a target")
  sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
  nested: dict = {}
  for key, (shape, dtype) in summary.items():
    node = nested
    parts = key.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)
  return load_export(path, nested)
