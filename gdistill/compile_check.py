"""--mode=compile: size a mesh before renting it.

For each stage kind of the plan (teacher, guided, progressive) this lowers and compiles the
real train step (train.make_train_step with the stage's loss) for the configured mesh on
abstract inputs -- jax.ShapeDtypeStruct with shardings for the state, the frozen teacher and
the batch -- so no parameter, optimizer state or parent export is materialized or read. It
reports XLA's per-device memory analysis of the compiled step and the per-device bytes of
the sharded state. Simulate a pod's mesh on one host with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (see docs/SCALING.md).
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from gdistill import config_lib, losses, paths, sharding, train
from gdistill.plan import Stage, make_plan

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")


def abstract_setup(config, stage: Stage, mesh) -> train.StageSetup:
  """train.setup_stage with the parent as an abstract tree with its shardings (no files)."""
  return train.setup_stage(config, "", stage, mesh, abstract_parent=True)


def abstract_batch(config, stage: Stage, mesh, s: train.StageSetup) -> dict:
  """The step's batch as ShapeDtypeStructs: examples (latents for a latent model) and their
  condition ('label' [B] or 'tokens' [B, L]) split over the batch axes, the scalars."""
  b = int(config[stage.section].batch_size)
  bs, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  cond = {"label": (b,), "tokens": (b, int(config.text.max_length))}
  out = {"x": jax.ShapeDtypeStruct((b,) + s.shape, jnp.float32, sharding=bs),
         "student_steps": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
         "seed": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}
  out.update({k: jax.ShapeDtypeStruct(cond[k], jnp.int32, sharding=bs)
              for k in s.batch_fields if k != "x"})
  return out


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs (or arrays) with NamedShardings
  (the largest shard where shards differ)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if x is None:
      continue
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def stages_to_check(config) -> list[Stage]:
  """The first stage of each kind in config.stage's plan (progressive rounds share a step)."""
  seen, out = set(), []
  for st in make_plan(config):
    if st.kind not in seen:
      seen.add(st.kind)
      out.append(st)
  return out


def compile_stage(config, stage: Stage, mesh) -> dict:
  """Lowers and compiles the stage's train step on abstract inputs; its memory report."""
  s = abstract_setup(config, stage, mesh)
  section = config[stage.section]
  loss_fn = losses.make_loss(stage.kind, student=s.student, teacher=s.teacher,
                             config=config)
  step = train.make_train_step(loss_fn, s, section, mesh)
  t0 = time.time()
  lowered = step.lower(s.abstract_state, s.teacher_params,
                       abstract_batch(config, stage, mesh, s))
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()
  mem = compiled.memory_analysis()
  report = {"stage": stage.name, "kind": stage.kind, "mesh": dict(mesh.shape),
            "batch_size": int(section.batch_size),
            "params": num_params(s.abstract_state["params"]),
            "state_bytes_per_device": per_device_bytes(s.abstract_state),
            "teacher_bytes_per_device": per_device_bytes(s.teacher_params),
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}
  if mem is None:  # some backends have no memory analysis
    report["memory"] = None
    return report
  m = {k: int(getattr(mem, k)) for k in MEMORY_FIELDS}
  # Live at once: inputs, outputs not aliased to (donated) inputs, temporaries and code.
  m["total_bytes"] = (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                      - m["alias_size_in_bytes"] + m["temp_size_in_bytes"]
                      + m["generated_code_size_in_bytes"])
  report["memory"] = m
  return report


def _gib(n: int) -> str:
  """Bytes in GiB, or MiB below 1 GiB."""
  return f"{n / 2 ** 30:9.3f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:9.3f} MiB"


def format_report(r: dict) -> str:
  head = (f"[{r['stage']}] mesh {r['mesh']} batch {r['batch_size']} params "
          f"{r['params'] / 1e6:.1f}M: lowered in {r['lower_s']:.1f} s, compiled in "
          f"{r['compile_s']:.1f} s")
  lines = [head,
           f"  state (params, EMA, Adam) per device {_gib(r['state_bytes_per_device'])}; "
           f"frozen teacher per device {_gib(r['teacher_bytes_per_device'])}"]
  m = r["memory"]
  if m is None:
    lines.append("  XLA memory analysis: not available on this backend")
    return "\n".join(lines)
  lines.append("  XLA memory analysis per device:")
  for k, label in (("argument_size_in_bytes", "arguments"), ("output_size_in_bytes", "outputs"),
                   ("alias_size_in_bytes", "aliased (donated)"),
                   ("temp_size_in_bytes", "temporaries"),
                   ("generated_code_size_in_bytes", "generated code"),
                   ("total_bytes", "total")):
    lines.append(f"    {label:<18} {_gib(m[k])}")
  return "\n".join(lines)


def run(config, workdir: str, devices=None) -> list[dict]:
  """Validates the config (no dataset needed), builds the mesh and reports each stage kind.

  Prints from process 0 and writes <workdir>/compile_report.json there.
  """
  workdir = paths.resolve(workdir)
  config_lib.resolve_paths(config)
  devices = list(devices if devices is not None else jax.devices())
  config_lib.validate(config, num_devices=len(devices), num_processes=jax.process_count())
  mesh = sharding.make_mesh(config.mesh, devices)
  primary = jax.process_index() == 0
  if primary:
    print(f"[compile] {len(devices)} {devices[0].platform} devices, mesh "
          f"{dict(mesh.shape)}; nothing is materialized", flush=True)
  reports = []
  with jax.set_mesh(mesh):
    for stage in stages_to_check(config):
      r = compile_stage(config, stage, mesh)
      reports.append(r)
      if primary:
        print(format_report(r), flush=True)
  if primary:
    paths.write_json_atomic(paths.join(workdir, "compile_report.json"), reports)
  return reports
