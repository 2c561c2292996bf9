"""Checkpoints: sharded round trips, 8 -> 2 device restore, strictness, corruption, exports."""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gdistill import checkpoint as ckpt


def _mesh(n_devices: int):
  return jax.make_mesh((n_devices // 2, 2), ("data", "fsdp"), devices=jax.devices()[:n_devices])


def _spec(x) -> P:
  """Shards the last axis on 'fsdp' for matrices and up, replicates vectors and scalars."""
  if np.ndim(x) >= 2:
    return P(*([None] * (np.ndim(x) - 1)), "fsdp")
  return P()


def _shardings(tree, mesh):
  return jax.tree.map(lambda x: NamedSharding(mesh, _spec(x)), tree)


def _abstract(tree, mesh):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, _shardings(tree, mesh))


def _state(mesh, *, seed: int = 0, ema: bool = True):
  k = jax.random.split(jax.random.key(seed), 3)
  params = {
      "dense": {"kernel": jax.random.normal(k[0], (8, 4)), "bias": jax.random.normal(k[1], (4,))},
      "conv0": {"kernel": jax.random.normal(k[2], (3, 3, 2, 4))},
  }
  params = jax.device_put(params, _shardings(params, mesh))
  tx = optax.adam(1e-3)
  grads = jax.tree.map(lambda p: 0.1 * p, params)
  _, opt_state = tx.update(grads, tx.init(params), params)
  state = {
      "step": jnp.int32(7 + seed),
      "params": params,
      "ema": jax.tree.map(lambda p: 0.5 * p, params) if ema else None,
      "opt_state": opt_state,
  }
  return jax.device_put(state, _shardings(state, mesh))


def _assert_identical(restored, expected, mesh):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(restored),
                             jax.tree.leaves(expected),
                             jax.tree.leaves(_shardings(expected, mesh))):
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert a.sharding == s, (jax.tree_util.keystr(path), a.sharding, s)


def _step_dirs(directory) -> list[str]:
  return sorted(os.listdir(directory))


def _garble(step_dir, *, truncate: bool):
  """Truncates (or overwrites with garbage) every file of a step's state item."""
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      if truncate:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
      else:
        with open(path, "wb") as f:
          f.write(b"\x00garbage" * 5)


def test_tree_summary_paths_are_readable():
  state = _state(_mesh(8))
  summary = ckpt.tree_summary(state)
  assert summary["params/dense/kernel"] == [[8, 4], "float32"]
  assert summary["opt_state/0/mu/conv0/kernel"] == [[3, 3, 2, 4], "float32"]
  assert summary["step"] == [[], "int32"]


def test_async_save_then_restore_is_bit_exact_with_target_sharding(tmp_path):
  mesh = _mesh(8)
  state = _state(mesh)
  extra = {"stage": "teacher", "data_seed": 0, "config_hash": "abc"}
  with ckpt.StageCheckpointer(str(tmp_path)) as ck:
    assert ck.latest_step() is None
    assert ck.save(7, state, extra)
    ck.wait()
    assert ck.latest_step() == 7 and ck.all_steps() == [7]
    restored, restored_extra = ck.restore(None, _abstract(state, mesh))
  _assert_identical(restored, state, mesh)
  assert restored_extra == extra
  assert restored["params"]["dense"]["kernel"].sharding.spec == P(None, "fsdp")


@pytest.mark.reliability
def test_restore_on_two_devices_from_an_eight_device_save(tmp_path):
  state = _state(_mesh(8))
  with ckpt.StageCheckpointer(str(tmp_path)) as ck:
    ck.save(7, state, {"stage": "teacher"})
  mesh2 = _mesh(2)
  with ckpt.StageCheckpointer(str(tmp_path)) as ck:
    restored, _ = ck.restore(7, _abstract(state, mesh2))
  _assert_identical(restored, state, mesh2)
  assert len(restored["params"]["dense"]["kernel"].sharding.device_set) == 2


def test_keep_two_retains_the_last_two(tmp_path):
  mesh = _mesh(8)
  state = _state(mesh, ema=False)
  with ckpt.StageCheckpointer(str(tmp_path), keep=2) as ck:
    for step in (1, 2, 3):
      ck.save(step, state, {"i": step})
    ck.wait()
    assert ck.all_steps() == [2, 3]
  assert _step_dirs(tmp_path) == ["2", "3"]


@pytest.mark.reliability
def test_dtype_and_shape_mismatches_are_refused_parameter_by_parameter(tmp_path):
  mesh = _mesh(8)
  state = _state(mesh)
  with ckpt.StageCheckpointer(str(tmp_path)) as ck:
    ck.save(7, state, {})
    ck.wait()
    target = _abstract(state, mesh)
    target["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct(
        (8, 4), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    target["ema"]["conv0"]["kernel"] = jax.ShapeDtypeStruct(
        (3, 3, 2, 8), jnp.float32, sharding=NamedSharding(mesh, P()))
    with pytest.raises(ValueError) as err:
      ck.restore(7, target)
    msg = str(err.value)
    assert ("params/dense/kernel: expected shape (8, 4) dtype bfloat16, "
            "found shape (8, 4) dtype float32") in msg
    assert ("ema/conv0/kernel: expected shape (3, 3, 2, 8) dtype float32, "
            "found shape (3, 3, 2, 4)") in msg
    assert "2 mismatches" in msg

    no_ema = _abstract({**state, "ema": None}, mesh)
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match="ema/dense/bias: found .* not in the target"):
      ck.restore(7, no_ema)
    # A mismatch is not corruption: restore_latest_usable must not skip past it.
    with pytest.raises(ckpt.CheckpointMismatchError):
      ck.restore_latest_usable(no_ema)


