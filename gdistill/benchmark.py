"""Throughput, FLOPs and MFU of the train steps and samplers of a config.

  python -m gdistill.benchmark --config=configs/digits.py [--config.key=value ...] \
      [--out=DIR] [--steps=10]

Measures the teacher, stage-one ('guided') and progressive train steps and sampling (the guided
teacher at N steps = 2N NFE, the w-student at N and at progressive.end_steps), built as
training builds them (train.setup_stage, losses.make_loss, train.make_train_step), on
synthetic batches and random parameters filled on the host (no workdir, no dataset): compile
time (and whether the persistent cache served it); the median synchronized step time after
warm-up, the train steps in interleaved rounds; images/s per device; model FLOPs per image
(flops.py's analytic count, XLA's count of the same dots and convolutions and of every op),
FLOP/s and MFU against flops.peak_flops (data sheet; on CPU a measured matmul ceiling); XLA's
memory analysis. 'loader' (on request: --only=loader) times the teacher step fed by the real
input pipeline (host or device normalization) against a pre-built device batch, in
alternating blocks, and the loader's pieces alone (also a synthetic 64x64x3 source); it needs
the dataset (digits prepares itself; an unprepared one is reported as skipped).
Prints a markdown table; writes benchmark.json and benchmark.md under --out ($OUT, else .).
--batch_sizes=512,256 tries each step kind at those global batches in turn, keeping the first
that fits (a compiled step over the device's memory skips to the largest listed batch predicted
to fit; an out-of-memory error at run time moves on to the next).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gdistill import (conditioning, config_validation, flops, losses, paths, runtime, sampling,
                      schedules, sharding, stage_setup, train)
from gdistill.benchmark_loader import LOADER_MODES, StepCase, bench_loader, loader_markdown
from gdistill.benchmark_report import markdown, write
from gdistill.denoiser import student_params_from_teacher
from gdistill import plan as plan_lib
from gdistill.plan import Stage

__all__ = ["KINDS", "LOADER_MODES", "bench_loader", "loader_markdown", "main", "markdown",
           "run", "write"]

KINDS = ("teacher", "guided", "progressive", "sample", "loader")
DEFAULT_KINDS = ("teacher", "guided", "progressive", "sample")   # 'loader' on request (--only)
STEP_KINDS = ("teacher", "guided", "progressive")


@dataclasses.dataclass(frozen=True)
class _Parentless(Stage):
  """A stage built without loading a parent, with the real stage's section and w-embedding."""
  w: bool = False

  @property
  def w_conditioned(self) -> bool:
    return self.w


def _stage(config, kind: str) -> Stage:
  if kind == "teacher":
    return Stage("teacher", "teacher", "teacher")
  if kind == "guided":
    return Stage("guided", "guided", "guided", None, "teacher")
  n = int(config.progressive.start_steps) // 2
  return Stage(f"progressive_{n}", "progressive", "progressive", n, "guided")


def random_tree(abstract, seed: int, zeros=lambda path: False):
  """Arrays in the shapes, dtypes and shardings of `abstract` (ShapeDtypeStructs), filled on
  the host: normal(0, 0.05), norm scales around 1, integers and zeros(path) leaves 0. Jitting
  the models' init instead costs an XLA compile of their RNG per parameter (20 s on 2 cores)."""
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = jax.tree_util.keystr(path)
    if zeros(path) or not jnp.issubdtype(a.dtype, jnp.floating):
      value = np.zeros(a.shape, a.dtype)
    else:
      value = (0.05 * rng.standard_normal(a.shape, np.float32)
               + name.endswith("'scale']")).astype(a.dtype)
    return jax.device_put(value, a.sharding) if a.sharding is not None else jnp.asarray(value)
  return jax.tree_util.tree_map_with_path(fill, abstract)


