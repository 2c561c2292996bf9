"""2-D class-conditional mixture (8 modes on a ring, 4 classes) with the MLP denoiser.

  python -m gdistill.main --config=configs/toy2d.py --workdir=workdirs/toy2d
  python -m gdistill.main --config=configs/toy2d.py:test --workdir=W   # the test-suite size
"""
from gdistill import config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config()
  c.stage = "pipeline"
  c.data.name = "toy2d"
  c.data.num_classes = 4
  c.model.update(dict(name="mlp", ch=128, num_res_blocks=3, dropout=0.0, num_classes=4,
                      channels=2, image_size=0, attn_resolutions=(), parametrization="v"))
  c.diffusion.update(dict(clip_x=False, p_uncond=0.2))
  c.teacher.update(dict(num_steps=1500, batch_size=256, lr=2e-3, warmup_steps=50,
                        schedule="cosine", ema_decay=0.99))
  c.guided.update(dict(num_steps=600, batch_size=256, lr=1e-3, ema_decay=0.99))
  c.progressive.update(dict(num_steps=300, batch_size=256, lr=5e-4, start_steps=32,
                            end_steps=4))
  c.checkpoint.every_steps = 500
  c.log.update(dict(every_steps=100, samples_per_class=64))
  if arg == "test":   # the test suite's pipeline: teacher, stage one, rounds 8 and 4
    c.teacher.update(dict(num_steps=800))
    c.guided.update(dict(num_steps=300))
    c.progressive.update(dict(num_steps=200, start_steps=16, end_steps=4))
    c.log.update(dict(every_steps=200, samples_per_class=16))
    c.eval.enabled = False
  elif arg:
    raise ValueError(f"configs/toy2d.py: unknown variant {arg!r}; valid: '' or 'test'")
  c.lock()
  return c
