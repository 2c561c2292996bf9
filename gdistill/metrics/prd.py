"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019).

The manifold of a feature set Phi is the union of balls B(phi, r_k(phi)), where
r_k(phi) is the distance from phi to its k-th nearest neighbour in Phi (phi
itself not counted). Then
  precision = fraction of generated features inside manifold(real),
  recall    = fraction of real features inside manifold(generated).
Squared distances come from |a|^2 + |b|^2 - 2 a.b on features centred on the
reference mean (which keeps the cancellation small), computed batch by batch so
that only a [batch, N] block is ever held. Queries are zero-padded to a whole
number of batches so each shape compiles once.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PrecisionRecall(NamedTuple):
  precision: float
  recall: float


def _sq_dists(queries: jax.Array, refs: jax.Array) -> jax.Array:
  """|q_i - r_j|^2, float32 [B, N], clamped at 0."""
  q_sq = jnp.sum(queries * queries, axis=-1)
  r_sq = jnp.sum(refs * refs, axis=-1)
  cross = jnp.matmul(queries, refs.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(q_sq[:, None] + r_sq[None, :] - 2.0 * cross, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_sq_dist(queries: jax.Array, refs: jax.Array, *, k: int) -> jax.Array:
  """(k+1)-th smallest squared distance: the k-th neighbour when queries are in refs."""
  neg_smallest, _ = jax.lax.top_k(-_sq_dists(queries, refs), k + 1)
  return -neg_smallest[:, -1]


@jax.jit
def _inside(queries: jax.Array, refs: jax.Array, ref_sq_radii: jax.Array) -> jax.Array:
  """Whether each query lies in some ball B(ref_j, radius_j), bool [B]."""
  return jnp.any(_sq_dists(queries, refs) <= ref_sq_radii[None, :], axis=-1)


def _batched(fn, queries: np.ndarray, batch_size: int) -> np.ndarray:
  n = queries.shape[0]
  padded = -(-n // batch_size) * batch_size
  queries = np.concatenate(
      [queries, np.zeros((padded - n, queries.shape[1]), queries.dtype)])
  outs = [fn(jnp.asarray(queries[lo:lo + batch_size]))
          for lo in range(0, padded, batch_size)]
  return np.concatenate([np.asarray(o) for o in outs])[:n]


def manifold_sq_radii(features, *, k: int = 3, batch_size: int = 1024) -> np.ndarray:
  """Squared k-NN radius of every feature within its own set, float32 [N]."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or features.shape[0] <= k:
    raise ValueError(f"features have shape {features.shape}; need [N, D] with N > k={k}.")
  refs = jnp.asarray(features)
  return _batched(lambda q: _kth_sq_dist(q, refs, k=k), features, batch_size)


def manifold_coverage(refs, ref_sq_radii, queries, *, batch_size: int = 1024) -> float:
  """Fraction of queries [M, D] inside the manifold of refs [N, D] with radii^2 [N]."""
  refs = jnp.asarray(refs, jnp.float32)
  radii = jnp.asarray(ref_sq_radii, jnp.float32)
  inside = _batched(lambda q: _inside(q, refs, radii),
                    np.asarray(queries, np.float32), batch_size)
  return float(np.mean(inside))


def precision_recall(real_features, fake_features, *, k: int = 3,
                     batch_size: int = 1024) -> PrecisionRecall:
  """Improved precision (fake inside real manifold) and recall (real inside fake)."""
  real = np.asarray(real_features, np.float32)
  fake = np.asarray(fake_features, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"real_features {real.shape} and fake_features {fake.shape} "
                     "must both be [N, D] with the same D.")
  center = real.mean(axis=0, keepdims=True)
  real, fake = real - center, fake - center
  real_radii = manifold_sq_radii(real, k=k, batch_size=batch_size)
  fake_radii = manifold_sq_radii(fake, k=k, batch_size=batch_size)
  precision = manifold_coverage(real, real_radii, fake, batch_size=batch_size)
  recall = manifold_coverage(fake, fake_radii, real, batch_size=batch_size)
  return PrecisionRecall(precision, recall)
