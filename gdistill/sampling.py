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
import numpy as np

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
                schedule: schedules.Schedule = schedules.Schedule(), start=None, known=None):
  """Runs sampler steps on the grid t_i = i / N (N = num_steps, traced) from z at t_start,
  start = N (t = 1) unless given, down to t = 0; returns x at t = 0. start < N is an edit: z1
  is then the input diffused to t_start, and the loop runs the `start` remaining steps.

  known = (x0, keep): inpainting by replacement. After every step the region where keep is 1
  is reset to x0 diffused to the step's time (fresh noise from fold_in(fold_in(rng, i), 1)),
  and the last step returns x0 there exactly; where keep is 0 nothing changes, so keep = 0
  everywhere is plain sampling, bit for bit.
  """
  n = jnp.asarray(num_steps, jnp.int32)
  s0 = n if start is None else jnp.asarray(start, jnp.int32)
  b = z1.shape[0]
  sched = lambda t: jnp.full((b,), schedule.logsnr(t), jnp.float32)

  def body(k, z):
    i = s0 - k                                  # current grid index, start .. 1
    t = i.astype(jnp.float32) / n
    x = x_hat(z, sched(t))
    l_prev = sched((i - 1).astype(jnp.float32) / n)
    if kind == "ddim":
      z_next = diffusion.ddim_step(z, x, sched(t), l_prev)
    else:
      # Deterministic jump to t_{i-2}, then forward-process noise back up to t_{i-1}.
      l_prev2 = sched(jnp.maximum(i - 2, 0).astype(jnp.float32) / n)
      z2 = diffusion.ddim_step(z, x, sched(t), l_prev2)
      a_prev, s_prev = diffusion.alpha_sigma(l_prev)
      a_prev2, _ = diffusion.alpha_sigma(l_prev2)
      var = -jnp.expm1(l_prev - l_prev2) * s_prev ** 2
      xi = jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype)
      z_next = (diffusion.bcast(a_prev / a_prev2, z) * z2
                + diffusion.bcast(jnp.sqrt(jnp.maximum(var, 0.0)), z) * xi)
    out = jnp.where(i == 1, x, z_next)
    if known is not None:
      x0, keep = known
      eps = jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), 1), z.shape,
                              z.dtype)
      target = jnp.where(i == 1, x0, diffusion.diffuse(x0, eps, l_prev))
      out = keep * target + (1.0 - keep) * out
    return out

  return jax.lax.fori_loop(0, s0, body, z1)


def edit_start(num_steps: int, strength: float) -> int:
  """The grid index an edit starts from: floor(N * strength) (diffusers' img2img convention:
  of the N-step grid t_i = i / N the edit runs the last floor(N s) steps, i = floor(N s) .. 1,
  starting from the input diffused to t = floor(N s) / N). Refuses strength outside (0, 1]
  and an N s below one step."""
  strength = float(strength)
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength:g}: must lie in (0, 1] (the fraction of the N-step "
                     "grid the edit runs; 1 starts from pure noise plus the image at t = 1)")
  k = int(np.floor(int(num_steps) * strength + 1e-9))
  if k < 1:
    raise ValueError(f"strength={strength:g} with steps={num_steps} runs floor(N s) = 0 steps: "
                     f"raise strength to >= {1 / int(num_steps):g} or use more steps")
  return k


def make_editor(denoiser: Denoiser, spec: SamplerSpec, example_shape: tuple[int, ...]):
  """Jitted fn(params, rng, cond, w, num_steps, start, x0, noised, keep) -> x at t = 0, for
  edits and inpainting (make_sampler's loop from a given input; gdistill/editing.py).

  x0 [B, *example_shape]: the input (latents for a latent model). The start latent is
  noised * diffuse(x0, eps, logsnr(start / N)) + (1 - noised) * eps with eps the very draw
  make_sampler starts from (so noised = 0, keep = 0 is sample(), bit for bit); keep [B, ...,
  1] is the region reset to x0 after every step (sample_loop's `known`).
  """
  def run(params, rng, cond_input, w, num_steps, start, x0, noised, keep):
    b = jax.tree.leaves(cond_input)[0].shape[0]
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,))
    rng_init, rng_steps = jax.random.split(rng)
    eps = jax.random.normal(rng_init, (b,) + tuple(example_shape), jnp.float32)
    t = jnp.asarray(start, jnp.float32) / jnp.asarray(num_steps, jnp.float32)
    logsnr = jnp.full((b,), spec.schedule.logsnr(t), jnp.float32)
    z = noised * diffusion.diffuse(x0, eps, logsnr) + (1.0 - noised) * eps
    cond = denoiser.encode_cond(params, cond_input)
    return sample_loop(_x_fn(denoiser, spec, params, cond, w), z, num_steps, rng_steps,
                       kind=spec.kind, schedule=spec.schedule, start=start, known=(x0, keep))
  return jax.jit(run)


def make_sampler(denoiser: Denoiser, spec: SamplerSpec, example_shape: tuple[int, ...]):
  """Jitted fn(params, rng, cond [B] labels or [B, L] tokens, w [B], num_steps) -> samples
  [B, *example_shape] (latents for a latent model). An inpainting model's cond is the dict
  Denoiser.cond_input makes ({'c': labels or tokens, 'inpaint': [B, h, w, 1 + C]}).

  The condition is encoded once (a text model's encoder runs before the loop, not per step);
  num_steps is traced: one compilation per batch size serves every N.
  """
  def run(params, rng, cond_input, w, num_steps):
    b = jax.tree.leaves(cond_input)[0].shape[0]
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,))
    rng_init, rng_steps = jax.random.split(rng)
    z1 = jax.random.normal(rng_init, (b,) + tuple(example_shape), jnp.float32)
    cond = denoiser.encode_cond(params, cond_input)
    return sample_loop(_x_fn(denoiser, spec, params, cond, w), z1, num_steps, rng_steps,
                       kind=spec.kind, schedule=spec.schedule)
  return jax.jit(run)


def as_key(rng) -> jax.Array:
  """An int seed, a typed jax key or a legacy uint32 [2] key -> a typed key (None: seed 0)."""
  if rng is None:
    return jax.random.key(0)
  if isinstance(rng, (int, np.integer)):
    return jax.random.key(int(rng))
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)  # a legacy uint32 [2] key


def sample(denoiser: Denoiser, params, rng, cond, w, num_steps: int, *,
           example_shape, spec: SamplerSpec = SamplerSpec()):
  """Convenience: (samples, nfe); cond: labels [B] or token ids [B, L]. Compiles once per
  (denoiser, spec, shape); prefer make_sampler."""
  fn = make_sampler(denoiser, spec, example_shape)
  return fn(params, rng, jnp.asarray(cond, jnp.int32), w, jnp.int32(num_steps)), spec.nfe(
      num_steps)
