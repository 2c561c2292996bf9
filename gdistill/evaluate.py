"""--mode=sample (samples to an .npz) and --mode=evaluate (the paper's sweep of a workdir).

evaluate_workdir(config, workdir) evaluates the finished exports of a workdir (PAPER.md,
"Evaluation protocol"); one row per model and sampler, in this order:
  teacher        guided DDIM at N0 = config.progressive.start_steps (2 N0 NFE), and with
                 every other eval.teacher_samplers
  teacher        the same at each N of eval.steps (2 N NFE): what distillation buys
  guided         the stage-one student at N0, DDIM (N0 NFE)
  progressive_N  each student at its own N, for N in eval.steps, with every eval.samplers
and for each w of eval.w the task's metrics (gdistill/scoring.py: FID / IS / class accuracy
for class models; adherence, diversity and Frechet distance from the attribute classifier for
text models), NFE and sampling wall-clock (compilation excluded). Every row samples the same
conditions from the same seed (eval.seed). Writes <workdir>/eval/: results.{json,csv,md}, the
trade-off plot over w (fid_vs_is.png; adh2_vs_div.png) and the quality-vs-NFE plot
(fid_vs_nfe.png; fd_vs_nfe.png), grids/ (the first samples of every row, one line per w),
tensorboard/, and the cached classifier and reference statistics.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import time

import jax
import numpy as np

from gdistill import (api, conditioning, config_lib, config_validation, dashboard, edit_eval,
                      paths, preemption, scoring)
from gdistill import checkpoint as ckpt_lib

GRID_COLUMNS = 10  # samples of each w in a row's grid (eval/grids/)


@dataclasses.dataclass(frozen=True)
class Row:
  """One evaluated model + sampler + step count (a row of the table)."""
  stage: str
  method: str
  sampler: str
  steps: int

  @property
  def nfe(self) -> int:
    return (2 if self.stage == "teacher" else 1) * self.steps

  @property
  def family(self) -> str:
    """Rows along one FID-vs-NFE curve: 'teacher' (guided DDIM), 'teacher_<sampler>' or
    'student_<sampler>'."""
    if self.stage == "teacher":
      return "teacher" if self.sampler == "ddim" else f"teacher_{self.sampler}"
    return f"student_{self.sampler}"


def plan_rows(config, stages: list[str]) -> list[Row]:
  """The rows the finished `stages` allow, in the table's order."""
  e, n0 = config.eval, int(config.progressive.start_steps)
  rows = []
  if "teacher" in stages:
    for s in e.teacher_samplers:
      name = "DDIM" if s == "ddim" else s
      rows.append(Row("teacher", f"Teacher, guided {name} (2 N0 NFE)", s, n0))
      rows += [Row("teacher", f"Teacher, guided {name}", s, int(n))
               for n in sorted(set(e.steps)) if int(n) != n0]
  if "guided" in stages:
    rows.append(Row("guided", "Stage-one student", "ddim", n0))
  for n in sorted(set(e.steps)):
    if f"progressive_{n}" in stages:
      rows += [Row(f"progressive_{n}", "Distilled student", s, int(n)) for s in e.samplers]
  return rows


def missing_stages(config, stages: list[str]) -> list[str]:
  """The stages whose rows the table asks for (the teacher, stage one, progressive_N for N in
  eval.steps below N0) that have no finished export among `stages`: their rows are left out."""
  n0 = int(config.progressive.start_steps)
  wanted = ["teacher", "guided"] + [f"progressive_{int(n)}" for n in sorted(set(config.eval.steps))
                                    if int(n) < n0]
  return [s for s in wanted if s not in stages]


