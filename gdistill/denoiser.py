"""A network plus its parametrization: x-predictions, guided x-predictions, construction.

`Denoiser` is the one object the losses and samplers see: it turns a Flax module's output
in any parametrization into x_hat, and combines a conditional and an unconditional forward
into the guided x_hat^w = (1 + w) x_hat(z, c) - w x_hat(z, null) in one batched call (2 NFE).
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


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A Flax denoiser module with its parametrization and label space."""
  module: nn.Module
  parametrization: str
  num_classes: int

  @property
  def w_conditioned(self) -> bool:
    return bool(getattr(self.module, "w_embedding", False))

  @property
  def null_label(self) -> int:
    return self.num_classes

  def x_pred(self, params, z, logsnr, label, w=None, *, train: bool = False,
             rngs: Optional[dict] = None):
    """x_hat(z_t, c[, w]) from the network output in its parametrization."""
    out = self.module.apply({"params": params}, z, logsnr, label,
                            w if self.w_conditioned else None, train=train, rngs=rngs)
    return diffusion.x_from_output(out, z, logsnr, self.parametrization)

  def guided_x_pred(self, params, z, logsnr, label, w):
    """x_hat^w = (1 + w) x_hat(z, c) - w x_hat(z, null): one batched forward of 2B (2 NFE)."""
    if self.w_conditioned:
      raise ValueError("guided_x_pred combines two forwards of a teacher; this model is a "
                       "w-conditioned student: call x_pred(..., w=w)")
    b = z.shape[0]
    null = jnp.full_like(label, self.null_label)
    x = self.x_pred(params, jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                    jnp.concatenate([label, null]))
    return diffusion.guided(x[:b], x[b:], w)

  def init_abstract(self, example_shape, batch: int = 1):
    """jax.eval_shape of init: boxed (logically partitioned) parameter shapes."""
    return jax.eval_shape(self.init_fn(example_shape, batch), jax.random.key(0))

  def init_fn(self, example_shape, batch: int = 1):
    """A function rng -> boxed params (for jit with out_shardings)."""
    def init(rng):
      z = jnp.zeros((batch,) + tuple(example_shape), jnp.float32)
      logsnr = jnp.zeros((batch,), jnp.float32)
      label = jnp.zeros((batch,), jnp.int32)
      w = jnp.zeros((batch,), jnp.float32) if self.w_conditioned else None
      return self.module.init({"params": rng}, z, logsnr, label, w)["params"]
    return init


def build_module(model_cfg, *, w_embedding: bool = False, dtype=None) -> nn.Module:
  """Builds the Flax module named by model_cfg.name ('unet' | 'mlp')."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  compute = dtypes[dtype or model_cfg.dtype]
  param = dtypes[model_cfg.param_dtype]
  out = diffusion.output_channels(model_cfg.parametrization, model_cfg.channels)
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
    return models.MLPDenoiser(hidden=model_cfg.ch, num_blocks=model_cfg.num_res_blocks,
                              dropout=float(model_cfg.dropout), **common)
  raise ValueError(f"model.name={model_cfg.name!r} is unknown; valid: 'unet', 'mlp'")


def build_denoiser(model_cfg, *, w_embedding: bool = False, dropout: Any = None) -> Denoiser:
  """Denoiser for a model config; dropout overrides model_cfg.dropout when given."""
  if dropout is not None:
    model_cfg = model_cfg.copy_and_resolve_references()
    with model_cfg.unlocked():
      model_cfg.dropout = float(dropout)
  module = build_module(model_cfg, w_embedding=w_embedding)
  return Denoiser(module, model_cfg.parametrization, model_cfg.num_classes)


def student_params_from_teacher(teacher_params, student_params):
  """The student's parameters with every teacher parameter copied in.

  The student may only add the w-embedding (ConditioningEmbedding 'w_dense*', whose last layer is
  zero-initialised, so the result equals the conditional teacher exactly); any other difference
  in structure or shape is refused.
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
    if k not in t_flat and "/w_dense" not in k:
      problems.append(f"{k}: in the student only (only the w-embedding may be new)")
  if problems:
    raise ValueError("teacher and student architectures differ:\n  " + "\n  ".join(problems))
  out = {k: (t_flat[k].astype(s_flat[k].dtype) if k in t_flat else s_flat[k]) for k in s_flat}
  return flax.traverse_util.unflatten_dict(out, sep="/")
