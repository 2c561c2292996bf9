"""ADM / iDDPM-style U-Net (Dhariwal & Nichol) in Flax Linen, conditioned on logSNR, label and w.

Inputs: z [B, H, W, C], logsnr [B], label [B] int (index num_classes = null label), optional w [B]
(students), optional `extra` [B, H, W, C_extra] channels concatenated to z (e.g. an inpainting
mask and masked image), optional `context` [B, L, D] attended to by cross-attention in every
attention block (e.g. text embeddings). Output: [B, H, W, out_channels] in the configured
parametrization (see diffusion.x_from_output).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdistill.models import layers

Dtype = Any


def _resize(x, factor: float):
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, int(h * factor), int(w * factor), c), method="nearest")


def _avg_pool(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
  """GroupNorm -> swish -> conv, scale-shift conditioning, dropout, zero-init conv, skip."""
  out_ch: int
  num_groups: int
  dropout: float
  updown: Optional[str] = None  # None | 'up' | 'down'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.swish(layers.group_norm(self.num_groups, param_dtype=self.param_dtype,
                                   name="norm0")(x)).astype(self.dtype)
    if self.updown == "up":
      h, x = _resize(h, 2), _resize(x, 2)
    elif self.updown == "down":
      h, x = _avg_pool(h), _avg_pool(x)
    h = layers.conv(self.out_ch, 3, name="conv0", **kw)(h)
    ss = layers.dense(2 * self.out_ch, name="emb_proj", **kw)(nn.swish(emb))
    scale, shift = jnp.split(ss[:, None, None, :], 2, axis=-1)
    h = layers.group_norm(self.num_groups, param_dtype=self.param_dtype, name="norm1")(h)
    h = h * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
    h = nn.swish(h).astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = layers.conv(self.out_ch, 3, zero=True, name="conv1", **kw)(h)
    if x.shape[-1] != self.out_ch:
      x = layers.conv(self.out_ch, 1, name="skip", **kw)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the H*W positions (+ optional cross-attention to context)."""
  head_dim: int
  num_groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hh, ww, c = x.shape
    assert c % self.head_dim == 0, (c, self.head_dim)
    heads = c // self.head_dim
    h = layers.group_norm(self.num_groups, param_dtype=self.param_dtype, name="norm")(x)
    h = h.astype(self.dtype).reshape(b, hh * ww, c)
    qkv = layers.dense(3 * c, name="qkv", **kw)(h).reshape(b, hh * ww, 3, heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if context is not None:
      kv = layers.dense(2 * c, name="context_kv", **kw)(context.astype(self.dtype))
      kv = kv.reshape(b, context.shape[1], 2, heads, self.head_dim)
      k = jnp.concatenate([k, kv[:, :, 0]], axis=1)
      v = jnp.concatenate([v, kv[:, :, 1]], axis=1)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits / jnp.sqrt(float(self.head_dim)), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v).reshape(b, hh * ww, c)
    out = layers.dense(c, zero=True, name="proj_out", **kw)(out)
    return x + out.reshape(b, hh, ww, c).astype(x.dtype)


class UNet(nn.Module):
  """ADM U-Net. attn_resolutions are spatial sizes (e.g. (32, 16, 8) for 64x64 inputs)."""
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  head_dim: int = 64
  dropout: float = 0.0
  num_groups: int = 32
  resblock_updown: bool = True
  num_classes: int = 0
  out_channels: int = 3
  w_embedding: bool = False
  w_scale: float = 4.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z, logsnr, label=None, w=None, *, extra=None, context=None,
               train: bool = False):
    assert z.ndim == 4, z.shape
    assert logsnr.shape == z.shape[:1], (logsnr.shape, z.shape)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blk = dict(num_groups=self.num_groups, **kw)
    res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    emb = layers.ConditioningEmbedding(self.ch, 4 * self.ch, self.num_classes, self.w_embedding,
                                       self.w_scale, name="cond", **kw)(logsnr, label, w)
    h = z if extra is None else jnp.concatenate([z, extra.astype(z.dtype)], axis=-1)
    h = layers.conv(self.ch, 3, name="conv_in", **kw)(h.astype(self.dtype))
    hs = [h]
    res = z.shape[1]
    n_levels = len(self.ch_mult)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res_cls(mult * self.ch, dropout=self.dropout, name=f"down_{level}_{i}", **blk)(
            h, emb, train)
        if res in self.attn_resolutions:
          h = AttentionBlock(self.head_dim, name=f"down_{level}_{i}_attn", **blk)(h, context)
        hs.append(h)
      if level != n_levels - 1:
        if self.resblock_updown:
          h = res_cls(h.shape[-1], dropout=self.dropout, updown="down",
                      name=f"down_{level}_downsample", **blk)(h, emb, train)
        else:
          h = layers.conv(h.shape[-1], 3, stride=2, name=f"down_{level}_downsample", **kw)(h)
        res //= 2
        hs.append(h)
    h = res_cls(h.shape[-1], dropout=self.dropout, name="mid_0", **blk)(h, emb, train)
    h = AttentionBlock(self.head_dim, name="mid_attn", **blk)(h, context)
    h = res_cls(h.shape[-1], dropout=self.dropout, name="mid_1", **blk)(h, emb, train)
    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = res_cls(mult * self.ch, dropout=self.dropout, name=f"up_{level}_{i}", **blk)(
            h, emb, train)
        if res in self.attn_resolutions:
          h = AttentionBlock(self.head_dim, name=f"up_{level}_{i}_attn", **blk)(h, context)
      if level != 0:
        if self.resblock_updown:
          h = res_cls(h.shape[-1], dropout=self.dropout, updown="up",
                      name=f"up_{level}_upsample", **blk)(h, emb, train)
        else:
          h = layers.conv(h.shape[-1], 3, name=f"up_{level}_upsample", **kw)(_resize(h, 2))
        res *= 2
    assert not hs
    h = nn.swish(layers.group_norm(self.num_groups, param_dtype=self.param_dtype,
                                   name="norm_out")(h)).astype(self.dtype)
    out = layers.conv(self.out_channels, 3, zero=True, name="conv_out", **kw)(h)
    return out.astype(jnp.float32)
