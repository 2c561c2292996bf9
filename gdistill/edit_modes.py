"""--mode=edit and --mode=inpaint: a finished stage edits or inpaints the images of an .npz.

  python -m gdistill.main --config=configs/shapes.py --workdir=W --mode=edit \
      --config.edit.stage=progressive_4 --config.edit.input=IN.npz \
      --config.edit.prompts_file=P.txt --config.edit.strength=0.6 --config.edit.w=3 \
      --config.edit.out=OUT.npz

IN.npz: 'images' uint8 [n, H, W, C]; for inpainting 'masks' uint8 [n, H, W] in {0, 1} (1 =
repaint); for class models 'labels' int [n]. Text models read one prompt per image from
prompts_file (line i for image i). OUT.npz: 'images' uint8, the prompts or labels, w, steps,
strength and NFE; OUT.png beside it: the inputs (inpainting: with the masked region grey) above
the outputs. The methods are Model.edit / Model.inpaint (gdistill/editing.py).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from gdistill import (api, config_lib, config_validation, dashboard, editing, evaluate, paths,
                      sampling)


def _read_input(section, key: str, need_masks: bool) -> dict:
  path = section.input
  if not path:
    raise config_lib.ConfigError(f"config.{key}.input='' is invalid: an .npz with 'images' "
                                 f"(uint8 NHWC){' and masks' if need_masks else ''}")
  if not paths.exists(path):
    raise config_lib.ConfigError(f"config.{key}.input={path!r} is invalid: no such file")
  arrays = dict(paths.load_npz(path))
  want = ("images", "masks") if need_masks else ("images",)
  missing = [k for k in want if k not in arrays]
  if missing:
    raise config_lib.ConfigError(
        f"config.{key}.input={path!r} has no {', '.join(repr(k) for k in missing)} (it holds "
        f"{sorted(arrays)}): 'images' uint8 [n, H, W, C]"
        + (", 'masks' uint8 [n, H, W] in {0, 1}, 1 = repaint" if need_masks else ""))
  if arrays["images"].dtype != np.uint8:
    raise config_lib.ConfigError(f"config.{key}.input={path!r}: 'images' is "
                                 f"{arrays['images'].dtype}, expected uint8 0..255")
  return arrays


def _conditions(model, section, key: str, arrays: dict, n: int) -> tuple[dict, dict]:
  """Keyword arguments of Model.edit / inpaint and what the output .npz records."""
  if model.text_conditioned:
    prompts = evaluate.read_prompts(section.prompts_file, f"{key}.prompts_file",
                                    "line i for image i")
    if len(prompts) != n:
      raise config_lib.ConfigError(
          f"config.{key}.prompts_file={section.prompts_file!r} holds {len(prompts)} prompts "
          f"for {n} images: one per image")
    return {"prompts": prompts}, {"prompts": np.array(prompts, dtype=str)}
  if "labels" not in arrays:
    raise config_lib.ConfigError(f"config.{key}.input={section.input!r} has no 'labels': a "
                                 "class-conditional model needs one label per image")
  labels = np.asarray(arrays["labels"], np.int32).reshape(-1)
  return {"labels": labels}, {"labels": labels}


def _run(config, workdir: str, key: str) -> dict:
  workdir = paths.resolve(workdir)
  config_lib.resolve_paths(config)
  config_validation.validate(config, num_devices=jax.device_count(),
                             num_processes=jax.process_count())
  s = config[key]
  inpaint = key == "inpaint"
  arrays = _read_input(s, key, inpaint)
  model = api.load(workdir, s.stage)
  x = arrays["images"]
  kwargs, recorded = _conditions(model, s, key, arrays, len(x))
  steps = int(s.steps) or model.default_steps
  try:
    start = steps if inpaint else sampling.edit_start(steps, float(s.strength))
    model.spec(s.sampler)
    method = editing.check_method(model, s.method or None) if inpaint else None
  except ValueError as e:
    raise config_lib.ConfigError(f"config.{key}: {e}") from None
  call = dict(w=float(s.w), steps=steps, sampler=s.sampler, rng=int(s.seed),
              batch_size=int(s.batch_size), **kwargs)
  t0 = time.perf_counter()
  try:
    if inpaint:
      out = model.inpaint(x, arrays["masks"], paste_back=bool(s.paste_back), method=method,
                          **call)
    else:
      out = model.edit(x, strength=float(s.strength), **call)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.{key}.input={s.input!r}: {e}") from None
  seconds = time.perf_counter() - t0
  path = s.out or paths.join(workdir, "inpainted.npz" if inpaint else "edited.npz")
  png = os.path.splitext(path)[0] + ".png"
  nfe = editing.nfe(model, steps, start)
  info = {"stage": model.stage, "w": float(s.w), "steps": steps, "start": start, "nfe": nfe,
          "num_images": len(x), "seconds": round(seconds, 4), "out": path, "png": png}
  if inpaint:
    info["method"] = method
  else:
    info["strength"] = float(s.strength)
  if jax.process_index() != 0:
    return info
  images = dashboard.to_uint8(out)
  record = {"images": images, **recorded, "w": np.float32(s.w), "steps": np.int32(steps),
            "nfe": np.int32(nfe), "stage": np.array(model.stage)}
  if inpaint:
    record["masks"] = np.asarray(arrays["masks"], np.uint8)
  else:
    record["strength"] = np.float32(s.strength)
  paths.save_npz_atomic(path, record)
  before = x.copy()
  if inpaint:  # show what is repainted: the masked pixels grey
    m = np.asarray(arrays["masks"]).reshape(x.shape[:3]).astype(bool)
    before[m] = 128
  k = min(len(x), 16)
  grid = dashboard.image_grid(np.concatenate([before[:k], images[:k]]), 2)
  dashboard.save_png(png, grid, scale=4 if grid.shape[0] < 200 else 1)
  what = (f"inpaint ({method})" if inpaint else f"edit strength {float(s.strength):g} ({start} of "
          f"{steps} steps)")
  print(f"[{key}] {model.stage} {what}, w={float(s.w):g}: {len(x)} images, {nfe} NFE each, "
        f"{seconds:.2f} s -> {path}, {png} (top: inputs, bottom: outputs)", flush=True)
  return info


def edit_to_file(config, workdir: str) -> dict:
  """--mode=edit: config.edit's images edited by config.edit.stage (module doc)."""
  return _run(config, workdir, "edit")


def inpaint_to_file(config, workdir: str) -> dict:
  """--mode=inpaint: config.inpaint's images inpainted by config.inpaint.stage (module doc)."""
  return _run(config, workdir, "inpaint")
