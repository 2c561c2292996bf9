"""Image-to-image editing (SDEdit) and inpainting with any finished stage, students in 1-8 steps.

Edit (`Model.edit`): the input x0 (a latent model's: its latents, scaling_factor * the posterior
mean) is diffused to t_k = k / N with k = floor(N * strength), z = alpha_k x0 + sigma_k eps,
and the stage's sampler runs the k remaining steps of its N-step grid, i = k .. 1 (diffusers'
img2img convention: N = 4, strength 0.6 runs 2 steps from t = 0.5; a student's NFE is k, the
guided teacher's 2 k). strength 1 starts from the input diffused to t = 1.

Inpaint (`Model.inpaint`), by replacement (RePaint-style; any stage, no training): masks are 1
where the image is to be repainted. Sampling starts from noise where the mask is 1 and from the
input diffused to t = 1 elsewhere; after each of the N steps the kept region is reset to the
input diffused to the step's time, and to the input itself at t = 0. A latent model works on
latents: the mask is taken to the latent grid by max-pooling over each latent's f x f pixels
(a latent is repainted if any of its pixels is). Paste-back (on by default): after decoding,
the output is the input exactly wherever the mask is 0, so only the masked pixels change.
A mask of zeros returns the input; a mask of ones is `sample()` with the same rng, bit for bit
before paste-back.

Images are uint8 [n, H, W, C] (0..255) or float [n, H, W, C] in [-1, 1]; masks [n, H, W] (or
[n, H, W, 1]) in {0, 1}. Outputs are float32 in [-1, 1] like sample().
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from gdistill import inpainting, sampling, sharding

_EDITORS: dict = {}


def as_images(images, image_shape: tuple[int, ...], what: str = "images") -> np.ndarray:
  """uint8 or [-1, 1] float images -> float32 [n, *image_shape] in [-1, 1]; refuses others."""
  x = np.asarray(images)
  if x.ndim == len(image_shape):
    x = x[None]
  if x.ndim != len(image_shape) + 1 or tuple(x.shape[1:]) != tuple(image_shape):
    raise ValueError(f"{what} have shape {tuple(np.shape(images))}; this model takes "
                     f"[n, {', '.join(map(str, image_shape))}] (uint8 0..255, or float in "
                     "[-1, 1])")
  if x.dtype == np.uint8:
    from gdistill.data import normalize
    return normalize(x)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{what} are {x.dtype}: pass uint8 (0..255) or float in [-1, 1]")
  x = x.astype(np.float32)
  if x.size and (not np.isfinite(x).all() or x.min() < -1.0 - 1e-6 or x.max() > 1.0 + 1e-6):
    raise ValueError(f"float {what} must lie in [-1, 1] (found {x.min():g}..{x.max():g}); "
                     "pass uint8 for 0..255 pixels")
  return np.clip(x, -1.0, 1.0)


def as_masks(masks, n: int, image_shape: tuple[int, ...]) -> np.ndarray:
  """Masks [n, H, W] or [n, H, W, 1] in {0, 1} -> float32 [n, H, W, 1]; refuses others."""
  h, w = image_shape[:2]
  m = np.asarray(masks)
  if m.ndim == 4 and m.shape[-1] == 1:
    m = m[..., 0]
  if m.shape != (n, h, w):
    raise ValueError(f"masks have shape {tuple(np.shape(masks))}; expected [{n}, {h}, {w}] "
                     "(one H x W mask per image, 1 = repaint)")
  if m.size and not np.isin(m, (0, 1)).all():
    raise ValueError("masks must hold only 0 (keep) and 1 (repaint)")
  return m.astype(np.float32)[..., None]


def check_counts(n_images: int, n_cond: int, what: str) -> None:
  if n_images != n_cond:
    raise ValueError(f"{n_images} images but {n_cond} {what}: pass one per image")


METHODS = ("model", "replacement")


def check_method(model, method: Optional[str]) -> str:
  """The inpainting method: None -> 'model' for an inpainting model, else 'replacement';
  refuses 'model' for a stage that cannot inpaint and unknown names."""
  if method is None:
    return "model" if model.inpainting else "replacement"
  if method not in METHODS:
    raise ValueError(f"method={method!r}: valid {METHODS}")
  if method == "model" and not model.inpainting:
    raise ValueError(f"stage {model.stage!r} cannot inpaint as a model: it does not take a "
                     "mask (model.inpainting is False). Use method='replacement', or train an "
                     "inpainting model (configs/shapes.py:inpaint, --config.model.inpainting"
                     "=True)")
  return method


def _editor(model, sampler: str):
  key = (id(model.denoiser), model.spec(sampler), tuple(model.example_shape))
  if key not in _EDITORS:
    _EDITORS[key] = sampling.make_editor(model.denoiser, model.spec(sampler),
                                         model.example_shape)
  return _EDITORS[key]


def run(model, x: np.ndarray, cond: np.ndarray, *, w, steps: int, start: int,
        masks: Optional[np.ndarray], sampler: str = "ddim", rng=None,
        batch_size: Optional[int] = None, paste_back: bool = True,
        method: str = "replacement") -> np.ndarray:
  """Edits (masks None: start = edit_start(N, strength)) or inpaints (start = N) the images x
  (float [-1, 1], as_images) of a loaded Model; float32 [n, *image_shape] in [-1, 1].
  method (inpainting): 'replacement', or 'model' (an inpainting model given the mask and the
  masked image, sampling every latent from noise with nothing reset)."""
  n = len(x)
  if n == 0:
    return np.zeros((0,) + tuple(model.image_shape), np.float32)
  w = np.broadcast_to(np.asarray(w, np.float32), (n,))
  bs = model.round_batch(batch_size) if batch_size else model.default_batch_size(n)
  fn = _editor(model, sampler)
  key = sampling.as_key(rng)
  batch_sh = sharding.batch_sharding(model.mesh)
  encode = _encoder(model)
  latent_hw = tuple(model.example_shape[:2])
  out = []
  for b, lo in enumerate(range(0, n, bs)):
    keep = min(bs, n - lo)
    pad = lambda a, fill=0: np.concatenate(
        [a[lo:lo + keep], np.full((bs - keep,) + a.shape[1:], fill, a.dtype)])
    xb, cb, wb = pad(x), pad(np.asarray(cond, np.int32)), pad(w.astype(np.float32))
    x0 = encode(jax.device_put(xb, batch_sh))
    block = None                     # an inpainting model's image block: generation
    if masks is None:  # an edit: every latent noised, none kept
      noised = np.ones((bs,) + tuple(model.example_shape[:-1]) + (1,), np.float32)
      kept = np.zeros_like(noised)
    elif method == "model":  # the network sees mask and masked image; all from noise
      mb = pad(masks)
      block = model.inpaint_condition(xb, mb)
      noised = np.zeros((bs,) + tuple(model.example_shape[:-1]) + (1,), np.float32)
      kept = noised
    else:
      mb = pad(masks)
      m = inpainting.pool_mask(mb, latent_hw) if model.latents is not None else mb
      noised = kept = 1.0 - m
    z = fn(model.params, jax.random.fold_in(key, b), model.cond_batch(cb, block),
           jax.device_put(wb, batch_sh), np.int32(steps), np.int32(start), x0,
           jax.device_put(noised, batch_sh), jax.device_put(kept, batch_sh))
    img = model._decode(z) if model._decode is not None else z  # pylint: disable=protected-access
    img = np.asarray(sharding.to_host(img), np.float32)[:keep]
    if masks is not None and paste_back:
      m = masks[lo:lo + keep]
      img = np.where(m > 0, img, x[lo:lo + keep])
    out.append(img)
  return np.concatenate(out)


def _encoder(model):
  """Images in [-1, 1] -> what the sampler works on (a latent model's scaled latents)."""
  if model.latents is None:
    return lambda x: x
  if not hasattr(model, "_encode_fn"):
    enc = jax.jit(model.latents.encode)
    model._encode_fn = lambda x: enc(model.latents.params, x)  # pylint: disable=protected-access
  return model._encode_fn  # pylint: disable=protected-access


def nfe(model, steps: int, start: int) -> int:
  """Network evaluations per image: `start` steps (an edit's floor(N s), inpainting's N),
  twice that for the guided teacher."""
  return (2 if model.is_teacher else 1) * int(start)


