"""Reference statistics (mu, sigma) of real-data features, computed once per workdir.

  mu, sigma = reference_stats(workdir + '/ref_stats.npz',
                              lambda: classifier_features(state, images)[0],
                              key=state.metadata['data_fingerprint'])

The cache is an .npz (allow_pickle=False) with 'mu' float64 [D], 'sigma' float64
[D, D], 'num_examples' and 'key'. It is reused only when it reads back whole
with consistent shapes (and the requested feature_dim and key); otherwise it is
recomputed and replaced, atomically (temporary file, then rename).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from gdistill import paths
from gdistill.metrics.frechet import feature_stats

log = logging.getLogger(__name__)


def _read(path: str, feature_dim: int | None, key: str) -> tuple[np.ndarray, np.ndarray] | str:
  """(mu, sigma), or why the cache cannot be used."""
  try:
    npz = paths.load_npz(path)
    mu, sigma, stored_key = npz["mu"], npz["sigma"], str(npz["key"])
  except Exception as e:  # pylint: disable=broad-except
    return f"unreadable ({type(e).__name__}: {e})"
  d = mu.shape[0] if mu.ndim == 1 else -1
  if d < 1 or sigma.shape != (d, d):
    return f"inconsistent shapes mu {mu.shape}, sigma {sigma.shape}"
  if feature_dim is not None and d != feature_dim:
    return f"feature dimension {d}, expected {feature_dim}"
  if stored_key != key:
    return f"key {stored_key!r}, expected {key!r}"
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    return "non-finite values"
  return mu, sigma


def reference_stats(cache_path: str, compute_fn: Callable[[], np.ndarray], *,
                    feature_dim: int | None = None, key: str = "") -> tuple[np.ndarray, np.ndarray]:
  """(mu float64 [D], sigma float64 [D, D]) of compute_fn()'s features [N, D], cached."""
  if paths.exists(cache_path):
    cached = _read(cache_path, feature_dim, key)
    if not isinstance(cached, str):
      return cached
    log.warning("Recomputing reference statistics: %s is %s.", cache_path, cached)
  features = np.asarray(compute_fn())
  if features.ndim != 2 or (feature_dim is not None and features.shape[1] != feature_dim):
    raise ValueError(f"compute_fn returned features of shape {features.shape}; expected "
                     f"[N, {feature_dim if feature_dim is not None else 'D'}].")
  mu, sigma = feature_stats(features)
  paths.save_npz_atomic(cache_path, dict(mu=mu, sigma=sigma,
                                         num_examples=np.int64(features.shape[0]),
                                         key=np.array(key)))
  return mu, sigma