def evaluate_workdir(config, workdir: str) -> dict:
  """Runs the sweep over workdir's exports and writes <workdir>/eval/; returns results.json.

  Relative paths (workdir, config path keys) are taken from the current directory.
  """
  t_start = time.perf_counter()
  workdir = paths.resolve(workdir)
  config_lib.resolve_paths(config)
  config_validation.validate(config, num_devices=jax.device_count(),
                             num_processes=jax.process_count())
  stages = api.finished_stages(workdir)
  rows = plan_rows(config, stages)
  if not rows:
    raise api.StageNotFoundError(
        f"nothing to evaluate in {workdir}: finished exports {stages or 'none'}; eval.steps="
        f"{tuple(config.eval.steps)} (progressive_N is evaluated for N in eval.steps)")
  eval_dir = paths.join(workdir, "eval")
  primary = jax.process_index() == 0
  if primary:
    paths.makedirs(eval_dir)
  tokenizer = conditioning.tokenizer_from_metadata(ckpt_lib.load_export_metadata(
      api.export_dir(workdir, stages[-1])).get("tokenizer"))
  task = scoring.make_task(config, eval_dir, tokenizer)
  e, ws = config.eval, [float(w) for w in config.eval.w]
  cond = task.cond
  rng = jax.random.key(int(e.seed))
  results, compile_s, model = [], {}, None
  progress_path = paths.join(eval_dir, "progress.json")
  key = _sweep_key(config, workdir, stages)
  cached = _load_progress(progress_path, key)
  guard = preemption.Guard()
  setup_s = time.perf_counter() - t_start
  total = len(rows) * len(ws)
  say = (lambda msg: print(f"[evaluate] {msg}", flush=True)) if primary else (lambda msg: None)
  say(f"{len(rows)} rows x {len(ws)} w = {total} results, {len(cond)} samples each "
      f"(set-up {setup_s:.1f} s)")
  missing = missing_stages(config, stages)
  if missing:
    say(f"no rows for {', '.join(missing)}: no finished export in {workdir} (still training, "
        f"or not in this plan; eval.steps={tuple(int(n) for n in config.eval.steps)}). Rerun "
        f"--mode=evaluate once they have finished to add their rows.")
  for row in rows:
    hits = [cached.get(_row_key(row, w)) for w in ws]
    if all(hits):  # finished before an interruption: same models, same request
      results += hits
      continue
    if model is None or model.stage != row.stage:
      model = None  # frees the previous stage's parameters first
      model = api.load(workdir, row.stage)
    bs = model.round_batch(min(int(e.batch_size), len(cond)))
    ckey = f"{'teacher' if model.is_teacher else 'student'}/{row.sampler}/{bs}"
    if ckey not in compile_s:
      t0 = time.perf_counter()
      model.compile(row.sampler, bs)
      compile_s[ckey] = round(time.perf_counter() - t0, 3)
    grid = []
    for w in ws:
      t0 = time.perf_counter()
      x = np.concatenate(list(model.sample_batches(cond, w=w, steps=row.steps,
                                                   sampler=row.sampler, rng=rng, batch_size=bs,
                                                   warn_w=False)))
      seconds = time.perf_counter() - t0
      scores = task.score(x)
      grid.append(x[:GRID_COLUMNS])
      results.append({**dataclasses.asdict(row), "nfe": row.nfe, "w": w, **scores,
                      "seconds": round(seconds, 4),
                      "images_per_second": round(len(cond) / max(seconds, 1e-9), 2)})
      shown = ", ".join(f"{h} {scores[k]:{f}}" for k, h, f in task.columns
                        if scores[k] is not None)
      say(f"{len(results)}/{total} {row.stage} {row.sampler} N={row.steps} ({row.nfe} NFE) "
          f"w={w:g}: {shown}, sampling {seconds:.2f} s")
    if primary and grid[0].ndim == 4:
      dashboard.save_png(paths.join(eval_dir, "grids", f"{row.stage}-{row.sampler}-"
                                    f"N{row.steps}.png"),
                         dashboard.image_grid(dashboard.to_uint8(np.concatenate(grid)),
                                              len(ws)), scale=4)
    if primary:
      paths.write_json_atomic(progress_path, {"key": key, "rows": results})
    if guard.should_stop(len(results)) and len(results) < total:
      raise preemption.Preempted(
          f"[evaluate] preempted after {len(results)} of {total} results; "
          f"saved in {progress_path}. Rerun the same command to continue.")
  out = {"workdir": workdir, "task": task.name, "feature": task.feature,
         "description": task.description, "num_samples": len(cond),
         "columns": [list(c) for c in task.columns], "quality": task.quality,
         "tradeoff": list(task.tradeoff),
         "batch_size": int(e.batch_size), "seed": int(e.seed),
         "n0": int(config.progressive.start_steps), "w": ws, "steps": [int(n) for n in e.steps],
         "samplers": list(e.samplers), "teacher_samplers": list(e.teacher_samplers),
         "stages": stages, "rows": results, "compile_seconds": compile_s,
         "setup_seconds": round(setup_s, 3),
         "total_seconds": round(time.perf_counter() - t_start, 3)}
  # Editing and inpainting (their table in eval/edits.md), before the main table is printed
  # last on the console.
  model = None
  t0 = time.perf_counter()
  if edit_eval.run(config, workdir, eval_dir, stages, say=say) is not None:
    say(f"editing and inpainting in {time.perf_counter() - t0:.1f} s -> "
        f"{paths.join(eval_dir, 'edits.md')}")
  if primary:
    write_results(out, rows, eval_dir, tensorboard=bool(config.log.tensorboard))
    say(f"{len(rows)} rows x {len(ws)} w in {out['total_seconds']:.1f} s -> "
        f"{paths.join(eval_dir, 'results.md')}")
    print(markdown_table(out, rows), end="", flush=True)
  return out


