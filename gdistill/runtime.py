"""Process-level JAX settings: the persistent compilation cache."""
from __future__ import annotations

import os

import jax


def enable_compilation_cache(directory: str, min_compile_secs: float = 1.0) -> None:
  """Caches compiled XLA executables on disk so reruns and resumed runs skip compilation."""
  if not directory:
    return
  path = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
