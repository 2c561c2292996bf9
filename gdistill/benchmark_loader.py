"""gdistill.benchmark's input-pipeline measurement (`--only=loader`): the teacher step fed by the
real loader (host or device normalization) against one pre-built device batch, and the pieces
of the pipeline timed alone. Reports figures; never fails on time."""
from __future__ import annotations

import dataclasses
import itertools
import statistics
import sys
import time

import jax
import numpy as np

from gdistill import data, runtime, sharding, train


@dataclasses.dataclass
class StepCase:
  """A compiled train step with its live (donated, replaced every step) state."""
  kind: str
  batch_size: int
  compiled: object
  state: dict
  teacher_params: object
  batch: dict
  timings: dict
  xla_total: float
  xla_matmul: float
  memory: dict
  metrics: object = None

  def step(self) -> float:
    """One synchronized step; returns its wall-clock seconds."""
    t = time.perf_counter()
    self.state, self.metrics = self.compiled(self.state, self.teacher_params, self.batch)
    jax.block_until_ready((self.state, self.metrics))
    return time.perf_counter() - t




def _loop(case: StepCase, batches, n: int) -> float:
  """n train steps as train.run_stage runs them (dispatch step i, then fetch the metrics of
  step i - 1); returns seconds per step, synchronized at the end."""
  t = time.perf_counter()
  pending = None
  for _ in range(n):
    batch = next(batches)
    case.state, metrics = case.compiled(case.state, case.teacher_params, batch)
    if pending is not None:
      jax.device_get(pending)
    pending = metrics
  jax.device_get(pending)
  jax.block_until_ready(case.state)
  return (time.perf_counter() - t) / n


def _fed(loader, mesh, batch_size: int, scalars: dict, finish):
  for _, local in loader:
    batch = finish(sharding.global_batch_from_local(local, mesh, batch_size))
    batch.update(scalars)
    yield batch


LOADER_MODES = ("device_batch", "loader_host_normalize", "loader_device_normalize")


def _median_us(fn, n: int) -> float:
  times = []
  for i in range(n):
    t = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t)
  return 1e6 * statistics.median(times)


def loader_host_cost(data_cfg, source, batch_size: int, *, calls: int = 30) -> dict:
  """Microseconds per batch that the loader thread spends producing a batch (fetch, and with
  host normalization the float conversion and flip), timed alone in this thread, and the bytes
  it hands over."""
  from gdistill.data import pipeline
  out = {"shape": list(source.info.shape), "batch": batch_size,
         "random_flip": bool(data_cfg.random_flip)}
  for host in (True, False):
    read = pipeline._reader(data_cfg, source, global_batch_size=batch_size, seed=0, lo=0,
                            hi=batch_size, host_normalize=host)
    name = "host_normalize" if host else "device_normalize"
    out[f"{name}_us"] = _median_us(read, calls)
    out[f"{name}_bytes"] = int(sum(v.nbytes for v in read(0).values()))
  return out


def main_thread_cost(data_cfg, source, mesh, batch_size: int, finish, *, calls: int = 20) -> dict:
  """Microseconds per batch the training thread spends on it, timed alone: the transfer
  (global_batch_from_local) of the float32 and of the uint8 batch, and the jitted finish_batch
  of the uint8 one (on a CPU it runs on XLA's cores)."""
  from gdistill.data import pipeline
  b, out = batch_size, {}
  for host in (True, False):
    read = pipeline._reader(data_cfg, source, global_batch_size=b, seed=0, lo=0, hi=b,
                            host_normalize=host)
    local = [read(i) for i in range(8)]
    out["transfer_float32_us" if host else "transfer_uint8_us"] = _median_us(
        lambda i: jax.block_until_ready(
            sharding.global_batch_from_local(local[i % 8], mesh, b)), calls)
  on_dev = [sharding.global_batch_from_local(x, mesh, b) for x in local]
  jax.block_until_ready(finish(on_dev[0]))            # compiles finish_batch (tens of ms)
  out["finish_on_device_us"] = _median_us(
      lambda i: jax.block_until_ready(finish(on_dev[i % 8])), calls)
  return out


def synthetic_source(shape=(64, 64, 3), num_examples: int = 2048, num_classes: int = 1000):
  """An in-memory uint8 image source of the given shape (random pixels) for loader_host_cost."""
  from gdistill.data import pipeline
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_examples,) + tuple(shape), dtype=np.uint8)
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  info = pipeline.DatasetInfo("synthetic", tuple(shape), num_classes, num_examples)
  return pipeline._Source(info, lambda idx: (images[idx], labels[idx]))


