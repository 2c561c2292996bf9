"""FLOP accounting for throughput and MFU: an analytic count, XLA's count, peak FLOP/s.

Model FLOPs are the multiply-adds (x 2) of every Dense, convolution and attention einsum
(QK^T and AV): the MFU convention (PaLM appendix B). Not counted: group/layer norms,
activations, biases, softmax, resize, pooling, RNG, the diffusion math and the optimizer (XLA
counts those as elementwise FLOPs; see `xla_total_flops`). A convolution counts only the taps
that land inside the image (zero-padding taps are skipped), which is how XLA's cost analysis
counts them; on 8x8 and 4x4 feature maps that is 16% and 31% fewer FLOPs than k*k taps.

Per example and per step kind (read from losses.py):
  teacher:     student forward + backward                          (F + B, B ~ 2F)
  guided:      teacher forward of 2B examples (cond + null label)  (2 F_teacher)
               + student forward + backward                        (F_s + B_s)
  progressive: two teacher forwards (t -> t' -> t'')                (2 F_teacher)
               + student forward + backward                        (F_s + B_s)
The backward of a Dense/conv is twice its forward (input and weight cotangents), except for
the layers whose input does not depend on parameters (conv_in, the first time/w Dense), whose
input cotangent is never computed. Remat recomputes forwards: those hardware FLOPs are not
model FLOPs and are not counted here (XLA's count of a remat program includes them).

Trainer hook: flops.throughput_metrics(images_per_sec, flops_per_example=
flops.step_flops_per_example(config, stage.kind), num_devices=jax.device_count(),
peak=flops.peak_flops_per_device(config.model.dtype)).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from gdistill import diffusion


@dataclasses.dataclass(frozen=True)
class Op:
  """One matmul-like op of a forward pass: FLOPs per example and its backward multiple."""
  name: str
  flops: int
  bwd: int = 2  # backward FLOPs / forward FLOPs: 2 (input + weight cotangents) or 1


def _taps(n_in: int, k: int, stride: int) -> tuple[int, int]:
  """(valid (output position, tap) pairs along one dim, output size) of a SAME convolution."""
  n_out = -(-n_in // stride)
  lo = max((n_out - 1) * stride + k - n_in, 0) // 2
  valid = sum(1 for o in range(n_out) for j in range(k) if 0 <= o * stride - lo + j < n_in)
  return valid, n_out


def conv_op(name, res: int, c_in: int, c_out: int, k: int = 3, stride: int = 1,
            bwd: int = 2) -> tuple[Op, int]:
  """A k x k SAME conv on a res x res map: (op, output resolution)."""
  valid, n_out = _taps(res, k, stride)
  return Op(name, 2 * c_in * c_out * valid * valid, bwd), n_out


def dense_op(name, d_in: int, d_out: int, positions: int = 1, bwd: int = 2) -> Op:
  return Op(name, 2 * d_in * d_out * positions, bwd)


def _cond_ops(base: int, emb: int, w_embedding: bool) -> list[Op]:
  ops = [dense_op("cond/time_dense0", base, emb, bwd=1), dense_op("cond/time_dense1", emb, emb)]
  if w_embedding:
    ops += [dense_op("cond/w_dense0", base, emb, bwd=1), dense_op("cond/w_dense1", emb, emb)]
  return ops


def unet_ops(m, w_embedding: bool = False) -> list[Op]:
  """The forward's ops, per example, walking models/unet.py block by block."""
  ch, emb = int(m.ch), 4 * int(m.ch)
  out_ch = diffusion.output_channels(m.parametrization, int(m.channels))
  ops = _cond_ops(ch, emb, w_embedding)

  def resblock(name, res, c_in, c_out, updown=None):
    r = res // 2 if updown == "down" else res * 2 if updown == "up" else res
    blk = [conv_op(f"{name}/conv0", r, c_in, c_out)[0],
           dense_op(f"{name}/emb_proj", emb, 2 * c_out),
           conv_op(f"{name}/conv1", r, c_out, c_out)[0]]
    if c_in != c_out:
      blk.append(conv_op(f"{name}/skip", r, c_in, c_out, k=1)[0])
    return blk, r

  def attention(name, res, c):
    n = res * res
    return [dense_op(f"{name}/qkv", c, 3 * c, n), Op(f"{name}/qk", 2 * n * n * c),
            Op(f"{name}/av", 2 * n * n * c), dense_op(f"{name}/proj_out", c, c, n)]

  res = int(m.image_size)
  attn = tuple(m.attn_resolutions)
  ops.append(conv_op("conv_in", res, int(m.channels), ch, bwd=1)[0])
  hs, c = [ch], ch
  for level, mult in enumerate(m.ch_mult):
    for i in range(int(m.num_res_blocks)):
      blk, _ = resblock(f"down_{level}_{i}", res, c, mult * ch)
      ops += blk
      c = mult * ch
      if res in attn:
        ops += attention(f"down_{level}_{i}_attn", res, c)
      hs.append(c)
    if level != len(m.ch_mult) - 1:
      if m.resblock_updown:
        blk, res = resblock(f"down_{level}_downsample", res, c, c, "down")
        ops += blk
      else:
        op, res = conv_op(f"down_{level}_downsample", res, c, c, stride=2)
        ops.append(op)
      hs.append(c)
  for name in ("mid_0", "mid_attn", "mid_1"):
    ops += attention(name, res, c) if name == "mid_attn" else resblock(name, res, c, c)[0]
  for level, mult in reversed(list(enumerate(m.ch_mult))):
    for i in range(int(m.num_res_blocks) + 1):
      blk, _ = resblock(f"up_{level}_{i}", res, c + hs.pop(), mult * ch)
      ops += blk
      c = mult * ch
      if res in attn:
        ops += attention(f"up_{level}_{i}_attn", res, c)
    if level != 0:
      if m.resblock_updown:
        blk, res = resblock(f"up_{level}_upsample", res, c, c, "up")
        ops += blk
      else:
        res *= 2
        ops.append(conv_op(f"up_{level}_upsample", res, c, c)[0])
  assert not hs
  ops.append(conv_op("conv_out", res, ch, out_ch)[0])
  return ops


