"""Noise schedules: the discrete (Stable Diffusion) table, the logSNR <-> timestep mapping and
the sampling grid against diffusers' formulas (transcribed here in numpy)."""
import numpy as np
import pytest

from gdistill import schedules

SD = schedules.Schedule("scaled_linear", num_train_timesteps=1000, beta_start=0.00085,
                        beta_end=0.012)


def diffusers_alphas_cumprod(t=1000, start=0.00085, end=0.012):
  """DDPMScheduler/DDIMScheduler(beta_schedule='scaled_linear').alphas_cumprod."""
  betas = np.linspace(start ** 0.5, end ** 0.5, t, dtype=np.float32) ** 2
  return np.cumprod(1.0 - betas, axis=0)


def diffusers_trailing_timesteps(n, t=1000):
  """DDIMScheduler.set_timesteps(n) with timestep_spacing='trailing'."""
  return np.round(np.arange(t, 0, -t / n)).astype(np.int64) - 1


def test_the_table_is_stable_diffusions_alphas_cumprod():
  ab = schedules.alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear")
  np.testing.assert_allclose(ab, diffusers_alphas_cumprod(), rtol=1e-5)  # theirs: float32
  table = SD.logsnr_table()
  assert np.all(np.diff(table) < 0)
  assert table[0] == pytest.approx(7.0694, abs=1e-3) and table[-1] == pytest.approx(-5.3640,
                                                                                    abs=1e-3)
  lin = schedules.alphas_cumprod(1000, 0.0001, 0.02, "linear")
  np.testing.assert_allclose(lin, np.cumprod(1 - np.linspace(0.0001, 0.02, 1000)), rtol=1e-12)


def test_logsnr_to_timestep_inverts_the_table_and_clips_outside():
  table = SD.logsnr_table()
  k = np.asarray(SD.timestep(table.astype(np.float32)))
  np.testing.assert_allclose(k, np.arange(1000), atol=2e-2)  # every grid point, float32
  # Between grid points: the fractional index of linear interpolation.
  mid = 0.5 * (table[100] + table[101])
  assert float(SD.timestep(np.float32(mid))) == pytest.approx(100.5, abs=2e-2)
  # Outside [lambda_999, lambda_0]: clipped to the ends.
  assert float(SD.timestep(np.float32(20.0))) == 0.0
  assert float(SD.timestep(np.float32(-20.0))) == 999.0
  # alpha and sigma from lambda equal sqrt(alpha_bar) and sqrt(1 - alpha_bar) on the grid.
  from gdistill import diffusion
  a, s = diffusion.alpha_sigma(table.astype(np.float32))
  ab = diffusers_alphas_cumprod()
  np.testing.assert_allclose(np.asarray(a), np.sqrt(ab), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s), np.sqrt(1 - ab), rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_the_sampling_grid_is_ddim_trailing_spacing(n):
  t_i = np.arange(n, 0, -1) / n
  k = np.asarray(SD.timestep(SD.logsnr(t_i.astype(np.float32))))
  want = diffusers_trailing_timesteps(n)
  np.testing.assert_array_equal(SD.grid_timesteps(n), want)
  np.testing.assert_allclose(k, want, atol=2e-2)
  # lambda(t) on the grid is the table's entry there.
  np.testing.assert_allclose(np.asarray(SD.logsnr(t_i.astype(np.float32))),
                             SD.logsnr_table()[want], atol=2e-4)


def test_time_below_one_step_stays_at_the_cleanest_entry_and_cosine_is_unchanged():
  lam = np.asarray(SD.logsnr(np.array([0.0, 0.0005, 0.001], np.float32)))
  np.testing.assert_allclose(lam, SD.logsnr_table()[0], atol=1e-5)
  cos = schedules.Schedule()
  np.testing.assert_allclose(np.asarray(cos.logsnr(np.array([0.0, 1.0], np.float32))),
                             [20.0, -20.0], atol=5e-3)
  with pytest.raises(ValueError, match="no discrete timesteps"):
    cos.timestep(0.0)
  for s in (SD, cos):
    assert schedules.from_dict(s.to_dict()) == s