def bench_loader(config, case: StepCase, mesh, *, steps: int, warmup: int, rounds: int,
                 log=print) -> dict:
  """The teacher step fed by the real loader vs by one pre-built device batch.

  Each round runs every mode once (the order rotates from round to round), as a block: open
  the loader (its thread starts prefetching), `warmup` untimed steps, `steps` timed steps,
  close it. seconds_per_step: median over the rounds of a block's time per step;
  overhead_pct: median over the rounds of block / device_batch block of the same round - 1
  (paired, so a load that drifts between rounds cancels), with its range over the rounds;
  overhead_pct_of_min: the same from each mode's fastest block (the least disturbed one).
  estimate_pct: the same share from the pieces timed alone (loader thread's work per batch +
  the main thread's transfer and finish_batch, over the device_batch step time): what the
  pipeline adds when nothing overlaps, readable even where the host's load hides it.
  """
  from gdistill.data import pipeline
  try:
    source = pipeline._open(config.data)
  except FileNotFoundError as e:
    log(f"[loader] skipped: {' '.join(str(e).splitlines())}")
    return {"skipped": " ".join(str(e).splitlines())}
  b = case.batch_size
  synthetic_cfg, synthetic = _DataCfg(random_flip=True), synthetic_source()
  finish = train.batch_finisher(mesh)
  scalars = train.step_scalars(mesh, 0, seed=0)
  fixed = dict(case.batch)
  times = {m: [] for m in LOADER_MODES}
  step0 = 0
  for r in range(rounds):
    for mode in LOADER_MODES[r % 3:] + LOADER_MODES[:r % 3]:
      if mode == "device_batch":
        it = itertools.repeat(fixed)
        if warmup:
          _loop(case, it, warmup)
        times[mode].append(_loop(case, it, steps))
        continue
      with data.make_loader(config.data, global_batch_size=b, seed=0, start_step=step0,
                            host_normalize=mode == "loader_host_normalize") as loader:
        it = _fed(loader, mesh, b, scalars, finish)
        if warmup:
          _loop(case, it, warmup)
        times[mode].append(_loop(case, it, steps))
      step0 += warmup + steps + 4
  med = {m: statistics.median(v) for m, v in times.items()}
  paired = {m: [100.0 * (t / t0 - 1.0) for t, t0 in zip(times[m], times["device_batch"])]
            for m in LOADER_MODES[1:]}
  pieces = main_thread_cost(config.data, source, mesh, b, finish)
  host_cost = loader_host_cost(config.data, source, b)
  per_step = {"loader_host_normalize": host_cost["host_normalize_us"]
              + pieces["transfer_float32_us"],
              "loader_device_normalize": host_cost["device_normalize_us"]
              + pieces["transfer_uint8_us"] + pieces["finish_on_device_us"]}
  out = {"batch": b, "steps_per_round": steps, "warmup": warmup, "rounds": rounds,
         "seconds_per_step": med, "seconds_per_step_rounds": times,
         "overhead_pct": {m: statistics.median(v) for m, v in paired.items()},
         "overhead_pct_range": {m: [min(v), max(v)] for m, v in paired.items()},
         "overhead_pct_of_min": {m: 100.0 * (min(times[m]) / min(times["device_batch"]) - 1.0)
                                 for m in LOADER_MODES[1:]},
         "estimate_us": per_step,
         "estimate_pct": {m: 100.0 * 1e-6 * us / med["device_batch"]
                          for m, us in per_step.items()},
         "host_cost": host_cost,
         "host_cost_64x64x3": loader_host_cost(synthetic_cfg, synthetic, b),
         "pieces_64x64x3": main_thread_cost(synthetic_cfg, synthetic, mesh, b, finish),
         "pieces": pieces,
         "normalize_on_device_default": bool(config.data.normalize_on_device),
         "tensorflow_imported": "tensorflow" in sys.modules,
         "tensorflow": runtime.tensorflow_report()}
  for m in LOADER_MODES:
    extra = "" if m == "device_batch" else (f" (paired {out['overhead_pct'][m]:+.1f}%, pieces "
                                            f"{out['estimate_pct'][m]:.2f}%)")
    log(f"[loader] {m}: {1e3 * med[m]:.1f} ms/step{extra}")
  return out


@dataclasses.dataclass(frozen=True)
class _DataCfg:
  """The data keys _reader reads, for the synthetic source."""
  name: str = "synthetic"
  random_flip: bool = False


def loader_markdown(lo: dict) -> str:
  if "skipped" in lo:
    return f"loader: skipped ({lo['skipped']})"
  sec = lo["seconds_per_step"]
  lines = [f"Teacher step (batch {lo['batch']}) fed by the input pipeline, {lo['rounds']} "
           f"rounds of {lo['steps_per_round']} steps per mode (medians over the rounds):", "",
           "| fed by | ms/step (median) | ms/step (fastest block) | loader overhead, paired "
           "(range) | of the fastest blocks | from the pieces |", "|---|---|---|---|---|---|"]
  for m in LOADER_MODES:
    fastest = 1e3 * min(lo["seconds_per_step_rounds"][m])
    if m == "device_batch":
      lines.append(f"| device batch | {1e3 * sec[m]:.1f} | {fastest:.1f} | - | - | - |")
      continue
    lo_, hi_ = lo["overhead_pct_range"][m]
    lines.append(f"| {m.replace('_', ' ')} | {1e3 * sec[m]:.1f} | {fastest:.1f} | "
                 f"{lo['overhead_pct'][m]:+.1f}% ({lo_:+.1f}% .. {hi_:+.1f}%) | "
                 f"{lo['overhead_pct_of_min'][m]:+.1f}% | "
                 f"{lo['estimate_pct'][m]:.2f}% ({lo['estimate_us'][m]:.0f} us) |")
  lines.append("")
  for key, what in (("host_cost", "this dataset"), ("host_cost_64x64x3", "synthetic 64x64x3")):
    h = lo[key]
    lines.append(
        f"loader thread per batch ({what}, {h['batch']} x {tuple(h['shape'])}, flip "
        f"{h['random_flip']}): host normalize {h['host_normalize_us']:.0f} us "
        f"({h['host_normalize_bytes'] / 2 ** 20:.2f} MiB), device normalize "
        f"{h['device_normalize_us']:.0f} us ({h['device_normalize_bytes'] / 2 ** 20:.2f} MiB)")
  for key, what in (("pieces", "this dataset"), ("pieces_64x64x3", "synthetic 64x64x3")):
    p = lo[key]
    lines.append(f"training thread per batch ({what}): global_batch_from_local float32 "
                 f"{p['transfer_float32_us']:.0f} us, uint8 {p['transfer_uint8_us']:.0f} us; "
                 f"jitted finish_batch {p['finish_on_device_us']:.0f} us")
  lines.append(f"TensorFlow imported in this process: {lo['tensorflow_imported']}")
  return "\n".join(lines)
