"""Inpainting models: the mask and the masked image as extra input channels, and training masks.

A model with `model.inpainting` takes, beside z_t, Stable Diffusion's inpainting layout
concatenated along channels: [z_t (C), mask (1), masked image (C)], in this order (diffusers'
StableDiffusionInpaintPipeline: latents 4 + mask 1 + masked-image latents 4 = 9 input
channels; a pixel model: image C + mask 1 + masked image C). The mask is 1 where the image is
to be repainted; the masked image is the input with those pixels set to 0 (mid-grey in
[-1, 1]), through the autoencoder for a latent model (scaling_factor * posterior mean), and the
mask is taken to the latent grid by max-pooling (a latent is repainted if any of its f x f
pixels is; diffusers resizes by nearest neighbour). This [mask, masked image] block is the
batch field FIELD ('inpaint'); it is part of the condition, never dropped: classifier-free
guidance drops the text (or label) only, so both forwards of the guided teacher see it.

Training batches get random masks (`random_masks`, drawn on the devices from the stage seed and
the step, so a resumed run draws the same ones): boxes, brush strokes, outpainting borders and
full masks (the model then generates from the text alone, so it still samples without an
image; `generation_condition` is that block). Their mix is config.masks.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

FIELD = "inpaint"
KINDS = ("box", "stroke", "border", "full")
MASK_SALT = 0x1A5C  # folded into the step's key: the masks' draws differ from the loss's


def extra_channels(channels: int) -> int:
  """Input channels an inpainting model adds to its `channels`: the mask and the masked image."""
  return 1 + int(channels)


def pool_mask(masks, latent_hw: tuple[int, int]):
  """[n, H, W, 1] masks -> [n, h, w, 1]: max over each f x f block (numpy or jax arrays)."""
  n, h, w, _ = masks.shape
  fh, fw = h // latent_hw[0], w // latent_hw[1]
  return masks.reshape(n, latent_hw[0], fh, latent_hw[1], fw, 1).max(axis=(2, 4))


def condition(x, masks, encode: Optional[Callable] = None):
  """The inpainting block [mask, masked image] [n, h, w, 1 + C] of images x [n, H, W, C] in
  [-1, 1] and masks [n, H, W, 1] (1 = repaint). encode: a latent model's images -> latents
  (None in pixel space). Traceable (jnp)."""
  masked = x * (1.0 - masks)
  if encode is not None:
    masked = encode(masked)
    masks = pool_mask(masks, tuple(masked.shape[1:3]))
  return jnp.concatenate([masks.astype(masked.dtype), masked], axis=-1)


def generation_condition(n: int, image_shape: tuple[int, ...], encode=None):
  """The block of a full mask (everything repainted: plain text-to-image generation)."""
  h, w, c = image_shape
  return condition(jnp.zeros((n, h, w, c), jnp.float32), jnp.ones((n, h, w, 1), jnp.float32),
                   encode)


def mask_probabilities(masks_cfg) -> np.ndarray:
  """config.masks -> the probabilities of KINDS (normalised; config_validation.validate has
  checked the weights)."""
  p = np.asarray([float(masks_cfg[k]) for k in KINDS], np.float64)
  return p / p.sum()


def _uniform(rng, b, lo, hi):
  return jax.random.uniform(rng, (b,), minval=lo, maxval=hi)


def random_masks(rng, b: int, h: int, w: int, probs) -> jnp.ndarray:
  """b random masks [b, h, w, 1] float32 (1 = repaint), each of one kind drawn with probs
  (over KINDS):
    box     an axis-aligned rectangle, sides 1/8 .. 3/4 of the image, anywhere inside it;
    stroke  a brush stroke: two joined segments through three random points, radius h/16 .. h/8;
    border  outpainting: everything outside a rectangle whose margins are 0 .. 1/3 of the
            side, one side's (drawn) 1/4 .. 1/2;
    full    everything (text-to-image generation).
  """
  ks = jax.random.split(rng, 8)
  yy = jnp.arange(h, dtype=jnp.float32)[None, :, None] + 0.5
  xx = jnp.arange(w, dtype=jnp.float32)[None, None, :] + 0.5
  col = lambda v: v[:, None, None]
  # box
  bh, bw = _uniform(ks[0], b, h / 8, 3 * h / 4), _uniform(ks[1], b, w / 8, 3 * w / 4)
  y0 = jax.random.uniform(ks[2], (b,)) * (h - bh)
  x0 = jax.random.uniform(jax.random.fold_in(ks[2], 1), (b,)) * (w - bw)
  box = ((yy >= col(y0)) & (yy < col(y0 + bh)) & (xx >= col(x0)) & (xx < col(x0 + bw)))
  # stroke: distance of each pixel to two segments p0-p1, p1-p2
  pts = jax.random.uniform(ks[3], (b, 3, 2)) * jnp.asarray([h, w], jnp.float32)[None, None]
  radius = _uniform(ks[4], b, h / 16, h / 8)

  def seg_dist(p, q):
    d = q - p
    t = ((yy - col(p[:, 0])) * col(d[:, 0]) + (xx - col(p[:, 1])) * col(d[:, 1])) / col(
        jnp.maximum(jnp.sum(d * d, -1), 1e-6))
    t = jnp.clip(t, 0.0, 1.0)
    return jnp.hypot(yy - (col(p[:, 0]) + t * col(d[:, 0])),
                     xx - (col(p[:, 1]) + t * col(d[:, 1])))

  dist = jnp.minimum(seg_dist(pts[:, 0], pts[:, 1]), seg_dist(pts[:, 1], pts[:, 2]))
  stroke = dist <= col(radius)
  # border: margins (top, bottom, left, right), one of them wide
  side = h
  margins = jax.random.uniform(ks[5], (b, 4)) * (side / 3)
  wide = jax.random.randint(ks[6], (b,), 0, 4)
  margins = jnp.where(jax.nn.one_hot(wide, 4) > 0,
                      side / 4 + jax.random.uniform(jax.random.fold_in(ks[6], 1), (b, 4)) *
                      (side / 4), margins)
  inside = ((yy >= col(margins[:, 0])) & (yy < col(h - margins[:, 1]))
            & (xx >= col(margins[:, 2])) & (xx < col(w - margins[:, 3])))
  border = ~inside
  full = jnp.ones((b, h, w), bool)
  kind = jax.random.choice(ks[7], len(KINDS), (b,), p=jnp.asarray(probs, jnp.float32))
  stack = jnp.stack([box, stroke, border, full], axis=1)          # [b, 4, h, w]
  chosen = jnp.take_along_axis(stack, kind[:, None, None, None], axis=1)[:, 0]
  return chosen.astype(jnp.float32)[..., None]
