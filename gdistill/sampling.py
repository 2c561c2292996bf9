"""Samplers: guided-teacher DDIM, student DDIM and the N-step stochastic sampler.

The step count N is a traced value (a while loop with a dynamic trip count), so one compile of
a sampler serves every N for a given batch shape. Time grid t_i = i / N, i = N .. 1, logSNR
from the model's schedule (gdistill/schedules.py). NFE: N for a student, 2 N for a guided
teacher (cond + uncond), with either sampler.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from gdistill import diffusion, schedules
from gdistill.denoiser import Denoiser

SAMPLERS = ("ddim", "stochastic")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """What to sample with: `guided` = the teacher combined at w (2 NFE per step)."""
  kind: str = "ddim"
  guided: bool = False
  clip: Optional[tuple[float, float]] = (-1.0, 1.0)
  schedule: schedules.Schedule = schedules.Schedule()

  def __post_init__(self):
    if self.kind not in SAMPLERS:
      raise ValueError(f"unknown sampler {self.kind!r}; valid: {SAMPLERS}")

  @property
  def nfe_per_step(self) -> int:
    return 2 if self.guided else 1

  def nfe(self, num_steps: int) -> int:
    return self.nfe_per_step * int(num_steps)


def _x_fn(denoiser: Denoiser, spec: SamplerSpec, params, cond, w) -> Callable:
  def x_hat(z, logsnr):
    if spec.guided:
      x = denoiser.guided_x_pred(params, z, logsnr, cond, w)
    else:
      x = denoiser.x_pred(params, z, logsnr, cond, w)
    if spec.clip is not None:
      x = jnp.clip(x, spec.clip[0], spec.clip[1])
    return x
  return x_hat


def sample_loop(x_hat: Callable, z1, num_steps, rng, *, kind: str = "ddim",
                schedule: schedules.Schedule = schedules.Schedule()):
  """Runs N = num_steps (traced) sampler steps from z1 at t = 1; returns x at t = 0."""
  n = jnp.asarray(num_steps, jnp.int32)
  b = z1.shape[0]
  sched = lambda t: jnp.full((b,), schedule.logsnr(t), jnp.float32)

  def body(k, z):
    i = n - k                                   # current grid index, N .. 1
    t = i.astype(jnp.float32) / n
    x = x_hat(z, sched(t))
    if kind == "ddim":
      z_next = diffusion.ddim_step(z, x, sched(t), sched((i - 1).astype(jnp.float32) / n))
    else:
      # Deterministic jump to t_{i-2}, then forward-process noise back up to t_{i-1}.
      l_prev, l_prev2 = sched((i - 1).astype(jnp.float32) / n), sched(
          jnp.maximum(i - 2, 0).astype(jnp.float32) / n)
      z2 = diffusion.ddim_step(z, x, sched(t), l_prev2)
      a_prev, s_prev = diffusion.alpha_sigma(l_prev)
      a_prev2, _ = diffusion.alpha_sigma(l_prev2)
      var = -jnp.expm1(l_prev - l_prev2) * s_prev ** 2
      xi = jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype)
      z_next = (diffusion.bcast(a_prev / a_prev2, z) * z2
                + diffusion.bcast(jnp.sqrt(jnp.maximum(var, 0.0)), z) * xi)
    return jnp.where(i == 1, x, z_next)

  return jax.lax.fori_loop(0, n, body, z1)


def make_sampler(denoiser: Denoiser, spec: SamplerSpec, example_shape: tuple[int, ...]):
  """Jitted fn(params, rng, cond [B] labels or [B, L] tokens, w [B], num_steps) -> samples
  [B, *example_shape] (latents for a latent model).

  The condition is encoded once (a text model's encoder runs before the loop, not per step);
  num_steps is traced: one compilation per batch size serves every N.
  """
  def run(params, rng, cond_input, w, num_steps):
    b = cond_input.shape[0]
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,))
    rng_init, rng_steps = jax.random.split(rng)
    z1 = jax.random.normal(rng_init, (b,) + tuple(example_shape), jnp.float32)
    cond = denoiser.encode_cond(params, cond_input)
    return sample_loop(_x_fn(denoiser, spec, params, cond, w), z1, num_steps, rng_steps,
                       kind=spec.kind, schedule=spec.schedule)
  return jax.jit(run)


def sample(denoiser: Denoiser, params, rng, cond, w, num_steps: int, *,
           example_shape, spec: SamplerSpec = SamplerSpec()):
  """Convenience: (samples, nfe); cond: labels [B] or token ids [B, L]. Compiles once per
  (denoiser, spec, shape); prefer make_sampler."""
  fn = make_sampler(denoiser, spec, example_shape)
  return fn(params, rng, jnp.asarray(cond, jnp.int32), w, jnp.int32(num_steps)), spec.nfe(
      num_steps)
