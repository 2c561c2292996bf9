"""Frechet distance between Gaussians fitted to features (FID), in float64 JAX.

  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

S1 S2 is not symmetric, so tr((S1 S2)^{1/2}) is computed through the symmetric
positive semi-definite M = S1^{1/2} S2 S1^{1/2}, which is similar to S1 S2 and so
has the same eigenvalues: tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)). Both
square roots use `eigh`; eigenvalues that round to slightly negative values are
clamped to 0. Everything runs under `jax.enable_x64(True)` in float64, so the
result agrees with a float64 `scipy.linalg.sqrtm` reference without its
complex-valued detours.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _psd_sqrt(s: jax.Array) -> jax.Array:
  """S^{1/2} of a symmetric PSD matrix via eigh; negative eigenvalues -> 0."""
  s = 0.5 * (s + s.T)
  eigvals, eigvecs = jnp.linalg.eigh(s)
  root = jnp.sqrt(jnp.maximum(eigvals, 0.0))
  return (eigvecs * root[None, :]) @ eigvecs.T


@jax.jit
def _frechet(mu1, sigma1, mu2, sigma2) -> jax.Array:
  root1 = _psd_sqrt(sigma1)
  m = root1 @ sigma2 @ root1
  eigvals = jnp.linalg.eigvalsh(0.5 * (m + m.T))
  tr_covmean = jnp.sum(jnp.sqrt(jnp.maximum(eigvals, 0.0)))
  diff = mu1 - mu2
  return diff @ diff + jnp.trace(sigma1) + jnp.trace(sigma2) - 2.0 * tr_covmean


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), float64; clamped at 0."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[-1] if mu1.ndim == 1 else -1
  for name, value, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)),
                             ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d))):
    if value.shape != shape:
      raise ValueError(f"{name} has shape {value.shape}; expected {shape} "
                       f"(mu1 has shape {mu1.shape}).")
  with jax.enable_x64(True):
    distance = float(_frechet(mu1, sigma1, mu2, sigma2))
  # Rounding can leave -1e-12 for identical Gaussians; a distance is >= 0.
  return max(distance, 0.0)


@jax.jit
def _stats(features: jax.Array) -> tuple[jax.Array, jax.Array]:
  mu = jnp.mean(features, axis=0)
  centered = features - mu[None, :]
  sigma = centered.T @ centered / (features.shape[0] - 1)
  return mu, sigma


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean float64 [D] and unbiased covariance float64 [D, D] of features [N, D]."""
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features have shape {features.shape}; expected [N, D] with N >= 2.")
  with jax.enable_x64(True):
    mu, sigma = _stats(features.astype(np.float64))
    return np.asarray(mu), np.asarray(sigma)


def fid_from_features(features1, features2) -> float:
  """Frechet distance between Gaussians fitted to features1 [N1, D] and features2 [N2, D]."""
  return frechet_distance(*feature_stats(features1), *feature_stats(features2))
