"""--mode=compile: size a mesh before renting it.

For each stage kind of the plan (teacher, guided, progressive) this lowers and compiles the
real train step (train.make_train_step with the stage's loss) for the configured mesh on
abstract inputs -- jax.ShapeDtypeStruct with shardings for the state, the frozen teacher and
the batch -- so no parameter, optimizer state or parent export is materialized or read. It
reports XLA's per-device memory analysis of the compiled step and the per-device bytes of
the sharded state. Simulate a pod's mesh on one host with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (see docs/SCALING.md), or compile for a real
TPU slice's devices without a TPU: --config.compile.topology=v5p-64 (libtpu's ahead-of-time
compiler, as MaxText's train_compile.py does; tpu_topology below).
"""
from __future__ import annotations

import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from gdistill import config_lib, config_validation, losses, paths, sharding, train
from gdistill import plan as plan_lib
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
  section = plan_lib.section(config, stage)
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
  try:  # XLA's count for the partitioned (per-device) program; None where not available.
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) if cost and cost.get("flops") else None
  except Exception:  # pylint: disable=broad-exception-caught
    flops = None
  report = {"stage": stage.name, "kind": stage.kind, "section": stage.section,
            "mesh": dict(mesh.shape), "batch_size": int(section.batch_size),
            "grad_accum": int(section.grad_accum),
            "params": num_params(s.abstract_state["params"]),
            "state_bytes_per_device": per_device_bytes(s.abstract_state),
            "teacher_bytes_per_device": per_device_bytes(s.teacher_params),
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "flops_per_device": flops}
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


