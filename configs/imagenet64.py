"""ImageNet 64x64, class-conditional (1000 classes): ADM U-Net, 295.9M parameters.

Hyperparameters from PAPER.md (Salimans & Ho ImageNet-64): ch 192, ch_mult (1,2,3,4), 3 res
blocks, attention at 32/16/8, head dim 64, dropout 0.1; Adam 3e-4, warm-up 1000, batch 2048,
EMA 0.9999, grad clip 1; distillation Adam 1e-4 annealed to 0 over 50k steps, 1024 -> 1 steps.
Needs imagenet_resized/64x64 prepared with tfds (manual ImageNet download), e.g.
  tfds build imagenet_resized/64x64 --data_dir=$DATA --file_format=array_record
  python -m gdistill.main --config=configs/imagenet64.py --config.data.data_dir=$DATA \
      --config.mesh.fsdp=4 --workdir=gs://bucket/run
"""
from gdistill import config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config()
  c.stage = "pipeline"
  c.data.update(dict(name="imagenet64", random_flip=True, num_classes=1000))
  c.model.update(dict(name="unet", ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                      attn_resolutions=(32, 16, 8), head_dim=64, dropout=0.1, num_groups=32,
                      resblock_updown=True, num_classes=1000, channels=3, image_size=64,
                      parametrization="both", dtype="bfloat16"))
  c.diffusion.update(dict(p_uncond=0.1, w_min=0.0, w_max=4.0))
  c.teacher.update(dict(num_steps=1_000_000, batch_size=2048, lr=3e-4, warmup_steps=1000,
                        ema_decay=0.9999, grad_clip=1.0))
  c.guided.update(dict(num_steps=100_000, batch_size=2048, lr=1e-4, ema_decay=0.9999))
  c.progressive.update(dict(num_steps=50_000, batch_size=2048, lr=1e-4, start_steps=1024,
                            end_steps=1))
  c.checkpoint.every_steps = 5000
  c.log.update(dict(every_steps=100, sample_every_steps=20_000))
  c.eval.update(dict(num_samples=50_000, batch_size=1024))
  if arg:
    raise ValueError(f"configs/imagenet64.py: unknown variant {arg!r}; valid: ''")
  c.lock()
  return c
