"""The diffusion math of gdistill: small pure, jit-able functions.

Conventions (see PAPER.md): continuous time t in [0, 1], variance preserving,
z_t = alpha_t x + sigma_t eps with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr).
Every function takes a per-example logSNR of shape [B] (or a scalar) and broadcasts it
against [B, ...] tensors. Guidance: x_w = (1 + w) x_cond - w x_uncond; w = 0 is conditional.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

PARAMETRIZATIONS = ("x", "eps", "v", "both")
WEIGHTINGS = ("snr_trunc", "snr", "constant", "v_mse")


def bcast(a: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-example [B] (or scalar) array to broadcast against x [B, ...]."""
  a = jnp.asarray(a)
  if a.ndim == 0:
    return a
  assert a.ndim == 1 and a.shape[0] == x.shape[0], (a.shape, x.shape)
  return a.reshape(a.shape + (1,) * (x.ndim - 1))


def _cosine_ab(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
  b = math.atan(math.exp(-0.5 * logsnr_max))
  a = math.atan(math.exp(-0.5 * logsnr_min)) - b
  return a, b


def logsnr_schedule_cosine(t, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
  """lambda(t) = -2 log tan(a t + b): lambda(0) = logsnr_max, lambda(1) = logsnr_min."""
  a, b = _cosine_ab(logsnr_min, logsnr_max)
  t = jnp.asarray(t, jnp.float32)
  return -2.0 * jnp.log(jnp.tan(a * t + b))


def t_from_logsnr_cosine(logsnr, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
  """Inverse of logsnr_schedule_cosine: t = (arctan(exp(-lambda / 2)) - b) / a."""
  a, b = _cosine_ab(logsnr_min, logsnr_max)
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return (jnp.arctan(jnp.exp(-0.5 * logsnr)) - b) / a


def alpha_sigma(logsnr):
  """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def diffuse(x, eps, logsnr):
  """q(z_t | x): z = alpha x + sigma eps."""
  assert x.shape == eps.shape, (x.shape, eps.shape)
  alpha, sigma = alpha_sigma(logsnr)
  return bcast(alpha, x) * x + bcast(sigma, x) * eps


def eps_from_x(z, x, logsnr):
  """eps = (z - alpha x) / sigma."""
  alpha, sigma = alpha_sigma(logsnr)
  return (z - bcast(alpha, z) * x) / bcast(sigma, z)


def x_from_eps(z, eps, logsnr):
  """x = (z - sigma eps) / alpha."""
  alpha, sigma = alpha_sigma(logsnr)
  return (z - bcast(sigma, z) * eps) / bcast(alpha, z)


def v_from_x_eps(x, eps, logsnr):
  """v = alpha eps - sigma x."""
  alpha, sigma = alpha_sigma(logsnr)
  return bcast(alpha, x) * eps - bcast(sigma, x) * x


def v_from_x(z, x, logsnr):
  """v from (z, x): v = alpha eps(z, x) - sigma x."""
  return v_from_x_eps(x, eps_from_x(z, x, logsnr), logsnr)


def v_from_eps(z, eps, logsnr):
  """v from (z, eps): v = alpha eps - sigma x(z, eps)."""
  return v_from_x_eps(x_from_eps(z, eps, logsnr), eps, logsnr)


def x_from_v(z, v, logsnr):
  """x = alpha z - sigma v."""
  alpha, sigma = alpha_sigma(logsnr)
  return bcast(alpha, z) * z - bcast(sigma, z) * v


def eps_from_v(z, v, logsnr):
  """eps = sigma z + alpha v."""
  alpha, sigma = alpha_sigma(logsnr)
  return bcast(sigma, z) * z + bcast(alpha, z) * v


def x_from_both(z, x_hat, eps_hat, logsnr):
  """'both' merge: x = sigma^2 x_hat + (1 - sigma^2) (z - sigma eps_hat) / alpha."""
  _, sigma = alpha_sigma(logsnr)
  s2 = bcast(sigma, z) ** 2
  return s2 * x_hat + (1.0 - s2) * x_from_eps(z, eps_hat, logsnr)


def x_from_output(out, z, logsnr, parametrization: str):
  """Maps a network output in the given parametrization to the x prediction."""
  if parametrization == "x":
    return out
  if parametrization == "eps":
    return x_from_eps(z, out, logsnr)
  if parametrization == "v":
    return x_from_v(z, out, logsnr)
  if parametrization == "both":
    c = z.shape[-1]
    assert out.shape[-1] == 2 * c, (out.shape, z.shape)
    return x_from_both(z, out[..., :c], out[..., c:], logsnr)
  raise ValueError(f"unknown parametrization {parametrization!r}; valid: {PARAMETRIZATIONS}")


def output_channels(parametrization: str, channels: int) -> int:
  """Number of network output channels for a parametrization."""
  if parametrization not in PARAMETRIZATIONS:
    raise ValueError(f"unknown parametrization {parametrization!r}; valid: {PARAMETRIZATIONS}")
  return 2 * channels if parametrization == "both" else channels


def guided(x_cond, x_uncond, w):
  """x_w = (1 + w) x_cond - w x_uncond (w per example [B] or scalar; w = 0 is conditional)."""
  w = bcast(w, x_cond)
  return (1.0 + w) * x_cond - w * x_uncond


def ddim_step(z, x_pred, logsnr_t, logsnr_s):
  """Deterministic DDIM step t -> s: z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t."""
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  eps = (z - bcast(alpha_t, z) * x_pred) / bcast(sigma_t, z)
  return bcast(alpha_s, z) * x_pred + bcast(sigma_s, z) * eps


def distillation_target(z_t, z_s, logsnr_t, logsnr_s):
  """x~ with ddim_step(z_t, x~, t, s) = z_s: (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - (sigma_s/sigma_t) alpha_t)."""
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  ratio = bcast(sigma_s / sigma_t, z_t)
  return (z_s - ratio * z_t) / (bcast(alpha_s, z_t) - ratio * bcast(alpha_t, z_t))


# Loss weightings: the loss is weight(logsnr) * ||x - x_hat||^2.
def weight_snr_trunc(logsnr):
  """max(1, SNR): truncated SNR weighting (default)."""
  return jnp.maximum(jnp.exp(logsnr), 1.0)


def weight_snr(logsnr):
  """SNR: equals the eps-MSE."""
  return jnp.exp(logsnr)


def weight_constant(logsnr):
  """1: plain x-MSE."""
  return jnp.ones_like(logsnr)


def weight_v_mse(logsnr):
  """1 + SNR = 1 / sigma^2: equals the v-MSE."""
  return 1.0 + jnp.exp(logsnr)


_WEIGHTINGS: dict[str, Callable] = {
    "snr_trunc": weight_snr_trunc,
    "snr": weight_snr,
    "constant": weight_constant,
    "v_mse": weight_v_mse,
}


def get_weighting(name: str) -> Callable:
  """The weighting function called `name` (one of WEIGHTINGS)."""
  if name not in _WEIGHTINGS:
    raise ValueError(f"unknown weighting {name!r}; valid: {WEIGHTINGS}")
  return _WEIGHTINGS[name]


def weighted_x_loss(x_pred, x_target, logsnr, weighting: str = "snr_trunc"):
  """Per-example loss weight(logsnr) * mean_dims (x_target - x_pred)^2, shape [B]."""
  assert x_pred.shape == x_target.shape, (x_pred.shape, x_target.shape)
  err = jnp.mean(jnp.square(x_target.astype(jnp.float32) - x_pred.astype(jnp.float32)),
                 axis=tuple(range(1, x_pred.ndim)))
  return get_weighting(weighting)(logsnr) * err
