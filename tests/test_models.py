"""The denoisers: size, logical annotations, conditioning inputs, student initialisation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from gdistill import denoiser as dn
from gdistill.models import MLPDenoiser, UNet
import util


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree)))


def test_imagenet64_unet_has_adm_parameter_count():
  m = UNet(ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
           head_dim=64, num_classes=1000, out_channels=6, resblock_updown=True)
  d = dn.Denoiser(m, "both", 1000)
  shapes = d.init_abstract((64, 64, 3))          # jax.eval_shape: nothing allocated
  n = _count(shapes)
  assert abs(n - 295.90e6) / 295.90e6 < 0.01, n
  # Every parameter carries logical axis names.
  leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == len(x.value.shape), (x.names, x.value.shape)


def _tiny_unet(**kw):
  return UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), head_dim=16,
              num_classes=10, out_channels=1, num_groups=8, **kw)


def _host_variables(module, *args, **kwargs):
  """module's variables in the shapes its init gives, filled on the host."""
  return util.host_filled(jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs), 0)


def test_unet_shapes_extra_channels_context_and_bf16():
  z = jnp.ones((2, 8, 8, 1))
  lam = jnp.zeros((2,))
  lab = jnp.array([1, 10])                       # 10 = null label
  m = _tiny_unet()
  p = _host_variables(m, z, lam, lab)
  extra = jnp.ones((2, 8, 8, 2))
  ctx = jnp.ones((2, 5, 12))
  p2 = _host_variables(m, z, lam, lab, extra=extra, context=ctx)
  out = jax.jit(m.apply)(p2, z, lam, lab, extra=extra, context=ctx)
  assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32
  mb = _tiny_unet(dtype=jnp.bfloat16)
  pb = jax.eval_shape(mb.init, jax.random.key(0), z, lam, lab)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(pb)))
  assert jax.jit(mb.apply)(p, z, lam, lab).dtype == jnp.float32
  # remat gives the same function
  mr = _tiny_unet(remat=True)
  np.testing.assert_allclose(jax.jit(mr.apply)(p, z, lam, lab), jax.jit(m.apply)(p, z, lam, lab),
                             atol=1e-6)


def test_student_from_teacher_equals_teacher_for_any_w():
  for mod_t, mod_s, shape in [
      (_tiny_unet(), _tiny_unet(w_embedding=True), (8, 8, 1)),
      (MLPDenoiser(hidden=32, num_blocks=2, num_classes=4),
       MLPDenoiser(hidden=32, num_blocks=2, num_classes=4, w_embedding=True), (2,))]:
    nc = mod_t.num_classes
    teacher, student = dn.Denoiser(mod_t, "eps", nc), dn.Denoiser(mod_s, "eps", nc)
    tp = util.random_params(teacher, shape, seed=1)  # no zero output layers to hide bugs
    sp = util.student_from_teacher(student, tp, shape)
    z = jnp.asarray(np.random.default_rng(4).standard_normal((6,) + shape, np.float32))
    lam = jnp.linspace(-10, 10, 6)
    lab = jnp.array([0, 1, 2, 3, nc, 1])
    x_t = jax.jit(teacher.x_pred)(tp, z, lam, lab)
    student_fn = jax.jit(student.x_pred)
    for w in [0.0, 0.5, 4.0, 13.0]:
      x_s = student_fn(sp, z, lam, lab, jnp.full((6,), w))
      np.testing.assert_array_equal(np.asarray(x_s), np.asarray(x_t))


def test_student_from_other_architecture_is_refused():
  t = dn.Denoiser(_tiny_unet(), "eps", 10)
  s = dn.Denoiser(UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
                       head_dim=16, num_classes=10, out_channels=1, num_groups=8,
                       w_embedding=True), "eps", 10)
  tp = jax.eval_shape(lambda: nn.unbox(t.init_fn((8, 8, 1))(jax.random.key(0))))
  sp = jax.eval_shape(lambda: nn.unbox(s.init_fn((8, 8, 1))(jax.random.key(0))))
  try:
    dn.student_params_from_teacher(tp, sp)
  except ValueError as e:
    assert "architectures differ" in str(e) and "down_2" in str(e)
  else:
    raise AssertionError("a mismatched teacher was accepted")


def test_build_module_from_config():
  cfg = ml_collections.ConfigDict(dict(
      name="unet", ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), head_dim=16,
      dropout=0.1, num_groups=8, resblock_updown=True, remat=False, num_classes=10, channels=1,
      parametrization="both", w_scale=4.0, dtype="float32", param_dtype="float32",
      conditioning="label"))
  d = dn.build_denoiser(cfg, w_embedding=True, dropout=0.0)
  assert d.module.out_channels == 2 and d.module.dropout == 0.0 and d.w_conditioned
