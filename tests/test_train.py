"""The training engine: sharding, abstract full-scale state, errors. (A real teacher on digits:
tests/test_cli.py's run of the README's command, whose losses and samples are checked there.)"""
import os

import jax
import numpy as np
import pytest

from gdistill import config_lib, data, driver, plan, sharding, train
import util


def _run_steps(c, mesh, n):
  stage = plan.Stage("teacher", "teacher", "teacher")
  with jax.set_mesh(mesh):
    s = train.setup_stage(c, "/nonexistent", stage, mesh)
    state = train.init_state(c, stage, s)
    from gdistill import losses
    step = train.make_train_step(losses.make_loss("teacher", student=s.student, teacher=None,
                                                  config=c), s, c.teacher, mesh)
    out = []
    for i in range(n):
      b = data.global_batch(c.data, global_batch_size=c.teacher.batch_size, seed=0, step=i)
      b = sharding.global_batch_from_local(b, mesh, c.teacher.batch_size)
      b.update(train.step_scalars(mesh, 0, 7))
      state, m = step(state, None, b)
      out.append(float(m["loss"]))
  return out, state


def test_fsdp_mesh_matches_one_device_and_shards_parameters(tmp_path):
  small = {"data.data_dir": str(tmp_path / "tfds"), "model.dropout": 0.0, "model.ch": 16,
           "model.head_dim": 16, "model.num_groups": 4, "teacher.batch_size": 16}
  c = util.quick_config(**small)
  one = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  c8 = util.quick_config(**small, **{"mesh.data": 4, "mesh.fsdp": 2})
  eight = sharding.make_mesh(c8.mesh)
  assert dict(eight.shape) == {"data": 4, "fsdp": 2}
  l1, _ = _run_steps(c, one, 3)
  l8, state = _run_steps(c8, eight, 3)
  np.testing.assert_allclose(l8, l1, rtol=2e-4)
  # Parameters whose logical axes map to 'fsdp' are split in two; the rest are replicated.
  kernel = state["params"]["down_0_0"]["conv0"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 2
  mu = state["opt_state"][1][0].mu["down_0_0"]["conv0"]["kernel"]
  assert mu.sharding == kernel.sharding


@pytest.mark.parametrize("name", ["imagenet64", "cifar10"])
def test_full_scale_configs_build_abstract_sharded_state(name):
  import importlib
  c = importlib.import_module(f"configs.{name}").get_config()
  with c.unlocked():
    c.mesh.fsdp = 2
  config_lib.validate(c, num_devices=8)
  mesh = sharding.make_mesh(c.mesh)
  s = train.setup_stage(c, "/nonexistent", plan.Stage("teacher", "teacher", "teacher"), mesh)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_state["params"]))
  if name == "imagenet64":
    assert abs(n - 295.9e6) / 295.9e6 < 0.01
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(s.abstract_state))
  assert "ema" in s.abstract_state


def test_unprepared_catalog_dataset_fails_offline_with_the_command(tmp_path, monkeypatch):
  """No download, no network wait: the refusal comes from the local files alone."""
  import importlib
  c = importlib.import_module("configs.cifar10").get_config()
  with c.unlocked():
    c.data.data_dir = str(tmp_path)
  util.forbid_network(monkeypatch)
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    driver.prepare(c, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")