def _sweep_key(config, workdir: str, stages: list[str]) -> str:
  """What the sweep's results depend on: the eval settings (less the editing table's, eval.edit*,
  which gdistill/edit_eval.py re-runs every time), the data and each export."""
  exports = {st: str(ckpt_lib.load_export_metadata(api.export_dir(workdir, st)).get("created"))
             for st in stages}
  sweep = {k: v for k, v in config.eval.to_dict().items() if not k.startswith("edit")}
  blob = json.dumps([sweep, config.data.to_dict(), int(config.seed),
                     int(config.progressive.start_steps), exports], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _row_key(row: Row, w: float) -> str:
  return f"{row.stage}/{row.sampler}/{row.steps}/{w:g}"


def _load_progress(path: str, key: str) -> dict:
  """{row key: result} from an interrupted sweep with the same key; {} otherwise."""
  if not paths.exists(path):
    return {}
  try:
    saved = paths.read_json(path)
  except (OSError, ValueError):
    return {}
  if saved.get("key") != key:
    return {}
  out = {}
  for r in saved.get("rows", []):
    out[f"{r['stage']}/{r['sampler']}/{r['steps']}/{r['w']:g}"] = r
  if out and jax.process_index() == 0:
    print(f"[evaluate] reusing {len(out)} results of an earlier run ({path})", flush=True)
  return out


def _cell(v, fmt: str) -> str:
  return "-" if v is None else format(v, fmt)


def markdown_table(out: dict, rows: list[Row]) -> str:
  """The paper's layout: one line per row; the task's metrics and seconds for each w."""
  by = {(r["stage"], r["sampler"], r["steps"], r["w"]): r for r in out["rows"]}
  columns = [tuple(c) for c in out["columns"]] + [("seconds", "s", ".2f")]
  head = ["Method", "Stage", "Sampler", "N", "NFE"]
  for w in out["w"]:
    head += [f"w={w:g} {h}" for _, h, _ in columns]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [row.method, row.stage, row.sampler, str(row.steps), str(row.nfe)]
    for w in out["w"]:
      r = by[(row.stage, row.sampler, row.steps, w)]
      cells += [_cell(r[k], f) for k, _, f in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_results(out: dict, rows: list[Row], eval_dir: str, tensorboard: bool = True) -> None:
  """results.json / .csv / .md, the two plots and the TensorBoard scalars and table."""
  paths.write_json_atomic(paths.join(eval_dir, "results.json"), out)
  metric_keys = sorted({k for r in out["rows"] for k in r} - set(_ROW_KEYS))
  fields = list(_ROW_KEYS) + metric_keys
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(out["rows"])
  paths.write_text_atomic(paths.join(eval_dir, "results.csv"), buf.getvalue())
  md = markdown_table(out, rows)
  paths.write_text_atomic(
      paths.join(eval_dir, "results.md"),
      f"# Evaluation of {out['workdir']}\n\n{out['description']} Seed {out['seed']}; "
      f"N0 = {out['n0']}. NFE: 2 N for the guided teacher, N for students. s: sampling "
      "wall-clock seconds, compilation excluded.\n\n" + md)
  _plots(out, rows, eval_dir)
  if tensorboard:
    _tensorboard(out, rows, md, paths.join(eval_dir, "tensorboard"))


_ROW_KEYS = ("stage", "method", "sampler", "steps", "nfe", "w", "seconds", "images_per_second")


def _plots(out: dict, rows: list[Row], eval_dir: str) -> None:
  """<x>_vs_<y>.png: the trade-off over w at each N (FID vs IS; adherence vs diversity), and
  <quality>_vs_nfe.png: the quality metric against NFE, one curve per family, per w."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  by = {(r["stage"], r["sampler"], r["steps"], r["w"]): r for r in out["rows"]}
  header = {k: h for k, h, _ in out["columns"]}
  (xk, yk), q = out["tradeoff"], out["quality"]
  ws, steps = out["w"], sorted({r.steps for r in rows})
  fig, axes = plt.subplots(1, len(steps), figsize=(4 * len(steps), 3.6), squeeze=False)
  for ax, n in zip(axes[0], steps):
    for row in (r for r in rows if r.steps == n):
      pts = [by[(row.stage, row.sampler, n, w)] for w in ws]
      ax.plot([p[xk] for p in pts], [p[yk] for p in pts], marker="o",
              label=f"{row.stage} {row.sampler} ({row.nfe} NFE)")
      for w, p in zip(ws, pts):
        ax.annotate(f"w={w:g}", (p[xk], p[yk]), fontsize=6)
    ax.set(title=f"N = {n}", xlabel=header[xk], ylabel=header[yk])
    ax.legend(fontsize=6)
  fig.suptitle(f"{header[yk]} vs {header[xk]} across w")
  fig.tight_layout()
  paths.save_figure(fig, paths.join(eval_dir, f"{yk}_vs_{xk}.png"), dpi=90)
  plt.close(fig)
  fig, axes = plt.subplots(1, len(ws), figsize=(4 * len(ws), 3.6), squeeze=False)
  for ax, w in zip(axes[0], ws):
    for fam in dict.fromkeys(r.family for r in rows):
      pts = sorted((r.nfe, by[(r.stage, r.sampler, r.steps, w)][q])
                   for r in rows if r.family == fam)
      ax.plot(*zip(*pts), marker="o", label=fam)
    ax.set_xscale("log", base=2)
    ax.set(title=f"w = {w:g}", xlabel="NFE", ylabel=header[q])
    ax.legend(fontsize=7)
  fig.suptitle(f"{header[q]} vs NFE")
  fig.tight_layout()
  paths.save_figure(fig, paths.join(eval_dir, f"{q}_vs_nfe.png"), dpi=90)
  plt.close(fig)


def _tensorboard(out: dict, rows: list[Row], md: str, logdir: str) -> None:
  """Scalars '<metric>/w=<w>/<family>' at step = NFE (curves over NFE), and the table."""
  from clu import metric_writers  # imports TensorFlow: only where we write
  writer = metric_writers.create_default_writer(logdir, just_logging=False, asynchronous=False)
  fam = {(r.stage, r.sampler, r.steps): r.family for r in rows}
  keys = [k for k, _, _ in out["columns"]] + ["seconds"]
  for r in out["rows"]:
    tag = f"w={r['w']:g}/{fam[(r['stage'], r['sampler'], r['steps'])]}"
    writer.write_scalars(r["nfe"], {f"{k}/{tag}": r[k] for k in keys if r[k] is not None})
  writer.write_texts(0, {"eval/results": md})
  writer.flush()
  writer.close()


def _sample_resumable(model, cond, w, steps, sampler, seed, bs, *, partial: str,
                      decode: bool = True):
  """model.sample, preemptible: on SIGTERM the finished batches go to `partial` (process 0)
  and Preempted is raised; a rerun with the same request continues from there."""
  key = hashlib.sha256(json.dumps(
      [model.stage, model.metadata.get("created", ""), model.config.model.to_dict(), w, steps,
       sampler, seed, bs, decode], sort_keys=True, default=str).encode()
      + np.ascontiguousarray(cond).tobytes()).hexdigest()[:16]
  done = []
  if paths.exists(partial):
    z = paths.load_npz(partial)
    if str(z["key"]) == key:
      done = [z[f"b{i}"] for i in range(int(z["count"]))]
      if jax.process_index() == 0:
        print(f"[sample] resuming after {len(done)} finished batches ({partial})", flush=True)
  guard = preemption.Guard()
  for xb in model.sample_batches(cond, w=w, steps=steps, sampler=sampler, rng=seed,
                                batch_size=bs, start_batch=len(done), warn_w=False,
                                decode=decode):
    done.append(xb)
    if guard.should_stop(len(done)) and len(done) * bs < len(cond):
      if jax.process_index() == 0:
        paths.save_npz_atomic(partial, {"key": np.array(key), "count": np.int32(len(done)),
                                        **{f"b{k}": v for k, v in enumerate(done)}})
      raise preemption.Preempted(f"[sample] preempted after {len(done)} batches; saved to "
                                 f"{partial}. Rerun the same command to continue.")
  shape = model.image_shape if decode else model.example_shape
  return np.concatenate(done) if done else np.zeros((0,) + shape, np.float32)


def read_prompts(path: str, key: str = "sample.prompts_file",
                 use: str = "sample i uses prompt i mod P") -> list[str]:
  """The non-empty lines of a prompts file; ConfigError naming config.<key> otherwise."""
  if not path:
    raise config_lib.ConfigError(
        f"config.{key}='' is invalid for a text-to-image model: a text file with one prompt "
        f"per line ({use})")
  if not paths.exists(path):
    raise config_lib.ConfigError(f"config.{key}={path!r} is invalid: no such file (one "
                                 "prompt per line)")
  prompts = [l.strip() for l in paths.read_text(path).splitlines() if l.strip()]
  if not prompts:
    raise config_lib.ConfigError(f"config.{key}={path!r} is invalid: it holds no prompt (one "
                                 "per line)")
  return prompts


def _conditions(model, s) -> tuple[np.ndarray, dict]:
  """config.sample's conditions and what the .npz records of them."""
  n = int(s.num_samples)
  if model.text_conditioned:
    prompts = read_prompts(s.prompts_file)
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    return model.conditions(prompts=chosen), {"prompts": np.array(chosen, dtype=str)}
  nc = model.num_classes
  labels = (np.arange(n) % nc if s.labels is None
            else np.resize(np.asarray(s.labels, np.int32), n)).astype(np.int32)
  if labels.min() < 0 or labels.max() >= nc:
    raise config_lib.ConfigError(f"config.sample.labels={tuple(s.labels)!r} is invalid: the "
                                 f"model has {nc} classes (0..{nc - 1})")
  return labels, {"labels": labels}


def prompt_grid(png: str, images: np.ndarray, prompts: list[str], title: str) -> None:
  """One row per prompt (its samples along the row), the prompt as the row's title."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  order = list(dict.fromkeys(prompts))
  rows = [images[[i for i, p in enumerate(prompts) if p == q]][:12] for q in order[:16]]
  fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * max(len(r) for r in rows) + 1,
                                                 1.35 * len(rows)), squeeze=False)
  for ax, q, r in zip(axes[:, 0], order, rows):
    ax.imshow(np.concatenate(list(dashboard.to_uint8(r)), axis=1), interpolation="nearest")
    ax.set_title(q, fontsize=8, loc="left")
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  paths.save_figure(fig, png, dpi=100)
  plt.close(fig)


def sample_to_file(config, workdir: str) -> dict:
  """--mode=sample: config.sample's samples to an .npz (+ a PNG grid beside it).

  Class models sample labels (config.sample.labels, or i % num_classes); text models the
  prompts of config.sample.prompts_file (sample i: prompt i mod P), decoded by the autoencoder
  (config.sample.latents_out keeps the latents too). config.sample.out '' writes
  <workdir>/samples.npz; a relative path is taken from the current directory. With several
  processes the batches are split over every process's devices and process 0 writes the files.
  """
  workdir = paths.resolve(workdir)
  config_lib.resolve_paths(config)
  config_validation.validate(config, num_devices=jax.device_count(),
                             num_processes=jax.process_count())
  s = config.sample
  model = api.load(workdir, s.stage)
  primary = jax.process_index() == 0
  cond, recorded = _conditions(model, s)
  outside = model.w_outside_training(float(s.w))
  if outside and primary:
    print(f"[sample] warning: {outside}", flush=True)
  try:
    model.spec(s.sampler)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.sample.sampler={s.sampler!r} is invalid: {e}") from None
  n = len(cond)
  steps = int(s.steps) or model.default_steps
  bs = model.round_batch(min(int(s.batch_size), n))
  t0 = time.perf_counter()
  model.compile(s.sampler, bs)
  compile_s = time.perf_counter() - t0
  path = s.out or paths.join(workdir, "samples.npz")
  keep_latents = bool(s.latents_out) and model.latents is not None
  t0 = time.perf_counter()
  x = _sample_resumable(model, cond, float(s.w), steps, s.sampler, int(s.seed), bs,
                        partial=f"{path}.partial.npz", decode=not keep_latents)
  latents = None
  if keep_latents:
    latents, x = x, np.concatenate([model.decode(x[i:i + bs]) for i in range(0, n, bs)])
  seconds = time.perf_counter() - t0
  png = os.path.splitext(path)[0] + ".png"
  info = {"stage": model.stage, "w": float(s.w), "steps": steps, "sampler": s.sampler,
          "nfe": model.nfe(steps), "num_samples": n, "seconds": round(seconds, 4),
          "compile_seconds": round(compile_s, 3), "out": path, "png": png}
  if not primary:
    return info
  arrays = ({"images": dashboard.to_uint8(x)} if x.ndim == 4 else {"points": x})
  arrays.update(recorded, w=np.float32(s.w), steps=np.int32(steps),
                nfe=np.int32(info["nfe"]), stage=np.array(model.stage))
  paths.save_npz_atomic(path, arrays)
  if latents is not None:
    paths.save_npz_atomic(s.latents_out, {"latents": latents, **recorded})
    info["latents_out"] = s.latents_out
  paths.remove(f"{path}.partial.npz")
  title = f"{model.stage} {s.sampler} N={steps} w={float(s.w):g}"
  if "prompts" in recorded:
    prompt_grid(png, x, [str(p) for p in recorded["prompts"]], title)
  elif x.ndim == 4:
    cols = min(n, model.num_classes)
    grid = dashboard.image_grid(arrays["images"], -(-n // cols))
    dashboard.save_png(png, grid, scale=4 if grid.shape[0] < 200 else 1)
  else:
    dashboard.scatter_png(png, x, recorded["labels"], title)
  print(f"[sample] {title}: {n} samples, {info['nfe']} NFE each, {seconds:.2f} s sampling "
        f"({n / max(seconds, 1e-9):.1f} samples/s; compile {compile_s:.1f} s) -> {path}, {png}",
        flush=True)
  return info