def random_state(s: train.StageSetup, seed: int = 0) -> dict:
  """A train state of the trainer's structure (s.abstract_state): random params (and EMA), the
  step, counters and optimizer moments at 0."""
  top = lambda path: getattr(path[0], "key", None)
  return random_tree(s.abstract_state, seed, zeros=lambda path: top(path) not in ("params", "ema"))


def _random_params(den, config, mesh, seed: int):
  abstract, shard, _ = stage_setup.abstract_params(den, train.example_shape(config), config,
                                                   mesh)
  return random_tree(abstract, seed), shard


def setup(config, stage: Stage, mesh, *, abstract_teacher: bool = False) -> train.StageSetup:
  """train.setup_stage for `stage` with random teacher parameters instead of a loaded export
  (abstract_teacher: ShapeDtypeStructs instead, for tracing without running)."""
  s = train.setup_stage(config, "", _Parentless(stage.name, "teacher", stage.section,
                                                stage.student_steps, None,
                                                w=stage.w_conditioned), mesh)
  teacher = stage_setup.teacher_model(config, stage)
  if teacher is None:
    return s
  if abstract_teacher:
    tp, t_shard, _ = stage_setup.abstract_params(teacher, train.example_shape(config), config,
                                                 mesh)
  else:
    tp, t_shard = _random_params(teacher, config, mesh, seed=1)
  return dataclasses.replace(s, teacher=teacher, teacher_params=tp, teacher_shardings=t_shard)


def synthetic_batch(config, batch_size: int, mesh, student_steps: int,
                    fields: tuple[str, ...] = ("x", "label")) -> dict:
  """Random examples (latents for a latent model) and conditions: labels or token ids."""
  rng = np.random.default_rng(0)
  local = {"x": rng.uniform(-1, 1, (batch_size,) + train.example_shape(config)).astype(np.float32)}
  if "label" in fields:
    local["label"] = rng.integers(0, config.model.num_classes, batch_size).astype(np.int32)
  if "tokens" in fields:
    local["tokens"] = random_tokens(config, batch_size, rng)
  batch = sharding.global_batch_from_local(local, mesh, batch_size)
  batch.update(train.step_scalars(mesh, student_steps, seed=0))
  return batch


def random_tokens(config, batch_size: int, rng: np.random.Generator) -> np.ndarray:
  """[B, max_length] token ids inside the config's tokenizer's vocabulary."""
  vocab = conditioning.tokenizer_for(config).vocab_size
  return rng.integers(0, vocab, (batch_size, int(config.text.max_length))).astype(np.int32)


def _memory(compiled) -> dict:
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  out = {k: int(getattr(ma, k, 0) or 0) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
      "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")}
  # The CPU client reports a peak without the temporaries: take the larger of the two.
  out["peak_bytes"] = max(out["peak_memory_in_bytes"], out["argument_size_in_bytes"]
                          + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                          + out["temp_size_in_bytes"])
  return out


_CACHE_HITS = []


def _count_cache_hits(event: str, **kwargs) -> None:
  if event == "/jax/compilation_cache/cache_hits":
    _CACHE_HITS.append(1)


def _compile(jitted, *args):
  """(compiled, timings, XLA total FLOPs, XLA dot/conv FLOPs) of jitted at args.

  timings: trace_s, lower_s, xla_compile_s, compile_s (their sum) and compile_cache_hit
  (whether the persistent compilation cache served the executable).
  """
  hits = len(_CACHE_HITS)
  t0 = time.perf_counter()
  traced = jitted.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  timings = {"trace_s": t1 - t0, "lower_s": t2 - t1, "xla_compile_s": t3 - t2,
             "compile_s": t3 - t0, "compile_cache_hit": len(_CACHE_HITS) > hits}
  return compiled, timings, flops.xla_total_flops(lowered), flops.jaxpr_matmul_flops(traced.jaxpr)


