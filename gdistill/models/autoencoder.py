"""Stable Diffusion's VAE (diffusers' AutoencoderKL) in Flax Linen, NHWC, diffusers' names.

encode: x [B, H, W, in_channels] -> (mean, logvar) [B, H/f, W/f, latent_channels], f =
2^(len(block_out_channels) - 1); decode: z -> x. Pipelines scale latents by scaling_factor
(z_pipeline = scaling_factor * z); that scaling is the caller's, as in diffusers.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdistill.models import layers
from gdistill.models.attention import Attention
from gdistill.models.unet_cond import Downsample2D, ResnetBlock2D, Upsample2D

Dtype = Any

SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
    scaling_factor=0.18215)

_EPS = 1e-6  # every GroupNorm of diffusers' Encoder / Decoder


class VAEMidBlock(nn.Module):
  """diffusers' UNetMidBlock2D (no temb): resnets_0 -> attentions_0 -> resnets_1.

  attentions_0: single-head self-attention over the H*W positions with group_norm, biased
  to_q/to_k/to_v/to_out_0 and a residual (diffusers' Attention, _from_deprecated_attn_block).
  """
  groups: int = 32
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, _EPS, name="resnets_0", **kw)(x)
    x = Attention(heads=1, dim_head=c, bias=True, norm_num_groups=self.groups, eps=_EPS,
                  residual_connection=True, attention_impl=self.attention_impl,
                  name="attentions_0", **kw)(x)
    return ResnetBlock2D(c, self.groups, _EPS, name="resnets_1", **kw)(x)


class DownEncoderBlock2D(nn.Module):
  """resnets_j (no temb) x num_layers, then downsamplers_0 (pad (0, 1), stride 2) if any."""
  out_channels: int
  num_layers: int = 2
  add_downsample: bool = True
  groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, _EPS, name=f"resnets_{j}", **kw)(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """resnets_j (no temb) x num_layers, then upsamplers_0 (nearest x2, conv) if any."""
  out_channels: int
  num_layers: int = 3
  add_upsample: bool = True
  groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, _EPS, name=f"resnets_{j}", **kw)(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """conv_in -> down_blocks_i -> mid_block -> conv_norm_out -> silu -> conv_out (2 * latent)."""
  block_out_channels: Tuple[int, ...]
  layers_per_block: int
  latent_channels: int
  groups: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ch, n = self.block_out_channels, len(self.block_out_channels)
    h = layers.conv(ch[0], 3, padding=1, name="conv_in", **kw)(x.astype(self.dtype))
    for i, c in enumerate(ch):
      h = DownEncoderBlock2D(c, self.layers_per_block, i < n - 1, self.groups,
                             name=f"down_blocks_{i}", **kw)(h)
    h = VAEMidBlock(self.groups, self.attention_impl, name="mid_block", **kw)(h)
    h = layers.group_norm(self.groups, epsilon=_EPS, param_dtype=self.param_dtype,
                          name="conv_norm_out")(h)
    h = nn.silu(h).astype(self.dtype)
    return layers.conv(2 * self.latent_channels, 3, padding=1, name="conv_out", **kw)(h)


class Decoder(nn.Module):
  """conv_in -> mid_block -> up_blocks_i (layers_per_block + 1 resnets; upsamplers_0 except the
  last) -> conv_norm_out -> silu -> conv_out."""
  block_out_channels: Tuple[int, ...]
  layers_per_block: int
  out_channels: int
  groups: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    r_ch = tuple(reversed(self.block_out_channels))
    h = layers.conv(r_ch[0], 3, padding=1, name="conv_in", **kw)(z.astype(self.dtype))
    h = VAEMidBlock(self.groups, self.attention_impl, name="mid_block", **kw)(h)
    for i, c in enumerate(r_ch):
      h = UpDecoderBlock2D(c, self.layers_per_block + 1, i < len(r_ch) - 1, self.groups,
                           name=f"up_blocks_{i}", **kw)(h)
    h = layers.group_norm(self.groups, epsilon=_EPS, param_dtype=self.param_dtype,
                          name="conv_norm_out")(h)
    h = nn.silu(h).astype(self.dtype)
    return layers.conv(self.out_channels, 3, padding=1, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL: encoder, quant_conv (1x1), post_quant_conv (1x1), decoder.

  q(z | x) = N(mean, exp(logvar)) with logvar clipped to [-30, 20] (DiagonalGaussianDistribution).
  sample_size and scaling_factor are informational (diffusers' config); apply scaling_factor to
  latents outside. Methods: encode(x) -> (mean, logvar), decode(z) -> x, and
  __call__(x) -> (reconstruction, mean, logvar), which creates every parameter at init.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",) * 4
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Optional[int] = None
  scaling_factor: float = 0.18215
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    n = len(self.block_out_channels)
    for name, types, kind in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                              ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
      if len(types) != n or any(t != kind for t in types):
        raise ValueError(f"{name}={types}: need {n} x {kind!r} (one per block_out_channels)")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shared = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                  attention_impl=self.attention_impl, **kw)
    self.encoder = Encoder(latent_channels=self.latent_channels, **shared)
    self.quant_conv = layers.conv(2 * self.latent_channels, 1, padding=0, **kw)
    self.post_quant_conv = layers.conv(self.latent_channels, 1, padding=0, **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **shared)

  def encode(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """x [B, H, W, in_channels] -> (mean, logvar), float32, logvar in [-30, 20]."""
    assert x.ndim == 4 and x.shape[-1] == self.in_channels, x.shape
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """z [B, h, w, latent_channels] -> x [B, H, W, out_channels], float32."""
    assert z.ndim == 4 and z.shape[-1] == self.latent_channels, z.shape
    return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, x: jax.Array, *, sample_posterior: bool = False,
               rng: Optional[jax.Array] = None):
    """(decode(z), mean, logvar), z = mean, or mean + exp(logvar / 2) eps when sample_posterior
    (eps from `rng`, else from the 'sample' rng stream)."""
    mean, logvar = self.encode(x)
    z = mean
    if sample_posterior:
      rng = self.make_rng("sample") if rng is None else rng
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar
