"""The one training loop: every stage of the plan trains through run_stage.

run_stage(config, workdir, stage, mesh) trains one stage to its export: sharded init (or strict
resume from the latest usable checkpoint, refusing changed hyperparameters), a jitted step with
explicit in/out shardings and donation, periodic async checkpoints, dashboards, sample grids,
and finally the export (EMA parameters when EMA is on) with lineage metadata. What differs
between stage kinds is data and small functions chosen by kind (gdistill/stage_setup.py,
losses.py, previews.py), never a branch here. gdistill/driver.py walks the plan.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdistill import autoencoding, conditioning, config_lib, data, dashboard, lineage, losses
from gdistill import inpainting, optim, preemption, previews, sharding
from gdistill import checkpoint as ckpt_lib
from gdistill import plan as plan_lib
from gdistill.plan import Stage
from gdistill.stage_setup import (StageSetup, data_shape, example_shape, export_dir,  # noqa: F401
                                  init_state, is_finished, setup_stage, stage_dir, stage_seed)


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def accumulated_grads(loss_fn: Callable, k: int, fields: tuple[str, ...], mesh) -> Callable:
  """(params, teacher_params, batch, rng) -> ((loss, aux), grads) over k micro-batches.

  k = 1: value_and_grad of loss_fn on the batch. k > 1 (config.<stage>.grad_accum): the batch
  fields are split into k micro-batches, micro-batch j taking rows j, j + k, j + 2k, ... (so
  every device holds an equal share of each), loss_fn runs on one at a time inside a lax.scan
  (activation memory of one micro-batch; combine with model.remat), and the loss, aux and
  gradients are their means: the update of the whole batch for a loss that is a mean over
  examples (tested to 1e-5). Micro-batch j draws its noise from fold_in(rng, j), so the
  draws differ from an unaccumulated step's (the same distribution).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    return grad_fn
  spec = sharding.batch_sharding(mesh).spec

  def split(x):
    micro = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    micro = jnp.moveaxis(micro, 1, 0)  # [k, B / k, ...], rows j, j + k, ... in micro-batch j
    return jax.lax.with_sharding_constraint(
        micro, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec)))

  def run(params, teacher_params, batch, rng):
    micro = {f: split(batch[f]) for f in fields}

    def one(j, mb):
      return grad_fn(params, teacher_params, {**batch, **mb}, jax.random.fold_in(rng, j))

    first = jax.eval_shape(one, 0, jax.tree.map(lambda a: a[0], micro))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), first)

    def body(total, xs):
      j, mb = xs
      return jax.tree.map(lambda t, v: t + v.astype(jnp.float32), total, one(j, mb)), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    return jax.tree.map(lambda t, f: (t / k).astype(f.dtype), total, first)
  return run