def mlp_ops(m, w_embedding: bool = False) -> list[Op]:
  """The forward's ops of models/mlp.py, per example."""
  h = int(m.ch)
  out = diffusion.output_channels(m.parametrization, int(m.channels))
  ops = _cond_ops(h, h, w_embedding) + [dense_op("dense_in", int(m.channels), h, bwd=1)]
  for i in range(int(m.num_res_blocks)):
    ops += [dense_op(f"block{i}_emb", h, h), dense_op(f"block{i}_dense0", h, 2 * h),
            dense_op(f"block{i}_dense1", 2 * h, h)]
  return ops + [dense_op("dense_out", h, out)]


def model_ops(model_cfg, w_embedding: bool = False) -> list[Op]:
  builders = {"unet": unet_ops, "mlp": mlp_ops}
  if model_cfg.name not in builders:
    raise ValueError(f"model.name={model_cfg.name!r}: no FLOP count; valid: {sorted(builders)}")
  return builders[model_cfg.name](model_cfg, w_embedding)


def forward_flops(model_cfg, w_embedding: bool = False) -> int:
  """Model FLOPs of one forward pass per example."""
  return sum(op.flops for op in model_ops(model_cfg, w_embedding))


def backward_flops(model_cfg, w_embedding: bool = False) -> int:
  """Model FLOPs of one backward pass per example (parameter and needed input cotangents)."""
  return sum(op.bwd * op.flops for op in model_ops(model_cfg, w_embedding))


STEP_KINDS = ("teacher", "guided", "progressive")
MODELS = ("unet", "mlp")  # the architectures with an analytic FLOP count


def has_analytic_count(model_cfg) -> bool:
  """Whether this module counts the model's FLOPs (not the SD-structured U-Net yet)."""
  return model_cfg.name in MODELS


def flops_per_image(config, kind: str, xla_dot_conv: float, *, num_steps: int = 0,
                    guided: bool = False) -> tuple[float, str]:
  """(model FLOPs per image, source) of a train step kind, or of sampling (kind 'sample':
  num_steps, guided): the analytic count, or for a model without one XLA's count of the
  compiled program's dots and convolutions (xla_dot_conv, per image), source 'xla'."""
  if not has_analytic_count(config.model):
    return xla_dot_conv, "xla"
  if kind == "sample":
    return sample_flops_per_image(config, num_steps, guided=guided), "analytic"
  return step_flops_per_example(config, kind), "analytic"


def step_flops_breakdown(config, kind: str) -> dict:
  """{'teacher_forward', 'student_forward', 'student_backward', 'total'} per example."""
  m = config.model
  if kind not in STEP_KINDS:
    raise ValueError(f"unknown step kind {kind!r}; valid: {STEP_KINDS}")
  student_w = kind != "teacher"
  teacher = {"teacher": 0, "guided": 2 * forward_flops(m, False),        # cond + null (2B)
             "progressive": 2 * forward_flops(m, True)}[kind]            # t -> t' -> t''
  out = {"teacher_forward": teacher, "student_forward": forward_flops(m, student_w),
         "student_backward": backward_flops(m, student_w)}
  out["total"] = sum(out.values())
  return out


def step_flops_per_example(config, kind: str) -> int:
  """Model FLOPs of one train step of a stage kind, per example of the global batch."""
  return step_flops_breakdown(config, kind)["total"]


