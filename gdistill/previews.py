"""Sample grids while a stage trains (`<stage>/samples/step_N.png` and TensorBoard images).

Diffusion stages: one row per w of config.log.sample_w; along the row every class
(samples_per_class each) or, for a text model, the first `log.sample_prompts` captions of the
dataset's test split; the stage's own N steps (teacher and stage one: log.sample_steps or N0);
latents are decoded. The autoencoder: a row of training images above their reconstructions.
One preview function per stage kind family; the loop calls it without knowing which.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gdistill import dashboard, sampling, schedules
from gdistill.plan import Stage

# preview(params, stage, step, dash, workdir) -> the PNG's path. One function serves every
# stage of a kind (the progressive rounds share theirs): the stage comes with each call.
Preview = Callable[[object, Stage, int, dashboard.Dashboard, str], str]


def _png_path(workdir: str, stage: Stage, step: int) -> str:
  return os.path.join(workdir, stage.name, "samples", f"step_{step:07d}.png")


def _publish(path: str, images: np.ndarray, rows: int, stage: Stage, step: int,
             dash: dashboard.Dashboard, *, labels=None, title: str = "") -> None:
  """Writes the grid (process 0) and sends it to TensorBoard."""
  if jax.process_index() != 0:
    return
  if images.ndim == 4:
    grid = dashboard.image_grid(dashboard.to_uint8(images), rows)
    dashboard.save_png(path, grid, scale=4 if grid.shape[0] < 200 else 1)
  else:
    grid = dashboard.scatter_png(path, images, labels, title)
  dash.images(step, {f"samples/{stage.name}": grid[None]})


def grid_conditions(config, student, tokenizer=None) -> np.ndarray:
  """The conditions along a grid row: every class (samples_per_class each), or the token ids
  of the first log.sample_prompts captions of the test split."""
  if student.cond_field == "label":
    nc, per = int(config.model.num_classes), int(config.log.samples_per_class)
    return np.repeat(np.arange(nc), per).astype(np.int32)
  from gdistill import data
  return tokenizer.encode(data.preview_captions(config.data, int(config.log.sample_prompts)))


def diffusion_preview(config, kind: str, student, latents=None, tokenizer=None) -> Preview:
  """Sample grids of a teacher / student (guided DDIM for the teacher, 2 NFE per step)."""
  clip = (-1.0, 1.0) if config.diffusion.clip_x else None
  spec = sampling.SamplerSpec("ddim", guided=kind == "teacher", clip=clip,
                              schedule=schedules.from_config(config.diffusion))
  from gdistill.stage_setup import example_shape
  sampler = sampling.make_sampler(student, spec, example_shape(config))
  decode = latents.decoder() if latents is not None else (lambda z: z)
  ws = tuple(float(w) for w in config.log.sample_w)
  conds = grid_conditions(config, student, tokenizer)
  cond = np.concatenate([conds] * len(ws))
  w = np.repeat(np.asarray(ws, np.float32), len(conds))
  default_steps = int(config.log.sample_steps or config.progressive.start_steps)
  cond_in = jnp.asarray(cond)
  if getattr(student, "inpainting", False):  # the grid of an inpainting model: generation
    from gdistill import inpainting
    from gdistill.stage_setup import data_shape
    encode = None if latents is None else (lambda im: latents.encode(latents.params, im))
    cond_in = {"c": cond_in, inpainting.FIELD: jax.jit(
        lambda: inpainting.generation_condition(len(cond), data_shape(config), encode))()}

  def preview(params, stage: Stage, step: int, dash: dashboard.Dashboard, workdir: str) -> str:
    steps = stage.student_steps or default_steps
    z = sampler(params, jax.random.key(1234), cond_in, jnp.asarray(w),
                jnp.int32(steps))
    x = np.asarray(jax.device_get(decode(z)))
    path = _png_path(workdir, stage, step)
    _publish(path, x, len(ws), stage, step, dash, labels=cond if cond.ndim == 1 else None,
             title=f"{stage.name} step {step}: w={ws}")
    return path
  return preview


def autoencoder_preview(config, model, num: int = 16) -> Preview:
  """Training images (top row) and their reconstructions (bottom row)."""
  from gdistill import data
  images = data.global_batch(config.data, global_batch_size=num, seed=0, step=0,
                             host_normalize=True, tokenizer=_any_tokenizer(config))["x"]
  recon = jax.jit(lambda p, x: jnp.clip(model.decode(p, model.encode(p, x)[0]), -1.0, 1.0))

  def preview(params, stage: Stage, step: int, dash: dashboard.Dashboard, workdir: str) -> str:
    x = np.asarray(jax.device_get(recon(params, jnp.asarray(images))))
    path = _png_path(workdir, stage, step)
    _publish(path, np.concatenate([images, x]), 2, stage, step, dash)
    return path
  return preview


def _any_tokenizer(config) -> Optional[object]:
  from gdistill import conditioning
  return conditioning.tokenizer_for(config)


def make_preview(config, kind: str, student, latents=None, tokenizer=None) -> Preview:
  """The preview of a stage kind."""
  if kind == "autoencoder":
    return autoencoder_preview(config, student)
  return diffusion_preview(config, kind, student, latents, tokenizer)
