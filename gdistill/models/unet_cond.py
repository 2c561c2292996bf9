"""Stable Diffusion's U-Net (diffusers' UNet2DConditionModel) in Flax Linen, NHWC.

Module and parameter names mirror diffusers' state dict so a checkpoint loads by renaming alone:
a torch `down_blocks.0.resnets.1.conv1.weight` [O, I, kh, kw] is our
`down_blocks_0/resnets_1/conv1/kernel` [kh, kw, I, O]; Linear weights [O, I] are Dense kernels
[I, O]; GroupNorm / LayerNorm `weight` is `scale`. The computation follows diffusers' default path
(resnet_time_scale_shift 'default', GEGLU feed-forward, no class embedding; of the addition
embeddings only 'text', the caption pooled into the timestep embedding, when asked).

Inputs: sample [B, H, W, C], timesteps [B] (fractional allowed), encoder_hidden_states [B, L, D],
optional timestep_cond [B, time_cond_proj_dim] (e.g. a guidance-scale embedding, Meng et al.).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdistill.models import layers
from gdistill.models.attention import Attention, dot_product_attention

Dtype = Any
IntOrTuple = Union[int, Sequence[int]]

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)


def timestep_embedding(timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
  """diffusers' get_timestep_embedding: [B] -> [B, d], float32.

  f_k = exp(-log(max_period) k / (half - shift)), k < half = d // 2; [sin(s t f), cos(s t f)]
  (cos first when flip_sin_to_cos); a zero column appended when d is odd.
  """
  assert timesteps.ndim == 1, "timesteps must be 1-D [B]"
  half = embedding_dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  args = scale * (timesteps.astype(jnp.float32)[:, None] * freqs[None, :])
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if embedding_dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def guidance_scale_embedding(w: jax.Array, embedding_dim: int = 512,
                             dtype: Dtype = jnp.float32) -> jax.Array:
  """diffusers' get_guidance_scale_embedding (LCM, VDM): [B] -> [B, d].

  f_k = exp(-k log(10000) / (half - 1)), k < half = d // 2; [sin(1000 w f), cos(1000 w f)],
  zero-padded when d is odd.
  """
  assert w.ndim == 1, "w must be 1-D [B]"
  w = w * 1000.0
  half = embedding_dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
  args = w.astype(dtype)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if embedding_dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def upsample_nearest(x: jax.Array, size: Optional[Tuple[int, int]] = None) -> jax.Array:
  """torch F.interpolate(mode='nearest'): x2, or to `size` with src = floor(dst * in / out)."""
  b, h, w, c = x.shape
  oh, ow = size if size is not None else (2 * h, 2 * w)
  if (oh, ow) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.minimum(np.floor(np.arange(oh) * (h / oh)).astype(np.int32), h - 1)
  cols = np.minimum(np.floor(np.arange(ow) * (w / ow)).astype(np.int32), w - 1)
  return x[:, rows][:, :, cols]


class TimestepEmbedding(nn.Module):
  """linear_1 -> silu -> linear_2; with cond_proj_dim, sample += cond_proj(condition) first.

  cond_proj (no bias) is ZERO-initialised here: a fresh w-conditioned student equals its teacher.
  """
  time_embed_dim: int
  cond_proj_dim: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sample, condition=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.cond_proj_dim is not None:
      if condition is None:  # diffusers skips cond_proj; cond_proj(0) = 0 is the same and inits it
        condition = jnp.zeros((sample.shape[0], self.cond_proj_dim), self.dtype)
      assert condition.shape == (sample.shape[0], self.cond_proj_dim), condition.shape
      sample = sample + layers.dense(sample.shape[-1], use_bias=False, zero=True,
                                     name="cond_proj", **kw)(condition.astype(self.dtype))
    elif condition is not None:
      raise ValueError("timestep_cond was given to a model with time_cond_proj_dim=None")
    sample = layers.dense(self.time_embed_dim, name="linear_1", **kw)(sample)
    return layers.dense(self.time_embed_dim, name="linear_2", **kw)(nn.silu(sample))


class AttentionPooling(nn.Module):
  """diffusers' AttentionPooling (DeepFloyd IF): one query, the tokens' mean + positional_embedding,
  attends over [query, tokens] with q_proj / k_proj / v_proj; [B, L, D] -> [B, D]."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"addition_embed_type_num_heads={self.num_heads} must divide the text "
                       f"width {d}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pos = self.param("positional_embedding", layers._kinit(
        nn.initializers.normal(d ** -0.5), ("vocab", "mlp")), (1, d), self.param_dtype)
    cls = x.mean(axis=1, keepdims=True) + pos[None].astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, d // self.num_heads)
    q = heads(layers.dense(d, name="q_proj", **kw)(cls))
    k = heads(layers.dense(d, name="k_proj", **kw)(x))
    v = heads(layers.dense(d, name="v_proj", **kw)(x))
    # diffusers scales q and k by head_dim ** -0.25 each: the usual 1 / sqrt(head_dim).
    return dot_product_attention(q, k, v, implementation="reference").reshape(b, d)


