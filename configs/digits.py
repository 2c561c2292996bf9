"""The embedded default: 8x8 handwritten digits (scikit-learn's 1,797 images, 10 classes).

Sized for a 2-core CPU. The default runs the whole pipeline: teacher, stage one (w-conditioned
student), progressive rounds from start_steps down to 1 step, then the evaluation.

  python -m gdistill.main --config=configs/digits.py --workdir=workdirs/digits
  python -m gdistill.main --config=configs/digits.py:quick --workdir=workdirs/digits_quick
  python -m gdistill.main --config=configs/digits.py --config.stage=teacher --workdir=W
"""
from gdistill import config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config()
  c.stage = "pipeline"
  c.data.name = "digits"
  c.data.num_classes = 10
  c.model.update(dict(name="unet", ch=32, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), head_dim=32, dropout=0.1, num_groups=8,
                      num_classes=10, channels=1, image_size=8, parametrization="v"))
  c.teacher.update(dict(num_steps=1200, batch_size=64, lr=2e-3, warmup_steps=50,
                        schedule="cosine", ema_decay=0.999))
  c.guided.update(dict(num_steps=700, batch_size=64, lr=1e-3, ema_decay=0.995))
  c.progressive.update(dict(num_steps=150, batch_size=64, lr=3e-4, start_steps=32,
                            end_steps=1))
  c.checkpoint.every_steps = 200
  c.log.every_steps = 100
  c.eval.edit_w = 2.0  # the table's guided column
  if arg == "quick":
    c.teacher.update(dict(num_steps=250, warmup_steps=10))
    c.guided.update(dict(num_steps=40))
    c.progressive.update(dict(num_steps=20, start_steps=8))
    c.checkpoint.every_steps = 20
    c.log.every_steps = 20
    c.eval.update(dict(num_samples=200, batch_size=200, steps=(1, 2, 4), w=(0.0, 2.0),
                       classifier_steps=200, edit_images=60, edit_batch_size=60))
  elif arg:
    raise ValueError(f"configs/digits.py: unknown variant {arg!r}; valid: '' or 'quick'")
  c.lock()
  return c
