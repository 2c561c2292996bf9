"""The driver: validates once, then walks the plan, stage by stage, and evaluates at the end.

  train_and_evaluate(config, workdir)   # what `python -m gdistill.main` (mode train) calls

Finished stages are skipped, the unfinished one resumes at its last committed checkpoint
(gdistill/train.py run_stage), and a pipeline ends with the evaluation (gdistill/evaluate.py).
"""
from __future__ import annotations

import os
import time

import jax

from gdistill import config_lib, config_validation, data, paths, sharding
from gdistill.plan import make_plan
from gdistill.train import run_stage


def prepare(config, workdir: str, devices=None):
  """Validation before any compile (config + dataset), the mesh and the saved config."""
  devices = list(devices if devices is not None else jax.devices())
  from gdistill import runtime
  runtime.configure_tensorflow(config.data)  # before the dashboards import TensorFlow
  info = data.dataset_info(config.data)
  config_validation.validate(config, num_devices=len(devices),
                      num_processes=jax.process_count(), dataset_info=info)
  mesh = sharding.make_mesh(config.mesh, devices)
  save_config(config, workdir)
  return mesh


def save_config(config, workdir: str) -> None:
  """<workdir>/config.json: what later commands (sample, evaluate, gdistill.load) read."""
  if jax.process_index() == 0:
    paths.write_text_atomic(os.path.join(workdir, "config.json"),
                            config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
  """Runs config.stage ('autoencoder' | 'teacher' | 'guided' | 'progressive' | 'pipeline') in
  workdir; a pipeline ends with the evaluation (config.eval.enabled).

  devices: the devices of the mesh (default: all of them). Relative paths (workdir and the
  config's path keys) are resolved against the current directory here (gdistill/paths.py).
  """
  workdir = paths.resolve(workdir)
  config_lib.resolve_paths(config)
  from gdistill import sd_import
  imported = sd_import.adopt(config)  # init_from a diffusers directory: its architecture
  mesh = prepare(config, workdir, devices)
  if imported is not None:
    with jax.set_mesh(mesh):
      sd_import.import_exports(config, workdir, mesh, imported)
    save_config(config, workdir)  # init_from / vae.init_from now name the imported exports
  plan = make_plan(config)
  results = {}
  t0 = time.time()
  programs = {}
  with jax.set_mesh(mesh):
    for stage in plan:
      results[stage.name] = run_stage(config, workdir, stage, mesh, programs)
  if jax.process_index() == 0:
    print(f"[pipeline] plan {[s.name for s in plan]} trained in "
          f"{(time.time() - t0) / 60:.1f} min", flush=True)
  if config.stage == "pipeline" and config.eval.enabled:
    from gdistill import evaluate
    results["eval"] = evaluate.evaluate_workdir(config, workdir)
    if jax.process_index() == 0:
      print(f"[pipeline] finished in {(time.time() - t0) / 60:.1f} min; table: "
            f"{os.path.join(workdir, 'eval', 'results.md')}", flush=True)
  return results