class TextTimeEmbedding(nn.Module):
  """diffusers' TextTimeEmbedding (addition_embed_type 'text'): norm1 -> pool -> proj -> norm2,
  the text tokens [B, L, D] pooled into one vector added to the timestep embedding, so every
  ResNet block (also those of levels without cross-attention) sees the caption."""
  time_embed_dim: int
  num_heads: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden_states):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.layer_norm(param_dtype=self.param_dtype, name="norm1")(hidden_states)
    h = AttentionPooling(self.num_heads, name="pool", **kw)(h.astype(self.dtype))
    h = layers.dense(self.time_embed_dim, name="proj", **kw)(h)
    return layers.layer_norm(param_dtype=self.param_dtype, name="norm2")(h).astype(self.dtype)


class ResnetBlock2D(nn.Module):
  """norm1 -> silu -> conv1 (+ time_emb_proj(silu(temb))) -> norm2 -> silu -> dropout -> conv2,
  plus the input (through a 1x1 conv_shortcut when channels change). temb None: no time_emb_proj."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layers.group_norm(self.groups, epsilon=self.eps,
                                          param_dtype=self.param_dtype, name=name)
    h = nn.silu(norm("norm1")(x)).astype(self.dtype)
    h = layers.conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
    if temb is not None:
      t = layers.dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(norm("norm2")(h)).astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = layers.conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
    return x.astype(h.dtype) + h


class Downsample2D(nn.Module):
  """`conv` 3x3 stride 2. padding 1: torch's symmetric padding; padding 0: diffusers' VAE pads
  (bottom, right) by one first, i.e. explicit ((0, 1), (0, 1))."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
    return layers.conv(self.out_channels, 3, stride=2, padding=pad, name="conv",
                       dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
  """Nearest x2 (or to output_size, torch's nearest rule), then a 3x3 `conv`."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, output_size: Optional[Tuple[int, int]] = None):
    return layers.conv(self.out_channels, 3, padding=1, name="conv", dtype=self.dtype,
                       param_dtype=self.param_dtype)(upsample_nearest(x, output_size))


class GEGLU(nn.Module):
  """proj to 2*inner, split (hidden, gate), hidden * gelu(gate) with the exact (erf) gelu."""
  inner_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = layers.dense(2 * self.inner_dim, name="proj", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    hidden, gate = jnp.split(h, 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """net_0 = GEGLU(dim -> 4 dim), net_1 = dropout (no params), net_2 = Dense(4 dim -> dim)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
    return layers.dense(x.shape[-1], name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x). LayerNorm eps 1e-5."""
  heads: int
  dim_head: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, dim_head=self.dim_head, attention_impl=self.attention_impl, **kw)
    norm = lambda name, h: layers.layer_norm(epsilon=1e-5, param_dtype=self.param_dtype,
                                             name=name)(h).astype(self.dtype)
    x = x + Attention(name="attn1", **attn)(norm("norm1", x))
    x = x + Attention(name="attn2", **attn)(norm("norm2", x), context)
    return x + FeedForward(name="ff", **kw)(norm("norm3", x))


class Transformer2DModel(nn.Module):
  """GroupNorm(eps 1e-6) -> proj_in (1x1 conv, or Dense) -> transformer_blocks_k -> proj_out,
  plus the input. inner width = heads * (channels // heads)."""
  heads: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hh, ww, c = x.shape
    dim_head = c // self.heads
    inner = self.heads * dim_head
    h = layers.group_norm(self.groups, epsilon=1e-6, param_dtype=self.param_dtype,
                          name="norm")(x).astype(self.dtype)
    if self.use_linear_projection:
      h = layers.dense(inner, name="proj_in", **kw)(h.reshape(b, hh * ww, c))
    else:
      h = layers.conv(inner, 1, padding=0, name="proj_in", **kw)(h).reshape(b, hh * ww, inner)
    for k in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, dim_head, self.attention_impl,
                                name=f"transformer_blocks_{k}", **kw)(h, context)
    if self.use_linear_projection:
      h = layers.dense(c, name="proj_out", **kw)(h).reshape(b, hh, ww, c)
    else:
      h = layers.conv(c, 1, padding=0, name="proj_out", **kw)(h.reshape(b, hh, ww, inner))
    return h + x.astype(h.dtype)


class _BlockBase(nn.Module):
  """Fields shared by the U-Net's down / mid / up blocks."""
  out_channels: int
  num_layers: int = 2
  add_sampler: bool = True  # downsamplers_0 / upsamplers_0
  has_attention: bool = True
  heads: int = 8
  transformer_layers: int = 1
  groups: int = 32
  eps: float = 1e-5
  dropout: float = 0.0
  use_linear_projection: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _resnet(self, j):
    return ResnetBlock2D(self.out_channels, self.groups, self.eps, self.dropout,
                         name=f"resnets_{j}", dtype=self.dtype, param_dtype=self.param_dtype)

  def _attention(self, j):
    return Transformer2DModel(self.heads, self.transformer_layers, self.groups,
                              self.use_linear_projection, self.attention_impl,
                              name=f"attentions_{j}", dtype=self.dtype,
                              param_dtype=self.param_dtype)


class DownBlock(_BlockBase):
  """CrossAttnDownBlock2D (has_attention) / DownBlock2D: (resnet [-> attention]) x num_layers
  [-> downsampler]; returns (h, skips) with one skip per layer plus one after the downsampler."""

  @nn.compact
  def __call__(self, x, temb, context, train: bool = False):
    skips = []
    for j in range(self.num_layers):
      x = self._resnet(j)(x, temb, train)
      if self.has_attention:
        x = self._attention(j)(x, context)
      skips.append(x)
    if self.add_sampler:
      x = Downsample2D(self.out_channels, 1, name="downsamplers_0", dtype=self.dtype,
                       param_dtype=self.param_dtype)(x)
      skips.append(x)
    return x, tuple(skips)


class MidBlock(_BlockBase):
  """UNetMidBlock2DCrossAttn: resnets_0 -> attentions_0 -> resnets_1 (num_layers = 1)."""

  @nn.compact
  def __call__(self, x, temb, context, train: bool = False):
    x = self._resnet(0)(x, temb, train)
    for j in range(self.num_layers):
      x = self._attention(j)(x, context)
      x = self._resnet(j + 1)(x, temb, train)
    return x


class UpBlock(_BlockBase):
  """CrossAttnUpBlock2D (has_attention) / UpBlock2D: per layer, concat the last remaining skip,
  resnet [-> attention]; then the upsampler to upsample_size (the next skip's H, W)."""

  @nn.compact
  def __call__(self, x, skips, temb, context, upsample_size=None, train: bool = False):
    assert len(skips) == self.num_layers, (len(skips), self.num_layers)
    for j in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
      x = self._resnet(j)(x, temb, train)
      if self.has_attention:
        x = self._attention(j)(x, context)
    if self.add_sampler:
      x = Upsample2D(self.out_channels, name="upsamplers_0", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x, upsample_size)
    return x


def _per_block(value, n: int, name: str) -> tuple:
  if isinstance(value, int):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"{name}={value}: need an int or {n} values, one per block")
  return value


