"""CLIP text encoder (transformers' CLIPTextModel.text_model) in Flax Linen, transformers' names.

input_ids [B, L] -> token_embedding + position_embedding -> encoder/layers_i (pre-LN, causal
self-attention, MLP) -> final_layer_norm. Parameter paths mirror the torch state dict below
`text_model.`: `encoder.layers.0.self_attn.q_proj.weight` [O, I] is our
`encoder/layers_0/self_attn/q_proj/kernel` [I, O]; embedding `weight` is `embedding`.

Which hidden state conditions the U-Net (output_layer indexes transformers' hidden_states tuple:
0 = embeddings, i = after layer i, -1 = last layer):
  SD 1.x: output_layer=-1 with the final LayerNorm = CLIPTextModel's last_hidden_state.
  diffusers' clip_skip=c: hidden_states[-(c + 1)], and diffusers' encode_prompt DOES apply
    final_layer_norm to it (pipeline_stable_diffusion.py) -> output_layer=-(c + 1), final_norm=True.
  SD 2.x: diffusers' text_encoder checkpoint already has the last OpenCLIP layer removed
    (num_hidden_layers 23, single_file_utils drops resblocks.23), and its pipelines use
    last_hidden_state (final LayerNorm applied, as the original FrozenOpenCLIPEmbedder's ln_final
    after the penultimate block) -> output_layer=-1, final_norm=True with 23 layers.
  final_norm=False gives transformers' raw hidden_states[output_layer].
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdistill.models import layers
from gdistill.models.attention import dot_product_attention

Dtype = Any

CLIP_VIT_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5)

_ACTS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
         "gelu": lambda x: nn.gelu(x, approximate=False)}


class CLIPTextEmbeddings(nn.Module):
  """token_embedding(ids) + position_embedding(arange(L))."""
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    length = input_ids.shape[-1]
    if length > self.max_position_embeddings:
      raise ValueError(f"sequence length {length} > max_position_embeddings "
                       f"{self.max_position_embeddings}")
    tok = layers.embed(self.vocab_size, self.hidden_size, name="token_embedding", **kw)(input_ids)
    pos = layers.embed(self.max_position_embeddings, self.hidden_size, name="position_embedding",
                       **kw)(jnp.arange(length))
    return tok + pos[None]


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention: q_proj, k_proj, v_proj, out_proj (all with bias)."""
  num_heads: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, length, d = x.shape
    assert d % self.num_heads == 0, (d, self.num_heads)
    split = lambda t: t.reshape(b, length, self.num_heads, d // self.num_heads)
    q, k, v = (split(layers.dense(d, name=n, **kw)(x)) for n in ("q_proj", "k_proj", "v_proj"))
    out = dot_product_attention(q, k, v, is_causal=True, implementation=self.attention_impl)
    return layers.dense(d, name="out_proj", **kw)(out.reshape(b, length, d))


class CLIPMLP(nn.Module):
  """fc1 -> act -> fc2."""
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _ACTS[self.hidden_act](layers.dense(self.intermediate_size, name="fc1", **kw)(x))
    return layers.dense(x.shape[-1], name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
  """x += self_attn(layer_norm1 x); x += mlp(layer_norm2 x)."""
  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name, h: layers.layer_norm(epsilon=self.layer_norm_eps,
                                             param_dtype=self.param_dtype,
                                             name=name)(h).astype(self.dtype)
    x = x + CLIPAttention(self.num_heads, self.attention_impl, name="self_attn", **kw)(
        norm("layer_norm1", x))
    return x + CLIPMLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(
        norm("layer_norm2", x))


class CLIPEncoder(nn.Module):
  """layers_i; returns the hidden states after the embeddings and after each of the first
  `num_layers` layers (transformers' hidden_states, truncated)."""
  num_hidden_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, num_layers: Optional[int] = None):
    num_layers = self.num_hidden_layers if num_layers is None else num_layers
    states = [x]
    for i in range(num_layers):
      x = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act,
                           self.layer_norm_eps, self.attention_impl, name=f"layers_{i}",
                           dtype=self.dtype, param_dtype=self.param_dtype)(x)
      states.append(x)
    return tuple(states)


class CLIPTextTransformer(nn.Module):
  """transformers' CLIPTextTransformer (the `text_model` of CLIPTextModel).

  __call__(input_ids, output_layer=-1, final_norm=True) -> [B, L, hidden] (float32);
  encode(...) -> (that, pooled [B, hidden]: its row at the EOS token = argmax(input_ids), CLIP's
  legacy rule, eos id 49407 being the largest id); all_hidden_states(input_ids) -> the
  num_hidden_layers + 1 states of transformers' output_hidden_states (no final LayerNorm).
  Only the layers up to output_layer run; init with the default output_layer.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.hidden_act not in _ACTS:
      raise ValueError(f"hidden_act={self.hidden_act!r}: expected one of {tuple(_ACTS)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = CLIPTextEmbeddings(self.vocab_size, self.hidden_size,
                                         self.max_position_embeddings, **kw)
    self.encoder = CLIPEncoder(self.num_hidden_layers, self.num_attention_heads,
                               self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                               self.attention_impl, **kw)
    self.final_layer_norm = layers.layer_norm(epsilon=self.layer_norm_eps,
                                              param_dtype=self.param_dtype)

  def all_hidden_states(self, input_ids: jax.Array) -> Tuple[jax.Array, ...]:
    """transformers' hidden_states: (embeddings, layer 1 out, ..., layer N out), float32."""
    assert input_ids.ndim == 2, input_ids.shape
    states = self.encoder(self.embeddings(input_ids))
    return tuple(s.astype(jnp.float32) for s in states)

  def encode(self, input_ids: jax.Array, *, output_layer: int = -1,
             final_norm: bool = True) -> Tuple[jax.Array, jax.Array]:
    """(hidden [B, L, D], pooled [B, D]); hidden = final_layer_norm(hidden_states[output_layer])
    (no norm when final_norm=False), pooled = hidden at argmax(input_ids)."""
    assert input_ids.ndim == 2, input_ids.shape
    n = self.num_hidden_layers
    index = output_layer + n + 1 if output_layer < 0 else output_layer
    if not 0 <= index <= n:
      raise ValueError(f"output_layer={output_layer}: expected in [-{n + 1}, {n}]")
    h = self.encoder(self.embeddings(input_ids), index)[index]
    if final_norm:
      h = self.final_layer_norm(h)
    h = h.astype(jnp.float32)
    eos = jnp.argmax(input_ids, axis=-1)
    pooled = jnp.take_along_axis(h, eos[:, None, None], axis=1)[:, 0]
    return h, pooled

  def __call__(self, input_ids: jax.Array, *, output_layer: int = -1,
               final_norm: bool = True) -> jax.Array:
    return self.encode(input_ids, output_layer=output_layer, final_norm=final_norm)[0]