def sample_flops_per_image(config, num_steps: int, *, guided: bool) -> int:
  """Model FLOPs to sample one image: guided teacher 2N forwards, w-student N forwards."""
  m = config.model
  return (2 if guided else 1) * int(num_steps) * forward_flops(m, not guided)


# Dense (no sparsity) peak FLOP/s per chip from the vendors' data sheets.
# 'float32' on NVIDIA is the TF32 tensor-core peak: XLA's default precision runs f32 dots and
# convolutions in TF32 on Ampere and later. Google publishes no f32 peak for TPUs (f32 matmuls
# run as several bf16 passes): the bf16 peak is used, so f32 MFU there is a lower bound.
PEAK_FLOPS = {
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5e": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v6e": {"bfloat16": 918e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12, "float32_ieee": 19.5e12},
    "H100 SXM": {"bfloat16": 989e12, "float32": 494e12, "float32_ieee": 67e12},
    "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12, "float32_ieee": 51e12},
    "H200": {"bfloat16": 989e12, "float32": 494e12, "float32_ieee": 67e12},
}


def device_family(device_kind: str) -> Optional[str]:
  """The PEAK_FLOPS key of a jax device_kind string (None: unknown, e.g. CPU)."""
  k = device_kind.lower()
  rules = [("v6", "TPU v6e"), ("v5 lite", "TPU v5e"), ("v5e", "TPU v5e"), ("v5", "TPU v5p"),
           ("v4", "TPU v4"), ("a100", "A100"), ("h100 pcie", "H100 PCIe"), ("h100", "H100 SXM"),
           ("h200", "H200")]
  if "tpu" in k or "nvidia" in k or any(s in k for s in ("a100", "h100", "h200")):
    for pat, fam in rules:
      if pat in k:
        return fam
  return None


def measure_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of a jitted n x n x n matmul on the default device (a measured ceiling)."""
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a, a))
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


@functools.lru_cache(maxsize=None)
def peak_flops(dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of one device in this compute dtype, where the figure comes from)."""
  d = jax.devices()[0]
  fam = device_family(d.device_kind)
  if fam is not None:
    table = PEAK_FLOPS[fam]
    key = "bfloat16" if dtype in ("bfloat16", "float16") or dtype not in table else dtype
    return table[key], f"{fam} {key} data-sheet peak"
  return measure_matmul_flops(dtype), f"measured {dtype} 2048^3 matmul on {d.device_kind}"


def peak_flops_per_device(dtype: str = "float32") -> float:
  """Peak FLOP/s of one device (data sheet; on CPU a measured matmul ceiling, cached)."""
  return peak_flops(dtype)[0]


def throughput_metrics(images_per_sec: float, *, flops_per_example: float, num_devices: int,
                       peak: float) -> dict:
  """Dashboard scalars from a measured global images/s: model TFLOP/s per device and MFU."""
  per_device = images_per_sec / num_devices * flops_per_example
  return {"tflops_per_device": per_device / 1e12, "mfu": per_device / peak}


# --- XLA's count ---------------------------------------------------------------------------

def xla_total_flops(lowered_or_compiled) -> float:
  """XLA's cost-analysis 'flops' (every op: matmuls and elementwise; a while body once)."""
  ca = lowered_or_compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", float("nan")))


MATMUL_PRIMITIVES = ("dot_general", "conv_general_dilated")


@functools.lru_cache(maxsize=4096)
def _xla_primitive_flops(prim, avals: tuple, params_key) -> float:
  params = dict(params_key)
  args = [jax.ShapeDtypeStruct(s, d) for s, d in avals]
  return xla_total_flops(jax.jit(lambda *xs: prim.bind(*xs, **params)).lower(*args))


def _hashable(v):
  if isinstance(v, dict):
    return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
  if isinstance(v, list):
    return tuple(_hashable(x) for x in v)
  return v


def jaxpr_matmul_flops(jaxpr) -> float:
  """XLA's FLOP count of every dot/convolution of a (closed) jaxpr, walking sub-jaxprs.

  Each primitive is lowered alone and costed by XLA. Scan bodies count `length` times; while
  bodies once (like XLA's own cost analysis); cond branches by their maximum.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in MATMUL_PRIMITIVES:
      avals = tuple((tuple(v.aval.shape), v.aval.dtype) for v in eqn.invars)
      total += _xla_primitive_flops(eqn.primitive, avals, _hashable(dict(eqn.params)))
      continue
    subs = [jaxpr_matmul_flops(j) for j in jax.extend.core.jaxprs_in_params(eqn.params)]
    if not subs:
      continue
    if name == "cond":
      total += max(subs)
    elif name == "scan":
      total += eqn.params["length"] * sum(subs)
    else:
      total += sum(subs)
  return total


def xla_matmul_flops(fn: Callable, *args: Any) -> float:
  """jaxpr_matmul_flops of fn traced at args (arrays or ShapeDtypeStructs)."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args))
