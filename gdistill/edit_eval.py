"""Editing and inpainting in the evaluation (--mode=evaluate, eval.edits): held-out images,
edited or inpainted by the teacher (at N0 steps, 2 N0 NFE for the full grid) and by the students
of eval.edit_steps, scored by the dataset's own classifier. Written to <eval_dir>/edits.md and
edits.json.

shapes (the attribute classifier, gdistill/metrics/attributes.py):
  recolour  single-object test images, each with the prompt naming its size, shape and cell and
            another colour (cycling over the five others: every colour pair occurs), edited at
            each strength of eval.edit_strengths: success = the object's cell holds the new
            colour; preservation = exactly one object, in the original cell, of the original
            shape.
  remove    two-object test images, the second object's pixel box (one pixel wider) masked,
            the prompt naming only the first object (with its cell): success = the masked
            object's cell is empty and the first object is found in its cell (colour, shape).
  fill      single-object test images (object not in the centre cell), an empty cell two
            rows or columns away masked (every pixel a large object in that cell can cover,
            less the kept object's box; the cell's own box is smaller than a large object),
            the prompt naming a new large object in that cell: success = the cell holds the
            named colour and shape; preservation = the original object is still found.
  Inpainting runs all N steps (Model.inpaint): by replacement with any model, and for an
  inpainting model (model.inpainting) also as the model itself (method 'model', its rows
  first); `psnr_keep` is the PSNR of the unmasked region before paste-back (how well the kept
  region is reproduced). The model method's fill prompt is the caption of the whole filled
  image ("a small purple circle left of a large white square", the data's two-object grammar):
  it was trained on captions of whole images, and a prompt naming only the new object (the
  replacement rows' prompt) fills worse (0.70 against 0.925 for the 4-step student of
  configs/shapes.py:inpaint at N0 = 16, 0.62 against 0.93 for its teacher).
digits (the evaluation's classifier):
  relabel   test digits edited to label (y + 1) mod 10 at each strength: success = classified
            as the new label.
  complete  the bottom half (rows 4..7) masked and inpainted with the digit's own label:
            success = classified as that label.
Seconds are per row (all images, one batch of eval.edit_batch_size at a time, compile
excluded).
"""
from __future__ import annotations

import time

import jax
import numpy as np

from gdistill import api, dashboard, paths, sampling

# --------------------------------------------------------------------------- shapes cases


def _object_mask(center, extent, size: int = 32) -> np.ndarray:
  m = np.zeros((size, size), np.uint8)
  x0, y0 = int(np.floor(center[0] - extent)) - 1, int(np.floor(center[1] - extent)) - 1
  x1, y1 = int(np.ceil(center[0] + extent)) + 1, int(np.ceil(center[1] + extent)) + 1
  m[max(y0, 0):min(y1, size), max(x0, 0):min(x1, size)] = 1
  return m


def _fill_mask(cell: int, keep_center, keep_extent) -> np.ndarray:
  """Where a large object of the data can lie in `cell` (every pixel its box can touch with
  its centre in the cell's middle half, gdistill/data/shapes.py), less the kept object's box
  (one pixel wider): the region a fill repaints. The cell's own box (10-11 px) is smaller
  than a large object (12-14 px): masking only it clips a large disc to a rounded square."""
  from gdistill.data import shapes
  size, width, extent = shapes.SIZE, shapes.SIZE / 3, shapes.HALF_EXTENT[1][1]
  r, c = divmod(int(cell), 3)
  lo = lambda k: max(int(np.floor(k * width + width / 4 - extent)), 0)
  hi = lambda k: min(int(np.ceil(k * width + 3 * width / 4 + extent)), size)
  m = np.zeros((size, size), np.uint8)
  m[lo(r):hi(r), lo(c):hi(c)] = 1
  return m * (1 - _object_mask(keep_center, keep_extent, size))


