"""Process-level settings: the persistent compilation cache, TensorFlow kept out of XLA's way."""
from __future__ import annotations

import importlib.abc
import os
import sys


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
