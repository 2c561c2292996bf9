"""CIFAR-10 32x32, class-conditional, the progressive-distillation hyperparameters (PAPER.md).

Needs the dataset prepared first (no download at train time):
  tfds build cifar10 --data_dir=$DATA --file_format=array_record
  python -m gdistill.main --config=configs/cifar10.py --config.data.data_dir=$DATA --workdir=W
"""
from gdistill import config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config()
  c.stage = "pipeline"
  c.data.update(dict(name="cifar10", random_flip=True, num_classes=10))
  c.model.update(dict(name="unet", ch=256, ch_mult=(1, 1, 1), num_res_blocks=3,
                      attn_resolutions=(16, 8), head_dim=64, dropout=0.2, num_groups=32,
                      num_classes=10, channels=3, image_size=32, parametrization="x",
                      dtype="bfloat16"))
  c.diffusion.update(dict(p_uncond=0.1, w_min=0.0, w_max=4.0))
  c.teacher.update(dict(num_steps=800_000, batch_size=128, lr=2e-4, warmup_steps=1000,
                        ema_decay=0.9999, grad_clip=1.0))
  c.guided.update(dict(num_steps=100_000, batch_size=128, lr=1e-4, ema_decay=0.9999))
  c.progressive.update(dict(num_steps=50_000, batch_size=128, lr=1e-4, start_steps=1024,
                            end_steps=1))
  c.checkpoint.every_steps = 5000
  c.log.update(dict(every_steps=100, sample_every_steps=20_000))
  c.eval.update(dict(num_samples=50_000, batch_size=1000))
  if arg:
    raise ValueError(f"configs/cifar10.py: unknown variant {arg!r}; valid: ''")
  c.lock()
  return c
