"""A small residual MLP denoiser for 2-D toy data, with the U-Net's interface."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gdistill.models import layers

Dtype = Any


class MLPDenoiser(nn.Module):
  """z [B, D] -> output [B, out_channels], conditioned like the U-Net (logsnr, label, w)."""
  hidden: int = 256
  num_blocks: int = 3
  num_classes: int = 0
  out_channels: int = 2
  dropout: float = 0.0
  w_embedding: bool = False
  w_scale: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z, logsnr, label=None, w=None, *, extra=None, context=None,
               train: bool = False):
    assert z.ndim == 2, z.shape
    assert context is None, "MLPDenoiser takes no context"
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = layers.ConditioningEmbedding(self.hidden, self.hidden, self.num_classes,
                                       self.w_embedding, self.w_scale, name="cond", **kw)(
                                           logsnr, label, w)
    h = z if extra is None else jnp.concatenate([z, extra.astype(z.dtype)], axis=-1)
    h = layers.dense(self.hidden, name="dense_in", **kw)(h.astype(self.dtype))
    for i in range(self.num_blocks):
      r = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name=f"block{i}_norm",
                       scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(h)
      r = r + layers.dense(self.hidden, name=f"block{i}_emb", **kw)(nn.swish(emb))
      r = layers.dense(2 * self.hidden, name=f"block{i}_dense0", **kw)(nn.swish(r).astype(self.dtype))
      r = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(r))
      r = layers.dense(self.hidden, name=f"block{i}_dense1", **kw)(r)
      h = h + r
    h = nn.swish(nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="norm_out",
                              scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(h))
    out = layers.dense(self.out_channels, name="dense_out", **kw)(h.astype(self.dtype))
    return out.astype(jnp.float32)
