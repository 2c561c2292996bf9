"""Latent space: the autoencoder of a latent model, its scale, and encoding / decoding.

A latent model (config.vae.enabled) denoises z0 = scaling_factor * mean(q(z | x)), the
AutoencoderKL posterior mean of an image x in [-1, 1], scaled to unit variance: the autoencoder
stage's export records scaling_factor = 1 / std of the latents of `autoencoder.scale_examples`
training images (the role 0.18215 plays for Stable Diffusion), and the held-out reconstruction
PSNR. Decoding divides by the scale. The diffusion stages see latents only: the training split
is encoded once (encode_split, cached in the workdir) and the loader serves its latents in the
dataset's deterministic order; samplers' outputs are decoded for images.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdistill import checkpoint as ckpt_lib
from gdistill import config_lib, models, paths, sharding

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class AutoencoderModel:
  """AutoencoderKL with the init interface of a Denoiser (the autoencoder stage's model)."""
  module: nn.Module

  def init_fn(self, example_shape, batch: int = 1):
    def init(rng):
      x = jnp.zeros((batch,) + tuple(example_shape), jnp.float32)
      return self.module.init({"params": rng}, x)["params"]
    return init

  def init_abstract(self, example_shape, batch: int = 1):
    # The key is made under the trace: no concrete array (a mesh of abstract devices, e.g. a
    # TPU topology compiled for from a CPU host, cannot hold one).
    init = self.init_fn(example_shape, batch)
    return jax.eval_shape(lambda: init(jax.random.key(0)))

  def encode(self, params, x):
    """(mean, logvar) of q(z | x) for x in [-1, 1]."""
    return self.module.apply({"params": params}, x, method="encode")

  def decode(self, params, z):
    return self.module.apply({"params": params}, z, method="decode")


def build(vae_cfg, data_shape, *, dtype: str = "float32",
          param_dtype: str = "float32") -> AutoencoderModel:
  """The AutoencoderKL of config.vae for images of data_shape (H, W, C)."""
  n = len(vae_cfg.block_out_channels)
  return AutoencoderModel(models.AutoencoderKL(
      in_channels=int(data_shape[-1]), out_channels=int(data_shape[-1]),
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=tuple(vae_cfg.block_out_channels),
      layers_per_block=int(vae_cfg.layers_per_block),
      latent_channels=int(vae_cfg.latent_channels), norm_num_groups=int(vae_cfg.norm_num_groups),
      dtype=_DTYPES[dtype], param_dtype=_DTYPES[param_dtype]))


def latent_shape(vae_cfg, data_shape) -> tuple[int, int, int]:
  """(H / f, W / f, latent_channels), f = 2^(len(block_out_channels) - 1)."""
  f = 2 ** (len(vae_cfg.block_out_channels) - 1)
  return (int(data_shape[0]) // f, int(data_shape[1]) // f, int(vae_cfg.latent_channels))


def psnr(x, y) -> float:
  """Peak SNR in dB of images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
  mse = float(np.mean(np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
  return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def statistics(model: AutoencoderModel, params, train_images, test_images,
               batch_size: int = 256) -> dict:
  """What the export records: scaling_factor (1 / std of the training latents' means) and
  the held-out reconstruction PSNR (posterior mean, pixels clipped to [-1, 1])."""
  encode = jax.jit(lambda p, x: model.encode(p, _normalize(x))[0])
  recon = jax.jit(lambda p, x: jnp.clip(model.decode(p, model.encode(p, _normalize(x))[0]),
                                        -1.0, 1.0))
  means = np.concatenate([np.asarray(encode(params, train_images[i:i + batch_size]))
                          for i in range(0, len(train_images), batch_size)])
  recons = np.concatenate([np.asarray(recon(params, test_images[i:i + batch_size]))
                           for i in range(0, len(test_images), batch_size)])
  truth = np.asarray(_normalize(test_images))
  return {"scaling_factor": float(1.0 / np.std(means.astype(np.float64))),
          "latent_mean": float(np.mean(means)),
          "psnr_test": round(psnr(recons, truth), 3), "psnr_test_examples": len(test_images)}


def _normalize(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.uint8:
    from gdistill.data import normalize_on_device
    return normalize_on_device(x)
  return x.astype(jnp.float32)


@dataclasses.dataclass
class Latents:
  """The frozen autoencoder a latent stage (or a sampler) uses, with its scale."""
  model: AutoencoderModel
  params: Any
  scaling_factor: float
  path: str

  def encode(self, params, x):
    """Images (uint8 or [-1, 1]) -> scaling_factor * posterior mean."""
    return self.scaling_factor * self.model.encode(params, _normalize(x))[0]

  def decode(self, params, z):
    """Latents -> images in [-1, 1] (clipped)."""
    return jnp.clip(self.model.decode(params, z / self.scaling_factor), -1.0, 1.0)

  def decoder(self) -> Callable:
    """Jitted latents -> images in [-1, 1], parameters bound."""
    fn = jax.jit(self.decode)
    return lambda z: fn(self.params, z)


def encode_split(latents: Latents, config, workdir: str, split: str,
                 batch_size: int = 512) -> np.ndarray:
  """The latents (scaling_factor * posterior mean, float32 [N, h, w, c]) of every image of a
  split, in dataset order: what the latent stages train on, encoded once instead of at every
  step. Cached in <workdir>/latents/<split>-<key>.npz, the key covering the autoencoder export
  and the data; process 0 encodes (on its first device), the others read its file."""
  from gdistill import data, distributed
  meta = ckpt_lib.load_export_metadata(latents.path)
  d = config.data
  key = config_lib.config_hash([latents.path, meta.get("created"), latents.scaling_factor,
                                d.name, d.variant, d.data_dir, split])
  path = paths.join(workdir, "latents", f"{split}-{key}.npz")

  def compute():
    if paths.exists(path):
      return paths.load_npz(path)["latents"]
    cfg = d.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.split = split
    images = (data.load_captioned(cfg, split)["image"] if d.name == "shapes"
              else data.load_array(cfg, split)[0])
    params = jax.device_get(latents.params)
    encode = jax.jit(latents.encode)
    out = np.concatenate([np.asarray(encode(params, images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)]).astype(np.float32)
    paths.save_npz_atomic(path, {"latents": out})
    return out

  out = compute() if jax.process_index() == 0 else None
  distributed.sync(f"latents:{split}:{key}")
  return out if out is not None else paths.load_npz(path)["latents"]


def export_path(config, workdir: str) -> str:
  """The autoencoder export a latent config uses: config.vae.init_from, else the workdir's
  'autoencoder' stage."""
  return config.vae.init_from or paths.join(workdir, "autoencoder", "export")


def load(config, workdir: str, data_shape, mesh) -> Latents:
  """The autoencoder export of a latent config, replicated over the mesh. Raises
  FileNotFoundError naming the stage to run (or the key to set) when it is missing, and
  config_lib.ConfigError when it has another architecture than config.vae."""
  path = export_path(config, workdir)
  try:
    meta = ckpt_lib.load_export_metadata(path)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"the latent model needs an autoencoder export at {path}: run the autoencoder stage "
        "first (--config.stage=autoencoder, or --config.stage=pipeline), or set "
        "--config.vae.init_from=PATH to an autoencoder export") from None
  want = config_lib.vae_arch_dict(config.vae)
  if meta.get("kind") != "autoencoder" or meta.get("vae") != want:
    raise config_lib.ConfigError(
        f"config.vae={want} does not match the autoencoder export at {path} (kind "
        f"{meta.get('kind')!r}, vae {meta.get('vae')}); set config.vae to its values or point "
        "config.vae.init_from at another export")
  model = build(config.vae, data_shape, param_dtype=config.model.param_dtype)
  rep = sharding.replicated(mesh)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                          nn.unbox(model.init_abstract(data_shape)))
  params, meta = ckpt_lib.load_export(path, abstract)
  return Latents(model, params, float(meta["scaling_factor"]), path)


def maybe_load(config, workdir: str, data_shape, mesh) -> Optional[Latents]:
  """load() for latent configs, None in pixel space."""
  return load(config, workdir, data_shape, mesh) if config.vae.enabled else None
