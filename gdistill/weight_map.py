"""The one table between gdistill parameters and diffusers / transformers state dicts.

gdistill's latent models name their modules after the reference implementations (module docs
of models/unet_cond.py, models/autoencoder.py, models/text.py), so a torch key maps to a
parameter path by renaming alone, plus a layout change of the leaf:

  torch key (state dict)                              gdistill path            layout
  down_blocks.0.resnets.1.conv1.weight  [O, I, kh, kw] down_blocks_0/resnets_1/conv1/kernel  [kh, kw, I, O]
  time_embedding.linear_1.weight        [O, I]         time_embedding/linear_1/kernel        [I, O]
  ...proj_in.weight (SD 1.x, 1x1 conv)  [O, I, 1, 1]   .../proj_in/kernel (1x1 conv)         [1, 1, I, O]
  ...norm1.weight                       [C]            .../norm1/scale                       [C]
  ...bias                               [C]            .../bias                              [C]
  embeddings.token_embedding.weight     [V, D]         embeddings/token_embedding/embedding  [V, D]

A path segment `<container>_<n>` is the torch `<container>.<n>` for the containers in
CONTAINERS (`linear_1`, `norm_1`-style names that are not containers keep their underscore).
A family adds a prefix: CLIPTextModel checkpoints of transformers 4 (Stable Diffusion's) keep
their keys below `text_model.`, transformers 5 saves them without it; both read, and written
files use the prefix, which both versions load.

Reading (`params_from_state`) walks the parameter tree a model's init gives (a template):
every template leaf must find its key with the right shape, and every key of the file must be
used (or be a known buffer, IGNORED_KEYS); each violation is an error that names the key. The
reader takes a `get(key, index)` callable, so a caller can read only a slice of a tensor (the
safetensors numpy API's get_slice): `index` is in gdistill's layout and is translated here to
the torch layout, which is what lets each process read just the shards it holds.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Optional

import numpy as np
from flax.traverse_util import flatten_dict as flatten, unflatten_dict as unflatten

CONTAINERS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
              "downsamplers", "upsamplers", "to_out", "net", "layers")
FAMILIES = {"unet": "", "vae": "", "text": "text_model."}
# Buffers some checkpoints carry that are not parameters (transformers < 4.31 saved
# CLIP's position_ids).
IGNORED_KEYS = ("text_model.embeddings.position_ids",)

_CONTAINER_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(CONTAINERS))
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight",
         "positional_embedding": "positional_embedding"}


class WeightMapError(ValueError):
  """A checkpoint does not fit the model: missing, unused or mis-shaped keys (named)."""


def torch_key(path: tuple[str, ...], family: str) -> str:
  """The state-dict key of the gdistill parameter at `path` (a tuple of names)."""
  if family not in FAMILIES:
    raise ValueError(f"family {family!r}; valid: {tuple(FAMILIES)}")
  *modules, leaf = path
  if leaf not in _LEAF:
    raise WeightMapError(f"parameter {'/'.join(path)}: leaf {leaf!r} has no torch name "
                         f"(known: {tuple(_LEAF)})")
  parts = [_CONTAINER_RE.sub(r"\1.\2", m) for m in modules]
  return FAMILIES[family] + ".".join(parts + [_LEAF[leaf]])


def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch layout's shape of a gdistill leaf of this shape (1x1 convs stay 4-D)."""
  shape = tuple(shape)
  if path[-1] != "kernel":
    return shape
  if len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:  # [in, out] -> [out, in]
    return (shape[1], shape[0])
  raise WeightMapError(f"parameter {'/'.join(path)}: kernel of rank {len(shape)}")


