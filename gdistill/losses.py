"""Per-stage losses as pure functions chosen by a factory; the train loop never branches on them.

Each loss has the signature
  loss_fn(params, teacher_params, batch, rng) -> (loss scalar, aux dict of scalars)
with batch = {'x': [B, ...] (images in [-1, 1], or latents), the condition field ('label' [B]
int or 'tokens' [B, L] int, Denoiser.cond_field; an inpainting model's also 'inpaint'),
'student_steps': int32 []} (the last is the round's N, read by progressive losses only). teacher_params is None for the autoencoder and
the teacher. The teacher's forwards run in inference mode under stop_gradient; its encoding of
the condition (a text model's text encoder) is computed once and shared with the student.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from gdistill import diffusion, schedules
from gdistill.denoiser import Denoiser


def _schedule(dcfg):
  return schedules.from_config(dcfg).logsnr


def autoencoder_loss(model, acfg) -> Callable:
  """AutoencoderKL: pixel MSE + l1_weight * pixel L1 of the decoded posterior sample, +
  kl_weight * KL(q(z|x) || N(0, I)) (means over elements); aux: the MSE, the L1, the KL and the
  PSNR of the batch. The L1 term (Stable Diffusion's VAE trains on L1) keeps the edges of small
  objects sharp, where the MSE of mostly-black images is already tiny."""
  kl_weight, l1_weight = float(acfg.kl_weight), float(acfg.l1_weight)

  def loss_fn(params, teacher_params, batch, rng):
    del teacher_params
    x = batch["x"]
    recon, mean, logvar = model.module.apply({"params": params}, x, sample_posterior=True,
                                             rng=rng)
    mse = jnp.mean(jnp.square(recon - x))
    l1 = jnp.mean(jnp.abs(recon - x))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))
    return mse + l1_weight * l1 + kl_weight * kl, {"mse": mse, "l1": l1, "kl": kl, "psnr": psnr}
  return loss_fn


def teacher_loss(student: Denoiser, dcfg, weighting: str) -> Callable:
  """Classifier-free guided teacher: the condition dropped to null with probability p_uncond
  (the null label, or the empty caption, whose encoding the text encoder learns too)."""
  sched = _schedule(dcfg)

  def loss_fn(params, teacher_params, batch, rng):
    del teacher_params
    x = batch["x"]
    b = x.shape[0]
    r_t, r_eps, r_drop, r_dropout = jax.random.split(rng, 4)
    logsnr = sched(jax.random.uniform(r_t, (b,)))
    z = diffusion.diffuse(x, jax.random.normal(r_eps, x.shape), logsnr)
    drop = jax.random.bernoulli(r_drop, dcfg.p_uncond, (b,))
    cond = student.encode_cond(params, student.cond_input(batch), drop)
    x_pred = student.x_pred(params, z, logsnr, cond, train=True, rngs={"dropout": r_dropout})
    per_ex = diffusion.weighted_x_loss(x_pred, x, logsnr, weighting)
    return jnp.mean(per_ex), {"x_mse": jnp.mean(jnp.square(x_pred - x))}
  return loss_fn


def w_weight(w, w_power: float):
  """Each example's weight (1 + w)^-w_power in a w-conditioned student's loss (1 at p = 0)."""
  return jnp.power(1.0 + w, -float(w_power))


def guided_loss(student: Denoiser, teacher: Denoiser, dcfg, weighting: str,
                w_power: float = 0.0) -> Callable:
  """Stage one: the w-conditioned student matches the guided teacher at w ~ U[w_min, w_max],
  each example weighted by (1 + w)^-w_power."""
  sched = _schedule(dcfg)

  def loss_fn(params, teacher_params, batch, rng):
    x = batch["x"]
    b = x.shape[0]
    r_t, r_eps, r_w, r_dropout = jax.random.split(rng, 4)
    logsnr = sched(jax.random.uniform(r_t, (b,)))
    w = jax.random.uniform(r_w, (b,), minval=dcfg.w_min, maxval=dcfg.w_max)
    z = diffusion.diffuse(x, jax.random.normal(r_eps, x.shape), logsnr)
    cond = jax.lax.stop_gradient(teacher.encode_cond(teacher_params, teacher.cond_input(batch)))
    target = jax.lax.stop_gradient(teacher.guided_x_pred(teacher_params, z, logsnr, cond, w))
    x_pred = student.x_pred(params, z, logsnr, cond, w, train=True,
                            rngs={"dropout": r_dropout})
    per_ex = diffusion.weighted_x_loss(x_pred, target, logsnr, weighting) * w_weight(w, w_power)
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


def progressive_loss(student: Denoiser, teacher: Denoiser, dcfg, clip_x: bool,
                     weighting: str, w_power: float = 0.0) -> Callable:
  """Stage two round: the N-step student matches two DDIM steps of the 2N-step teacher (each
  example weighted by (1 + w)^-w_power).

  N = batch['student_steps'] is traced (an int32 scalar), so every round shares one compile.
  """
  sched = _schedule(dcfg)

  def loss_fn(params, teacher_params, batch, rng):
    x, steps = batch["x"], batch["student_steps"]
    b = x.shape[0]
    n = steps.astype(jnp.float32)
    r_i, r_eps, r_w, r_dropout = jax.random.split(rng, 4)
    i = jax.random.randint(r_i, (b,), 0, steps)
    t = (i + 1).astype(jnp.float32) / n
    lt, lt1, lt2 = sched(t), sched(t - 0.5 / n), sched(t - 1.0 / n)
    w = jax.random.uniform(r_w, (b,), minval=dcfg.w_min, maxval=dcfg.w_max)
    z_t = diffusion.diffuse(x, jax.random.normal(r_eps, x.shape), lt)
    cond = jax.lax.stop_gradient(teacher.encode_cond(teacher_params, teacher.cond_input(batch)))

    def teacher_x(z, logsnr):
      xh = teacher.x_pred(teacher_params, z, logsnr, cond, w)
      return jnp.clip(xh, -1.0, 1.0) if clip_x else xh

    target = jax.lax.stop_gradient(progressive_target(teacher_x, z_t, lt, lt1, lt2, i == 0))
    x_pred = student.x_pred(params, z_t, lt, cond, w, train=True, rngs={"dropout": r_dropout})
    per_ex = diffusion.weighted_x_loss(x_pred, target, lt, weighting) * w_weight(w, w_power)
    return jnp.mean(per_ex), {"x_mse": jnp.mean(jnp.square(x_pred - target))}
  return loss_fn


def make_loss(kind: str, *, student, teacher: Denoiser | None, config) -> Callable:
  """The loss of a stage kind: 'autoencoder' | 'teacher' | 'guided' | 'progressive'."""
  dcfg = config.diffusion
  if kind == "autoencoder":
    return autoencoder_loss(student, config.autoencoder)
  weighting = config[kind].weighting or dcfg.weighting
  if kind == "teacher":
    return teacher_loss(student, dcfg, weighting)
  if kind == "guided":
    return guided_loss(student, teacher, dcfg, weighting, config.guided.w_power)
  if kind == "progressive":
    return progressive_loss(student, teacher, dcfg, bool(dcfg.clip_x), weighting,
                            config.progressive.w_power)
  raise ValueError(f"unknown stage kind {kind!r}; valid: autoencoder, teacher, guided, "
                   "progressive")
