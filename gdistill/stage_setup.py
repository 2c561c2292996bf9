"""What a stage trains and starts from: its models, its parent, its optimizer, its sharded state.

setup_stage(config, workdir, stage, mesh) builds, for any stage kind of the plan:
  student   the model being trained: the AutoencoderKL (autoencoder), or a Denoiser (teacher:
            plain; guided / progressive: w-conditioned);
  teacher   the frozen Denoiser a distillation stage learns from, with its parameters read
            from the parent export (checked by lineage first);
  the optimizer (frozen parameter groups left alone) and the abstract sharded state.
init_state then builds the fresh state: random for the autoencoder and the teacher, the parent's
weights plus a zero w-embedding for stage one, the parent's weights for a progressive round.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gdistill import autoencoding, conditioning, config_lib, lineage, optim, paths, schedules
from gdistill import checkpoint as ckpt_lib
from gdistill import sharding
from gdistill.denoiser import Denoiser, build_denoiser, student_params_from_teacher
from gdistill import plan as plan_lib
from gdistill.plan import Stage


def example_shape(config) -> tuple[int, ...]:
  """One example as the denoising network sees it (latents for a latent model)."""
  m = config.model
  return (m.image_size, m.image_size, m.channels) if m.name != "mlp" else (m.channels,)


def data_shape(config) -> tuple[int, ...]:
  """One example as the dataset holds it (the autoencoder's images for a latent model)."""
  if config.vae.enabled:
    return (config.vae.image_size, config.vae.image_size, config.vae.image_channels)
  return example_shape(config)


def model_shape(config, stage: Stage) -> tuple[int, ...]:
  """What the stage's model takes: images for the autoencoder, else example_shape."""
  return data_shape(config) if stage.kind == "autoencoder" else example_shape(config)


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def export_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name, "export")


def is_finished(workdir: str, name: str) -> bool:
  return paths.exists(os.path.join(export_dir(workdir, name), "metadata.json"))


def stage_seed(config, stage: Stage) -> int:
  return (int(config.seed) * 1_000_003 + zlib.crc32(stage.name.encode())) % (2 ** 31)


def parametrization(config, w_conditioned: bool) -> str:
  """What a model predicts: the teacher model.parametrization, the w-conditioned students
  model.student_parametrization (when set)."""
  m = config.model
  return (m.student_parametrization or m.parametrization) if w_conditioned else m.parametrization


def denoiser_for(config, *, w_embedding: bool, dropout: Any = None,
                 tokenizer=None) -> Denoiser:
  """The config's denoiser (tokenizer: the text model's; looked up from the dataset if None)."""
  if tokenizer is None:
    tokenizer = conditioning.tokenizer_for(config)
  model_cfg = config.model.copy_and_resolve_references()
  with model_cfg.unlocked():
    model_cfg.parametrization = parametrization(config, w_embedding)
  return build_denoiser(model_cfg, w_embedding=w_embedding, dropout=dropout,
                        schedule=schedules.from_config(config.diffusion), text_cfg=config.text,
                        tokenizer=tokenizer)


def student_model(config, stage: Stage):
  """The model a stage trains."""
  if stage.kind == "autoencoder":
    return autoencoding.build(config.vae, data_shape(config),
                              param_dtype=config.model.param_dtype)
  return denoiser_for(config, w_embedding=stage.w_conditioned,
                      dropout=plan_lib.section(config, stage).dropout)


def teacher_model(config, stage: Stage) -> Optional[Denoiser]:
  """The frozen model a stage distils: the plain teacher for 'guided', the previous round's
  w-conditioned model for 'progressive'; None for the autoencoder and the teacher."""
  if stage.kind not in ("guided", "progressive"):
    return None
  return denoiser_for(config, w_embedding=stage.kind == "progressive", dropout=0.0)


def parent_path(config, workdir: str, stage: Stage) -> Optional[str]:
  if stage.kind not in ("guided", "progressive"):
    return None
  if stage.parent is None:
    if not config.init_from:
      raise config_lib.ConfigError(
          f"stage {stage.name} needs a parent export: set --config.init_from=PATH (an export "
          "dir with metadata.json) or run config.stage=pipeline")
    return config.init_from
  return export_dir(workdir, stage.parent)


