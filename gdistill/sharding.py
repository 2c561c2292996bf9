"""Mesh, logical-axis shardings and global batches.

The mesh has axes ('data', 'fsdp'); the batch is split over both (FSDP is data parallel too).
Parameters are annotated with logical axis names in the models; config.logical_axis_rules maps
those names to mesh axes, so turning FSDP on is a config change (mesh.fsdp > 1).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """Mesh ('data', 'fsdp') over all (or the given) devices; data=-1 takes the rest."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  fsdp = int(mesh_cfg.fsdp)
  data = n // fsdp if int(mesh_cfg.data) == -1 else int(mesh_cfg.data)
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices; set "
                     f"--config.mesh.data=-1 or make data x fsdp = {n}")
  # Auto axes: XLA propagates shardings from the jit in/out shardings (GSPMD).
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _fit(spec: P, shape, mesh) -> P:
  """Drops mesh axes from dims they do not divide (e.g. a 1-channel output conv): replicated."""
  out = []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if size > 1 and shape[i] % size == 0 else None)
  return P(*out)


def logical_shardings(boxed_abstract, mesh, rules):
  """NamedShardings for a tree of nn.Partitioned (abstract) params under the rules.

  A dim that the mapped mesh axes do not divide stays replicated.
  """
  specs = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(specs, tuple(tuple(r) for r in rules))
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_abstract))
  fitted = jax.tree.map(lambda sp, shp: _fit(sp, shp, mesh), mesh_specs, shapes,
                        is_leaf=lambda x: isinstance(x, P))
  return jax.tree.map(lambda sp: NamedSharding(mesh, sp), fitted,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch_from_local(local: dict, mesh, global_batch_size: int) -> dict:
  """Host-local slices -> global jax.Arrays sharded over the batch axes."""
  sh = batch_sharding(mesh)
  out = {}
  for k, v in local.items():
    shape = (global_batch_size,) + tuple(v.shape[1:])
    out[k] = jax.make_array_from_process_local_data(sh, np.asarray(v), shape)
  return out


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the given shardings (restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole (possibly multi-process) array as numpy on every process."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
