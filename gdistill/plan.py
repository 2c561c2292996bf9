"""The plan: a pipeline as data. One frozen record per stage; one driver walks them."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the plan.

  name: 'teacher', 'guided' or 'progressive_N' (N = the student's sampling steps); used for the
    workdir folder, the dashboards and the CLI.
  kind: which loss and which model family ('teacher' | 'guided' | 'progressive').
  section: the config section with its optimizer and step settings.
  student_steps: N for a progressive round, else None.
  parent: the stage whose export this one starts from (None: the teacher, or config.init_from).
  """
  name: str
  kind: str
  section: str
  student_steps: Optional[int] = None
  parent: Optional[str] = None

  @property
  def w_conditioned(self) -> bool:
    return self.kind != "teacher"

  @property
  def teacher_steps(self) -> Optional[int]:
    """Sampling steps of this stage's teacher (2N for a progressive round)."""
    return None if self.student_steps is None else 2 * self.student_steps


def progressive_rounds(start_steps: int, end_steps: int, first_parent: Optional[str]):
  """Rounds start_steps/2, start_steps/4, ..., end_steps."""
  rounds, parent, n = [], first_parent, start_steps // 2
  while n >= end_steps:
    name = f"progressive_{n}"
    rounds.append(Stage(name, "progressive", "progressive", n, parent))
    parent, n = name, n // 2
  return rounds


def make_plan(config) -> tuple[Stage, ...]:
  """The stages config.stage selects, in order."""
  teacher = Stage("teacher", "teacher", "teacher")
  guided = Stage("guided", "guided", "guided", None, "teacher")
  p = config.progressive
  if config.stage == "teacher":
    return (teacher,)
  if config.stage == "guided":
    return (dataclasses.replace(guided, parent=None if config.init_from else "teacher"),)
  if config.stage == "progressive":
    return tuple(progressive_rounds(p.start_steps, p.end_steps,
                                    None if config.init_from else "guided"))
  if config.stage == "pipeline":
    return (teacher, guided) + tuple(progressive_rounds(p.start_steps, p.end_steps, "guided"))
  raise ValueError(f"config.stage={config.stage!r}; valid: teacher, guided, progressive, pipeline")