def make_train_step(loss_fn: Callable, s: StageSetup, section, mesh):
  """Jitted (state, teacher_params, batch) -> (state, metrics); donates the state.

  The stage's seed and the student's step count travel in the batch (replicated scalars), so
  every progressive round lowers to the same program and reuses one compilation.
  """
  ema_decay = float(section.ema_decay)
  schedule = optim.lr_schedule(section)
  grads_of = accumulated_grads(loss_fn, int(section.grad_accum), s.batch_fields, mesh)

  def step_fn(state, teacher_params, batch):
    rng = jax.random.fold_in(jax.random.key(batch["seed"]), state["step"])
    (loss, aux), grads = grads_of(state["params"], teacher_params, batch, rng)
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

  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  batch_shardings = {**{k: batch_sh for k in s.batch_fields}, "student_steps": rep, "seed": rep}
  return jax.jit(step_fn,
                 in_shardings=(s.state_shardings, s.teacher_shardings, batch_shardings),
                 out_shardings=(s.state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def batch_finisher(mesh, fields: tuple[str, ...] = ("x", "label"), latents=None,
                   masks=None) -> Callable[..., dict]:
  """global batch (, step) -> the batch the train step takes (its `fields`): data.finish_batch
  jitted with the batch sharding for uint8 batches (config.data.normalize_on_device); float
  batches (points, a latent model's encoded images) pass through untouched (and compile
  nothing).
  latents (an autoencoding.Latents): the batch holds images that this step encodes on the
  devices (a latent model on image-caption files, which are not encoded ahead, or an
  inpainting model, whose masked images are encoded too).
  masks = (probabilities of inpainting.KINDS, seed): an inpainting model's batch gains the
  field 'inpaint' (gdistill/inpainting.py) from random masks drawn on the devices from
  (seed, step), the same on every process and on resume.
  """
  keep = set(fields) | {"flip"}
  keep.discard(inpainting.FIELD)
  select = lambda batch: batch if set(batch) <= keep else {k: v for k, v in batch.items()
                                                           if k in keep}
  if latents is None and masks is None:
    finish = jax.jit(data.finish_batch, out_shardings=sharding.batch_sharding(mesh))

    def run(batch, step: int = 0):
      del step
      batch = select(batch)
      return finish(batch) if data.needs_finish(batch) else batch
    return run
  probs = None if masks is None else jnp.asarray(masks[0], jnp.float32)
  mask_key = None if masks is None else jax.random.fold_in(jax.random.key(int(masks[1])),
                                                           inpainting.MASK_SALT)
  encode = None if latents is None else latents.encode

  def finish_more(params, batch, step):
    out = data.finish_batch(batch)
    x = out["x"]
    if probs is not None:
      b, h, w = x.shape[:3]
      m = inpainting.random_masks(jax.random.fold_in(mask_key, step), b, h, w, probs)
      out[inpainting.FIELD] = inpainting.condition(
          x, m, None if encode is None else (lambda im: encode(params, im)))
    if encode is not None:
      out["x"] = encode(params, x)
    return out
  fn = jax.jit(finish_more, out_shardings=sharding.batch_sharding(mesh))
  params = None if latents is None else latents.params
  return lambda batch, step=0: fn(params, select(batch), np.int32(step))


def step_scalars(mesh, student_steps: int, seed: int) -> dict:
  """The replicated scalars every train step takes beside the examples."""
  rep = sharding.replicated(mesh)
  return {"student_steps": jax.device_put(np.int32(student_steps), rep),
          "seed": jax.device_put(np.int32(seed), rep)}


def throughput_fn(config, stage: Stage, mesh) -> Callable[[float], dict]:
  """images/s -> model TFLOP/s per device and MFU (gdistill/flops.py: analytic FLOPs of the
  stage's step; the device's data-sheet peak, on CPU a measured matmul ceiling). Models
  without an analytic count (the autoencoder, the SD U-Net) report rates only."""
  from gdistill import flops
  if stage.kind not in flops.STEP_KINDS or not flops.has_analytic_count(config.model):
    return lambda images_per_sec: {}
  per_example = flops.step_flops_per_example(config, stage.kind)
  peak = flops.peak_flops_per_device(config.model.dtype)
  n = int(mesh.devices.size)
  return lambda images_per_sec: flops.throughput_metrics(
      images_per_sec, flops_per_example=per_example, num_devices=n, peak=peak)


def export_extras(config, stage: Stage, s: StageSetup, params) -> dict:
  """What a stage adds to its export's metadata: the autoencoder its scaling factor and
  held-out PSNR (autoencoding.statistics), a text model its tokenizer."""
  if stage.kind == "autoencoder":
    n = int(config.autoencoder.scale_examples)
    train = data.global_batch(config.data, global_batch_size=n, seed=0, step=0,
                              host_normalize=False,
                              tokenizer=conditioning.tokenizer_for(config))["x"]
    test_cfg = config.data.copy_and_resolve_references()
    with test_cfg.unlocked():
      test_cfg.split = "test"
    test = data.load_array(test_cfg, "test")[0] if config.data.name != "shapes" else (
        data.load_captioned(config.data, "test")["image"])
    return {"vae": config_lib.vae_arch_dict(config.vae),
            **autoencoding.statistics(s.student, jax.device_get(params), train, test)}
  return {"tokenizer": conditioning.tokenizer_metadata(conditioning.tokenizer_for(config))}


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
  section = plan_lib.section(config, stage)
  total = int(section.num_steps)
  t_start = time.time()
  t_first = None
  s = setup_stage(config, workdir, stage, mesh)
  latents = (autoencoding.load(config, workdir, data_shape(config), mesh) if stage.latent
             else None)
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
  tokenizer = conditioning.tokenizer_for(config)
  programs = {} if programs is None else programs
  key = (stage.kind, stage.section, total)  # the lr schedule depends on num_steps
  if key not in programs:
    loss_fn = losses.make_loss(stage.kind, student=s.student, teacher=s.teacher,
                               config=config)
    programs[key] = (make_train_step(loss_fn, s, section, mesh),
                     previews.make_preview(config, stage.kind, s.student, latents, tokenizer))
  step_fn, preview = programs[key]
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
  # A latent model trains on latents: an embedded dataset's split is encoded once (cached in
  # the workdir); image-caption files, and an inpainting model's images (their masked copies
  # are encoded too), batch by batch on the devices.
  inpaint = getattr(s.student, "inpainting", False)
  streamed = latents is not None and (data.streams_images(config.data) or inpaint)
  masks = (inpainting.mask_probabilities(config.masks), seed) if inpaint else None
  finish = batch_finisher(mesh, s.batch_fields, latents if streamed else None, masks)
  encoded = (None if latents is None or streamed else
             autoencoding.encode_split(latents, config, workdir, config.data.split))
  with data.make_loader(config.data, global_batch_size=int(section.batch_size), seed=seed,
                        start_step=start, process_index=jax.process_index(),
                        process_count=jax.process_count(),
                        host_normalize=not config.data.normalize_on_device,
                        tokenizer=tokenizer, examples=encoded) as loader:
    for step, local in loader:
      if step >= total:
        break
      batch = finish(sharding.global_batch_from_local(local, mesh, int(section.batch_size)), step)
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
        preview(state.get("ema", state["params"]), stage, done, dash, workdir)
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
  meta.update(export_extras(config, stage, s, final))
  ckpt_lib.save_export(edir, final, meta)
  t_grid = time.time()
  png = preview(final, stage, total, dash, workdir)
  t_grid = time.time() - t_grid
  ck.close()
  dash.close()
  if jax.process_index() == 0:
    first = "" if t_first is None else f"set-up and first step (compile) {t_first:.1f} s, "
    print(f"[{stage.name}] done in {time.time() - t_start:.1f} s ({first}sample grid "
          f"{t_grid:.1f} s): export {edir}; samples {png}", flush=True)
  return ckpt_lib.load_export_metadata(edir)


