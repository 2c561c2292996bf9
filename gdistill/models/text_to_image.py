"""The text-conditioned latent denoiser: a CLIP text encoder and Stable Diffusion's U-Net.

TextToImageDenoiser(z [B, H, W, C], logsnr [B], cond, w=None) -> the U-Net's output, where cond
is either token ids [B, L] (int; the text encoder runs) or their encoding [B, L, D] (float; a
frozen encoder's output computed once and shared, e.g. by a teacher and its student). Its
parameters are {'text_encoder': CLIP's names, 'unet': diffusers' names}, so each half maps to
a transformers / diffusers checkpoint by the renaming table of the loader.

Time: the U-Net takes a discrete model's (fractional) timestep k(logsnr) of the noise schedule
(gdistill/schedules.py), as Stable Diffusion's does. Guidance strength (students): w enters as
diffusers' `time_cond_proj_dim` condition: guidance_scale_embedding(w) -> time_embedding.cond_proj
(zero-initialised, so a fresh student equals its teacher).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from gdistill import schedules
from gdistill.models.text import CLIPTextTransformer
from gdistill.models.unet_cond import UNet2DConditionModel, guidance_scale_embedding


class TextToImageDenoiser(nn.Module):
  text_encoder: CLIPTextTransformer
  unet: UNet2DConditionModel
  schedule: schedules.Schedule = schedules.Schedule("scaled_linear")

  @property
  def w_embedding(self) -> bool:
    return self.unet.time_cond_proj_dim is not None

  def encode_text(self, tokens):
    """Token ids [B, L] -> the encoder's last hidden state [B, L, D] (float32)."""
    return self.text_encoder(tokens)

  def __call__(self, z, logsnr, cond, w=None, *, train: bool = False):
    assert z.ndim == 4 and logsnr.shape == z.shape[:1], (z.shape, logsnr.shape)
    context = self.encode_text(cond) if jnp.issubdtype(cond.dtype, jnp.integer) else cond
    timesteps = self.schedule.timestep(logsnr)
    timestep_cond: Optional[jnp.ndarray] = None
    if self.w_embedding:
      if w is None:
        raise ValueError("this model is w-conditioned (a student): pass w [B]")
      w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), logsnr.shape)
      timestep_cond = guidance_scale_embedding(w, self.unet.time_cond_proj_dim)
    elif w is not None:
      raise ValueError("w was given to a model without a w-embedding (a teacher); teachers "
                       "are guided by combining two forwards, see diffusion.guided")
    return self.unet(z, timesteps, context, timestep_cond, train=train).astype(jnp.float32)