def to_torch(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """A gdistill leaf in the torch layout (a new contiguous array)."""
  value = np.asarray(value)
  if path[-1] == "kernel":
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return np.ascontiguousarray(value)


def _torch_index(path, index: tuple[slice, ...], ndim: int) -> tuple[slice, ...]:
  """An index in gdistill's layout -> the same elements' index in torch's layout."""
  index = tuple(index) + (slice(None),) * (ndim - len(index))
  if path[-1] != "kernel":
    return index
  if ndim == 4:
    h, w, i, o = index
    return (o, i, h, w)
  return (index[1], index[0])


def _from_torch(path, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A torch slice (in torch layout) -> gdistill layout; a [O, I, 1, 1] conv read into a
  Dense kernel [I, O] (SD 1.x's 1x1-conv proj_in/proj_out into linear-projection blocks) is
  squeezed."""
  if path[-1] != "kernel":
    return value
  if value.ndim == 4 and len(shape) == 2:
    value = value[:, :, 0, 0]
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def key_table(template: Mapping, family: str) -> dict[str, tuple[tuple[str, ...], tuple]]:
  """{torch key: (gdistill path, torch shape)} for every leaf of a parameter template (arrays
  or ShapeDtypeStructs)."""
  table = {}
  for path, leaf in flatten(template).items():
    key = torch_key(path, family)
    if key in table:
      raise WeightMapError(f"two parameters map to {key}: {'/'.join(table[key][0])} and "
                           f"{'/'.join(path)}")
    table[key] = (path, torch_shape(path, np.shape(leaf)))
  return table


def file_keys(keys, family: str) -> dict[str, str]:
  """{canonical key (with the family's prefix): the file's own key}: a file whose keys all
  lack the prefix (transformers 5) gets it added."""
  prefix = FAMILIES[family]
  if prefix and not any(k.startswith(prefix) for k in keys):
    return {prefix + k: k for k in keys}
  return {k: k for k in keys}


def check_keys(template: Mapping, family: str, keys: Mapping[str, tuple[int, ...]],
               source: str = "the checkpoint") -> None:
  """Raises WeightMapError naming every missing, unused or mis-shaped key.

  keys: {torch key: shape} of the file. A 4-D [O, I, 1, 1] weight fits a 2-D [O, I] slot."""
  keys = {canon: keys[k] for canon, k in file_keys(keys, family).items()}
  table = key_table(template, family)
  problems = []
  for key, (path, shape) in table.items():
    if key not in keys:
      problems.append(f"missing {key} (for {'/'.join(path)}, shape {shape})")
      continue
    got = tuple(keys[key])
    if got != shape and not (len(shape) == 2 and got == shape + (1, 1)):
      problems.append(f"shape of {key}: {got} in {source}, the model needs {shape} "
                      f"({'/'.join(path)})")
  unused = sorted(k for k in keys if k not in table and k not in IGNORED_KEYS)
  problems += [f"unused {k} (shape {tuple(keys[k])}): the model has no parameter for it"
               for k in unused]
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise WeightMapError(f"{source} does not fit the {family} model ({len(problems)} "
                         f"problem(s)); is the model config the checkpoint's config.json?\n  "
                         f"{shown}{more}")


def params_from_state(template: Mapping, family: str,
                      get: Callable[[str, Optional[tuple]], np.ndarray],
                      keys: Mapping[str, tuple[int, ...]], *, source: str = "the checkpoint",
                      place: Optional[Callable] = None) -> dict:
  """The parameter tree of `template`'s structure with the checkpoint's values.

  get(key, torch_index) -> that slice of the tensor in torch layout (torch_index None: all of
  it); keys: {key: shape}. place(path, shape, dtype, read) -> array builds each leaf from
  read(index) (gdistill-layout index -> numpy); default: the whole leaf as numpy."""
  check_keys(template, family, keys, source)
  names = file_keys(keys, family)
  out = {}
  for path, leaf in flatten(template).items():
    key = names[torch_key(path, family)]
    shape, dtype = tuple(np.shape(leaf)), np.dtype(getattr(leaf, "dtype", np.float32))
    four_d = len(keys[key]) == 4 and len(shape) == 2

    def read(index=None, path=path, key=key, shape=shape, dtype=dtype, four_d=four_d):
      ndim = 4 if four_d else len(shape)
      tidx = None if index is None else _torch_index(path, index, len(shape))
      if tidx is not None and four_d:
        tidx = tidx + (slice(None), slice(None))
      value = np.asarray(get(key, tidx))
      if four_d and value.ndim != ndim:
        raise WeightMapError(f"{key}: got rank {value.ndim}, expected {ndim}")
      return np.asarray(_from_torch(path, value, shape), dtype)

    out[path] = place(path, shape, dtype, read) if place is not None else read()
  return unflatten(out)


def state_from_params(params: Mapping, family: str, *,
                      conv_1x1: Optional[Callable[[tuple[str, ...]], bool]] = None
                      ) -> dict[str, np.ndarray]:
  """The torch state dict (numpy, torch layout) of a parameter tree. conv_1x1(path): write
  this 2-D kernel as a [O, I, 1, 1] conv weight (SD 1.x's proj_in / proj_out)."""
  out = {}
  for path, leaf in flatten(params).items():
    value = to_torch(path, np.asarray(leaf, np.float32))
    if conv_1x1 is not None and path[-1] == "kernel" and value.ndim == 2 and conv_1x1(path):
      value = value[:, :, None, None]
    out[torch_key(path, family)] = np.ascontiguousarray(value)
  return out
