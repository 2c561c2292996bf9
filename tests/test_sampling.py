"""Samplers: analytic Gaussian case, NFE accounting, one compile for every N."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdistill import diffusion as d
from gdistill import sampling
from gdistill.denoiser import Denoiser
from gdistill.models import MLPDenoiser

MU, S = 0.7, 0.3


def gaussian_x_hat(z, logsnr):
  """E[x | z_t] for x ~ N(MU, S^2): MU + alpha S^2 / (alpha^2 S^2 + sigma^2) (z - alpha MU)."""
  a, s = d.alpha_sigma(logsnr)
  a, s = d.bcast(a, z), d.bcast(s, z)
  return MU + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (z - a * MU)


@pytest.mark.parametrize("kind,n", [("ddim", 1024), ("stochastic", 1024)])
def test_gaussian_data_recovered(kind, n):
  b = 20000
  z1 = jax.random.normal(jax.random.key(0), (b, 2))
  run = jax.jit(lambda z, n, rng: sampling.sample_loop(gaussian_x_hat, z, n, rng, kind=kind))
  x = np.asarray(run(z1, n, jax.random.key(1)))
  se_mean = S / np.sqrt(b)
  assert abs(x.mean() - MU) < 5 * se_mean
  # Standard error of the sample variance: S^2 sqrt(2 / (2 b)) (2 dims); 5 of them.
  assert abs(x.var() - S ** 2) < 5 * S ** 2 * np.sqrt(2 / (2 * b))


def test_ddim_is_deterministic_and_one_step_returns_x_hat():
  z1 = jax.random.normal(jax.random.key(0), (64, 2))
  one = sampling.sample_loop(gaussian_x_hat, z1, 1, jax.random.key(0))
  np.testing.assert_allclose(one, gaussian_x_hat(z1, jnp.full((64,), -20.0)), atol=1e-5)
  a = sampling.sample_loop(gaussian_x_hat, z1, 8, jax.random.key(0))
  b = sampling.sample_loop(gaussian_x_hat, z1, 8, jax.random.key(5))
  np.testing.assert_array_equal(a, b)


def test_one_compile_serves_every_n_and_nfe():
  traces = []
  module = MLPDenoiser(hidden=16, num_blocks=1, num_classes=3, out_channels=2)
  den = Denoiser(module, "v", 3)
  params = jax.jit(den.init_fn((2,)))(jax.random.key(0))
  import flax.linen as nn
  params = nn.unbox(params)

  class Counting(Denoiser):
    def guided_x_pred(self, *a, **k):
      traces.append(1)
      return super().guided_x_pred(*a, **k)

  spec = sampling.SamplerSpec(kind="ddim", guided=True, clip=None)
  fn = sampling.make_sampler(Counting(module, "v", 3), spec, (2,))
  labels = jnp.array([0, 1, 2, 3])
  outs = {}
  for n in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]:
    outs[n] = fn(params, jax.random.key(0), labels, 2.0, jnp.int32(n))
  assert len(traces) == 1, f"traced {len(traces)} times"
  assert fn._cache_size() == 1
  assert spec.nfe(4) == 8 and sampling.SamplerSpec(guided=False).nfe(4) == 4
  assert all(np.isfinite(np.asarray(v)).all() for v in outs.values())


def test_unknown_sampler_refused():
  with pytest.raises(ValueError, match="valid"):
    sampling.SamplerSpec(kind="euler")
