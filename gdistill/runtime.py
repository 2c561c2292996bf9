"""Process-level settings: XLA's CPU kernels, the persistent compilation cache, TensorFlow kept
out of XLA's way."""
from __future__ import annotations

import importlib.abc
import importlib.metadata
import os
import sys


# ------------------------------------------------------------------------------- XLA on the CPU
# jaxlib 0.10's CPU compiler hands convolutions, dots and element-wise ops to YNNPACK "library
# fusions" by default. On gdistill's CPU-sized models (convolutions of 4-128 channels at 4x4-32x32)
# its convolution and element-wise fusions run slower than XLA's own kernels: on the 2-core CPU of
# docs/PERFORMANCE.md, with YNNPACK kept for dots only, the shapes teacher's train step went
# 194-234 -> 147 ms, stage one's 233 -> 177 ms, a round's 250 -> 180 ms and the autoencoder's
# 8.7 -> 11.3 steps/s (dots stay with YNNPACK: a 2048^3 matmul runs at 0.18 TFLOP/s there, 0.14
# without). The flags apply only to jaxlib versions they were measured on (an XLA_FLAGS entry a
# jaxlib does not know aborts the process), never override the user's own XLA_FLAGS entry, and
# GDISTILL_XLA_CPU_DEFAULTS=0 turns them off.
CPU_XLA_FLAGS = (("xla_cpu_experimental_ynn_fusion_type", "individual_dot"),)
CPU_FLAGS_JAXLIB = ("0.10.",)   # jaxlib versions the flags were measured on (prefixes)


