"""Multi-head attention: one kernel entry point, and diffusers' `Attention` layer in Flax.

dot_product_attention(q, k, v) = softmax(q k^T / sqrt(head_dim) [+ mask]) v over [B, L, heads,
head_dim], through jax.nn.dot_product_attention ('xla', 'cudnn', or None = let JAX pick) or a plain
float32 einsum ('reference', for tests and debugging). Every attention in the latent models (UNet
transformer blocks, VAE mid-block, CLIP text encoder) goes through it, so the kernel is one switch.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdistill.models import layers

Dtype = Any

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "reference")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: Optional[jax.Array] = None, is_causal: bool = False,
                          implementation: Optional[str] = None) -> jax.Array:
  """softmax(q k^T / sqrt(d) masked) v: q [B, Lq, N, d], k, v [B, Lk, N, d] -> [B, Lq, N, d].

  mask: boolean, broadcastable to [B, N, Lq, Lk], True where a query may attend a key.
  is_causal: query i attends keys j <= i only. implementation: None (JAX picks), 'xla', 'cudnn'
  (GPU, fp16/bf16 only) or 'reference' (einsum-softmax in float32, output cast to q.dtype).
  """
  assert q.ndim == k.ndim == v.ndim == 4, (q.shape, k.shape, v.shape)
  assert k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:], (
      q.shape, k.shape, v.shape)
  if implementation is not None and implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}: expected None or one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  scale = 1.0 / math.sqrt(q.shape[-1])
  if implementation != "reference":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                                        implementation=implementation)
  f32 = jnp.float32
  logits = jnp.einsum("bqnd,bknd->bnqk", q.astype(f32), k.astype(f32)) * scale
  allowed = None
  if mask is not None:
    allowed = jnp.broadcast_to(mask, logits.shape)
  if is_causal:
    lq, lk = q.shape[1], k.shape[1]
    causal = jnp.tril(jnp.ones((lq, lk), bool))[None, None]
    causal = jnp.broadcast_to(causal, logits.shape)
    allowed = causal if allowed is None else allowed & causal
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(f32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bnqk,bknd->bqnd", probs, v.astype(f32))
  return out.astype(q.dtype)


class Attention(nn.Module):
  """diffusers' `Attention` (AttnProcessor2_0): to_q, to_k, to_v, attention, to_out_0.

  x [B, L, query_dim] or [B, H, W, query_dim] (flattened to L = H*W and back), optional context
  [B, Lc, cross_dim] (None: self-attention). With norm_num_groups, `group_norm` (eps) is applied to
  x first; with residual_connection the input is added back: out = x + to_out_0(attn(...)).
  heads * dim_head is the inner width; to_out_0 maps it back to query_dim.
  """
  heads: int
  dim_head: int
  bias: bool = False  # to_q, to_k, to_v
  out_bias: bool = True  # to_out_0
  norm_num_groups: Optional[int] = None
  eps: float = 1e-5
  residual_connection: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual, shape = x, x.shape
    query_dim = shape[-1]
    h = x
    if self.norm_num_groups is not None:
      h = layers.group_norm(self.norm_num_groups, epsilon=self.eps, param_dtype=self.param_dtype,
                            name="group_norm")(h)
    h = h.astype(self.dtype).reshape(shape[0], -1, query_dim)
    ctx = h if context is None else context.astype(self.dtype)
    inner = self.heads * self.dim_head
    q = layers.dense(inner, use_bias=self.bias, name="to_q", **kw)(h)
    k = layers.dense(inner, use_bias=self.bias, name="to_k", **kw)(ctx)
    v = layers.dense(inner, use_bias=self.bias, name="to_v", **kw)(ctx)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
    out = dot_product_attention(split(q), split(k), split(v), implementation=self.attention_impl)
    out = out.reshape(shape[0], -1, inner)
    out = layers.dense(query_dim, use_bias=self.out_bias, name="to_out_0", **kw)(out)
    out = out.reshape(shape)
    if self.residual_connection:
      out = out + residual.astype(out.dtype)
    return out
