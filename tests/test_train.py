"""The training engine: sharding, abstract full-scale state, errors. (A real teacher on digits:
tests/test_cli.py's run of the README's command, whose losses and samples are checked there.)"""
import os

import jax
import numpy as np
import pytest

from gdistill import config_lib, config_validation, data, driver, plan, sharding, train
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


def test_fsdp_mesh_matches_one_device_and_shards_parameters():
  """The sharding mechanism does not depend on the network: the toy2d MLP (whose Dense
  kernels carry the same logical axes as the U-Net's convolutions) on 1 device and on a
  4 x 2 (data x fsdp) mesh."""
  small = {"model.ch": 64, "teacher.batch_size": 16}
  c = util.toy_config(**small)
  one = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  c8 = util.toy_config(**small, **{"mesh.data": 4, "mesh.fsdp": 2})
  eight = sharding.make_mesh(c8.mesh)
  assert dict(eight.shape) == {"data": 4, "fsdp": 2}
  l1, _ = _run_steps(c, one, 3)
  l8, state = _run_steps(c8, eight, 3)
  np.testing.assert_allclose(l8, l1, rtol=2e-4)
  # Parameters whose logical axes map to 'fsdp' are split in two; the rest are replicated.
  kernel = state["params"]["block0_dense0"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 2
  norm = state["params"]["block0_norm"]["scale"]
  assert "fsdp" not in str(norm.sharding.spec)
  assert norm.addressable_shards[0].data.shape == norm.shape
  mu = state["opt_state"][1][0].mu["block0_dense0"]["kernel"]
  assert mu.sharding == kernel.sharding


@pytest.mark.parametrize("name", ["imagenet64", "cifar10"])
def test_full_scale_configs_build_abstract_sharded_state(name):
  import importlib
  c = importlib.import_module(f"configs.{name}").get_config()
  with c.unlocked():
    c.mesh.fsdp = 2
  config_validation.validate(c, num_devices=8)
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


def test_gradient_accumulation_is_the_update_of_the_whole_batch():
  """grad_accum = 4 (four micro-batches of 8 on 8 devices) gives the optimizer update of one
  batch of 32, to 1e-5 relative, for a loss that is a mean over examples (here the teacher's
  x-loss at fixed noise, so both runs see the same function); loss and metrics are the means
  too. A batch that the micro-batches cannot share evenly is refused by name. (The mechanism
  does not depend on the network: the toy2d MLP, whose steps compile in seconds.)"""
  import jax.numpy as jnp
  from gdistill import diffusion
  small = {"teacher.batch_size": 32, "mesh.data": 8}
  stage = plan.Stage("teacher", "teacher", "teacher")

  def loss_fn_for(student):
    def loss_fn(params, teacher_params, batch, rng):
      del teacher_params, rng  # deterministic: noise from the examples themselves
      x = batch["x"]
      axes = tuple(range(1, x.ndim))
      logsnr = 3.0 * jnp.mean(x, axis=axes)
      z = diffusion.diffuse(x, jnp.flip(x, axis=-1), logsnr)
      x_pred = student.x_pred(params, z, logsnr, batch["label"])
      per_ex = jnp.mean(jnp.square(x_pred - x), axis=axes)
      return jnp.mean(per_ex), {"x_mse": jnp.mean(per_ex)}
    return loss_fn

  results = {}
  for k in (1, 4):
    c = util.toy_config(**small, **{"teacher.grad_accum": k})
    config_validation.validate(c, num_devices=8)
    mesh = sharding.make_mesh(c.mesh)
    with jax.set_mesh(mesh):
      s = train.setup_stage(c, "/nonexistent", stage, mesh)
      state = train.init_state(c, stage, s)
      loss_fn = loss_fn_for(s.student)
      step = train.make_train_step(loss_fn, s, c.teacher, mesh)
      b = data.global_batch(c.data, global_batch_size=32, seed=0, step=0)
      b = sharding.global_batch_from_local(b, mesh, 32)
      b.update(train.step_scalars(mesh, 0, 7))
      grads = jax.jit(train.accumulated_grads(loss_fn, k, s.batch_fields, mesh))(
          state["params"], None, b, jax.random.key(0))[1]
      state, m = step(state, None, b)
      results[k] = (jax.tree.map(np.asarray, state["params"]), float(m["loss"]),
                    float(m["grad_norm"]), jax.tree.map(np.asarray, grads))
  (p1, l1, n1, g1), (p4, l4, n4, g4) = results[1], results[4]
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  np.testing.assert_allclose(n4, n1, rtol=1e-5)
  scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(g1))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):  # the gradients themselves
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):  # and the updated parameters
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  bad = util.toy_config(**small, **{"teacher.grad_accum": 3})
  with pytest.raises(config_lib.ConfigError, match="teacher.grad_accum"):
    config_validation.validate(bad, num_devices=8)
