"""Inception Score: IS = exp(E_x KL(p(y | x) || p(y))), p(y) = E_x p(y | x).

With `splits` > 1 the N samples are cut into equal consecutive chunks (the
remainder N % splits is dropped, as in the reference implementation), IS is
computed per chunk, and the mean over chunks is returned.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy


@jax.jit
def _log_probs_from_logits(logits: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@jax.jit
def _split_scores(probs: jax.Array) -> jax.Array:
  """probs [S, n, K] -> IS of each of the S splits, [S]."""
  marginal = jnp.mean(probs, axis=1, keepdims=True)  # p(y), [S, 1, K].
  # KL(p(y|x) || p(y)) = sum_y p log p - p log p(y); 0 log 0 = 0.
  kl = jnp.sum(xlogy(probs, probs) - xlogy(probs, marginal), axis=-1)  # [S, n].
  return jnp.exp(jnp.mean(kl, axis=-1))


def _looks_like_probs(x: np.ndarray) -> bool:
  return bool(np.all(x >= 0.0) and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3))


def inception_score(logits_or_probs, splits: int = 1, *,
                    from_logits: bool | None = None) -> float:
  """exp(E KL(p(y|x) || p(y))) of logits or probabilities [N, K], averaged over splits.

  from_logits=None decides from the values: rows that are non-negative and sum
  to 1 are probabilities, anything else is logits (softmax is applied).
  """
  x = np.asarray(logits_or_probs, np.float32)
  if x.ndim != 2:
    raise ValueError(f"logits_or_probs has shape {x.shape}; expected [N, K].")
  n = x.shape[0]
  if not 1 <= splits <= n:
    raise ValueError(f"splits={splits}: must be in 1..N={n}.")
  if from_logits is None:
    from_logits = not _looks_like_probs(x)
  if from_logits:
    probs = jnp.exp(_log_probs_from_logits(x))
  else:
    probs = jnp.asarray(x / x.sum(axis=-1, keepdims=True))
  size = n // splits
  probs = probs[: size * splits].reshape(splits, size, x.shape[1])
  return float(jnp.mean(_split_scores(probs)))
