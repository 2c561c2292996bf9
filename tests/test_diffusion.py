"""The diffusion math against identities and analytic cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdistill import diffusion as d

jax.config.update("jax_enable_x64", False)


def _rand(key, shape=(16, 8, 8, 3)):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  x = jax.random.normal(k1, shape)
  eps = jax.random.normal(k2, shape)
  logsnr = jax.random.uniform(k3, shape[:1], minval=-8.0, maxval=8.0)
  return x, eps, logsnr


def test_schedule_endpoints_monotone_inverse():
  assert float(d.logsnr_schedule_cosine(0.0)) == pytest.approx(20.0, abs=5e-3)  # float32
  assert float(d.logsnr_schedule_cosine(1.0)) == pytest.approx(-20.0, abs=5e-3)
  t = jnp.linspace(0.0, 1.0, 1001)
  lam = d.logsnr_schedule_cosine(t)
  assert bool(jnp.all(jnp.diff(lam) < 0))
  np.testing.assert_allclose(d.t_from_logsnr_cosine(lam), t, atol=2e-5)
  # Near the ends lambda(t) is steep (|d lambda / d t| ~ 2.5e4 at lambda = -18), so one float32
  # ulp of t there moves lambda by ~1.5e-3: the round trip is good to a few ulps of t.
  lam2 = jnp.linspace(-19.0, 19.0, 101)
  np.testing.assert_allclose(d.logsnr_schedule_cosine(d.t_from_logsnr_cosine(lam2)), lam2,
                             rtol=1e-4, atol=5e-3)


def test_alpha_sigma_unit_variance():
  lam = jnp.linspace(-20.0, 20.0, 101)
  a, s = d.alpha_sigma(lam)
  np.testing.assert_allclose(a ** 2 + s ** 2, 1.0, atol=1e-6)
  np.testing.assert_allclose(jnp.log(a ** 2 / s ** 2)[20:80], lam[20:80], rtol=1e-4, atol=1e-3)


def test_conversions_round_trip():
  x, eps, lam = _rand(0)
  z = d.diffuse(x, eps, lam)
  v = d.v_from_x_eps(x, eps, lam)
  tol = dict(atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(d.eps_from_x(z, x, lam), eps, **tol)
  np.testing.assert_allclose(d.x_from_eps(z, eps, lam), x, **tol)
  np.testing.assert_allclose(d.x_from_v(z, v, lam), x, **tol)
  np.testing.assert_allclose(d.eps_from_v(z, v, lam), eps, **tol)
  np.testing.assert_allclose(d.v_from_x(z, x, lam), v, **tol)
  np.testing.assert_allclose(d.v_from_eps(z, eps, lam), v, **tol)
  # 'both' with consistent heads returns x; its weight on x_hat is sigmoid(-lambda).
  np.testing.assert_allclose(d.x_from_both(z, x, eps, lam), x, **tol)
  off = d.x_from_both(z, x + 1.0, eps, lam) - x
  np.testing.assert_allclose(off, jnp.broadcast_to(
      d.bcast(jax.nn.sigmoid(-lam), x), x.shape), **tol)
  for p, out in [("x", x), ("eps", eps), ("v", v), ("both", jnp.concatenate([x, eps], -1))]:
    np.testing.assert_allclose(d.x_from_output(out, z, lam, p), x, **tol)


def test_guidance_same_in_x_eps_v_space():
  xc, eps, lam = _rand(1)
  xu = jax.random.normal(jax.random.key(9), xc.shape)
  z = d.diffuse(xc, eps, lam)
  w = jnp.linspace(0.0, 4.0, xc.shape[0])
  x_w = d.guided(xc, xu, w)
  eps_w = d.guided(d.eps_from_x(z, xc, lam), d.eps_from_x(z, xu, lam), w)
  v_w = d.guided(d.v_from_x(z, xc, lam), d.v_from_x(z, xu, lam), w)
  np.testing.assert_allclose(d.x_from_eps(z, eps_w, lam), x_w, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(d.x_from_v(z, v_w, lam), x_w, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(d.guided(xc, xu, jnp.zeros_like(w)), xc)


@pytest.mark.parametrize("n,i", [(8, 5), (4, 3), (1024, 700), (8, 0), (2, 0)])
def test_one_student_step_lands_on_teacher_two_steps(n, i):
  """The progressive-distillation identity, for t'' > 0 and t'' = 0."""
  x, eps, _ = _rand(2)
  b = x.shape[0]
  t = jnp.full((b,), (i + 1) / n)
  lt, lt1, lt2 = (d.logsnr_schedule_cosine(t), d.logsnr_schedule_cosine(t - 0.5 / n),
                  d.logsnr_schedule_cosine(t - 1.0 / n))
  z_t = d.diffuse(x, eps, lt)
  x1 = jnp.tanh(z_t * 0.7 + 0.1)            # any teacher predictions
  z_t1 = d.ddim_step(z_t, x1, lt, lt1)
  x2 = jnp.tanh(z_t1 * 0.5 - 0.2)
  z_t2 = d.ddim_step(z_t1, x2, lt1, lt2)
  if i > 0:
    x_tilde = d.distillation_target(z_t, z_t2, lt, lt2)
    np.testing.assert_allclose(d.ddim_step(z_t, x_tilde, lt, lt2), z_t2, atol=1e-4, rtol=1e-4)
  else:
    # At t'' = 0 the sampler's last step returns x_hat: the target is x2 itself and the
    # general formula gives the x that a DDIM step to t = 0 would decode (within sigma(0)).
    x_tilde = d.distillation_target(z_t, z_t2, lt, lt2)
    np.testing.assert_allclose(x_tilde, x2, atol=5e-3)


def test_weightings():
  lam = jnp.array([-5.0, 0.0, 3.0])
  np.testing.assert_allclose(d.weight_snr_trunc(lam), [1.0, 1.0, np.exp(3.0)], rtol=1e-6)
  x, eps, lam = _rand(3)
  z = d.diffuse(x, eps, lam)
  x_hat = x + 0.1 * jax.random.normal(jax.random.key(5), x.shape)
  # 'snr' weighting equals eps-MSE, 'v_mse' equals v-MSE.
  eps_mse = jnp.mean((d.eps_from_x(z, x_hat, lam) - eps) ** 2, axis=(1, 2, 3))
  v_mse = jnp.mean((d.v_from_x(z, x_hat, lam) - d.v_from_x_eps(x, eps, lam)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(d.weighted_x_loss(x_hat, x, lam, "snr"), eps_mse, rtol=2e-3)
  np.testing.assert_allclose(d.weighted_x_loss(x_hat, x, lam, "v_mse"), v_mse, rtol=2e-3)
  with pytest.raises(ValueError, match="valid"):
    d.get_weighting("nope")
