"""The one training loop (every stage) and the driver that walks the plan.

run_stage(config, workdir, stage, mesh) trains one stage of the plan to its export:
  sharded init (or strict resume from the latest usable checkpoint), a jitted step with
  explicit in/out shardings and donation, periodic async checkpoints, dashboards, sample grids,
  and finally the export (EMA parameters when EMA is on) with lineage metadata.
train_and_evaluate(config, workdir) validates the config, builds the mesh and walks the plan,
skipping finished stages and resuming the unfinished one at its last committed step.
"""
from __future__ import annotations

import dataclasses
import os
import time
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdistill import checkpoint as ckpt_lib
from gdistill import config_lib, data, dashboard, lineage, losses, optim, paths, sharding
from gdistill import sampling
from gdistill import preemption
from gdistill.denoiser import Denoiser, build_denoiser, student_params_from_teacher
from gdistill.plan import Stage, make_plan


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def example_shape(config) -> tuple[int, ...]:
  m = config.model
  return (m.image_size, m.image_size, m.channels) if m.name == "unet" else (m.channels,)


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def export_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name, "export")


def is_finished(workdir: str, name: str) -> bool:
  return paths.exists(os.path.join(export_dir(workdir, name), "metadata.json"))


def stage_seed(config, stage: Stage) -> int:
  return (int(config.seed) * 1_000_003 + zlib.crc32(stage.name.encode())) % (2 ** 31)


def student_denoiser(config, stage: Stage) -> Denoiser:
  return build_denoiser(config.model, w_embedding=stage.w_conditioned,
                        dropout=config[stage.section].dropout)


def teacher_denoiser(config, stage: Stage) -> Optional[Denoiser]:
  """The frozen model a stage distils: the plain teacher for 'guided', the previous round's
  w-conditioned model for 'progressive'; None for the teacher stage."""
  if stage.kind == "teacher":
    return None
  return build_denoiser(config.model, w_embedding=stage.kind == "progressive", dropout=0.0)


def parent_path(config, workdir: str, stage: Stage) -> Optional[str]:
  if stage.kind == "teacher":
    return None
  if stage.parent is None:
    if not config.init_from:
      raise config_lib.ConfigError(
          f"stage {stage.name} needs a parent export: set --config.init_from=PATH (an export "
          "dir with metadata.json) or run config.stage=pipeline")
    return config.init_from
  return export_dir(workdir, stage.parent)


def abstract_params(den: Denoiser, config, mesh):
  """(unboxed ShapeDtypeStructs with shardings, shardings, boxed abstract)."""
  boxed = den.init_abstract(example_shape(config))
  shard = sharding.logical_shardings(boxed, mesh, config.logical_axis_rules)
  return sharding.with_shardings(nn.unbox(boxed), shard), shard, boxed


@dataclasses.dataclass
class StageSetup:
  """Everything run_stage builds before its first step."""
  student: Denoiser
  teacher: Optional[Denoiser]
  teacher_params: Any
  parent_meta: Optional[dict]
  parent_path: Optional[str]
  optimizer: optax.GradientTransformation
  state_shardings: dict
  abstract_state: dict
  teacher_shardings: Any


def setup_stage(config, workdir: str, stage: Stage, mesh, *,
                abstract_parent: bool = False) -> StageSetup:
  """Models, parent (checked and loaded), optimizer and the sharded abstract state.

  abstract_parent: the parent's parameters as sharded ShapeDtypeStructs and no file read
  (--mode=compile lowers the step without any export).
  """
  section = config[stage.section]
  student = student_denoiser(config, stage)
  teacher = teacher_denoiser(config, stage)
  ppath = None if abstract_parent else parent_path(config, workdir, stage)
  teacher_params = parent_meta = t_shard = None
  if abstract_parent and teacher is not None:
    teacher_params, t_shard, _ = abstract_params(teacher, config, mesh)
  if ppath is not None:
    parent_meta = ckpt_lib.load_export_metadata(ppath)
    lineage.check_parent(stage, config, parent_meta, ppath)
    t_abs, t_shard, _ = abstract_params(teacher, config, mesh)
    teacher_params, _ = ckpt_lib.load_export(ppath, t_abs)
  optimizer = optim.make_optimizer(section)
  p_abs, p_shard, boxed = abstract_params(student, config, mesh)
  opt_boxed = jax.eval_shape(optimizer.init, boxed)
  opt_shard = sharding.logical_shardings(opt_boxed, mesh, config.logical_axis_rules)
  opt_abs = sharding.with_shardings(nn.unbox(opt_boxed), opt_shard)
  rep = sharding.replicated(mesh)
  shardings = {"step": rep, "skipped": rep, "params": p_shard, "opt_state": opt_shard}
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  abstract = {"step": scalar, "skipped": scalar, "params": p_abs, "opt_state": opt_abs}
  if section.ema_decay > 0:
    shardings["ema"], abstract["ema"] = p_shard, p_abs
  return StageSetup(student, teacher, teacher_params, parent_meta, ppath, optimizer,
                    shardings, abstract, t_shard)


