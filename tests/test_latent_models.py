"""Stable-Diffusion-structured modules: diffusers / transformers names, sizes, embeddings, masks."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from gdistill.models import layers
from gdistill.models.attention import ATTENTION_IMPLEMENTATIONS, dot_product_attention
from gdistill.models.autoencoder import SD15_VAE, AutoencoderKL
from gdistill.models.text import CLIP_VIT_L14, CLIPTextTransformer
from gdistill.models.unet_cond import (SD15_UNET, Downsample2D, TimestepEmbedding,
                                       UNet2DConditionModel, guidance_scale_embedding,
                                       timestep_embedding)

TINY_UNET = dict(block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                 cross_attention_dim=32, norm_num_groups=8, attention_head_dim=2)
TINY_VAE = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8)
TINY_CLIP = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=16)


def _paths(params):
  """{'a/b/kernel': shape} of an (unboxed or abstract) parameter tree."""
  return {"/".join(k): tuple(v.shape) for k, v in flatten_dict(nn.unbox(params)).items()}


def _count(params):
  return sum(math.prod(s) for s in _paths(params).values())


def _assert_logical(boxed):
  """Every leaf is a Partitioned box naming each axis with a known logical name."""
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= set(layers.LOGICAL_AXES)
  specs = jax.tree.leaves(nn.get_partition_spec(boxed),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(leaves)
  assert all(isinstance(s, jax.sharding.PartitionSpec) for s in specs)


def _abstract_init(model, *args, **kwargs):
  """jax.eval_shape(model.init): the boxed abstract variables, checked for logical axes."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)
  _assert_logical(boxed)
  return boxed


def _random_params(boxed, seed=0):
  """Concrete random parameters for an abstract tree, filled on the host: a test needs weights
  with structure, and compiling Flax's initialisers for a whole U-Net takes far longer."""
  rng = np.random.default_rng(seed)
  flat = flatten_dict(nn.unbox(boxed)["params"])
  out = {}
  for path, leaf in flat.items():
    fan_in = math.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
    value = rng.normal(0.0, 1.0 / math.sqrt(fan_in), leaf.shape)
    if path[-1] == "scale":
      value = 1.0 + 0.1 * value
    elif path[-1] == "bias":
      value = 0.1 * value
    out[path] = jnp.asarray(value, leaf.dtype)
  return unflatten_dict(out)


def _unet_inputs(b=2, size=8, length=5, dim=32, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (b, size, size, 4)),
          jnp.array([999.0, 10.5])[:b],
          jax.random.normal(k[1], (b, length, dim)))


# ----------------------------------------------------------------------------- sizes (abstract)

