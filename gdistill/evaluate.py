"""--mode=sample (samples to an .npz) and --mode=evaluate (the paper's sweep of a workdir).

evaluate_workdir(config, workdir) evaluates the finished exports of a workdir (PAPER.md,
"Evaluation protocol"); one row per model and sampler, in this order:
  teacher        guided DDIM at N0 = config.progressive.start_steps (2 N0 NFE)
  teacher        guided DDIM at each N of eval.steps (2 N NFE): what distillation buys
  guided         the stage-one student at N0, DDIM (N0 NFE)
  progressive_N  each student at its own N, for N in eval.steps, with every eval.samplers
and for each w of eval.w: FID against the real training set (features of a small classifier
trained once on it for digits/toy2d, of the FID Inception for cifar10/imagenet64), IS, class
accuracy (the classifier predicts the asked label; classifier datasets only), NFE and sampling
wall-clock (compilation excluded). Every row samples the same labels (i % num_classes) from the
same seed (eval.seed). Writes <workdir>/eval/: results.{json,csv,md}, fid_vs_is.png,
fid_vs_nfe.png, tensorboard/, and the cached classifier.npz and reference_stats.npz.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Callable

import jax
import numpy as np

from gdistill import api, config_lib, dashboard, data, distributed, metrics, paths, preemption
from gdistill import checkpoint as ckpt_lib

CLASSIFIER_DATASETS = ("digits", "toy2d")


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


@dataclasses.dataclass
class Scorer:
  """features_fn(samples) -> (features, logits); (mu, sigma) of the training set.

  With several processes each one computes the features of its share of the samples
  (distributed.process_rows) and the shares are gathered: nothing is computed twice.
  """
  feature: str  # 'classifier' | 'inception'
  features_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  mu: np.ndarray
  sigma: np.ndarray

  def __call__(self, x: np.ndarray, labels: np.ndarray) -> dict:
    if x.ndim == 4:
      x = dashboard.to_uint8(x)  # score what a saved image holds, like the uint8 references
    rows = distributed.process_rows(len(x))
    feats, logits = self.features_fn(x[rows])
    feats = distributed.allgather_rows(np.asarray(feats), len(x))
    logits = distributed.allgather_rows(np.asarray(logits), len(x))
    fid = metrics.frechet_distance(*metrics.feature_stats(feats), self.mu, self.sigma)
    acc = (float(np.mean(np.argmax(logits, -1) == labels))
           if self.feature == "classifier" else None)
    return {"fid": fid, "is": metrics.inception_score(logits, from_logits=True), "accuracy": acc}


def make_scorer(config, eval_dir: str) -> Scorer:
  """The feature extractor and reference stats (cached in eval_dir; with several processes
  process 0 computes them and the others read its files). For Inception datasets the weights
  are loaded first, so a missing file fails before anything is sampled."""
  ref_path = paths.join(eval_dir, "reference_stats.npz")
  if config.data.name in CLASSIFIER_DATASETS:
    x, y = data.load_array(config.data, "train")
    train_it = lambda: metrics.get_or_train_classifier(
        paths.join(eval_dir, "classifier.npz"), x, y, int(config.model.num_classes),
        steps=int(config.eval.classifier_steps), seed=int(config.seed))
    state = _process0_first("classifier", train_it)
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state.params):
      digest.update(np.ascontiguousarray(leaf).tobytes())
    fn = lambda s: metrics.classifier_features(state, s)
    key, feature = f"classifier:{digest.hexdigest()[:16]}", "classifier"
  else:
    try:
      params = metrics.load_inception_params(config.eval.inception_weights)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e} Set --config.eval.inception_weights=PATH.") from None
    fn = lambda s: metrics.inception_features(params, s)
    x, key, feature = None, f"inception:{config.data.name}:train", "inception"
  mu, sigma = _process0_first("reference_stats", lambda: metrics.reference_stats(
      ref_path, lambda: fn(x if x is not None else data.load_array(config.data, "train")[0])[0],
      key=key))
  return Scorer(feature, fn, mu, sigma)


def _process0_first(name: str, compute_or_load: Callable):
  """Runs compute_or_load on process 0 (which computes and caches), then on the others (which
  find the cache): one computation for all processes."""
  out = compute_or_load() if jax.process_index() == 0 else None
  distributed.sync(f"eval:{name}")
  return out if out is not None else compute_or_load()


def evaluate_workdir(config, workdir: str) -> dict:
  """Runs the sweep over workdir's exports and writes <workdir>/eval/; returns results.json.

  Relative paths (workdir, config path keys) are taken from the current directory.
  """
  t_start = time.perf_counter()
  workdir = paths.resolve(workdir)
  config_lib.resolve_paths(config)
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
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
  scorer = make_scorer(config, eval_dir)
  e, ws = config.eval, [float(w) for w in config.eval.w]
  labels = np.arange(int(e.num_samples)) % int(config.model.num_classes)
  rng = jax.random.key(int(e.seed))
  results, compile_s, model = [], {}, None
  progress_path = paths.join(eval_dir, "progress.json")
  key = _sweep_key(config, workdir, stages)
  cached = _load_progress(progress_path, key)
  guard = preemption.Guard()
  setup_s = time.perf_counter() - t_start
  total = len(rows) * len(ws)
  say = (lambda msg: print(f"[evaluate] {msg}", flush=True)) if primary else (lambda msg: None)
  say(f"{len(rows)} rows x {len(ws)} w = {total} results, {len(labels)} samples each "
      f"(set-up {setup_s:.1f} s)")
  for row in rows:
    hits = [cached.get(_row_key(row, w)) for w in ws]
    if all(hits):  # finished before an interruption: same models, same request
      results += hits
      continue
    if model is None or model.stage != row.stage:
      model = None  # frees the previous stage's parameters first
      model = api.load(workdir, row.stage)
    bs = model.round_batch(min(int(e.batch_size), len(labels)))
    ckey = f"{'teacher' if model.is_teacher else 'student'}/{row.sampler}/{bs}"
    if ckey not in compile_s:
      t0 = time.perf_counter()
      model.compile(row.sampler, bs)
      compile_s[ckey] = round(time.perf_counter() - t0, 3)
    for w in ws:
      t0 = time.perf_counter()
      x = model.sample(labels, w=w, steps=row.steps, sampler=row.sampler, rng=rng, batch_size=bs)
      seconds = time.perf_counter() - t0
      scores = scorer(x, labels)
      results.append({**dataclasses.asdict(row), "nfe": row.nfe, "w": w, **scores,
                      "seconds": round(seconds, 4),
                      "images_per_second": round(len(labels) / max(seconds, 1e-9), 2)})
      say(f"{len(results)}/{total} {row.stage} {row.sampler} N={row.steps} ({row.nfe} NFE) "
          f"w={w:g}: FID {scores['fid']:.2f}, sampling {seconds:.2f} s")
    if primary:
      paths.write_json_atomic(progress_path, {"key": key, "rows": results})
    if guard.should_stop(len(results)) and len(results) < total:
      raise preemption.Preempted(
          f"[evaluate] preempted after {len(results)} of {total} results; "
          f"saved in {progress_path}. Rerun the same command to continue.")
  out = {"workdir": workdir, "feature": scorer.feature, "num_samples": len(labels),
         "batch_size": int(e.batch_size), "seed": int(e.seed),
         "n0": int(config.progressive.start_steps), "w": ws, "steps": [int(n) for n in e.steps],
         "samplers": list(e.samplers), "teacher_samplers": list(e.teacher_samplers),
         "stages": stages, "rows": results, "compile_seconds": compile_s,
         "setup_seconds": round(setup_s, 3),
         "total_seconds": round(time.perf_counter() - t_start, 3)}
  if primary:
    write_results(out, rows, eval_dir, tensorboard=bool(config.log.tensorboard))
    say(f"{len(rows)} rows x {len(ws)} w in {out['total_seconds']:.1f} s -> "
        f"{paths.join(eval_dir, 'results.md')}")
    print(markdown_table(out, rows), end="", flush=True)
  return out


def _sweep_key(config, workdir: str, stages: list[str]) -> str:
  """What the sweep's results depend on: the eval settings, the data and each export."""
  exports = {st: str(ckpt_lib.load_export_metadata(api.export_dir(workdir, st)).get("created"))
             for st in stages}
  blob = json.dumps([config.eval.to_dict(), config.data.to_dict(), int(config.seed),
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
  """The paper's layout: one line per row; FID / IS / accuracy / seconds for each w."""
  by = {(r["stage"], r["sampler"], r["steps"], r["w"]): r for r in out["rows"]}
  head = ["Method", "Stage", "Sampler", "N", "NFE"]
  for w in out["w"]:
    head += [f"w={w:g} FID", f"w={w:g} IS", f"w={w:g} Acc", f"w={w:g} s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [row.method, row.stage, row.sampler, str(row.steps), str(row.nfe)]
    for w in out["w"]:
      r = by[(row.stage, row.sampler, row.steps, w)]
      cells += [_cell(r["fid"], ".2f"), _cell(r["is"], ".2f"), _cell(r["accuracy"], ".3f"),
                _cell(r["seconds"], ".2f")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_results(out: dict, rows: list[Row], eval_dir: str, tensorboard: bool = True) -> None:
  """results.json / .csv / .md, the two plots and the TensorBoard scalars and table."""
  paths.write_json_atomic(paths.join(eval_dir, "results.json"), out)
  fields = ["stage", "method", "sampler", "steps", "nfe", "w", "fid", "is", "accuracy",
            "seconds", "images_per_second"]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(out["rows"])
  paths.write_text_atomic(paths.join(eval_dir, "results.csv"), buf.getvalue())
  md = markdown_table(out, rows)
  paths.write_text_atomic(
      paths.join(eval_dir, "results.md"),
      f"# Evaluation of {out['workdir']}\n\n{out['num_samples']} samples per row and w "
      f"(labels i % num_classes, seed {out['seed']}); FID and IS from {out['feature']} "
      f"features against the training set; N0 = {out['n0']}. NFE: 2 N for the guided "
      "teacher, N for students. s: sampling wall-clock seconds, compilation excluded.\n\n"
      + md)
  _plots(out, rows, eval_dir)
  if tensorboard:
    _tensorboard(out, rows, md, paths.join(eval_dir, "tensorboard"))


def _plots(out: dict, rows: list[Row], eval_dir: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  by = {(r["stage"], r["sampler"], r["steps"], r["w"]): r for r in out["rows"]}
  ws, steps = out["w"], sorted({r.steps for r in rows})
  fig, axes = plt.subplots(1, len(steps), figsize=(4 * len(steps), 3.6), squeeze=False)
  for ax, n in zip(axes[0], steps):
    for row in (r for r in rows if r.steps == n):
      pts = [by[(row.stage, row.sampler, n, w)] for w in ws]
      ax.plot([p["is"] for p in pts], [p["fid"] for p in pts], marker="o",
              label=f"{row.stage} {row.sampler} ({row.nfe} NFE)")
      for w, p in zip(ws, pts):
        ax.annotate(f"w={w:g}", (p["is"], p["fid"]), fontsize=6)
    ax.set(title=f"N = {n}", xlabel="IS", ylabel="FID")
    ax.legend(fontsize=6)
  fig.suptitle("FID vs IS across w")
  fig.tight_layout()
  paths.save_figure(fig, paths.join(eval_dir, "fid_vs_is.png"), dpi=90)
  plt.close(fig)
  fig, axes = plt.subplots(1, len(ws), figsize=(4 * len(ws), 3.6), squeeze=False)
  for ax, w in zip(axes[0], ws):
    for fam in dict.fromkeys(r.family for r in rows):
      pts = sorted((r.nfe, by[(r.stage, r.sampler, r.steps, w)]["fid"])
                   for r in rows if r.family == fam)
      ax.plot(*zip(*pts), marker="o", label=fam)
    ax.set_xscale("log", base=2)
    ax.set(title=f"w = {w:g}", xlabel="NFE", ylabel="FID")
    ax.legend(fontsize=7)
  fig.suptitle("FID vs NFE")
  fig.tight_layout()
  paths.save_figure(fig, paths.join(eval_dir, "fid_vs_nfe.png"), dpi=90)
  plt.close(fig)


def _tensorboard(out: dict, rows: list[Row], md: str, logdir: str) -> None:
  """Scalars '<metric>/w=<w>/<family>' at step = NFE (curves over NFE), and the table."""
  from clu import metric_writers  # imports TensorFlow: only where we write
  writer = metric_writers.create_default_writer(logdir, just_logging=False, asynchronous=False)
  fam = {(r.stage, r.sampler, r.steps): r.family for r in rows}
  for r in out["rows"]:
    tag = f"w={r['w']:g}/{fam[(r['stage'], r['sampler'], r['steps'])]}"
    writer.write_scalars(r["nfe"], {f"{k}/{tag}": r[k] for k in ("fid", "is", "accuracy",
                                                                  "seconds") if r[k] is not None})
  writer.write_texts(0, {"eval/results": md})
  writer.flush()
  writer.close()


def _sample_resumable(model, labels, w, steps, sampler, seed, bs, *, partial: str):
  """model.sample, preemptible: on SIGTERM the finished batches go to `partial` (process 0)
  and Preempted is raised; a rerun with the same request continues from there."""
  key = hashlib.sha256(json.dumps(
      [model.stage, model.metadata.get("created", ""), model.config.model.to_dict(), w, steps,
       sampler, seed, bs], sort_keys=True, default=str).encode()
      + np.ascontiguousarray(labels).tobytes()).hexdigest()[:16]
  done = []
  if paths.exists(partial):
    z = paths.load_npz(partial)
    if str(z["key"]) == key:
      done = [z[f"b{i}"] for i in range(int(z["count"]))]
      if jax.process_index() == 0:
        print(f"[sample] resuming after {len(done)} finished batches ({partial})", flush=True)
  guard = preemption.Guard()
  for xb in model.sample_batches(labels, w=w, steps=steps, sampler=sampler, rng=seed,
                                batch_size=bs, start_batch=len(done), warn_w=False):
    done.append(xb)
    if guard.should_stop(len(done)) and len(done) * bs < len(labels):
      if jax.process_index() == 0:
        paths.save_npz_atomic(partial, {"key": np.array(key), "count": np.int32(len(done)),
                                        **{f"b{k}": v for k, v in enumerate(done)}})
      raise preemption.Preempted(f"[sample] preempted after {len(done)} batches; saved to "
                                 f"{partial}. Rerun the same command to continue.")
  return np.concatenate(done) if done else np.zeros((0,) + model.example_shape, np.float32)


def sample_to_file(config, workdir: str) -> dict:
  """--mode=sample: config.sample's samples to an .npz (+ a PNG grid beside it).

  config.sample.out '' writes <workdir>/samples.npz; a relative path is taken from the current
  directory. With several processes the batches are split over every process's devices and
  process 0 writes the files.
  """
  workdir = paths.resolve(workdir)
  config_lib.resolve_paths(config)
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  s = config.sample
  model = api.load(workdir, s.stage)
  primary = jax.process_index() == 0
  outside = model.w_outside_training(float(s.w))
  if outside and primary:
    print(f"[sample] warning: {outside}", flush=True)
  n, nc = int(s.num_samples), model.num_classes
  labels = (np.arange(n) % nc if s.labels is None
            else np.resize(np.asarray(s.labels, np.int32), n)).astype(np.int32)
  if labels.min() < 0 or labels.max() >= nc:
    raise config_lib.ConfigError(f"config.sample.labels={tuple(s.labels)!r} is invalid: the "
                                 f"model has {nc} classes (0..{nc - 1})")
  try:
    model.spec(s.sampler)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.sample.sampler={s.sampler!r} is invalid: {e}") from None
  steps = int(s.steps) or model.default_steps
  bs = model.round_batch(min(int(s.batch_size), n))
  t0 = time.perf_counter()
  model.compile(s.sampler, bs)
  compile_s = time.perf_counter() - t0
  path = s.out or paths.join(workdir, "samples.npz")
  t0 = time.perf_counter()
  x = _sample_resumable(model, labels, float(s.w), steps, s.sampler, int(s.seed), bs,
                        partial=f"{path}.partial.npz")
  seconds = time.perf_counter() - t0
  png = os.path.splitext(path)[0] + ".png"
  info = {"stage": model.stage, "w": float(s.w), "steps": steps, "sampler": s.sampler,
          "nfe": model.nfe(steps), "num_samples": n, "seconds": round(seconds, 4),
          "compile_seconds": round(compile_s, 3), "out": path, "png": png}
  if not primary:
    return info
  arrays = ({"images": dashboard.to_uint8(x)} if x.ndim == 4 else {"points": x})
  arrays.update(labels=labels, w=np.float32(s.w), steps=np.int32(steps),
                nfe=np.int32(info["nfe"]), stage=np.array(model.stage))
  paths.save_npz_atomic(path, arrays)
  paths.remove(f"{path}.partial.npz")
  title = f"{model.stage} {s.sampler} N={steps} w={float(s.w):g}"
  if x.ndim == 4:
    cols = min(n, nc)
    grid = dashboard.image_grid(arrays["images"], -(-n // cols))
    dashboard.save_png(png, grid, scale=4 if grid.shape[0] < 200 else 1)
  else:
    dashboard.scatter_png(png, x, labels, title)
  print(f"[sample] {title}: {n} samples, {info['nfe']} NFE each, {seconds:.2f} s sampling "
        f"({n / max(seconds, 1e-9):.1f} samples/s; compile {compile_s:.1f} s) -> {path}, {png}",
        flush=True)
  return info