def init_state(config, stage: Stage, s: StageSetup):
  """Fresh sharded state: the teacher from random init, students from their parent."""
  shape = example_shape(config)
  use_ema = "ema" in s.state_shardings

  def init(rng, teacher_params):
    p = nn.unbox(s.student.init_fn(shape)(rng))
    if stage.kind == "guided":
      p = student_params_from_teacher(teacher_params, p)
    elif stage.kind == "progressive":
      p = jax.tree.map(lambda t, q: t.astype(q.dtype), teacher_params, p)
    state = {"step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32), "params": p,
             "opt_state": s.optimizer.init(p)}
    if use_ema:
      state["ema"] = p
    return state

  rng = jax.random.key(stage_seed(config, stage))
  return jax.jit(init, out_shardings=s.state_shardings)(rng, s.teacher_params)


def make_train_step(loss_fn: Callable, s: StageSetup, section, mesh):
  """Jitted (state, teacher_params, batch) -> (state, metrics); donates the state.

  The stage's seed and the student's step count travel in the batch (replicated scalars), so
  every progressive round lowers to the same program and reuses one compilation.
  """
  ema_decay = float(section.ema_decay)
  schedule = optim.lr_schedule(section)

  def step_fn(state, teacher_params, batch):
    rng = jax.random.fold_in(jax.random.key(batch["seed"]), state["step"])
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], teacher_params, batch, rng)
    gnorm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, opt_state = s.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"step": state["step"] + 1,
           "skipped": state["skipped"] + (~finite).astype(jnp.int32),
           "params": optim.tree_where(finite, params, state["params"]),
           "opt_state": optim.tree_where(finite, opt_state, state["opt_state"])}
    if "ema" in state:
      new["ema"] = optim.tree_where(finite, optim.ema_update(
          state["ema"], params, optim.ema_decay_at(state["step"], ema_decay)),
                                    state["ema"])
    metrics = {"loss": loss, "grad_norm": gnorm, "lr": schedule(state["step"]),
               "nonfinite": (~finite).astype(jnp.int32), "skipped_total": new["skipped"], **aux}
    return new, metrics

  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(step_fn,
                 in_shardings=(s.state_shardings, s.teacher_shardings,
                               {"x": batch_sh, "label": batch_sh,
                                "student_steps": sharding.replicated(mesh),
                                "seed": sharding.replicated(mesh)}),
                 out_shardings=(s.state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def batch_finisher(mesh) -> Callable[[dict], dict]:
  """global batch -> the float32 batch the train step takes: data.finish_batch jitted with the
  batch sharding for uint8 batches (config.data.normalize_on_device); float batches pass
  through untouched (and do not compile anything)."""
  finish = jax.jit(data.finish_batch, out_shardings=sharding.batch_sharding(mesh))
  return lambda batch: finish(batch) if data.needs_finish(batch) else batch


def step_scalars(mesh, student_steps: int, seed: int) -> dict:
  """The replicated scalars every train step takes beside the examples."""
  rep = sharding.replicated(mesh)
  return {"student_steps": jax.device_put(np.int32(student_steps), rep),
          "seed": jax.device_put(np.int32(seed), rep)}


def _grid(config, stage: Stage, params, sampler_fn) -> tuple[dict, np.ndarray]:
  """Samples one row per w (classes along the row) with the stage's model."""
  nc, ws = config.model.num_classes, tuple(config.log.sample_w)
  per = int(config.log.samples_per_class)
  labels = np.tile(np.repeat(np.arange(nc), per), len(ws)).astype(np.int32)
  w = np.repeat(np.asarray(ws, np.float32), nc * per)
  steps = stage.student_steps or int(config.log.sample_steps or config.progressive.start_steps)
  x = sampler_fn(params, jax.random.key(1234), jnp.asarray(labels), jnp.asarray(w),
                 jnp.int32(steps))
  return {"labels": labels, "w": w, "steps": steps}, np.asarray(jax.device_get(x))


def write_grid(config, stage: Stage, params, sampler_fn, step: int,
               dash: dashboard.Dashboard, workdir: str) -> str:
  info, x = _grid(config, stage, params, sampler_fn)
  path = os.path.join(stage_dir(workdir, stage.name), "samples", f"step_{step:07d}.png")
  if jax.process_index() != 0:
    return path
  rows = len(config.log.sample_w)
  if x.ndim == 4:
    grid = dashboard.image_grid(dashboard.to_uint8(x), rows)
    dashboard.save_png(path, grid, scale=4 if grid.shape[0] < 200 else 1)
  else:
    grid = dashboard.scatter_png(path, x, info["labels"],
                                 f"{stage.name} step {step}: w={tuple(config.log.sample_w)}")
  dash.images(step, {f"samples/{stage.name}": grid[None]})
  return path


def grid_sampler(config, stage: Stage, s: StageSetup):
  clip = (-1.0, 1.0) if config.diffusion.clip_x else None
  spec = sampling.SamplerSpec("ddim", guided=stage.kind == "teacher", clip=clip,
                              logsnr_min=config.diffusion.logsnr_min,
                              logsnr_max=config.diffusion.logsnr_max)
  return sampling.make_sampler(s.student, spec, example_shape(config))


def throughput_fn(config, stage: Stage, mesh) -> Callable[[float], dict]:
  """images/s -> model TFLOP/s per device and MFU (gdistill/flops.py: analytic FLOPs of the
  stage's step; the device's data-sheet peak, on CPU a measured matmul ceiling)."""
  from gdistill import flops
  per_example = flops.step_flops_per_example(config, stage.kind)
  peak = flops.peak_flops_per_device(config.model.dtype)
  n = int(mesh.devices.size)
  return lambda images_per_sec: flops.throughput_metrics(
      images_per_sec, flops_per_example=per_example, num_devices=n, peak=peak)


def run_stage(config, workdir: str, stage: Stage, mesh, programs: Optional[dict] = None) -> dict:
  """Trains one stage to its export (resuming if it has checkpoints); returns its metadata.

  programs: a dict shared across the stages of one plan; stages of the same kind (the
  progressive rounds) reuse the jitted train step and grid sampler stored there instead of
  tracing them again.
  """
  edir = export_dir(workdir, stage.name)
  if is_finished(workdir, stage.name):
    meta = ckpt_lib.load_export_metadata(edir)
    if jax.process_index() == 0:
      print(f"[{stage.name}] finished earlier ({meta['train_steps']} steps): {edir}", flush=True)
    return meta
  section = config[stage.section]
  total = int(section.num_steps)
  t_start = time.time()
  t_first = None
  s = setup_stage(config, workdir, stage, mesh)
  sdir = stage_dir(workdir, stage.name)
  ck = ckpt_lib.StageCheckpointer(os.path.join(sdir, "checkpoints"),
                                  keep=int(config.checkpoint.keep),
                                  async_save=bool(config.checkpoint.async_save))
  latest = ck.latest_extra()
  changes = [] if latest is None else lineage.check_resume(latest[1].get("hparams"), config,
                                                           stage, latest[0])
  restored = ck.restore_latest_usable(s.abstract_state)
  if restored is None:
    start, state = 0, init_state(config, stage, s)
  else:
    start, state, _ = restored
  seed = stage_seed(config, stage)
  extra = {"stage": stage.name, "seed": seed, "config_hash": config_lib.config_hash(config),
           "hparams": lineage.resume_record(config, stage)}
  scalars = step_scalars(mesh, stage.student_steps or 0, seed)
  programs = {} if programs is None else programs
  key = (stage.kind, stage.section)
  if key not in programs:
    loss_fn = losses.make_loss(stage.kind, student=s.student, teacher=s.teacher,
                               dcfg=config.diffusion)
    programs[key] = (make_train_step(loss_fn, s, section, mesh),
                     grid_sampler(config, stage, s))
  step_fn, sampler_fn = programs[key]
  dash = dashboard.Dashboard(sdir, stage.name, total, int(section.batch_size), start,
                             throughput_fn=throughput_fn(config, stage, mesh),
                             tensorboard=bool(config.log.tensorboard))
  if jax.process_index() == 0:
    what = "resuming at step %d" % start if start else "starting"
    print(f"[{stage.name}] {what}; {total} steps, batch {section.batch_size}, "
          f"parent {s.parent_path or '-'}", flush=True)
    if start and changes:
      print(f"[{stage.name}] resuming with changed hyperparameters (config.allow_changes): "
            + "; ".join(changes), flush=True)
  log_every = max(int(config.log.every_steps), 1)
  ckpt_every = max(int(config.checkpoint.every_steps), 1)
  sample_every = int(config.log.sample_every_steps)
  max_bad = int(section.max_nonfinite)
  bad_run, pending = 0, None
  guard = preemption.Guard()

  def drain(p):
    nonlocal bad_run
    pstep, metrics = p
    m = jax.device_get(metrics)
    bad_run = bad_run + 1 if int(m["nonfinite"]) else 0
    if bad_run >= max_bad:
      ck.wait()
      raise NonFiniteError(
          f"[{stage.name}] {bad_run} consecutive steps (up to {pstep}) had a non-finite loss or "
          f"gradient; stopping. The last good checkpoint is kept in {ck.directory}; lower the "
          f"learning rate ({stage.section}.lr) or check the data.")
    if pstep % log_every == 0 or pstep == total:
      dash.scalars(pstep, m)

  step = start
  finish = batch_finisher(mesh)
  with data.make_loader(config.data, global_batch_size=int(section.batch_size), seed=seed,
                        start_step=start, process_index=jax.process_index(),
                        process_count=jax.process_count(),
                        host_normalize=not config.data.normalize_on_device) as loader:
    for step, local in loader:
      if step >= total:
        break
      batch = finish(sharding.global_batch_from_local(local, mesh, int(section.batch_size)))
      batch.update(scalars)
      state, metrics = step_fn(state, s.teacher_params, batch)
      if pending is not None:
        drain(pending)
      pending = (step + 1, metrics)
      done = step + 1
      if done == start + 1:
        jax.block_until_ready(metrics)      # first step includes compilation:
        t_first = time.time() - t_start
        dash.reset_clock(done)              # rates and ETA count from here
      if done % ckpt_every == 0 or done == total:
        ck.save(done, state, extra)
      if sample_every and done % sample_every == 0 and done != total:
        write_grid(config, stage, state.get("ema", state["params"]), sampler_fn, done,
                   dash, workdir)
      if guard.should_stop(done):
        drain(pending)
        if done % ckpt_every and done != total:
          ck.save(done, state, extra, force=True)
        ck.wait()
        ck.close()
        dash.close()
        raise preemption.Preempted(f"[{stage.name}] preempted at step {done}; checkpoint "
                                   "saved. Rerun the same command to resume.")
  if pending is not None:
    drain(pending)
  ck.wait()
  final = state.get("ema", state["params"])
  meta = lineage.export_metadata(config, stage, train_steps=total, parent=s.parent_meta,
                                 parent_path=s.parent_path)
  ckpt_lib.save_export(edir, final, meta)
  t_grid = time.time()
  png = write_grid(config, stage, final, sampler_fn, total, dash, workdir)
  t_grid = time.time() - t_grid
  ck.close()
  dash.close()
  if jax.process_index() == 0:
    first = "" if t_first is None else f"set-up and first step (compile) {t_first:.1f} s, "
    print(f"[{stage.name}] done in {time.time() - t_start:.1f} s ({first}sample grid "
          f"{t_grid:.1f} s): export {edir}; samples {png}", flush=True)
  return ckpt_lib.load_export_metadata(edir)


def prepare(config, workdir: str, devices=None):
  """Validation before any compile (config + dataset), the mesh and the saved config."""
  devices = list(devices if devices is not None else jax.devices())
  from gdistill import runtime
  runtime.configure_tensorflow(config.data)  # before the dashboards import TensorFlow
  info = data.dataset_info(config.data)
  config_lib.validate(config, num_devices=len(devices),
                      num_processes=jax.process_count(), dataset_info=info)
  mesh = sharding.make_mesh(config.mesh, devices)
  if jax.process_index() == 0:
    paths.write_text_atomic(os.path.join(workdir, "config.json"),
                            config.to_json_best_effort(indent=2, sort_keys=True))
  return mesh


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
  """Runs config.stage ('teacher' | 'guided' | 'progressive' | 'pipeline') in workdir.

  devices: the devices of the mesh (default: all of them). Relative paths (workdir and the
  config's path keys) are resolved against the current directory here (gdistill/paths.py).
  """
  workdir = paths.resolve(workdir)
  config_lib.resolve_paths(config)
  mesh = prepare(config, workdir, devices)
  plan = make_plan(config)
  results = {}
  t0 = time.time()
  programs = {}
  with jax.set_mesh(mesh):
    for stage in plan:
      results[stage.name] = run_stage(config, workdir, stage, mesh, programs)
  if jax.process_index() == 0:
    print(f"[pipeline] plan {[s.name for s in plan]} trained in "
          f"{(time.time() - t0) / 60:.1f} min",
          flush=True)
  if config.stage == "pipeline" and config.eval.enabled:
    from gdistill import evaluate
    results["eval"] = evaluate.evaluate_workdir(config, workdir)
    if jax.process_index() == 0:
      print(f"[pipeline] finished in {(time.time() - t0) / 60:.1f} min; table: "
            f"{os.path.join(workdir, 'eval', 'results.md')}", flush=True)
  return results