_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


class UNet2DConditionModel(nn.Module):
  """diffusers' UNet2DConditionModel (SD 1.x / 2.x structure, config field names kept).

  attention_head_dim is, as in diffusers, the NUMBER of heads per block unless num_attention_heads
  is given (heads = num_attention_heads or attention_head_dim; head width = channels // heads).
  sample_size is informational (diffusers' config), the model takes any H, W.
  """
  sample_size: Optional[int] = None
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: IntOrTuple = 2
  cross_attention_dim: int = 768
  attention_head_dim: IntOrTuple = 8
  num_attention_heads: Optional[IntOrTuple] = None
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  time_cond_proj_dim: Optional[int] = None
  addition_embed_type: Optional[str] = None
  addition_embed_type_num_heads: int = 64
  use_linear_projection: bool = False
  transformer_layers_per_block: IntOrTuple = 1
  dropout: float = 0.0
  remat: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check(self):
    n = len(self.block_out_channels)
    for name, types, known in (("down_block_types", self.down_block_types, _DOWN),
                               ("up_block_types", self.up_block_types, _UP)):
      if len(types) != n or any(t not in known for t in types):
        raise ValueError(f"{name}={types}: need {n} entries (one per block_out_channels) "
                         f"from {tuple(known)}")

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, timestep_cond=None, *,
               train: bool = False):
    self._check()
    if self.addition_embed_type not in (None, "text"):
      raise ValueError(f"addition_embed_type={self.addition_embed_type!r}: gdistill implements "
                       "None and 'text' (diffusers' TextTimeEmbedding)")
    assert sample.ndim == 4 and sample.shape[-1] == self.in_channels, sample.shape
    b = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
    assert encoder_hidden_states.ndim == 3 and encoder_hidden_states.shape[0] == b
    assert encoder_hidden_states.shape[-1] == self.cross_attention_dim, (
        encoder_hidden_states.shape, self.cross_attention_dim)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, ch = len(self.block_out_channels), self.block_out_channels
    heads = _per_block(self.num_attention_heads or self.attention_head_dim, n, "attention heads")
    lpb = _per_block(self.layers_per_block, n, "layers_per_block")
    tlpb = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
    blk = dict(groups=self.norm_num_groups, eps=self.norm_eps, dropout=self.dropout,
               use_linear_projection=self.use_linear_projection,
               attention_impl=self.attention_impl, **kw)
    down_cls, mid_cls, up_cls = DownBlock, MidBlock, UpBlock
    if self.remat:
      down_cls = nn.remat(DownBlock, static_argnums=(4,))
      mid_cls = nn.remat(MidBlock, static_argnums=(4,))
      up_cls = nn.remat(UpBlock, static_argnums=(5, 6))

    t_emb = timestep_embedding(timesteps, ch[0], self.flip_sin_to_cos, self.freq_shift)
    emb = TimestepEmbedding(4 * ch[0], self.time_cond_proj_dim, name="time_embedding", **kw)(
        t_emb.astype(self.dtype), timestep_cond)
    context = encoder_hidden_states.astype(self.dtype)
    if self.addition_embed_type == "text":
      emb = emb + TextTimeEmbedding(4 * ch[0], self.addition_embed_type_num_heads,
                                    name="add_embedding", **kw)(context)

    h = layers.conv(ch[0], 3, padding=1, name="conv_in", **kw)(sample.astype(self.dtype))
    skips = [h]
    for i, kind in enumerate(self.down_block_types):
      h, res = down_cls(ch[i], lpb[i], i < n - 1, _DOWN[kind], heads[i], tlpb[i],
                        name=f"down_blocks_{i}", **blk)(h, emb, context, train)
      skips.extend(res)
    h = mid_cls(ch[-1], 1, False, True, heads[-1], tlpb[-1], name="mid_block", **blk)(
        h, emb, context, train)
    r_ch, r_heads, r_lpb, r_tlpb = (tuple(reversed(v)) for v in (ch, heads, lpb, tlpb))
    for i, kind in enumerate(self.up_block_types):
      k = r_lpb[i] + 1
      res, skips = tuple(skips[-k:]), skips[:-k]
      size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
      h = up_cls(r_ch[i], k, i < n - 1, _UP[kind], r_heads[i], r_tlpb[i],
                 name=f"up_blocks_{i}", **blk)(h, res, emb, context, size, train)
    assert not skips, len(skips)
    h = layers.group_norm(self.norm_num_groups, epsilon=self.norm_eps,
                          param_dtype=self.param_dtype, name="conv_norm_out")(h)
    h = nn.silu(h).astype(self.dtype)
    out = layers.conv(self.out_channels, 3, padding=1, name="conv_out", **kw)(h)
    return out.astype(jnp.float32)