def configure_xla_cpu() -> str:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS; call it before JAX starts its backends (XLA reads the
  variable once, then). Returns what it did, in words (for a log line); never raises."""
  if os.environ.get("GDISTILL_XLA_CPU_DEFAULTS", "1") == "0":
    return "off (GDISTILL_XLA_CPU_DEFAULTS=0)"
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return "off (jaxlib not found)"
  if not version.startswith(CPU_FLAGS_JAXLIB):
    return f"off (measured on jaxlib {', '.join(v + '*' for v in CPU_FLAGS_JAXLIB)}, not {version})"
  jax = sys.modules.get("jax")
  if jax is not None:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      return "off (JAX's backends had already started)"
  flags = os.environ.get("XLA_FLAGS", "")
  added = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS if f"--{name}=" not in flags]
  if added:
    os.environ["XLA_FLAGS"] = " ".join(([flags] if flags.strip() else []) + added)
  return ("on: " + " ".join(added)) if added else "kept the XLA_FLAGS entries already set"


def enable_compilation_cache(directory: str, min_compile_secs: float = 1.0) -> None:
  """Caches compiled XLA executables on disk so reruns and resumed runs skip compilation."""
  if not directory:
    return
  import jax  # here: configure_tensorflow needs no JAX
  path = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------------- TensorFlow
# TensorFlow comes in through clu's TensorBoard writer (gdistill/dashboard.py, evaluate.py) and
# tensorflow_datasets. It runs no model work here, yet by default its context takes every GPU
# (allocating most of its memory) and starts intra- and inter-op thread pools of one thread per
# core, beside XLA's. configure_tensorflow hides the accelerators from it and shrinks its pools.
_TF_SETTINGS: dict = {}
_TF_REPORT: dict = {}       # What the last application did (tests and the benchmark read it).


def configure_tensorflow(data_cfg=None, *, intra_op_threads: int | None = None,
                         inter_op_threads: int | None = None,
                         hide_accelerators: bool | None = None) -> dict:
  """Keeps TensorFlow off the accelerators and off the cores XLA uses. Idempotent, cheap.

  Settings: data_cfg.tf_intra_op_threads, .tf_inter_op_threads (0: TensorFlow's default, one
  thread per core) and .tf_hide_accelerators, or the keyword arguments (which win); defaults
  1, 1, True. Call it before TensorFlow runs its first op (the first op initializes its context,
  after which device visibility and pool sizes are fixed):
    * TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS are set in the environment (TensorFlow
      reads them when its context starts, whoever imports it);
    * if TensorFlow is already imported, tf.config.set_visible_devices([], 'GPU' and 'TPU')
      and tf.config.threading.set_{intra,inter}_op_parallelism_threads are applied now;
      otherwise an import hook applies them right after the first `import tensorflow`, so this
      never imports TensorFlow itself (it costs seconds).
  If TensorFlow's context already started with other settings, this prints one warning line
  to stderr and leaves TensorFlow as it is (never raises).
  Returns the settings.
  """
  get = (lambda k, d: d) if data_cfg is None else (
      lambda k, d: data_cfg.get(k, d) if hasattr(data_cfg, "get") else getattr(data_cfg, k, d))
  settings = {
      "intra_op_threads": int(get("tf_intra_op_threads", 1) if intra_op_threads is None
                              else intra_op_threads),
      "inter_op_threads": int(get("tf_inter_op_threads", 1) if inter_op_threads is None
                              else inter_op_threads),
      "hide_accelerators": bool(get("tf_hide_accelerators", True) if hide_accelerators is None
                                else hide_accelerators)}
  for key in ("intra_op_threads", "inter_op_threads"):
    if settings[key] < 0:
      from gdistill import config_lib
      raise config_lib.ConfigError(f"config.data.tf_{key}={settings[key]} is invalid: an "
                                   "integer >= 0 (0: TensorFlow's default, one per core)")
  _TF_SETTINGS.clear()
  _TF_SETTINGS.update(settings)
  for var, key in (("TF_NUM_INTRAOP_THREADS", "intra_op_threads"),
                   ("TF_NUM_INTEROP_THREADS", "inter_op_threads")):
    if settings[key] > 0:
      os.environ[var] = str(settings[key])
  tf = sys.modules.get("tensorflow")
  if tf is not None and hasattr(tf, "config"):
    _apply_tensorflow_settings(tf)
  elif not any(isinstance(f, _ConfigureOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _ConfigureOnImport())
  return dict(settings)


def tensorflow_report() -> dict:
  """What the last application of the settings found: {'applied': bool, 'error': str,
  'visible_device_types': [...], 'intra_op_threads': n, 'inter_op_threads': n} as TensorFlow
  reports them (0: its default); {} while TensorFlow has not been imported."""
  return dict(_TF_REPORT)


def _apply_tensorflow_settings(tf) -> None:
  s = _TF_SETTINGS
  if not s:
    return
  error = ""
  try:
    if s["hide_accelerators"]:
      for kind in ("GPU", "TPU"):
        tf.config.set_visible_devices([], kind)
    if s["intra_op_threads"]:
      tf.config.threading.set_intra_op_parallelism_threads(s["intra_op_threads"])
    if s["inter_op_threads"]:
      tf.config.threading.set_inter_op_parallelism_threads(s["inter_op_threads"])
  except RuntimeError as e:  # The context started before (see configure_tensorflow).
    error = str(e)
    print(f"gdistill: TensorFlow's context started before runtime.configure_tensorflow() "
          f"({e}); its device visibility and thread pools stay as they were. Call "
          f"configure_tensorflow before the first TensorFlow op.", file=sys.stderr, flush=True)
  _TF_REPORT.clear()
  _TF_REPORT.update(
      applied=not error, error=error,
      visible_device_types=sorted({d.device_type for d in tf.config.get_visible_devices()}),
      intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
      inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads())


class _ConfigureOnImport(importlib.abc.MetaPathFinder):
  """One-shot: applies _TF_SETTINGS right after `tensorflow` executes, before any op runs."""

  def find_spec(self, fullname, path, target=None):
    if fullname != "tensorflow":
      return None
    sys.meta_path.remove(self)
    import importlib.util
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:
      return spec
    spec.loader = _ConfigureAfterExec(spec.loader)
    return spec


class _ConfigureAfterExec(importlib.abc.Loader):
  def __init__(self, inner):
    self._inner = inner

  def create_module(self, spec):
    return self._inner.create_module(spec)

  def exec_module(self, module):
    module.__loader__ = module.__spec__.loader = self._inner  # as if never wrapped
    self._inner.exec_module(module)
    _apply_tensorflow_settings(module)
