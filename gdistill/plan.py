"""The plan: a pipeline as data. One frozen record per stage; one driver walks them.

  autoencoder -> teacher -> guided -> progressive_{N0/2} -> ... -> progressive_{end}

`autoencoder` is there for latent models (config.vae.enabled) that train their own autoencoder
(no config.vae.init_from); every diffusion stage of such a plan trains on its latents.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

STAGE_RE = re.compile(r"^(autoencoder|teacher|guided|progressive_([1-9][0-9]*))$")
STAGE_HELP = "'autoencoder', 'teacher', 'guided', 'progressive_N' or 'latest'"
KINDS = ("autoencoder", "teacher", "guided", "progressive")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the plan.

  name: 'autoencoder', 'teacher', 'guided' or 'progressive_N' (N = the student's sampling
    steps); used for the workdir folder, the dashboards and the CLI.
  kind: which model family, loss and initialisation (KINDS).
  section: the config section with its optimizer and step settings.
  student_steps: N for a progressive round, else None.
  parent: the stage whose export this one starts from (None: trained from scratch, or
    config.init_from).
  latent: trains on the autoencoder's latents (the batch finisher encodes the images).
  frozen: top-level parameter groups the optimizer leaves as they are (a text model's
    'text_encoder' in the distillation stages: it stays the teacher's).
  """
  name: str
  kind: str
  section: str
  student_steps: Optional[int] = None
  parent: Optional[str] = None
  latent: bool = False
  frozen: tuple[str, ...] = ()

  @property
  def w_conditioned(self) -> bool:
    return self.kind in ("guided", "progressive")

  @property
  def diffusion(self) -> bool:
    """A denoising stage (not the autoencoder)."""
    return self.kind != "autoencoder"

  @property
  def teacher_steps(self) -> Optional[int]:
    """Sampling steps of this stage's teacher (2N for a progressive round)."""
    return None if self.student_steps is None else 2 * self.student_steps


def plan_order(name: str) -> tuple[int, int]:
  """Sort key of stage names in plan order (progressive rounds by decreasing N)."""
  m = STAGE_RE.match(name)
  if m.group(2):
    return (3, -int(m.group(2)))
  return (KINDS.index(name), 0)


def progressive_rounds(start_steps: int, end_steps: int, first_parent: Optional[str],
                       **common):
  """Rounds start_steps/2, start_steps/4, ..., end_steps."""
  rounds, parent, n = [], first_parent, start_steps // 2
  while n >= end_steps:
    name = f"progressive_{n}"
    rounds.append(Stage(name, "progressive", "progressive", n, parent, **common))
    parent, n = name, n // 2
  return rounds


def round_steps(config) -> dict[int, int]:
  """progressive.round_steps as {N: training steps} (the rounds it names; the others train
  progressive.num_steps)."""
  return {int(n): int(k) for n, k in config.progressive.get("round_steps", ())}


def section(config, stage: Stage):
  """The stage's training settings: config[stage.section], except that a progressive round
  named in progressive.round_steps trains that many steps (its learning-rate schedule, ETA
  and resume record follow). Every consumer of a stage's settings reads them here."""
  s = config[stage.section]
  n = round_steps(config).get(stage.student_steps) if stage.kind == "progressive" else None
  if n is None or n == int(s.num_steps):
    return s
  out = s.copy_and_resolve_references()
  out.unlock()
  out.num_steps = n
  return out


def trains_autoencoder(config) -> bool:
  """Whether a pipeline of this config trains its own autoencoder: a latent model
  (config.vae.enabled) without an autoencoder export to start from (config.vae.init_from)."""
  return bool(config.vae.enabled) and not config.vae.init_from


def make_plan(config) -> tuple[Stage, ...]:
  """The stages config.stage selects, in order."""
  latent = bool(config.vae.enabled)
  frozen = ("text_encoder",) if config.model.conditioning == "text" else ()
  common = dict(latent=latent)
  autoencoder = Stage("autoencoder", "autoencoder", "autoencoder")
  teacher = Stage("teacher", "teacher", "teacher", **common)
  guided = Stage("guided", "guided", "guided", None, "teacher", frozen=frozen, **common)
  p = config.progressive
  rounds = lambda first: tuple(progressive_rounds(p.start_steps, p.end_steps, first,
                                                  frozen=frozen, **common))
  own_autoencoder = (autoencoder,) if trains_autoencoder(config) else ()
  if config.stage == "autoencoder":
    return (autoencoder,)
  if config.stage == "teacher":
    return (teacher,)
  if config.stage == "guided":
    return (dataclasses.replace(guided, parent=None if config.init_from else "teacher"),)
  if config.stage == "progressive":
    return rounds(None if config.init_from else "guided")
  if config.stage == "pipeline":
    if config.init_from:  # a given teacher (an export, or a diffusers directory imported)
      return (dataclasses.replace(guided, parent=None),) + rounds("guided")
    return own_autoencoder + (teacher, guided) + rounds("guided")
  raise ValueError(f"config.stage={config.stage!r}; valid: autoencoder, teacher, guided, "
                   "progressive, pipeline")