def _row(name, *, batch, times, timings, analytic, xla_total, xla_matmul, mem, peak,
         num_devices, flops_source="analytic", **extra) -> dict:
  med = statistics.median(times)
  img_s_dev = batch / med / num_devices
  achieved = analytic * img_s_dev
  return {"name": name, "batch": batch, **timings, "median_s": med,
          "min_s": min(times), "times_s": times, "images_per_s_per_device": img_s_dev,
          "flops_per_image": analytic, "flops_source": flops_source,
          "xla_matmul_flops_per_image": xla_matmul,
          "xla_total_flops_per_image": xla_total,
          "xla_matmul_over_analytic": xla_matmul / analytic,
          "xla_total_over_analytic": xla_total / analytic,
          "flops_per_s_per_device": achieved, "mfu": achieved / peak,
          "peak_memory_bytes": mem.get("peak_bytes", 0), "memory": mem, **extra}


def _is_oom(e: Exception) -> bool:
  s = str(e)
  return any(k in s for k in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


class TooBig(RuntimeError):
  """XLA's memory analysis of a compiled step exceeds the device: `fit` is the batch that
  would fit if memory grows linearly with the batch beyond the arguments."""

  def __init__(self, batch: int, peak: int, limit: int, fit: int):
    super().__init__(f"batch {batch}: XLA peak {peak / 2 ** 30:.2f} GiB > limit "
                     f"{limit / 2 ** 30:.2f} GiB (about batch {fit} would fit)")
    self.fit = fit


def device_memory_limit(margin: float = 0.95) -> int:
  """Bytes one device may allocate, less a margin for fragmentation (0 where the runtime does
  not say, e.g. CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return int(margin * stats.get("bytes_limit", 0))


def _check_fits(mem: dict, batch: int, limit: int) -> None:
  peak = mem.get("peak_bytes", 0)
  if limit and peak > limit:
    fixed = mem["argument_size_in_bytes"]
    per_example = max(peak - fixed, 1) / batch
    raise TooBig(batch, peak, limit, int(max(limit - fixed, 0) / per_example))


def prepare_step(config, kind: str, mesh, *, memory_limit: int = 0) -> StepCase:
  """Builds, compiles and runs once (out-of-memory shows here) the train step of `kind`."""
  stage = _stage(config, kind)
  section = plan_lib.section(config, stage)
  batch_size = int(section.batch_size)
  s = setup(config, stage, mesh)
  state = random_state(s)
  loss_fn = losses.make_loss(kind, student=s.student, teacher=s.teacher, config=config)
  step = train.make_train_step(loss_fn, s, section, mesh)
  batch = synthetic_batch(config, batch_size, mesh, stage.student_steps or 0, s.batch_fields)
  compiled, timings, xla_total, xla_mm = _compile(step, state, s.teacher_params, batch)
  mem = _memory(compiled)
  _check_fits(mem, batch_size, memory_limit)
  case = StepCase(kind, batch_size, compiled, state, s.teacher_params, batch, timings, xla_total,
                  xla_mm, mem)
  case.step()
  return case


def time_steps(cases: list[StepCase], *, steps: int, warmup: int) -> dict[str, list[float]]:
  """Interleaved rounds (one step of each case per round), so that the cases share whatever
  else the host is doing; the first `warmup` rounds are not kept."""
  times = {c.kind: [] for c in cases}
  for r in range(warmup + steps):
    for c in cases:
      dt = c.step()
      if r >= warmup:
        times[c.kind].append(dt)
  return times


def step_row(config, case: StepCase, times: list[float], *, peak: float,
             num_devices: int) -> dict:
  b = case.batch_size
  count, source = flops.flops_per_image(config, case.kind, case.xla_matmul / b)
  breakdown = (flops.step_flops_breakdown(config, case.kind) if source == "analytic" else None)
  return _row(case.kind, batch=b, times=times, timings=case.timings,
              analytic=count, flops_source=source, xla_total=case.xla_total / b,
              xla_matmul=case.xla_matmul / b, mem=case.memory, peak=peak,
              num_devices=num_devices, flops_breakdown=breakdown,
              final_loss=float(case.metrics["loss"]), remat=bool(config.model.remat),
              dtype=str(config.model.dtype))


def bench_sampling(config, mesh, *, batch_size: int, num_steps: int, repeats: int,
                   peak: float, memory_limit: int = 0) -> list[dict]:
  """Guided teacher at N steps (2N NFE) and the w-student at N and at end_steps (N NFE)."""
  shape = train.example_shape(config)
  teacher = stage_setup.student_model(config, Stage("teacher", "teacher", "teacher"))
  student = stage_setup.student_model(config, Stage("guided", "guided", "guided"))
  tp, _ = _random_params(teacher, config, mesh, seed=1)
  sp = student_params_from_teacher(tp, _random_params(student, config, mesh, seed=2)[0])
  sh = sharding.batch_sharding(mesh)
  if config.model.conditioning == "text":
    cond = random_tokens(config, batch_size, np.random.default_rng(0))
  else:
    cond = np.arange(batch_size, dtype=np.int32) % config.model.num_classes
  cond = jax.device_put(jnp.asarray(cond), sh)
  w = jax.device_put(jnp.full((batch_size,), 1.0, jnp.float32), sh)
  clip = (-1.0, 1.0) if config.diffusion.clip_x else None
  rows = []
  end = int(config.progressive.end_steps)
  for name, den, params, guided, ns in (
      ("sample_teacher_guided", teacher, tp, True, (num_steps,)),
      ("sample_student", student, sp, False, (num_steps,) + ((end,) if end != num_steps else ()))):
    spec = sampling.SamplerSpec("ddim", guided=guided, clip=clip,
                                schedule=schedules.from_config(config.diffusion))
    fn = sampling.make_sampler(den, spec, shape)
    args = (params, jax.random.key(0), cond, w)
    compiled, timings, xla_total, xla_mm = _compile(fn, *args, jnp.int32(num_steps))
    mem = _memory(compiled)
    _check_fits(mem, batch_size, memory_limit)
    jax.block_until_ready(compiled(*args, jnp.int32(1)))         # warm-up (same executable)
    for n in ns:
      times = []
      for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args, jnp.int32(n)))
        times.append(time.perf_counter() - t)
      # XLA's cost analysis counts the while-loop body (one sampler step) once: scale by N.
      count, source = flops.flops_per_image(config, "sample", xla_mm * n / batch_size,
                                            num_steps=n, guided=guided)
      rows.append(_row(f"{name}_{n}", batch=batch_size, times=times,
                       timings=timings if n == ns[0] else {
                           **{k: 0.0 for k in timings}, "compile_cache_hit": False},
                       analytic=count, flops_source=source,
                       xla_total=xla_total * n / batch_size, xla_matmul=xla_mm * n / batch_size,
                       mem=mem, peak=peak, num_devices=mesh.size, num_steps=n,
                       nfe=spec.nfe(n), dtype=str(config.model.dtype)))
  return rows


def _with_batch(config, kind: str, batch: int):
  section = "teacher" if kind in ("teacher", "sample") else kind
  config[section].batch_size = int(batch)


def run(config, *, steps: int = 10, warmup: int = 2, kinds=DEFAULT_KINDS, sample_batch: int = 0,
        sample_steps: int = 0, sample_repeats: int = 2, batch_sizes=(),
        reference_img_s: float = 0.0, memory_limit: int = 0, loader_rounds: int = 3,
        log=print) -> dict:
  """Benchmarks `kinds` of config on all devices; returns the result dict (see module doc)."""
  t_start = time.time()
  load_before = os.getloadavg()
  if not getattr(_count_cache_hits, "registered", False):
    jax.monitoring.register_event_listener(_count_cache_hits)
    _count_cache_hits.registered = True
  devices = jax.devices()
  config_validation.validate(config, num_devices=len(devices), num_processes=jax.process_count())
  mesh = sharding.make_mesh(config.mesh, devices)
  dtype = str(config.model.dtype)
  peak, peak_source = flops.peak_flops(dtype)
  log(f"devices: {len(devices)} x {devices[0].device_kind}; peak {peak / 1e12:.3f} TFLOP/s per "
      f"device ({peak_source})")
  limit = int(memory_limit or device_memory_limit())
  rows, chosen, cases = [], {}, []

  def first_fit(kind, tries, build):
    """build(batch) for the first batch of `tries` that fits (see the module doc)."""
    tries = [b for b in tries if b % mesh.size == 0]
    if not tries:
      raise ValueError(f"[{kind}] no batch size in {batch_sizes} is divisible by the "
                       f"{mesh.size} devices")
    i = 0
    while True:
      try:
        out = build(tries[i])
      except Exception as e:  # noqa: BLE001 -- only out-of-memory moves on
        fit = e.fit if isinstance(e, TooBig) else tries[i] - 1
        rest = [j for j in range(i + 1, len(tries)) if tries[j] <= fit]
        if not (isinstance(e, TooBig) or _is_oom(e)) or not rest:
          raise
        log(f"[{kind}] {str(e).splitlines()[0][:200]}; trying batch {tries[rest[0]]}")
        i = rest[0]
        continue
      chosen["last"] = chosen[kind] = tries[i]
      return out

  def build_step(kind, b):
    _with_batch(config, kind, b)
    held = sum(c.memory.get("argument_size_in_bytes", 0) for c in cases)
    return prepare_step(config, kind, mesh, memory_limit=max(limit - held, 1) if limit else 0)

  for kind in kinds:
    if kind not in KINDS:
      raise ValueError(f"unknown benchmark kind {kind!r}; valid: {KINDS}")
  loader = None
  with jax.set_mesh(mesh):
    step_kinds = [k for k in kinds if k in STEP_KINDS]
    for kind in step_kinds + (["teacher"] if "loader" in kinds and "teacher" not in kinds
                              else []):
      tries = [b for b in batch_sizes if b <= chosen.get("last", b)] or [
          int(config[kind].batch_size)]
      cases.append(first_fit(kind, tries, lambda b, kind=kind: build_step(kind, b)))
      c = cases[-1]
      log(f"[{kind}] batch {c.batch_size}: compile {c.timings['compile_s']:.1f} s"
          f"{' (persistent cache)' * c.timings['compile_cache_hit']}")
    timed = [c for c in cases if c.kind in step_kinds]
    times = time_steps(timed, steps=steps, warmup=max(warmup - 1, 0))
    rows += [step_row(config, c, times[c.kind], peak=peak, num_devices=mesh.size) for c in timed]
    if "loader" in kinds:
      teacher = next(c for c in cases if c.kind == "teacher")
      loader = bench_loader(config, teacher, mesh, steps=steps, warmup=warmup,
                            rounds=loader_rounds, log=log)
    del cases[:]
    if "sample" in kinds:
      tries = ([sample_batch] if sample_batch else
               [b for b in batch_sizes if b <= chosen.get("last", b)] or [
                   int(config.teacher.batch_size)])
      rows += first_fit("sample", tries, lambda b: bench_sampling(
          config, mesh, batch_size=b, repeats=sample_repeats, peak=peak, memory_limit=limit,
          num_steps=sample_steps or int(config.progressive.start_steps)))
  for r in rows:
    log(f"[{r['name']}] batch {r['batch']}: median {r['median_s'] * 1e3:.1f} ms, "
        f"{r['images_per_s_per_device']:.1f} img/s/dev, MFU {100 * r['mfu']:.1f}%")
  peaks = [peak]
  if peak_source.startswith("measured"):      # the host's load varies: keep the best ceiling
    peaks.append(flops.measure_matmul_flops(dtype))
    peak = max(peaks)
    for r in rows:
      r["mfu"] = r["flops_per_s_per_device"] / peak
  by = {r["name"]: r for r in rows}
  ratios = {}
  if "teacher" in by:
    per_img = lambda r: r["median_s"] / r["batch"]
    for k in ("guided", "progressive"):
      if k in by:
        ratios[f"{k}_over_teacher"] = per_img(by[k]) / per_img(by["teacher"])
  result = {"config_model": config.model.to_dict(), "devices": len(devices),
            "device_kind": devices[0].device_kind, "platform": devices[0].platform,
            "peak_flops_per_device": peak, "peak_source": peak_source, "dtype": dtype,
            "peak_measurements": peaks,
            "steps": steps, "warmup": warmup, "rows": rows, "step_time_ratios": ratios,
            "batch_sizes": {k: v for k, v in chosen.items() if k != "last"},
            "memory_limit_bytes": limit,
            "total_s": time.time() - t_start, "jax_version": jax.__version__,
            "host_cpus": os.cpu_count(), "load_average_1m": [load_before[0], os.getloadavg()[0]],
            "command": " ".join([os.path.basename(sys.executable), "-m", "gdistill.benchmark"]
                                + sys.argv[1:])}
  if loader is not None:
    result["loader"] = loader
  if reference_img_s and "teacher" in by:
    result["reference"] = {"teacher_img_s": reference_img_s,
                           "speedup": by["teacher"]["images_per_s_per_device"] * len(devices)
                           / reference_img_s}
  return result


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  xla_cpu = runtime.configure_xla_cpu()  # before any backend starts
  from gdistill import console
  console.capture(paths.resolve(FLAGS.out or os.environ.get("OUT") or "."), "benchmark")
  runtime.enable_compilation_cache(FLAGS.compilation_cache)
  runtime.configure_tensorflow(FLAGS.config.data)
  kinds = tuple(k for k in FLAGS.only.split(",") if k) or DEFAULT_KINDS
  result = run(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup, kinds=kinds,
               sample_batch=FLAGS.sample_batch, sample_steps=FLAGS.sample_steps,
               sample_repeats=FLAGS.sample_repeats,
               batch_sizes=tuple(int(b) for b in FLAGS.batch_sizes.split(",") if b),
               reference_img_s=FLAGS.reference_img_s, memory_limit=FLAGS.memory_limit_bytes,
               loader_rounds=FLAGS.loader_rounds)
  result.update(xla_cpu_flags=xla_cpu, xla_flags=os.environ.get("XLA_FLAGS", ""))
  print(markdown(result), flush=True)
  path = write(result, FLAGS.out or os.environ.get("OUT") or ".")
  print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]).",
                                  lock_config=True)
  flags.DEFINE_string("out", "", "Output folder for benchmark.json/.md (default $OUT, else .).")
  flags.DEFINE_integer("steps", 10, "Timed steps per train step kind (after the warm-up).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_string("only", "", f"Comma list of {KINDS} (default: all but 'loader').")
  flags.DEFINE_integer("sample_batch", 0, "Sampling batch (0: the teacher batch).")
  flags.DEFINE_integer("sample_steps", 0, "Sampler steps N (0: progressive.start_steps).")
  flags.DEFINE_integer("sample_repeats", 2, "Timed sampler calls per N.")
  flags.DEFINE_string("batch_sizes", "", "Descending global batches to try (out of memory: "
                      "next); empty: the config's.")
  flags.DEFINE_integer("memory_limit_bytes", 0, "Per-device memory for the fit check (0: the "
                       "device's bytes_limit; none on CPU).")
  flags.DEFINE_float("reference_img_s", 0.0, "A teacher-step img/s to compare against.")
  flags.DEFINE_integer("loader_rounds", 3, "Rounds of the 'loader' measurement (each runs "
                       "every feed mode for --warmup + --steps steps).")
  flags.DEFINE_string("compilation_cache", "~/.cache/gdistill/xla",
                      "Persistent XLA compilation cache, as in gdistill.main ('' disables it: "
                      "cold compile times); rows say whether the cache served them.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