def propose(report: dict, device_memory_bytes: float, headroom: float = 0.9) -> Optional[dict]:
  """mesh.fsdp and grad_accum for devices of device_memory_bytes, from one compile's report.

  An estimate, to confirm by compiling with the proposal: XLA's temporaries are taken as
  proportional to the per-device micro-batch (measured on ImageNet-64: 355.7 GiB at 256
  examples per device, 41.4 GiB at 32, docs/SCALING.md), everything else (state, teacher,
  code) as proportional to 1 / fsdp. fsdp grows (over divisors of the device count) until the
  rest takes at most half of the usable memory (headroom x memory); grad_accum is the smallest
  power of two that then fits. None when the backend has no memory analysis."""
  m = report.get("memory")
  if not m:
    return None
  devices = int(np.prod(list(report["mesh"].values())))
  fsdp = int(report["mesh"].get("fsdp", 1))
  per_device = report["batch_size"] // devices
  temp_per_example = m["temp_size_in_bytes"] / max(per_device // report["grad_accum"], 1)
  rest = m["total_bytes"] - m["temp_size_in_bytes"]
  budget = headroom * device_memory_bytes
  new_fsdp = fsdp
  for f in sorted(d for d in range(fsdp, devices + 1) if devices % d == 0):
    new_fsdp = f
    if rest * fsdp / f <= budget / 2:
      break
  rest = rest * fsdp / new_fsdp
  k = 1
  while k < per_device and rest + temp_per_example * per_device / k > budget:
    k *= 2
  while per_device % k:
    k *= 2
  k = min(k, per_device)
  total = rest + temp_per_example * per_device / k
  return {"fsdp": new_fsdp, "grad_accum": k, "estimated_bytes": int(total),
          "fits": bool(total <= budget), "device_memory_bytes": int(device_memory_bytes)}


def format_proposal(r: dict, p: dict) -> str:
  gib = p["device_memory_bytes"] / 2 ** 30
  flags = f"--config.mesh.fsdp={p['fsdp']} --config.{r['section']}.grad_accum={p['grad_accum']}"
  if p["fits"]:
    return (f"  proposal for {gib:g} GiB per device: {flags}: about "
            f"{p['estimated_bytes'] / 2 ** 30:.1f} GiB per device (an estimate: compile with "
            "these flags to confirm)")
  return (f"  proposal for {gib:g} GiB per device: does not fit even at one example per device "
          f"per micro-batch ({flags}: about {p['estimated_bytes'] / 2 ** 30:.1f} GiB): more "
          "devices, or a smaller model or batch")


def _gib(n: int) -> str:
  """Bytes in GiB, or MiB below 1 GiB."""
  return f"{n / 2 ** 30:9.3f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:9.3f} MiB"


def format_report(r: dict) -> str:
  head = (f"[{r['stage']}] mesh {r['mesh']} batch {r['batch_size']} params "
          f"{r['params'] / 1e6:.1f}M: lowered in {r['lower_s']:.1f} s, compiled in "
          f"{r['compile_s']:.1f} s")
  lines = [head]
  if r.get("flops_per_device"):
    f = r["flops_per_device"]
    amount = f"{f / 1e12:.2f} TFLOP" if f >= 1e11 else f"{f / 1e9:.2f} GFLOP"
    lines.append(f"  XLA cost analysis: {amount} per device per step")
  lines += [
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


# Cloud TPU slice names (TensorCores for v4 / v5p, chips for v5e / v6e) -> the chip topology
# libtpu's compiler takes. v4 and v5p chips are one JAX device each (two cores, megacore).
TPU_SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
    "v4-128": "v4:4x4x4", "v4-256": "v4:4x4x8",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8", "v5e-64": "v5e:8x8",
    "v5e-256": "v5e:16x16", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-64": "v6e:8x8",
    "v6e-256": "v6e:16x16",
}


def tpu_topology(name: str) -> list:
  """The devices of a TPU slice ('v5p-64' or a topology such as 'v5p:2x4x4'), as abstract
  devices libtpu compiles for from a host without TPUs. Raises ValueError for an unknown name
  and RuntimeError naming the fix when libtpu is not installed."""
  topo = TPU_SLICES.get(name, name)
  if ":" not in topo:
    raise ValueError(f"compile.topology={name!r} is not a TPU slice: use a name such as "
                     f"{', '.join(sorted(TPU_SLICES)[:6])}, ... or a topology 'v5p:2x4x4'")
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise RuntimeError(
        f"compile.topology={name!r} compiles with libtpu's TPU compiler, which is not "
        "installed: pip install 'jax[tpu]' (it needs no TPU), or leave compile.topology empty "
        "to compile for this host's devices") from None
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # v4 / v5p: one device per chip (megacore), as a TPU VM of that slice presents them.
  kw = {"chip_config_name": "megacore"} if topo.split(":")[0] in ("v4", "v5p") else {}
  return list(topologies.get_topology_desc(topology_name=topo, platform="tpu", **kw).devices)


def run(config, workdir: str, devices=None) -> list[dict]:
  """Validates the config (no dataset needed), builds the mesh and reports each stage kind.

  Prints from process 0 and writes <workdir>/compile_report.json there.
  """
  workdir = paths.resolve(workdir)
  config_lib.resolve_paths(config)
  if devices is None and config.compile.topology:
    devices = tpu_topology(config.compile.topology)
  devices = list(devices if devices is not None else jax.devices())
  config_validation.validate(config, num_devices=len(devices), num_processes=jax.process_count())
  mesh = sharding.make_mesh(config.mesh, devices)
  primary = jax.process_index() == 0
  if primary:
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    print(f"[compile] {len(devices)} {devices[0].platform} devices ({kind}), mesh "
          f"{dict(mesh.shape)}; nothing is materialized", flush=True)
  reports = []
  with jax.set_mesh(mesh):
    for stage in stages_to_check(config):
      r = compile_stage(config, stage, mesh)
      if config.compile.device_memory_gib > 0:
        r["proposal"] = propose(r, config.compile.device_memory_gib * 2 ** 30)
      reports.append(r)
      if primary:
        print(format_report(r), flush=True)
        if r.get("proposal"):
          print(format_proposal(r, r["proposal"]), flush=True)
  if primary:
    paths.write_json_atomic(paths.join(workdir, "compile_report.json"), reports)
  return reports
