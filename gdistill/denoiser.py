"""A network plus its parametrization and conditioning: x-predictions, guided x-predictions.

`Denoiser` is the one object the losses and samplers see. It turns a Flax module's output in
any parametrization into x_hat, and combines a conditional and an unconditional forward into
the guided x_hat^w = (1 + w) x_hat(z, c) - w x_hat(z, null) in one batched call (2 NFE).

Conditioning is a batch field (`cond_field`): 'label' (int [B]; null = the extra class
num_classes) or 'tokens' (int [B, L] caption ids; null = the empty caption "", Stable
Diffusion's convention). encode_cond turns the field into what the network takes: labels as
they are, tokens through the model's text encoder (once per batch: a teacher's encoding is
shared with its student, whose own copy of the encoder stays frozen).

An inpainting model (`inpainting`, gdistill/inpainting.py) also takes the batch field 'inpaint'
([B, h, w, 1 + C]: the mask and the masked image), concatenated to z_t along channels before
the network. Its condition is then a dict {'c': the encoded text / label, 'inpaint': ...};
guidance drops only 'c', both forwards see the same image block.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from gdistill import diffusion
from gdistill import models
from gdistill import schedules
from gdistill.inpainting import FIELD as INPAINT_FIELD
from gdistill.inpainting import extra_channels

# Parameters a w-conditioned student adds to its teacher (all zero-initialised at the end).
W_EMBEDDING_PARAMS = ("w_dense", "cond_proj")


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A Flax denoiser module with its parametrization and conditioning.

  null_tokens: the empty caption's ids (text models), None for class-conditional ones.
  """
  module: nn.Module
  parametrization: str
  num_classes: int = 0
  null_tokens: Optional[tuple[int, ...]] = None
  inpainting: bool = False

  @property
  def w_conditioned(self) -> bool:
    return bool(getattr(self.module, "w_embedding", False))

  @property
  def cond_field(self) -> str:
    """The batch field this model is conditioned on: 'label' or 'tokens'."""
    return "label" if self.null_tokens is None else "tokens"

  @property
  def cond_fields(self) -> tuple[str, ...]:
    """Every batch field the condition is made of (an inpainting model adds 'inpaint')."""
    return (self.cond_field,) + ((INPAINT_FIELD,) if self.inpainting else ())

  def cond_input(self, batch: dict):
    """The condition's input from a batch: the field, or for an inpainting model the dict
    {'c': the field, 'inpaint': the mask and masked image}."""
    if self.inpainting:
      return {"c": batch[self.cond_field], INPAINT_FIELD: batch[INPAINT_FIELD]}
    return batch[self.cond_field]

  @property
  def null_label(self) -> int:
    return self.num_classes

  def encode_cond(self, params, cond_input, drop=None):
    """The condition input -> the network's condition; where drop [B] is True, the null one
    (an inpainting model keeps its image block)."""
    if self.inpainting:
      return {"c": self._encode(params, cond_input["c"], drop),
              INPAINT_FIELD: cond_input[INPAINT_FIELD]}
    return self._encode(params, cond_input, drop)

  def _encode(self, params, cond_input, drop):
    if self.null_tokens is None:
      return cond_input if drop is None else jnp.where(drop, self.null_label, cond_input)
    tokens = cond_input
    if drop is not None:
      null = jnp.asarray(self.null_tokens, tokens.dtype)[None]
      tokens = jnp.where(drop[:, None], null, tokens)
    return self.module.apply({"params": params}, tokens, method="encode_text")

  def null_cond(self, params, batch: int):
    """The null condition for a batch of `batch` examples."""
    if self.null_tokens is None:
      return jnp.full((batch,), self.null_label, jnp.int32)
    tokens = jnp.asarray(self.null_tokens, jnp.int32)[None]
    ctx = self.module.apply({"params": params}, tokens, method="encode_text")
    return jnp.broadcast_to(ctx, (batch,) + ctx.shape[1:])

  def null_like(self, params, cond):
    """The null condition of an encoded condition's batch (an inpainting model's image block
    kept)."""
    if self.inpainting:
      c = cond["c"]
      return {"c": self.null_cond(params, c.shape[0]).astype(c.dtype),
              INPAINT_FIELD: cond[INPAINT_FIELD]}
    return self.null_cond(params, cond.shape[0]).astype(cond.dtype)

  def x_pred(self, params, z, logsnr, cond, w=None, *, train: bool = False,
             rngs: Optional[dict] = None):
    """x_hat(z_t, c[, w]) from the network output in its parametrization."""
    z_in = z
    if self.inpainting:
      z_in = jnp.concatenate([z, cond[INPAINT_FIELD].astype(z.dtype)], axis=-1)
      cond = cond["c"]
    out = self.module.apply({"params": params}, z_in, logsnr, cond,
                            w if self.w_conditioned else None, train=train, rngs=rngs)
    return diffusion.x_from_output(out, z, logsnr, self.parametrization)

  def guided_x_pred(self, params, z, logsnr, cond, w):
    """x_hat^w = (1 + w) x_hat(z, c) - w x_hat(z, null): one batched forward of 2B (2 NFE)."""
    if self.w_conditioned:
      raise ValueError("guided_x_pred combines two forwards of a teacher; this model is a "
                       "w-conditioned student: call x_pred(..., w=w)")
    b = z.shape[0]
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond,
                        self.null_like(params, cond))
    x = self.x_pred(params, jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]), both)
    return diffusion.guided(x[:b], x[b:], w)

  def example_cond(self, batch: int, example_shape=None):
    """A placeholder condition input (zeros) of the right shape and dtype (an inpainting
    model's needs the example shape)."""
    if self.null_tokens is None:
      c = jnp.zeros((batch,), jnp.int32)
    else:
      c = jnp.zeros((batch, len(self.null_tokens)), jnp.int32)
    if not self.inpainting:
      return c
    h, w, ch = example_shape
    return {"c": c, INPAINT_FIELD: jnp.zeros((batch, h, w, 1 + ch), jnp.float32)}

  def init_abstract(self, example_shape, batch: int = 1):
    """jax.eval_shape of init: boxed (logically partitioned) parameter shapes."""
    # The key is made under the trace: no concrete array (a mesh of abstract devices, e.g. a
    # TPU topology compiled for from a CPU host, cannot hold one).
    init = self.init_fn(example_shape, batch)
    return jax.eval_shape(lambda: init(jax.random.key(0)))

  def init_fn(self, example_shape, batch: int = 1):
    """A function rng -> boxed params (for jit with out_shardings)."""
    def init(rng):
      z = jnp.zeros((batch,) + tuple(example_shape), jnp.float32)
      logsnr = jnp.zeros((batch,), jnp.float32)
      w = jnp.zeros((batch,), jnp.float32) if self.w_conditioned else None
      cond = self.example_cond(batch, example_shape)
      if self.inpainting:
        z, cond = jnp.concatenate([z, cond[INPAINT_FIELD]], axis=-1), cond["c"]
      return self.module.init({"params": rng}, z, logsnr, cond, w)["params"]
    return init


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_module(model_cfg, *, w_embedding: bool = False, dtype=None, schedule=None,
                 text_cfg=None, vocab_size: int = 0) -> nn.Module:
  """Builds the Flax module named by model_cfg.name ('unet' | 'mlp' | 'unet2d_condition').

  unet2d_condition needs the noise schedule (its timestep input), the text section and the
  tokenizer's vocabulary size.
  """
  compute = _DTYPES[dtype or model_cfg.dtype]
  param = _DTYPES[model_cfg.param_dtype]
  out = diffusion.output_channels(model_cfg.parametrization, model_cfg.channels)
  extra = extra_channels(model_cfg.channels) if model_cfg.get("inpainting") else 0
  if model_cfg.name == "unet2d_condition":
    kw = dict(dtype=compute, param_dtype=param, attention_impl=model_cfg.attention_impl or None)
    unet = models.UNet2DConditionModel(
        in_channels=model_cfg.channels + extra, out_channels=out,
        down_block_types=tuple(model_cfg.down_block_types),
        up_block_types=tuple(model_cfg.up_block_types),
        block_out_channels=tuple(model_cfg.block_out_channels),
        layers_per_block=model_cfg.layers_per_block,
        cross_attention_dim=int(text_cfg.hidden_size),
        attention_head_dim=(model_cfg.attention_head_dim
                            if isinstance(model_cfg.attention_head_dim, int)
                            else tuple(model_cfg.attention_head_dim)),
        norm_num_groups=model_cfg.num_groups, dropout=float(model_cfg.dropout),
        time_cond_proj_dim=int(model_cfg.time_cond_proj_dim) if w_embedding else None,
        use_linear_projection=bool(model_cfg.use_linear_projection),
        addition_embed_type=model_cfg.get("addition_embed_type") or None,
        addition_embed_type_num_heads=int(model_cfg.get("addition_embed_type_num_heads", 64)),
        remat=bool(model_cfg.remat), **kw)
    text = models.CLIPTextTransformer(
        vocab_size=int(vocab_size), hidden_size=int(text_cfg.hidden_size),
        intermediate_size=int(text_cfg.intermediate_size),
        num_hidden_layers=int(text_cfg.num_hidden_layers),
        num_attention_heads=int(text_cfg.num_attention_heads),
        max_position_embeddings=int(text_cfg.max_length), hidden_act=text_cfg.hidden_act, **kw)
    return models.TextToImageDenoiser(text, unet, schedule or schedules.Schedule("scaled_linear"))
  common = dict(num_classes=model_cfg.num_classes, out_channels=out, w_embedding=w_embedding,
                w_scale=float(model_cfg.w_scale), dtype=compute, param_dtype=param)
  if model_cfg.name == "unet":
    return models.UNet(ch=model_cfg.ch, ch_mult=tuple(model_cfg.ch_mult),
                       num_res_blocks=model_cfg.num_res_blocks,
                       attn_resolutions=tuple(model_cfg.attn_resolutions),
                       head_dim=model_cfg.head_dim, dropout=float(model_cfg.dropout),
                       num_groups=model_cfg.num_groups,
                       resblock_updown=bool(model_cfg.resblock_updown),
                       remat=bool(model_cfg.remat), **common)
  if model_cfg.name == "mlp":
    if extra:
      raise ValueError("model.inpainting needs an image model ('unet' or 'unet2d_condition'); "
                       "model.name='mlp' takes flat vectors")
    return models.MLPDenoiser(hidden=model_cfg.ch, num_blocks=model_cfg.num_res_blocks,
                              dropout=float(model_cfg.dropout), **common)
  raise ValueError(f"model.name={model_cfg.name!r} is unknown; valid: 'unet', 'mlp', "
                   "'unet2d_condition'")