@pytest.mark.reliability
def test_corrupt_latest_falls_back_to_previous_and_deletes_nothing(tmp_path, caplog):
  mesh = _mesh(8)
  states = {step: _state(mesh, seed=step) for step in (1, 2)}
  with ckpt.StageCheckpointer(str(tmp_path)) as ck:
    for step, state in states.items():
      ck.save(step, state, {"step": step})
  _garble(tmp_path / "2", truncate=True)
  with ckpt.StageCheckpointer(str(tmp_path)) as ck, caplog.at_level(logging.WARNING):
    step, restored, extra = ck.restore_latest_usable(_abstract(states[1], mesh))
  assert step == 1 and extra == {"step": 1}
  _assert_identical(restored, states[1], mesh)
  assert any("step 2" in r.getMessage() for r in caplog.records)
  assert _step_dirs(tmp_path) == ["1", "2"]


@pytest.mark.reliability
def test_all_corrupt_raises_and_deletes_nothing(tmp_path):
  mesh = _mesh(8)
  state = _state(mesh)
  with ckpt.StageCheckpointer(str(tmp_path)) as ck:
    assert ck.restore_latest_usable(_abstract(state, mesh)) is None
    for step in (1, 2):
      ck.save(step, state, {})
  _garble(tmp_path / "1", truncate=False)
  _garble(tmp_path / "2", truncate=True)
  with ckpt.StageCheckpointer(str(tmp_path)) as ck:
    with pytest.raises(ckpt.NoUsableCheckpointError, match=r"(?s)step 2: .*step 1: "):
      ck.restore_latest_usable(_abstract(state, mesh))
  assert _step_dirs(tmp_path) == ["1", "2"]


@pytest.mark.reliability
def test_interrupted_save_tmp_dir_is_ignored(tmp_path):
  mesh = _mesh(8)
  state = _state(mesh)
  with ckpt.StageCheckpointer(str(tmp_path)) as ck:
    ck.save(1, state, {"step": 1})
  # What a kill -9 during the save of step 5 leaves behind (orbax 0.12 tmp naming).
  os.makedirs(tmp_path / "5.orbax-checkpoint-tmp" / "state")
  (tmp_path / "5.orbax-checkpoint-tmp" / "state" / "_METADATA").write_text("{")
  with ckpt.StageCheckpointer(str(tmp_path)) as ck:
    assert ck.latest_step() == 1 and ck.all_steps() == [1]
    step, _, extra = ck.restore_latest_usable(_abstract(state, mesh))
    assert (step, extra) == (1, {"step": 1})
    assert ck.save(5, state, {"step": 5})
    ck.wait()
    assert ck.all_steps() == [1, 5]
  assert _step_dirs(tmp_path) == ["1", "5"]


def test_export_round_trip_and_overwrite(tmp_path):
  mesh = _mesh(8)
  params = _state(mesh)["params"]
  path = str(tmp_path / "teacher")
  ckpt.save_export(path, jax.tree.map(lambda p: 2 * p, params), {"stage": "teacher", "round": 0})
  ckpt.save_export(path, params, {"stage": "teacher", "round": 1})  # replaces the first
  assert sorted(os.listdir(tmp_path)) == ["teacher"]
  meta = ckpt.load_export_metadata(path)
  assert meta["round"] == 1
  assert meta["param_summary"]["dense/kernel"] == [[8, 4], "float32"]
  mesh2 = _mesh(2)
  restored, meta2 = ckpt.load_export(path, _abstract(params, mesh2))
  _assert_identical(restored, params, mesh2)
  assert meta2 == meta
  bad = _abstract(params, mesh)
  bad["dense"]["bias"] = jax.ShapeDtypeStruct((4,), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  with pytest.raises(ckpt.CheckpointMismatchError, match="dense/bias: expected shape"):
    ckpt.load_export(path, bad)


def test_missing_or_incomplete_export_is_a_clear_error(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="No complete export at .*nope"):
    ckpt.load_export_metadata(missing)
  params = _state(_mesh(8))["params"]
  with pytest.raises(FileNotFoundError, match="nope"):
    ckpt.load_export(missing, _abstract(params, _mesh(8)))
  os.makedirs(tmp_path / "half" / "params")  # interrupted: no metadata.json
  with pytest.raises(FileNotFoundError, match="metadata.json is missing"):
    ckpt.load_export_metadata(str(tmp_path / "half"))
