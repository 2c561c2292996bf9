"""InceptionV3 as used by FID ('pt_inception-2015-12-05'), in Flax Linen.

The architecture of pytorch-fid's `fid_inception_v3` (torchvision Inception3
without the aux head, 1008-way fc, FIDInceptionA/C/E_1 blocks whose average pools
ignore padding, and FIDInceptionE_2 with a max pool in its pool branch). Module
names follow the torch state dict ('Mixed_6b.branch7x7dbl_5.conv.weight'), so
the weights convert by name. Images [N, H, W, C] (uint8 0..255 or float in
[-1, 1], C in {1, 3}) are resized to 299x299 bilinearly (half-pixel centres, no
antialias, as torch's `interpolate(align_corners=False)`); the outputs are the
2048-d average-pooled features and the 1008 logits.

Weights are never downloaded. Convert pytorch-fid's file once, where torch is
installed (weights_only=True reads it without unpickling arbitrary objects):

  import numpy as np, torch
  sd = torch.load('pt_inception-2015-12-05-6726825d.pth', map_location='cpu',
                  weights_only=True)
  np.savez('pt_inception-2015-12-05.npz', **{k: v.numpy() for k, v in sd.items()})
  # or: safetensors.torch.save_file(sd, 'pt_inception-2015-12-05.safetensors')

then `variables = load_inception_params('pt_inception-2015-12-05.npz')`.
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
EXPECTED_FILE = ("pytorch-fid's pt_inception-2015-12-05-6726825d.pth weights converted "
                 "to .npz or .safetensors (torch state-dict names)")

Pad = tuple[tuple[int, int], tuple[int, int]]


def _pad(ph: int, pw: int) -> Pad:
  return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> relu."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: Pad = ((0, 0), (0, 0))

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=self.padding,
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x):
  """3x3 stride-1 average pool, padding 1, padded zeros not counted (TF)."""
  return nn.avg_pool(x, (3, 3), padding=_pad(1, 1), count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=_pad(0, 3)), dict(kernel=(7, 1), padding=_pad(3, 0))
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (avg pool, padding not counted) or, max_pool=True, E_2."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=_pad(0, 1)), dict(kernel=(3, 1), padding=_pad(1, 0))
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(b3),
                          BasicConv2d(384, **col, name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), padding=_pad(1, 1))
    else:
      pooled = _avg_pool_same(x)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """[N, 299, 299, 3] in [-1, 1] -> (pool float32 [N, 2048], logits float32 [N, 1008])."""

  @nn.compact
  def __call__(self, x):
    assert x.ndim == 4 and x.shape[1:] == (INPUT_SIZE, INPUT_SIZE, 3), x.shape
    x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    assert x.shape[1:] == (8, 8, POOL_DIM), x.shape
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, name="fc")(pool)
    return pool, logits


def init_shapes() -> dict[str, Any]:
  """{'params': ..., 'batch_stats': ...} as jax.ShapeDtypeStruct, nothing allocated."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)


# Flax (collection, leaf name) -> torch suffix.
_TORCH_SUFFIX = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_name(collection: str, path: tuple[str, ...]) -> tuple[str, tuple[int, ...] | None]:
  """Torch state-dict name of a Flax leaf and the transpose that converts it:
  conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
  suffix = _TORCH_SUFFIX[(collection, path[-1])]
  transpose = None
  if path[-1] == "kernel":
    transpose = (2, 3, 1, 0) if path[-2] == "conv" else (1, 0)
  return ".".join(path[:-1] + (suffix,)), transpose


def variables_from_torch(state: dict[str, np.ndarray]) -> dict[str, Any]:
  """Flax variables from a pt_inception torch state dict (name -> array); strict."""
  state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  variables, used = {}, set()
  for collection, tree in init_shapes().items():
    flat = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
      name, transpose = _torch_name(collection, path)
      if name not in state:
        raise ValueError(f"Inception weights lack {name!r} (for {collection}/{'/'.join(path)}).")
      value = np.asarray(state[name], np.float32)
      if transpose is not None:
        value = np.transpose(value, transpose)
      if value.shape != leaf.shape:
        raise ValueError(f"Inception weight {name!r} has shape {value.shape} after "
                         f"conversion; the architecture needs {leaf.shape}.")
      flat[path] = value
      used.add(name)
    variables[collection] = traverse_util.unflatten_dict(flat)
  extra = sorted(set(state) - used)
  if extra:
    raise ValueError(f"Inception weights have {len(extra)} unknown entries, e.g. {extra[:3]}.")
  return variables


def load_inception_params(path: str) -> dict[str, Any]:
  """Flax variables of the FID Inception from a converted .npz or .safetensors file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Inception weights not found at {path!r}: expected {EXPECTED_FILE}. gdistill never "
        "downloads them; convert them once as shown in gdistill/metrics/inception.py.")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    state = load_file(path)
  elif path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as npz:
      state = {k: npz[k] for k in npz.files}
  else:
    raise ValueError(f"Inception weights {path!r}: expected a .npz or .safetensors file.")
  return variables_from_torch(state)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] or float [-1, 1], [N, H, W, 1 or 3] -> float32 [N, 299, 299, 3] in [-1, 1]."""
  assert images.ndim == 4 and images.shape[-1] in (1, 3), images.shape
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 127.5 - 1.0
  else:
    x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.tile(x, (1, 1, 1, 3))
  shape = (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3)
  return jax.image.resize(x, shape, method="bilinear", antialias=False)


@jax.jit
def _apply(variables, images):
  return FIDInceptionV3().apply(variables, preprocess(images))


def inception_features(params, images, *, batch_size: int = 200) -> tuple[np.ndarray, np.ndarray]:
  """(pool float32 [N, 2048], logits float32 [N, 1008]) of images [N, H, W, C].

  params: the variables from `load_inception_params`. The last batch is padded so
  that every batch has the same shape (one compilation).
  """
  images = np.asarray(images)
  n = images.shape[0]
  size = min(batch_size, n)
  pools, logits = [], []
  for lo in range(0, n, size):
    batch = images[lo:lo + size]
    keep = batch.shape[0]
    batch = np.concatenate([batch, np.zeros((size - keep,) + batch.shape[1:], batch.dtype)])
    pool, logit = _apply(params, jnp.asarray(batch))
    pools.append(np.asarray(pool)[:keep])
    logits.append(np.asarray(logit)[:keep])
  return np.concatenate(pools), np.concatenate(logits)
