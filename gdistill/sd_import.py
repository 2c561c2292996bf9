"""A diffusers Stable Diffusion directory as a workdir's teacher and autoencoder.

`--config.init_from=DIR` (DIR holding model_index.json) makes a pipeline distil that checkpoint:

  adopt(config)                          before validation: the checkpoint's architecture,
                                         schedule, parametrisation and tokenizer replace the
                                         config's (diffusers_io.Pipeline.apply_to; one line
                                         says so)
  import_exports(config, workdir, mesh)  once: W/teacher/export (U-Net + text encoder) and
                                         W/autoencoder/export (VAE + scaling factor) in
                                         gdistill's export format, each parameter read straight
                                         into its sharding; then config.init_from and
                                         config.vae.init_from point at them

so the plan (guided -> progressive rounds -> evaluation) and every later command (sample,
evaluate, export) see an ordinary teacher export. A finished import of the same directory is
reused; an interrupted one is redone (exports are written atomically).
"""
from __future__ import annotations

import os
from typing import Optional

import flax.linen as nn
import jax

from gdistill import (autoencoding, checkpoint as ckpt_lib, conditioning, config_lib,
                      diffusers_io, lineage, sharding, stage_setup)
from gdistill.plan import Stage


def adopt(config) -> Optional[diffusers_io.Pipeline]:
  """If config.init_from is a diffusers directory: its sections into config; else None."""
  if not diffusers_io.is_pipeline_dir(config.init_from):
    return None
  found = diffusers_io.read(config.init_from)
  if not config.vae.enabled:
    raise config_lib.ConfigError(
        f"config.init_from={config.init_from} is a latent Stable Diffusion checkpoint: use a "
        "latent config (config.vae.enabled=True, e.g. configs/sd15.py), whose vae.image_size "
        "is the dataset's image size")
  found.apply_to(config)
  if jax.process_index() == 0:
    m = found.model
    print(f"[import] {found.directory}: U-Net {list(m['block_out_channels'])} "
          f"({m['parametrization']}), text encoder {found.text['num_hidden_layers']} x "
          f"{found.text['hidden_size']}, VAE scaling factor {found.scaling_factor}; the "
          "checkpoint's architecture replaces config.model / text / vae", flush=True)
  return found


def _imported(path: str, source: str) -> bool:
  try:
    return ckpt_lib.load_export_metadata(path).get("imported_from") == source
  except (FileNotFoundError, ckpt_lib.DamagedExportError):
    return False


def import_exports(config, workdir: str, mesh, found: diffusers_io.Pipeline) -> None:
  """Writes (or reuses) the teacher and autoencoder exports of `found`; points config at
  them."""
  teacher_path = stage_setup.export_dir(workdir, "teacher")
  vae_path = stage_setup.export_dir(workdir, "autoencoder")
  source = found.directory
  if not _imported(teacher_path, source):
    den = stage_setup.denoiser_for(config, w_embedding=False)
    stage = Stage("teacher", "teacher", "teacher", latent=True)
    abstract, shards, _ = stage_setup.abstract_params(
        den, stage_setup.model_shape(config, stage), config, mesh)
    params = {
        "unet": diffusers_io.read_params(found.weights("unet"), abstract["unet"], "unet",
                                         shards["unet"]),
        "text_encoder": diffusers_io.read_params(found.weights("text_encoder"),
                                                 abstract["text_encoder"], "text",
                                                 shards["text_encoder"])}
    meta = lineage.export_metadata(config, stage, train_steps=0, parent=None,
                                   parent_path=None)
    meta.update(imported_from=source, tokenizer=conditioning.tokenizer_metadata(
        conditioning.tokenizer_for(config)))
    ckpt_lib.save_export(teacher_path, params, meta)
  if not _imported(vae_path, source):
    shape = stage_setup.data_shape(config)
    model = autoencoding.build(config.vae, shape, param_dtype=config.model.param_dtype)
    rep = sharding.replicated(mesh)
    abstract = nn.unbox(model.init_abstract(shape))
    params = diffusers_io.read_params(found.weights("vae"), abstract, "vae",
                                      jax.tree.map(lambda _: rep, abstract))
    stage = Stage("autoencoder", "autoencoder", "autoencoder")
    meta = lineage.export_metadata(config, stage, train_steps=0, parent=None,
                                   parent_path=None)
    meta.update(imported_from=source, vae=config_lib.vae_arch_dict(config.vae),
                scaling_factor=found.scaling_factor)
    ckpt_lib.save_export(vae_path, params, meta)
  with config.unlocked():
    config.init_from = teacher_path
    config.vae.init_from = vae_path
  if jax.process_index() == 0:
    print(f"[import] teacher {teacher_path}, autoencoder {vae_path}", flush=True)
