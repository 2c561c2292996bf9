"""Export metadata and the checks that refuse a parent that does not fit.

Every finished stage exports its (EMA) parameters plus metadata: kind, name, N (sampling
steps of the exported model; None for continuous-time teacher and stage-one models), w range,
parametrization, schedule, the model architecture and its hash, the config hash, and its parent
(path, step, metadata hash).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Optional

from gdistill import config_lib
from gdistill.plan import Stage

FORMAT_VERSION = 1


def metadata_hash(meta: dict) -> str:
  core = {k: v for k, v in meta.items() if k != "param_summary"}
  return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def export_metadata(config, stage: Stage, *, train_steps: int, parent: Optional[dict],
                    parent_path: Optional[str]) -> dict:
  """The JSON metadata written beside a stage's exported parameters."""
  d = config.diffusion
  return {
      "format_version": FORMAT_VERSION,
      "stage": stage.name,
      "kind": stage.kind,
      "sampling_steps": stage.student_steps,
      "w_conditioned": stage.w_conditioned,
      "w_range": [float(d.w_min), float(d.w_max)] if stage.w_conditioned else None,
      "parametrization": config.model.parametrization,
      "schedule": {"name": "cosine", "logsnr_min": float(d.logsnr_min),
                   "logsnr_max": float(d.logsnr_max)},
      "model": config_lib.arch_dict(config.model),
      "model_hash": config_lib.arch_hash(config.model),
      "config_hash": config_lib.config_hash(config),
      "dataset": config.data.name,
      "train_steps": int(train_steps),
      "parent": None if parent is None else {
          "path": parent_path, "stage": parent.get("stage"), "train_steps": parent.get(
              "train_steps"), "metadata_hash": metadata_hash(parent)},
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


class LineageError(ValueError):
  """A parent export that cannot serve as this stage's teacher / initialisation."""


def check_parent(stage: Stage, config, parent: dict, parent_path: str) -> None:
  """Refuses a parent that does not fit, naming what was expected and what was found."""
  want_hash = config_lib.arch_hash(config.model)
  if parent.get("model_hash") != want_hash:
    found, want = parent.get("model", {}), config_lib.arch_dict(config.model)
    diffs = [f"model.{k}: expected {want.get(k)!r}, found {found.get(k)!r}"
             for k in want if found.get(k) != want.get(k)]
    raise LineageError(f"{parent_path} has another architecture than config.model "
                       f"(stage {stage.name}):\n  " + "\n  ".join(diffs or ["(hash differs)"]))
  if stage.kind == "guided":
    if parent.get("kind") != "teacher":
      raise LineageError(f"stage guided needs a teacher export (kind 'teacher', not "
                         f"w-conditioned); {parent_path} is kind {parent.get('kind')!r}")
    return
  if stage.kind == "progressive":
    if not parent.get("w_conditioned"):
      raise LineageError(
          f"stage {stage.name} needs a w-conditioned parent (a 'guided' or 'progressive' "
          f"export); {parent_path} is kind {parent.get('kind')!r} without w-conditioning. "
          "Run stage guided first.")
    n_parent = parent.get("sampling_steps")
    if parent.get("kind") == "progressive" and n_parent != stage.teacher_steps:
      raise LineageError(
          f"stage {stage.name} distils a {stage.teacher_steps}-step teacher into a "
          f"{stage.student_steps}-step student; {parent_path} samples in {n_parent} steps "
          f"(expected {stage.teacher_steps}). Set --config.progressive.start_steps="
          f"{n_parent} to continue from it.")
    d = config.diffusion
    if parent.get("w_range") != [float(d.w_min), float(d.w_max)]:
      raise LineageError(
          f"{parent_path} was trained for w in {parent.get('w_range')}; this config asks for "
          f"[{d.w_min}, {d.w_max}] (diffusion.w_min/w_max)")
    return
  raise LineageError(f"stage {stage.name} of kind {stage.kind!r} takes no parent")
