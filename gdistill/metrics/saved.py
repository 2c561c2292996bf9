"""Small evaluation models (the classifiers) saved as one .npz: parameters and JSON metadata,
and no pickling."""
from __future__ import annotations

import json
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

from gdistill import paths

META_KEY = "__metadata__"
PARAM_PREFIX = "params/"


def save(path: str, params: Any, metadata: dict) -> None:
  """Writes params and metadata to path atomically (a temporary file, then a rename)."""
  arrays = {PARAM_PREFIX + k: np.asarray(v)
            for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  arrays[META_KEY] = np.array(json.dumps(metadata, sort_keys=True))
  paths.save_npz_atomic(path, arrays)


def load(path: str, what: str, check: Callable[[dict], tuple[Any, str]]) -> tuple[Any, dict]:
  """Reads (params, metadata) written by save(). check(metadata) returns the abstract
  parameters the metadata describes (after validating it) and their name for messages; every
  parameter's shape must match them."""
  if not paths.exists(path):
    raise FileNotFoundError(f"No {what} at {path!r}.")
  npz = paths.load_npz(path)
  if META_KEY not in npz:
    raise ValueError(f"{path!r} is not a gdistill {what}: no {META_KEY!r} entry.")
  metadata = json.loads(str(npz[META_KEY]))
  flat = {k[len(PARAM_PREFIX):]: v for k, v in npz.items() if k.startswith(PARAM_PREFIX)}
  abstract, name = check(metadata)
  expected = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  found = {k: v.shape for k, v in flat.items()}
  if found != expected:
    raise ValueError(f"{path!r}: parameters {found} do not match {name} {expected}.")
  return traverse_util.unflatten_dict(flat, sep="/"), metadata


def abstract_params(module, input_shape: tuple[int, ...]) -> Any:
  """The parameter shapes of module for a float32 input of input_shape (nothing computed)."""
  dummy = jax.ShapeDtypeStruct(input_shape, np.float32)
  return jax.eval_shape(module.init, jax.random.key(0), dummy)["params"]
