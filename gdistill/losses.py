"""Per-stage losses as pure functions chosen by a factory; the train loop never branches on them.

Each loss has the signature
  loss_fn(params, teacher_params, batch, rng) -> (loss scalar, aux dict of scalars)
with batch = {'x': [B, ...] in [-1, 1], 'label': [B] int, 'student_steps': int32 []} (the
last is the round's N, read by progressive losses only). teacher_params is None for the
teacher stage. The teacher's forwards run in inference mode under stop_gradient.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from gdistill import diffusion
from gdistill.denoiser import Denoiser


def _schedule(dcfg):
  return lambda t: diffusion.logsnr_schedule_cosine(t, dcfg.logsnr_min, dcfg.logsnr_max)


def teacher_loss(student: Denoiser, dcfg) -> Callable:
  """Classifier-free guided teacher: labels dropped to null with probability p_uncond."""
  sched = _schedule(dcfg)

  def loss_fn(params, teacher_params, batch, rng):
    del teacher_params
    x, label = batch["x"], batch["label"]
    b = x.shape[0]
    r_t, r_eps, r_drop, r_dropout = jax.random.split(rng, 4)
    logsnr = sched(jax.random.uniform(r_t, (b,)))
    z = diffusion.diffuse(x, jax.random.normal(r_eps, x.shape), logsnr)
    drop = jax.random.bernoulli(r_drop, dcfg.p_uncond, (b,))
    label = jnp.where(drop, student.null_label, label)
    x_pred = student.x_pred(params, z, logsnr, label, train=True, rngs={"dropout": r_dropout})
    per_ex = diffusion.weighted_x_loss(x_pred, x, logsnr, dcfg.weighting)
    return jnp.mean(per_ex), {"x_mse": jnp.mean(jnp.square(x_pred - x))}
  return loss_fn


def guided_loss(student: Denoiser, teacher: Denoiser, dcfg) -> Callable:
  """Stage one: the w-conditioned student matches the guided teacher at w ~ U[w_min, w_max]."""
  sched = _schedule(dcfg)

  def loss_fn(params, teacher_params, batch, rng):
    x, label = batch["x"], batch["label"]
    b = x.shape[0]
    r_t, r_eps, r_w, r_dropout = jax.random.split(rng, 4)
    logsnr = sched(jax.random.uniform(r_t, (b,)))
    w = jax.random.uniform(r_w, (b,), minval=dcfg.w_min, maxval=dcfg.w_max)
    z = diffusion.diffuse(x, jax.random.normal(r_eps, x.shape), logsnr)
    target = jax.lax.stop_gradient(teacher.guided_x_pred(teacher_params, z, logsnr, label, w))
    x_pred = student.x_pred(params, z, logsnr, label, w, train=True,
                            rngs={"dropout": r_dropout})
    per_ex = diffusion.weighted_x_loss(x_pred, target, logsnr, dcfg.weighting)
    return jnp.mean(per_ex), {"x_mse": jnp.mean(jnp.square(x_pred - target))}
  return loss_fn


def progressive_target(teacher_x: Callable, z_t, logsnr_t, logsnr_t1, logsnr_t2, is_last):
  """Two teacher DDIM steps t -> t' -> t'' and the x that does them in one step.

  teacher_x(z, logsnr) -> x_hat. Where is_last (t'' = 0) the target is the teacher's x2.
  """
  x1 = teacher_x(z_t, logsnr_t)
  z_t1 = diffusion.ddim_step(z_t, x1, logsnr_t, logsnr_t1)
  x2 = teacher_x(z_t1, logsnr_t1)
  z_t2 = diffusion.ddim_step(z_t1, x2, logsnr_t1, logsnr_t2)
  x_tilde = diffusion.distillation_target(z_t, z_t2, logsnr_t, logsnr_t2)
  return jnp.where(diffusion.bcast(is_last, x_tilde), x2, x_tilde)


def progressive_loss(student: Denoiser, teacher: Denoiser, dcfg, clip_x: bool) -> Callable:
  """Stage two round: the N-step student matches two DDIM steps of the 2N-step teacher.

  N = batch['student_steps'] is traced (an int32 scalar), so every round shares one compile.
  """
  sched = _schedule(dcfg)

  def loss_fn(params, teacher_params, batch, rng):
    x, label, steps = batch["x"], batch["label"], batch["student_steps"]
    b = x.shape[0]
    n = steps.astype(jnp.float32)
    r_i, r_eps, r_w, r_dropout = jax.random.split(rng, 4)
    i = jax.random.randint(r_i, (b,), 0, steps)
    t = (i + 1).astype(jnp.float32) / n
    lt, lt1, lt2 = sched(t), sched(t - 0.5 / n), sched(t - 1.0 / n)
    w = jax.random.uniform(r_w, (b,), minval=dcfg.w_min, maxval=dcfg.w_max)
    z_t = diffusion.diffuse(x, jax.random.normal(r_eps, x.shape), lt)

    def teacher_x(z, logsnr):
      xh = teacher.x_pred(teacher_params, z, logsnr, label, w)
      return jnp.clip(xh, -1.0, 1.0) if clip_x else xh

    target = jax.lax.stop_gradient(progressive_target(teacher_x, z_t, lt, lt1, lt2, i == 0))
    x_pred = student.x_pred(params, z_t, lt, label, w, train=True, rngs={"dropout": r_dropout})
    per_ex = diffusion.weighted_x_loss(x_pred, target, lt, dcfg.weighting)
    return jnp.mean(per_ex), {"x_mse": jnp.mean(jnp.square(x_pred - target))}
  return loss_fn


def make_loss(kind: str, *, student: Denoiser, teacher: Denoiser | None, dcfg) -> Callable:
  """The loss of a stage kind: 'teacher' | 'guided' | 'progressive'."""
  if kind == "teacher":
    return teacher_loss(student, dcfg)
  if kind == "guided":
    return guided_loss(student, teacher, dcfg)
  if kind == "progressive":
    return progressive_loss(student, teacher, dcfg, bool(dcfg.clip_x))
  raise ValueError(f"unknown stage kind {kind!r}; valid: teacher, guided, progressive")