def shapes_cases(test: dict, n: int) -> dict:
  """The recolour, remove and fill cases of module doc from the shapes test split."""
  from gdistill.data import shapes
  one = np.flatnonzero(test["num_objects"] == 1)[:n]
  two = np.flatnonzero(test["num_objects"] == 2)[:n]
  def noun(color, shape, size):
    return f"{shapes.SIZES[size]} {shapes.COLORS[color]} {shapes.SHAPES[shape]}"
  rec = {"images": test["image"][one], "cell": test["cell"][one, 0],
         "shape": test["shape"][one, 0],
         "old": test["color"][one, 0],
         "new": (test["color"][one, 0] + 1 + np.arange(len(one)) % 5) % len(shapes.COLORS)}
  rec["prompts"] = [f"a {noun(c, s, z)} {shapes.CELL_PHRASES[cell]}" for c, s, z, cell in zip(
      rec["new"], rec["shape"], test["size"][one, 0], rec["cell"])]
  rem = {"images": test["image"][two], "keep_cell": test["cell"][two, 0],
         "keep_color": test["color"][two, 0], "keep_shape": test["shape"][two, 0],
         "gone_cell": test["cell"][two, 1],
         "masks": np.stack([_object_mask(test["center"][i, 1], test["half_extent"][i, 1])
                            for i in two]) if len(two) else np.zeros((0, 32, 32), np.uint8)}
  rem["prompts"] = [f"a {noun(c, s, z)} {shapes.CELL_PHRASES[cell]}" for c, s, z, cell in zip(
      rem["keep_color"], rem["keep_shape"], test["size"][two, 0], rem["keep_cell"])]
  rng = np.random.default_rng(0)
  # Fill: single objects outside the centre cell; the new object goes to a cell two rows or
  # columns away (never adjacent, as the data keeps large objects), picked from (seed 0, i).
  far = np.flatnonzero((test["num_objects"] == 1) & (test["cell"][:, 0] != 4))[:n]
  cells = test["cell"][far, 0]
  choices = [[k for k in range(9) if max(abs(k // 3 - c // 3), abs(k % 3 - c % 3)) == 2]
             for c in cells]
  fill = {"images": test["image"][far], "old_cell": cells,
          "old_color": test["color"][far, 0], "old_shape": test["shape"][far, 0],
          "cell": np.array([ch[rng.integers(len(ch))] for ch in choices], np.int32),
          "color": rng.integers(0, len(shapes.COLORS), len(far)),
          "shape": rng.integers(0, len(shapes.SHAPES), len(far))}
  fill["masks"] = np.stack([
      _fill_mask(cell, test["center"][i, 0], test["half_extent"][i, 0])
      for i, cell in zip(far, fill["cell"])]) if len(far) else np.zeros((0, 32, 32), np.uint8)
  fill["prompts"] = [f"a {noun(c, s, 1)} {shapes.CELL_PHRASES[cell]}"  # size 1: large
                     for c, s, cell in zip(fill["color"], fill["shape"], fill["cell"])]
  old_nouns = [noun(c, s, z) for c, s, z in zip(fill["old_color"], fill["old_shape"],
                                                  test["size"][far, 0])]
  fill["image_prompts"] = [_pair_caption(a, int(ca), f"{noun(c, s, 1)}", int(cb))
                           for a, ca, c, s, cb in zip(old_nouns, fill["old_cell"],
                                                      fill["color"], fill["shape"], fill["cell"])]
  return {"recolour": rec, "remove": rem, "fill": fill}


def _pair_caption(a: str, cell_a: int, b: str, cell_b: int) -> str:
  """The data's two-object caption of objects a and b in their cells ("a X left of a Y",
  "a X above a Y"; the data's grammar, gdistill/data/shapes.py)."""
  (ra, ca), (rb, cb) = divmod(cell_a, 3), divmod(cell_b, 3)
  if ca < cb:
    return f"a {a} left of a {b}"
  if ra < rb:
    return f"a {a} above a {b}"
  return f"a {b} left of a {a}" if cb < ca else f"a {b} above a {a}"


def _has(pred: dict, cell, color=None, shape=None) -> np.ndarray:
  rows = np.arange(len(cell))
  ok = pred["present"][rows, cell]
  if color is not None:
    ok &= pred["color"][rows, cell] == color
  if shape is not None:
    ok &= pred["shape"][rows, cell] == shape
  return ok


def _psnr_keep(raw: np.ndarray, images: np.ndarray, masks: np.ndarray) -> float:
  keep = (masks == 0)[..., None].repeat(images.shape[-1], -1)
  diff = (dashboard.to_uint8(raw).astype(np.float64) - images.astype(np.float64))[keep]
  mse = float(np.mean(diff ** 2)) if diff.size else 0.0
  return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


# ------------------------------------------------------------------------------ the sweep


def _rows(config, stages: list[str]) -> list[tuple[str, int]]:
  rows = [("teacher", int(config.progressive.start_steps))] if "teacher" in stages else []
  for n in sorted({int(s) for s in config.eval.edit_steps}, reverse=True):
    if f"progressive_{n}" in stages:
      rows.append((f"progressive_{n}", n))
  return rows


def _start(steps: int, strength: float) -> int:
  """floor(N s), 0 where an N-step model runs no step at this strength (a skipped row)."""
  try:
    return sampling.edit_start(steps, strength)
  except ValueError:
    return 0


def _skipped(stage: str, task: str, strength: float, steps: int, n: int) -> dict:
  return dict(stage=stage, task=task, strength=float(strength), steps=steps, nfe=0,
              success=None, preservation=None, seconds=0.0, n=n,
              note=f"floor({steps} x {strength:g}) = 0 steps")


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def run(config, workdir: str, eval_dir: str, stages: list[str], say=print) -> dict | None:
  """The editing / inpainting evaluation of module doc; None for datasets without one."""
  if config.data.name not in ("shapes", "digits") or not config.eval.edits:
    return None
  e = config.eval
  w, bs = float(e.edit_w), int(e.edit_batch_size)
  rows = _rows(config, stages)
  if not rows:
    return None
  if config.data.name == "shapes":
    from gdistill import data as data_lib
    from gdistill.metrics import attributes
    test = data_lib.load_captioned(config.data, "test")
    state = attributes.get_or_train(paths.join(eval_dir, "attributes.npz"),
                                    data_lib.load_captioned(config.data, "train"),
                                    steps=int(e.classifier_steps), seed=int(config.seed))
    cases = shapes_cases(test, int(e.edit_images))
    predict = lambda x: attributes.predict(state, dashboard.to_uint8(x))
  else:
    from gdistill import data as data_lib, metrics
    x_all, y_all = data_lib.load_array(config.data, "train")  # digits8x8 has one split
    state = metrics.get_or_train_classifier(paths.join(eval_dir, "classifier.npz"), x_all,
                                            y_all, int(config.model.num_classes),
                                            steps=int(e.classifier_steps),
                                            seed=int(config.seed))
    n = int(e.edit_images)
    pick = np.random.default_rng(1).permutation(len(y_all))[:n]
    cases = {"images": x_all[pick], "labels": y_all[pick].astype(np.int32)}
    classify = lambda x: np.argmax(metrics.classifier_features(state, x)[1], -1)
  results = []
  for stage, steps in rows:
    model = api.load(workdir, stage)
    rng = jax.random.key(int(e.seed))
    kw = dict(w=w, steps=steps, rng=rng, batch_size=bs)
    nfe = lambda start: (2 if model.is_teacher else 1) * start
    # compile outside the timings: one edit and one inpaint of one batch
    if config.data.name == "shapes":
      c = cases["recolour"]
      model.edit(c["images"][:1], prompts=c["prompts"][:1], strength=1.0, **kw)
      model.inpaint(c["images"][:1], np.zeros((1, 32, 32), np.uint8),
                    prompts=c["prompts"][:1], **kw)
      for s in e.edit_strengths:
        start = _start(steps, s)
        if not start:
          results.append(_skipped(stage, "recolour", s, steps, len(c["prompts"])))
          continue
        x, sec = _timed(lambda: model.edit(c["images"], prompts=c["prompts"], strength=s,
                                           **kw))
        p = predict(x)
        ok = _has(p, c["cell"], color=c["new"])
        keep = (p["num_objects"] == 1) & _has(p, c["cell"], shape=c["shape"])
        results.append(dict(stage=stage, task="recolour", strength=float(s), steps=steps,
                            nfe=nfe(start), success=float(ok.mean()),
                            preservation=float(keep.mean()), seconds=round(sec, 3),
                            n=len(ok)))
      methods = ("model", "replacement") if model.inpainting else ("replacement",)
      for task, method in [(t, m) for m in methods for t in ("remove", "fill")]:
        c = cases[task]
        prompts = c.get("image_prompts", c["prompts"]) if method == "model" else c["prompts"]
        x, sec = _timed(lambda: model.inpaint(c["images"], c["masks"], prompts=prompts,
                                              paste_back=False, method=method, **kw))
        psnr = _psnr_keep(x, c["images"], c["masks"])
        x = np.where(c["masks"][..., None] > 0, x, c["images"] / np.float32(127.5) - 1)
        p = predict(x)
        if task == "remove":
          ok = ~_has(p, c["gone_cell"])
          keep = _has(p, c["keep_cell"], c["keep_color"], c["keep_shape"])
          ok &= keep
        else:
          ok = _has(p, c["cell"], c["color"], c["shape"])
          keep = _has(p, c["old_cell"], c["old_color"], c["old_shape"])
        results.append(dict(stage=stage, task=task, method=method, strength=None,
                            steps=steps, nfe=nfe(steps), success=float(ok.mean()),
                            preservation=float(keep.mean()), psnr_keep=round(psnr, 2),
                            seconds=round(sec, 3), n=len(ok)))
    else:
      imgs, labels = cases["images"], cases["labels"]
      target = (labels + 1) % int(config.model.num_classes)
      model.edit(imgs[:1], labels=target[:1], strength=1.0, **kw)
      for s in e.edit_strengths:
        start = _start(steps, s)
        if not start:
          results.append(_skipped(stage, "relabel", s, steps, len(labels)))
          continue
        x, sec = _timed(lambda: model.edit(imgs, labels=target, strength=s, **kw))
        results.append(dict(stage=stage, task="relabel", strength=float(s), steps=steps,
                            nfe=nfe(start), success=float(np.mean(classify(x) == target)),
                            preservation=None, seconds=round(sec, 3), n=len(labels)))
      masks = np.zeros(imgs.shape[:3], np.uint8)
      masks[:, imgs.shape[1] // 2:] = 1
      methods = ("model", "replacement") if model.inpainting else ("replacement",)
      for method in methods:
        x, sec = _timed(lambda: model.inpaint(imgs, masks, labels=labels, method=method, **kw))
        results.append(dict(stage=stage, task="complete", method=method, strength=None,
                            steps=steps, nfe=nfe(steps),
                            success=float(np.mean(classify(x) == labels)),
                            preservation=None, seconds=round(sec, 3), n=len(labels)))
    for r in [r for r in results if r["stage"] == stage]:
      if r["success"] is None:
        say(f"edits {r['stage']} {r['task']} strength {r['strength']:g}: floor(N s) = 0 of "
            f"its {steps} steps, skipped")
        continue
      say(f"edits {r['stage']} {r['task']}"
          + (f" strength {r['strength']:g}" if r["strength"] is not None else "")
          + (f" by {r['method']}" if "method" in r else "")
          + f" ({r['nfe']} NFE, w={w:g}): success {r['success']:.3f}"
          + (f", preservation {r['preservation']:.3f}" if r["preservation"] is not None else "")
          + (f", PSNR kept {r['psnr_keep']:.1f} dB" if "psnr_keep" in r else "")
          + f", {r['seconds']:.2f} s")
  out = {"w": w, "strengths": [float(s) for s in e.edit_strengths], "batch_size": bs,
         "rows": results,
         "description": __doc__.split("\n\n")[0]}
  if jax.process_index() == 0:
    paths.write_json_atomic(paths.join(eval_dir, "edits.json"), out)
    paths.write_text_atomic(paths.join(eval_dir, "edits.md"), markdown(out))
  return out


def markdown(out: dict) -> str:
  lines = [f"Editing and inpainting at w = {out['w']:g} (gdistill/edit_eval.py; NFE per "
           f"image; seconds for all images of the row, in batches of {out['batch_size']}, "
           "compilation excluded)", "",
           "| stage | task | method | strength | NFE | success | preservation | PSNR kept (dB) "
           "| s |", "|---|---|---|---|---|---|---|---|---|"]
  f = lambda v, fmt: "-" if v is None else format(v, fmt)
  for r in out["rows"]:
    if r["success"] is None:
      lines.append(f"| {r['stage']} | {r['task']} | - | {f(r['strength'], 'g')} | 0 | "
                   f"{r['note']} | | | |")
      continue
    lines.append(f"| {r['stage']} | {r['task']} | {r.get('method', '-')} | "
                 f"{f(r['strength'], 'g')} | {r['nfe']} | "
                 f"{r['success']:.3f} | {f(r['preservation'], '.3f')} | "
                 f"{f(r.get('psnr_keep'), '.1f')} | {r['seconds']:.2f} |")
  return "\n".join(lines) + "\n"
