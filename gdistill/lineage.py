"""Export metadata, and the checks that refuse a parent or a resume that does not fit.

Every finished stage exports its (EMA) parameters plus metadata: kind, name, N (sampling
steps of the exported model; None for continuous-time teacher and stage-one models), w range,
parametrization, schedule, the model architecture and its hash, the config hash, and its parent
(path, step, metadata hash). Every checkpoint records the hyperparameters it was trained with
(resume_record); check_resume refuses to continue it with other values unless
config.allow_changes names them.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Optional

from gdistill import config_lib, schedules
from gdistill import plan as plan_lib
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
      "parametrization": ((config.model.student_parametrization or config.model.parametrization)
                          if stage.w_conditioned else config.model.parametrization),
      "schedule": schedules.from_config(d).to_dict(),
      "model": config_lib.arch_dict(config.model),
      "model_hash": config_lib.arch_hash(config.model),
      "text": (config_lib.text_arch_dict(config.text)
               if config.model.conditioning == "text" else None),
      "latent": bool(config.vae.enabled) and stage.kind != "autoencoder",
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
  want_text = (config_lib.text_arch_dict(config.text)
               if config.model.conditioning == "text" else None)
  if parent.get("text") != want_text:
    raise LineageError(f"{parent_path} has another text encoder than config.text (stage "
                       f"{stage.name}): expected {want_text}, found {parent.get('text')}")
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


# ------------------------------------------------------------------------------------ resuming
# max_nonfinite: a guard, not part of the update rule; round_steps: what it changes for a round
# is that round's num_steps, recorded as such.
_NOT_HYPERPARAMETERS = ("max_nonfinite", "round_steps")


def resume_record(config, stage: Stage) -> dict:
  """The config values that decide how a stage trains from a given checkpoint on, flat
  ({'teacher.lr': 0.002, ...}); stored with every checkpoint (its `extra`) and compared on
  resume. num_steps counts only where the learning-rate schedule depends on it (not for
  'constant'), so a constant-schedule stage may be extended. The architecture is not here: a
  different one fails the strict restore anyway."""
  section = plan_lib.section(config, stage)
  out = {f"{stage.section}.{k}": v for k, v in section.to_dict().items()
         if k not in _NOT_HYPERPARAMETERS}
  if section.schedule == "constant":
    out.pop(f"{stage.section}.num_steps")
  out.update({f"diffusion.{k}": v for k, v in config.diffusion.to_dict().items()})
  out.update({"seed": config.seed, "data.name": config.data.name,
              "data.split": config.data.split, "data.variant": config.data.variant,
              "data.random_flip": config.data.random_flip,
              "model.dropout": config.model.dropout, "model.dtype": config.model.dtype})
  if config.model.get("inpainting"):  # the training masks' mix (recorded only where used)
    out.update({f"masks.{k}": v for k, v in config.masks.to_dict().items()})
  return json.loads(json.dumps(out, default=str))  # tuples -> lists, as stored in JSON


def _allowed(key: str, allow: list[str]) -> bool:
  return "all" in allow or key in allow or key.rsplit(".", 1)[-1] in allow


def check_resume(saved: Optional[dict], config, stage: Stage, step: int) -> list[str]:
  """Refuses (config_lib.ConfigError) to resume `stage` at `step` when a value recorded in
  `saved` (that checkpoint's resume_record) differs from the config's and config.allow_changes
  does not name it; returns the allowed changes as 'key: old -> new' lines. A checkpoint
  without a record (older gdistill) is not checked."""
  if not saved:
    return []
  now = resume_record(config, stage)
  allow = [a.strip() for a in str(config.allow_changes).split(",") if a.strip()]
  # Keys the checkpoint does not record (added to gdistill later, or num_steps under a
  # constant schedule) cannot have been changed since.
  changed = {k: (saved[k], now.get(k)) for k in sorted(saved) if saved[k] != now.get(k)}
  refused = [k for k in changed if not _allowed(k, allow)]
  if refused:
    lines = "\n".join(f"  config.{k}: {changed[k][0]!r} in the checkpoint, {changed[k][1]!r} "
                      "now" for k in refused)
    raise config_lib.ConfigError(
        f"stage {stage.name} has a checkpoint at step {step} written with other "
        f"hyperparameters:\n{lines}\nResuming would train the rest of the stage differently "
        "from how it started. Restore the old value(s), or accept the change with "
        f"--config.allow_changes={','.join(refused)} ('all' accepts every change), or delete "
        f"{stage.name}/ in the workdir to start the stage afresh.")
  return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()]