def test_full_size_parameter_counts_and_logical_axes():
  """SD 1.5 UNet / VAE and CLIP ViT-L/14 text: diffusers' / transformers' exact parameter counts."""
  unet = UNet2DConditionModel(**SD15_UNET)
  boxed = jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                         jnp.zeros((1, 2, 768)))
  _assert_logical(boxed)
  assert _count(boxed["params"]) == 859_520_964
  vae = AutoencoderKL(**SD15_VAE)
  boxed = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  _assert_logical(boxed)
  assert _count(boxed["params"]) == 83_653_863
  clip = CLIPTextTransformer(**CLIP_VIT_L14)
  boxed = jax.eval_shape(clip.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  _assert_logical(boxed)
  assert _count(boxed["params"]) == 123_060_480


# ----------------------------------------------------------------------------- UNet

def test_unet_shapes_names_and_zero_cond_proj():
  """Names and shapes; a student with a zero cond_proj equals its teacher (run with remat, which
  must not change the numbers); an odd 5x5 input upsamples to each skip's size (diffusers'
  upsample_size); per-block head counts."""
  x, t, ctx = _unet_inputs(size=5)
  cfg = dict(TINY_UNET, attention_head_dim=(2, 4))
  student = UNet2DConditionModel(**cfg, time_cond_proj_dim=16)
  teacher = UNet2DConditionModel(**cfg, remat=True)
  w_emb = guidance_scale_embedding(jnp.array([2.0, 7.5]), 16)
  boxed = _abstract_init(student, x, t, ctx, w_emb)
  paths = _paths(boxed["params"])
  expected = {
      "conv_in/kernel": (3, 3, 4, 32),
      "time_embedding/linear_1/kernel": (32, 128),
      "time_embedding/linear_2/bias": (128,),
      "time_embedding/cond_proj/kernel": (16, 32),
      "down_blocks_0/resnets_0/conv1/kernel": (3, 3, 32, 32),
      "down_blocks_0/resnets_0/time_emb_proj/kernel": (128, 32),
      "down_blocks_0/attentions_0/norm/scale": (32,),
      "down_blocks_0/attentions_0/proj_in/kernel": (1, 1, 32, 32),
      "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel": (32, 32),
      "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel": (32, 32),
      "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_out_0/bias": (32,),
      "down_blocks_0/attentions_0/transformer_blocks_0/norm3/scale": (32,),
      "down_blocks_0/downsamplers_0/conv/kernel": (3, 3, 32, 32),
      "down_blocks_1/resnets_0/conv_shortcut/kernel": (1, 1, 32, 64),
      "mid_block/resnets_1/norm2/bias": (64,),
      "mid_block/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel": (64, 512),
      "mid_block/attentions_0/transformer_blocks_0/ff/net_2/kernel": (256, 64),
      "up_blocks_0/resnets_0/conv1/kernel": (3, 3, 128, 64),  # h 64 + skip 64
      "up_blocks_0/resnets_1/conv_shortcut/kernel": (1, 1, 96, 64),  # h 64 + skip 32
      "up_blocks_0/upsamplers_0/conv/kernel": (3, 3, 64, 64),
      "up_blocks_1/resnets_0/conv1/kernel": (3, 3, 96, 32),
      "up_blocks_1/attentions_1/proj_out/kernel": (1, 1, 32, 32),
      "conv_norm_out/scale": (32,),
      "conv_out/kernel": (3, 3, 32, 4),
  }
  for path, shape in expected.items():
    assert paths.get(path) == shape, (path, paths.get(path), shape)
  for absent in ("time_embedding/cond_proj/bias", "up_blocks_1/upsamplers_0/conv/kernel",
                 "down_blocks_1/downsamplers_0/conv/kernel",
                 "down_blocks_1/attentions_0/norm/scale",
                 "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/bias"):
    assert absent not in paths, absent
  # Flax's init zero-initialises cond_proj (the rest of the embedding is drawn).
  emb_params = nn.unbox(TimestepEmbedding(128, 16).init(jax.random.key(1), jnp.ones((2, 32)),
                                                        w_emb))["params"]
  assert not emb_params["cond_proj"]["kernel"].any() and emb_params["linear_1"]["kernel"].any()

  params = _random_params(boxed, seed=1)
  params["time_embedding"]["cond_proj"]["kernel"] = jnp.zeros((16, 32))
  student_apply = jax.jit(student.apply)
  out = student_apply({"params": params}, x, t, ctx, w_emb)
  assert out.shape == x.shape and out.dtype == jnp.float32 and np.isfinite(out).all()
  # A student with a zero cond_proj equals the teacher on the same other weights.
  teacher_params = dict(params)
  teacher_params["time_embedding"] = {k: v for k, v in params["time_embedding"].items()
                                      if k != "cond_proj"}
  ref = jax.jit(teacher.apply)({"params": teacher_params}, x, t, ctx)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # ... and the guidance embedding reaches the output once cond_proj is trained.
  moved = dict(params, time_embedding=dict(params["time_embedding"],
                                           cond_proj={"kernel": jnp.full((16, 32), 0.1)}))
  assert not np.allclose(student_apply({"params": moved}, x, t, ctx, w_emb), out)
  with pytest.raises(ValueError, match="timestep_cond"):
    jax.eval_shape(teacher.apply, {"params": teacher_params}, x, t, ctx, w_emb)


def test_unet_config_variants():
  """use_linear_projection makes proj_in / proj_out Dense; transformer_layers_per_block; SD 2.x
  style per-block head counts; bad block types are named."""
  x, t, ctx = _unet_inputs()
  lin = UNet2DConditionModel(**TINY_UNET, use_linear_projection=True,
                             transformer_layers_per_block=2, num_attention_heads=(2, 4))
  paths = _paths(_abstract_init(lin, x, t, ctx)["params"])
  assert paths["down_blocks_0/attentions_0/proj_in/kernel"] == (32, 32)
  assert paths["up_blocks_1/attentions_0/proj_out/kernel"] == (32, 32)
  assert "mid_block/attentions_0/transformer_blocks_1/attn1/to_v/kernel" in paths
  assert "mid_block/attentions_0/transformer_blocks_2/attn1/to_v/kernel" not in paths
  with pytest.raises(ValueError, match="down_block_types"):
    jax.eval_shape(UNet2DConditionModel(**dict(TINY_UNET, down_block_types=("DownBlock2D",))).init,
                   jax.random.key(0), x, t, ctx)


def _np_get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False,
                               downscale_freq_shift=1, scale=1, max_period=10000):
  """numpy transcription of diffusers.models.embeddings.get_timestep_embedding."""
  half_dim = embedding_dim // 2
  exponent = -math.log(max_period) * np.arange(0, half_dim, dtype=np.float32)
  exponent = exponent / (half_dim - downscale_freq_shift)
  emb = np.exp(exponent)
  emb = timesteps[:, None].astype(np.float32) * emb[None, :]
  emb = scale * emb
  emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = np.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
  if embedding_dim % 2 == 1:
    emb = np.pad(emb, ((0, 0), (0, 1)))
  return emb