def build_denoiser(model_cfg, *, w_embedding: bool = False, dropout: Any = None,
                   schedule: Optional[schedules.Schedule] = None, text_cfg=None,
                   tokenizer=None) -> Denoiser:
  """Denoiser for a model config; dropout overrides model_cfg.dropout when given. Text models
  (model.conditioning 'text') need text_cfg and the tokenizer."""
  if dropout is not None:
    model_cfg = model_cfg.copy_and_resolve_references()
    with model_cfg.unlocked():
      model_cfg.dropout = float(dropout)
  text = model_cfg.conditioning == "text"
  if text and tokenizer is None:
    raise ValueError("a text-conditioned model needs its tokenizer")
  module = build_module(model_cfg, w_embedding=w_embedding, schedule=schedule,
                        text_cfg=text_cfg, vocab_size=tokenizer.vocab_size if text else 0)
  null = tuple(int(i) for i in tokenizer.encode([""])[0]) if text else None
  return Denoiser(module, model_cfg.parametrization,
                  0 if text else int(model_cfg.num_classes), null,
                  inpainting=bool(model_cfg.get("inpainting", False)))


def student_params_from_teacher(teacher_params, student_params):
  """The student's parameters with every teacher parameter copied in.

  The student may only add the w-embedding (W_EMBEDDING_PARAMS: the ADM ConditioningEmbedding's
  'w_dense*' or the U-Net's time_embedding/cond_proj, whose last layer is zero-initialised, so
  the result equals the conditional teacher exactly); any other difference in structure or
  shape is refused.
  """
  t_flat = flax.traverse_util.flatten_dict(teacher_params, sep="/")
  s_flat = flax.traverse_util.flatten_dict(student_params, sep="/")
  problems = []
  for k, v in t_flat.items():
    if k not in s_flat:
      problems.append(f"{k}: in the teacher, not in the student")
    elif s_flat[k].shape != v.shape:
      problems.append(f"{k}: teacher shape {v.shape}, student shape {s_flat[k].shape}")
  for k in s_flat:
    if k not in t_flat and not any(f"/{name}" in f"/{k}" for name in W_EMBEDDING_PARAMS):
      problems.append(f"{k}: in the student only (only the w-embedding may be new)")
  if problems:
    raise ValueError("teacher and student architectures differ:\n  " + "\n  ".join(problems))
  out = {k: (t_flat[k].astype(s_flat[k].dtype) if k in t_flat else s_flat[k]) for k in s_flat}
  return flax.traverse_util.unflatten_dict(out, sep="/")