def abstract_params(model, shape, config, mesh):
  """(unboxed ShapeDtypeStructs with shardings, shardings, boxed abstract)."""
  boxed = model.init_abstract(shape)
  shard = sharding.logical_shardings(boxed, mesh, config.logical_axis_rules)
  return sharding.with_shardings(nn.unbox(boxed), shard), shard, boxed


@dataclasses.dataclass
class StageSetup:
  """Everything run_stage builds before its first step."""
  student: Any
  teacher: Optional[Denoiser]
  teacher_params: Any
  parent_meta: Optional[dict]
  parent_path: Optional[str]
  optimizer: optax.GradientTransformation
  state_shardings: dict
  abstract_state: dict
  teacher_shardings: Any
  shape: tuple[int, ...]

  @property
  def batch_fields(self) -> tuple[str, ...]:
    """The batch fields the stage's train step takes: 'x' and the condition's fields."""
    return ("x",) + tuple(getattr(self.student, "cond_fields", ()))


def setup_stage(config, workdir: str, stage: Stage, mesh, *,
                abstract_parent: bool = False) -> StageSetup:
  """Models, parent (checked and loaded), optimizer and the sharded abstract state.

  abstract_parent: the parent's parameters as sharded ShapeDtypeStructs and no file read
  (--mode=compile lowers the step without any export).
  """
  section = plan_lib.section(config, stage)
  student = student_model(config, stage)
  teacher = teacher_model(config, stage)
  shape = model_shape(config, stage)
  ppath = None if abstract_parent else parent_path(config, workdir, stage)
  teacher_params = parent_meta = t_shard = None
  if abstract_parent and teacher is not None:
    teacher_params, t_shard, _ = abstract_params(teacher, shape, config, mesh)
  if ppath is not None:
    parent_meta = ckpt_lib.load_export_metadata(ppath)
    lineage.check_parent(stage, config, parent_meta, ppath)
    t_abs, t_shard, _ = abstract_params(teacher, shape, config, mesh)
    teacher_params, _ = ckpt_lib.load_export(ppath, t_abs)
  optimizer = optim.make_optimizer(section, frozen=stage.frozen)
  p_abs, p_shard, boxed = abstract_params(student, shape, config, mesh)
  opt_boxed = jax.eval_shape(optimizer.init, boxed)
  opt_shard = sharding.logical_shardings(opt_boxed, mesh, config.logical_axis_rules)
  opt_abs = sharding.with_shardings(nn.unbox(opt_boxed), opt_shard)
  rep = sharding.replicated(mesh)
  shardings = {"step": rep, "skipped": rep, "params": p_shard, "opt_state": opt_shard}
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  abstract = {"step": scalar, "skipped": scalar, "params": p_abs, "opt_state": opt_abs}
  if section.ema_decay > 0:
    shardings["ema"], abstract["ema"] = p_shard, p_abs
  return StageSetup(student, teacher, teacher_params, parent_meta, ppath, optimizer,
                    shardings, abstract, t_shard, shape)


# How each kind's first parameters come about (from random ones and the parent's).
_INITIAL_PARAMS = {
    "autoencoder": lambda fresh, parent: fresh,
    "teacher": lambda fresh, parent: fresh,
    "guided": lambda fresh, parent: student_params_from_teacher(parent, fresh),  # + w-embedding
    "progressive": lambda fresh, parent: jax.tree.map(lambda t, q: t.astype(q.dtype),
                                                      parent, fresh),
}


def init_state(config, stage: Stage, s: StageSetup):
  """Fresh sharded state: random for the autoencoder and the teacher, from the parent for the
  distillation stages."""
  use_ema = "ema" in s.state_shardings
  initial = _INITIAL_PARAMS[stage.kind]

  def init(rng, teacher_params):
    fresh = nn.unbox(s.student.init_fn(s.shape)(rng))
    p = initial(fresh, teacher_params)
    state = {"step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32), "params": p,
             "opt_state": s.optimizer.init(p)}
    if use_ema:
      state["ema"] = p
    return state

  rng = jax.random.key(stage_seed(config, stage))
  return jax.jit(init, out_shardings=s.state_shardings)(rng, s.teacher_params)