def _np_get_guidance_scale_embedding(w, embedding_dim=512):
  """numpy transcription of diffusers' LCM pipeline get_guidance_scale_embedding."""
  w = w * 1000.0
  half_dim = embedding_dim // 2
  emb = np.log(10000.0) / (half_dim - 1)
  emb = np.exp(np.arange(half_dim, dtype=np.float32) * -emb)
  emb = w.astype(np.float32)[:, None] * emb[None, :]
  emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:
    emb = np.pad(emb, ((0, 0), (0, 1)))
  return emb


@pytest.mark.parametrize("dim,flip,shift", [(320, True, 0), (33, False, 1), (64, True, 1)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
  t = np.array([0.0, 1.0, 17.25, 999.0], np.float32)
  got = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
  want = _np_get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4)  # sin(999 f) in float32


@pytest.mark.parametrize("dim", [512, 256, 17])
def test_guidance_scale_embedding_matches_diffusers(dim):
  w = np.array([0.0, 1.0, 3.5, 7.5, 15.0], np.float32)
  got = guidance_scale_embedding(jnp.asarray(w), dim)
  np.testing.assert_allclose(got, _np_get_guidance_scale_embedding(w, dim), rtol=1e-5, atol=1e-3)
  assert got.shape == (5, dim) and got.dtype == jnp.float32


# ----------------------------------------------------------------------------- attention

def test_attention_implementations_agree():
  assert ATTENTION_IMPLEMENTATIONS == ("xla", "cudnn", "reference")
  k = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(k[0], (2, 7, 3, 8))
  kv = jax.random.normal(k[1], (2, 5, 3, 8))
  mask = jax.random.bernoulli(k[3], 0.7, (2, 1, 7, 5)).at[..., 0].set(True)

  @jax.jit
  def run(q, kv, mask):
    out = {}
    for name, impl in (("reference", "reference"), ("xla", "xla"), ("default", None)):
      out[name, "plain"] = dot_product_attention(q, kv, kv * 2, implementation=impl)
      out[name, "mask"] = dot_product_attention(q, kv, kv * 2, mask=mask, implementation=impl)
      out[name, "causal"] = dot_product_attention(q, q, q, is_causal=True, implementation=impl)
    return out

  out = run(q, kv, mask)
  for case in ("plain", "mask", "causal"):
    for name in ("xla", "default"):
      np.testing.assert_allclose(out[name, case], out["reference", case], rtol=1e-5, atol=1e-5)
  # the reference by hand: softmax scale 1/sqrt(head_dim), causal mask
  logits = np.einsum("bqnd,bknd->bnqk", q, q) / math.sqrt(8)
  logits = np.where(np.tril(np.ones((7, 7), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.einsum("bnqk,bknd->bqnd", probs, q), out["reference", "causal"],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="implementation"):
    dot_product_attention(q, kv, kv, implementation="flash")


# ----------------------------------------------------------------------------- VAE

def test_vae_shapes_names_and_methods():
  vae = AutoencoderKL(**TINY_VAE)
  x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
  boxed = _abstract_init(vae, x)
  paths = _paths(boxed["params"])
  expected = {
      "encoder/conv_in/kernel": (3, 3, 3, 16),
      "encoder/down_blocks_0/resnets_0/norm1/scale": (16,),
      "encoder/down_blocks_0/downsamplers_0/conv/kernel": (3, 3, 16, 16),
      "encoder/down_blocks_1/resnets_0/conv_shortcut/kernel": (1, 1, 16, 32),
      "encoder/mid_block/attentions_0/group_norm/scale": (32,),
      "encoder/mid_block/attentions_0/to_q/bias": (32,),
      "encoder/mid_block/attentions_0/to_out_0/kernel": (32, 32),
      "encoder/mid_block/resnets_1/conv2/kernel": (3, 3, 32, 32),
      "encoder/conv_out/kernel": (3, 3, 32, 8),
      "quant_conv/kernel": (1, 1, 8, 8),
      "post_quant_conv/kernel": (1, 1, 4, 4),
      "decoder/conv_in/kernel": (3, 3, 4, 32),
      "decoder/up_blocks_0/resnets_1/conv1/kernel": (3, 3, 32, 32),
      "decoder/up_blocks_0/upsamplers_0/conv/kernel": (3, 3, 32, 32),
      "decoder/up_blocks_2/resnets_0/conv_shortcut/kernel": (1, 1, 32, 16),
      "decoder/conv_norm_out/bias": (16,),
      "decoder/conv_out/kernel": (3, 3, 16, 3),
  }
  for path, shape in expected.items():
    assert paths.get(path) == shape, (path, paths.get(path), shape)
  for absent in ("encoder/down_blocks_2/downsamplers_0/conv/kernel",
                 "decoder/up_blocks_2/upsamplers_0/conv/kernel",
                 "encoder/down_blocks_0/resnets_0/time_emb_proj/kernel"):
    assert absent not in paths, absent
  variables = {"params": _random_params(boxed, seed=3)}

  @jax.jit
  def run(variables, x):
    mean, logvar = vae.apply(variables, x, method=AutoencoderKL.encode)
    rec = vae.apply(variables, mean, method=AutoencoderKL.decode)
    return mean, logvar, rec, vae.apply(variables, x), vae.apply(
        variables, x, sample_posterior=True, rng=jax.random.key(6))

  mean, logvar, rec, (rec2, mean2, _), (sampled, _, _) = run(variables, x)
  assert mean.shape == logvar.shape == (2, 8, 8, 4)
  assert float(logvar.min()) >= -30.0 and float(logvar.max()) <= 20.0
  assert rec.shape == x.shape and rec.dtype == jnp.float32 and np.isfinite(rec).all()
  np.testing.assert_allclose(rec2, rec, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean2, mean, rtol=1e-6, atol=1e-6)
  assert sampled.shape == x.shape and not np.allclose(sampled, rec)


def test_downsample_padding_matches_torch():
  """padding 1: torch's symmetric pad (tap [1, 1] reads x[2i, 2j]); padding 0: diffusers' VAE pads
  only bottom / right (tap [0, 0] reads x[2i, 2j])."""
  x = jax.random.normal(jax.random.key(7), (1, 6, 6, 2))
  for padding, tap in ((1, 1), (0, 0)):
    mod = Downsample2D(2, padding=padding)
    kernel = jnp.zeros((3, 3, 2, 2)).at[tap, tap].set(jnp.eye(2))
    out = mod.apply({"params": {"conv": {"kernel": kernel, "bias": jnp.zeros(2)}}}, x)
    assert out.shape == (1, 3, 3, 2)
    np.testing.assert_allclose(out, x[:, ::2, ::2], atol=1e-6)


# ----------------------------------------------------------------------------- CLIP text

def test_clip_text_names_causality_and_outputs():
  clip = CLIPTextTransformer(**TINY_CLIP)
  ids = jax.random.randint(jax.random.key(8), (2, 12), 0, 98).at[:, 9].set(98)  # EOS = max id
  boxed = _abstract_init(clip, ids)
  paths = _paths(boxed["params"])
  expected = {
      "embeddings/token_embedding/embedding": (99, 32),
      "embeddings/position_embedding/embedding": (16, 32),
      "encoder/layers_0/self_attn/q_proj/kernel": (32, 32),
      "encoder/layers_0/self_attn/out_proj/bias": (32,),
      "encoder/layers_1/layer_norm1/scale": (32,),
      "encoder/layers_2/mlp/fc1/kernel": (32, 37),
      "encoder/layers_2/mlp/fc2/kernel": (37, 32),
      "encoder/layers_2/layer_norm2/bias": (32,),
      "final_layer_norm/scale": (32,),
  }
  for path, shape in expected.items():
    assert paths.get(path) == shape, (path, paths.get(path), shape)
  assert len(paths) == 2 + 3 * 16 + 2
  variables = {"params": _random_params(boxed, seed=4)}
  changed = ids.at[:, 6].set((ids[:, 6] + 1) % 98)
  gelu = CLIPTextTransformer(**dict(TINY_CLIP, hidden_act="gelu"))
  final_ln = nn.LayerNorm(epsilon=1e-5)

  @jax.jit
  def run(v):
    return dict(
        out=clip.apply(v, ids), changed=clip.apply(v, changed),
        states=clip.apply(v, ids, method=CLIPTextTransformer.all_hidden_states),
        encoded=clip.apply(v, ids, method=CLIPTextTransformer.encode),
        penult_raw=clip.apply(v, ids, output_layer=-2, final_norm=False),
        clip_skip_1=clip.apply(v, ids, output_layer=-2), gelu=gelu.apply(v, ids))

  r = run(variables)
  out, states = r["out"], r["states"]
  assert out.shape == (2, 12, 32) and out.dtype == jnp.float32
  # Causal: a change at position 6 leaves positions < 6 untouched and moves the rest.
  np.testing.assert_allclose(r["changed"][:, :6], out[:, :6], rtol=1e-6, atol=1e-6)
  assert not np.allclose(r["changed"][:, 6:], out[:, 6:])
  assert len(states) == 4  # embeddings + 3 layers, as transformers' output_hidden_states
  hidden, pooled = r["encoded"]
  np.testing.assert_allclose(hidden, out, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(pooled, out[:, 9], rtol=1e-6, atol=1e-6)  # EOS = argmax(ids)
  np.testing.assert_allclose(r["penult_raw"], states[-2], rtol=1e-6, atol=1e-6)
  # diffusers' clip_skip=1: final_layer_norm(hidden_states[-2]).
  want = final_ln.apply({"params": variables["params"]["final_layer_norm"]}, states[-2])
  np.testing.assert_allclose(r["clip_skip_1"], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      final_ln.apply({"params": variables["params"]["final_layer_norm"]}, states[-1]), out,
      rtol=1e-5, atol=1e-5)
  assert not np.allclose(r["gelu"], out)
  with pytest.raises(ValueError, match="output_layer"):
    jax.eval_shape(lambda v: clip.apply(v, ids, output_layer=4), variables)


def test_bfloat16_compute_traces():
  """dtype=bfloat16 (params float32) traces through every module; outputs come back float32."""
  bf16 = dict(dtype=jnp.bfloat16)
  x, t, ctx = _unet_inputs()
  unet = UNet2DConditionModel(**TINY_UNET, time_cond_proj_dim=8, **bf16)
  variables = jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx)
  assert {v.value.dtype for v in jax.tree.leaves(
      variables, is_leaf=lambda v: isinstance(v, nn.Partitioned))} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(unet.apply, variables, x, t, ctx, jnp.zeros((2, 8)))
  assert out.shape == x.shape and out.dtype == jnp.float32
  vae = AutoencoderKL(**TINY_VAE, **bf16)
  img = jnp.zeros((1, 32, 32, 3))
  rec, mean, logvar = jax.eval_shape(vae.apply, jax.eval_shape(vae.init, jax.random.key(0), img),
                                     img)
  assert rec.dtype == mean.dtype == logvar.dtype == jnp.float32 and mean.shape == (1, 8, 8, 4)
  clip = CLIPTextTransformer(**TINY_CLIP, **bf16)
  ids = jnp.zeros((2, 16), jnp.int32)
  h = jax.eval_shape(clip.apply, jax.eval_shape(clip.init, jax.random.key(0), ids), ids)
  assert h.shape == (2, 16, 32) and h.dtype == jnp.float32
