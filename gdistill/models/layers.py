"""Building blocks shared by the denoisers: annotated Dense/Conv, embeddings, conditioning.

Every parameter carries logical axis names (nn.with_logical_partitioning); the config maps
those names to mesh axes. Logical names used here:
  'embed'    input features of a Dense / conv (rows of a weight matrix)
  'mlp'      output features of a Dense / conv (columns)
  'vocab'    rows of an embedding table (labels, tokens, positions)
  'norm'     GroupNorm / LayerNorm scale and bias
  'bias'     biases
  'conv_h', 'conv_w'  conv kernel spatial dims (never sharded)
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LOGICAL_AXES = ("embed", "mlp", "vocab", "norm", "bias", "conv_h", "conv_w")


def _kinit(init, names):
  return nn.with_logical_partitioning(init, names)


def dense(features: int, *, dtype, param_dtype, zero: bool = False, name=None, scale: float = 1.0,
          use_bias: bool = True):
  """Dense layer with logical axes ('embed', 'mlp'); kernel [in, out], bias optional."""
  init = nn.initializers.zeros if zero else nn.initializers.variance_scaling(
      scale, "fan_avg", "uniform")
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name, use_bias=use_bias,
                  kernel_init=_kinit(init, ("embed", "mlp")),
                  bias_init=_kinit(nn.initializers.zeros, ("bias",)))


def conv(features: int, kernel: int = 3, *, dtype, param_dtype, stride: int = 1,
         zero: bool = False, name=None, padding="SAME"):
  """Conv layer with logical axes ('conv_h', 'conv_w', 'embed', 'mlp'); kernel HWIO.

  padding: "SAME" (default), "VALID", an int p (torch's padding=p: p zeros on every side), or
  explicit ((top, bottom), (left, right)). "SAME" with stride 2 pads (0, 1), not torch's (1, 1).
  """
  init = nn.initializers.zeros if zero else nn.initializers.variance_scaling(
      1.0, "fan_avg", "uniform")
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=_kinit(init, ("conv_h", "conv_w", "embed", "mlp")),
                 bias_init=_kinit(nn.initializers.zeros, ("bias",)))


def group_norm(num_groups: int, *, param_dtype, name=None, epsilon: float = 1e-5):
  """GroupNorm computed in float32 (statistics never in low precision)."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32,
                      param_dtype=param_dtype, name=name,
                      scale_init=_kinit(nn.initializers.ones, ("norm",)),
                      bias_init=_kinit(nn.initializers.zeros, ("norm",)))


def layer_norm(*, param_dtype, name=None, epsilon: float = 1e-5):
  """LayerNorm over the last axis, computed in float32; params `scale`, `bias` ('norm',)."""
  return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype, name=name,
                      scale_init=_kinit(nn.initializers.ones, ("norm",)),
                      bias_init=_kinit(nn.initializers.zeros, ("norm",)))


def embed(num_embeddings: int, features: int, *, dtype, param_dtype, name=None,
          stddev: float = 0.02):
  """Lookup table [num_embeddings, features] (param `embedding`), logical axes ('vocab', 'mlp')."""
  return nn.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype, name=name,
                  embedding_init=_kinit(nn.initializers.normal(stddev), ("vocab", "mlp")))


def sinusoidal_embedding(x: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Fourier features [B] -> [B, dim]: (cos(x f_k), sin(x f_k)), f_k = max_period^(-k/half)."""
  assert x.ndim == 1, x.shape
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def logsnr_to_time_feature(logsnr: jax.Array) -> jax.Array:
  """Maps logSNR to a bounded feature in [0, 1]: arctan(exp(-logsnr / 2)) / (pi / 2)."""
  logsnr = jnp.clip(logsnr.astype(jnp.float32), -20.0, 20.0)
  return jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * jnp.pi)


class ConditioningEmbedding(nn.Module):
  """Embedding vector from (logSNR, label, optional w): the vector every block is conditioned on.

  time: sinusoidal(1000 * time_feature(logsnr)) -> Dense -> swish -> Dense.
  label: table of num_classes + 1 rows (row num_classes is the null label), added.
  w (students, w_embedding=True): sinusoidal(1000 * w / w_scale) -> Dense -> swish -> Dense with a
  zero-initialised last layer, added: a fresh student equals its teacher exactly.
  """
  base_dim: int
  emb_dim: int
  num_classes: int
  w_embedding: bool = False
  w_scale: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, logsnr, label, w=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t = sinusoidal_embedding(1000.0 * logsnr_to_time_feature(logsnr), self.base_dim)
    emb = dense(self.emb_dim, name="time_dense0", **kw)(t)
    emb = dense(self.emb_dim, name="time_dense1", **kw)(nn.swish(emb))
    if self.num_classes > 0:
      assert label is not None and label.ndim == 1, "a class-conditional model needs labels [B]"
      table = nn.Embed(self.num_classes + 1, self.emb_dim, param_dtype=self.param_dtype,
                       dtype=self.dtype, name="label_embed",
                       embedding_init=_kinit(nn.initializers.normal(1.0), ("vocab", "mlp")))
      emb = emb + table(label)
    if self.w_embedding:
      if w is None:
        raise ValueError("this model is w-conditioned (a student): pass w [B]")
      w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), logsnr.shape)
      we = sinusoidal_embedding(1000.0 * w / self.w_scale, self.base_dim)
      we = dense(self.emb_dim, name="w_dense0", **kw)(we)
      we = dense(self.emb_dim, name="w_dense1", zero=True, **kw)(nn.swish(we))
      emb = emb + we
    elif w is not None:
      raise ValueError("w was given to a model without a w-embedding (a teacher); "
                       "teachers are guided by combining two forwards, see diffusion.guided")
    return emb
