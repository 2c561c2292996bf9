"""Stable Diffusion v1.5: distil SD 1.5 (stage one and progressive rounds) on your image-caption
data, on a mesh.

U-Net: diffusers' UNet2DConditionModel of SD 1.5 (block_out_channels 320/640/1280/1280, 2 layers
per block, 8 heads, cross-attention 768; 859.5M parameters) on 64x64x4 latents of 512x512
images; text encoder: CLIP ViT-L/14's text transformer (12 layers, 768 wide, 77 tokens;
123.1M); the SD VAE (scaling factor 0.18215); SD's scaled-linear 1000-step epsilon schedule.
The real checkpoint (diffusers layout) loads with --config.init_from=DIR: its configs then decide
the architecture; the sizes here let --mode=compile size a job without it.

Data: your image-caption files (gdistill/data/files.py), read batch by batch and encoded to
latents on the devices: a folder of images with a .txt caption beside each
(data.name='image_folder', the default) or webdataset tar shards (data.name='webdataset'),
scaled and centre-cropped to 512x512. End to end (docs/STABLE_DIFFUSION.md has the pod and
8-GPU commands):

  python -m gdistill.main --config=configs/sd15.py --workdir=workdirs/sd15 \
      --config.init_from=/models/stable-diffusion-v1-5 --config.data.data_dir=/data/captions

Sizing only (no checkpoint, dataset or parameter is read or materialized):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m gdistill.main \
      --config=configs/sd15.py --mode=compile --workdir=workdirs/sd15_compile \
      --config.mesh.fsdp=8
"""
from gdistill import config_lib
from gdistill.models.autoencoder import SD15_VAE
from gdistill.models.text import CLIP_VIT_L14
from gdistill.models.unet_cond import SD15_UNET


def get_config(arg: str = ""):
  c = config_lib.base_config()
  c.stage = "pipeline"
  c.data.update(dict(name="image_folder", num_classes=0, image_size=512, decode_threads=16))
  c.vae.update(dict(enabled=True, init_from="stable-diffusion-v1-5/vae", image_size=512,
                    image_channels=3, block_out_channels=SD15_VAE["block_out_channels"],
                    layers_per_block=SD15_VAE["layers_per_block"],
                    latent_channels=SD15_VAE["latent_channels"],
                    norm_num_groups=SD15_VAE["norm_num_groups"]))
  c.model.update(dict(name="unet2d_condition", conditioning="text", channels=4, image_size=64,
                      num_classes=0, parametrization="eps", dropout=0.0,
                      num_groups=SD15_UNET["norm_num_groups"],
                      block_out_channels=SD15_UNET["block_out_channels"],
                      down_block_types=SD15_UNET["down_block_types"],
                      up_block_types=SD15_UNET["up_block_types"],
                      layers_per_block=SD15_UNET["layers_per_block"],
                      attention_head_dim=SD15_UNET["attention_head_dim"],
                      time_cond_proj_dim=256, remat=True, dtype="bfloat16"))
  c.text.update(dict(tokenizer="clip", vocab_size=CLIP_VIT_L14["vocab_size"],
                     max_length=CLIP_VIT_L14["max_position_embeddings"],
                     hidden_size=CLIP_VIT_L14["hidden_size"],
                     intermediate_size=CLIP_VIT_L14["intermediate_size"],
                     num_hidden_layers=CLIP_VIT_L14["num_hidden_layers"],
                     num_attention_heads=CLIP_VIT_L14["num_attention_heads"],
                     hidden_act=CLIP_VIT_L14["hidden_act"]))
  c.diffusion.update(dict(schedule="scaled_linear", num_train_timesteps=1000,
                          beta_start=0.00085, beta_end=0.012, weighting="snr", clip_x=False,
                          p_uncond=0.1, w_min=2.0, w_max=14.0))
  # The teacher is Stable Diffusion itself (a checkpoint); these are distillation settings.
  c.teacher.update(dict(num_steps=1, batch_size=64, lr=1e-5))
  c.guided.update(dict(num_steps=20000, batch_size=64, lr=1e-5, ema_decay=0.9999))
  c.progressive.update(dict(num_steps=5000, batch_size=64, lr=1e-5, start_steps=64,
                            end_steps=1))
  c.mesh.update(dict(data=-1, fsdp=8))
  c.checkpoint.every_steps = 1000
  c.log.update(dict(every_steps=100, sample_w=(2.0, 7.0)))
  c.eval.enabled = False  # the evaluation table needs an embedded dataset's classifier
  if arg:
    raise ValueError(f"configs/sd15.py: unknown variant {arg!r}; valid: ''")
  c.lock()
  return c
