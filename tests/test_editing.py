"""Editing (SDEdit) and inpainting by replacement: the strength grid, masks (zeros = the input,
ones = generation), paste-back exactness, the CLI modes and refusals of bad input, on an
untrained digits workdir (pixel space; the latent path is in test_text_to_image.py)."""
import os

import jax
import numpy as np
import pytest

import gdistill
from gdistill import api, data, edit_modes, sampling, schedules
import util


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("edit_wd"))
  c = util.tiny_eval_config()
  util.write_untrained_workdir(c, wd)
  return wd, c


def _digits(n, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (n, 8, 8, 1)).astype(np.uint8)


@pytest.mark.parametrize("steps,strength,start", [(4, 0.6, 2), (4, 1.0, 4), (8, 0.4, 3),
                                                  (1, 1.0, 1), (4, 0.25, 1)])
def test_an_edit_runs_the_last_floor_n_s_steps_of_the_grid(steps, strength, start):
  """The grid an edit visits: t = k/N, (k-1)/N, ..., 1/N with k = floor(N s) (diffusers'
  img2img convention), one network evaluation each."""
  assert sampling.edit_start(steps, strength) == start
  seen = []

  def x_hat(z, logsnr):
    seen.append(float(logsnr[0]))
    return z * 0.0
  sched = schedules.Schedule()
  with jax.disable_jit():
    sampling.sample_loop(x_hat, np.zeros((1, 2), np.float32), steps, jax.random.key(0),
                         schedule=sched, start=start)
  want = [float(sched.logsnr(i / steps)) for i in range(start, 0, -1)]
  np.testing.assert_allclose(seen, want, rtol=1e-6)


def test_edit_strength_outside_0_1_and_below_one_step_are_refused():
  for s in (0.0, -0.1, 1.01):
    with pytest.raises(ValueError, match=r"strength=.*must lie in \(0, 1\]"):
      sampling.edit_start(4, s)
  with pytest.raises(ValueError, match="runs floor\\(N s\\) = 0 steps"):
    sampling.edit_start(4, 0.2)


def test_edit_outputs_and_determinism(workdir):
  wd, _ = workdir
  model = gdistill.load(wd, "progressive_2")
  x = _digits(5)
  out = model.edit(x, labels=np.arange(5), strength=0.5, w=2.0, rng=3)
  assert out.shape == (5, 8, 8, 1) and out.dtype == np.float32
  assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
  np.testing.assert_array_equal(out, model.edit(x, labels=np.arange(5), strength=0.5, w=2.0,
                                                rng=3))
  # float input in [-1, 1] is the same input as its uint8 form (normalized as the data are)
  np.testing.assert_array_equal(out, model.edit(data.normalize(x), labels=np.arange(5),
                                                strength=0.5, w=2.0, rng=3))
  teacher = gdistill.load(wd, "teacher")
  assert teacher.edit(x[:2], labels=[1, 2], strength=0.5, steps=2).shape == (2, 8, 8, 1)


def test_inpaint_masks_zeros_keep_the_input_and_ones_generate(workdir):
  wd, _ = workdir
  model = gdistill.load(wd, "progressive_2")
  x = _digits(6, seed=1)
  labels = np.arange(6)
  zeros = np.zeros((6, 8, 8), np.uint8)
  kept = model.inpaint(x, zeros, labels=labels, w=1.0, rng=0)
  np.testing.assert_array_equal(kept, x / np.float32(127.5) - np.float32(1.0))
  # Without paste-back too: the kept region is reset to the input at t = 0.
  np.testing.assert_array_equal(
      model.inpaint(x, zeros, labels=labels, w=1.0, rng=0, paste_back=False),
      x / np.float32(127.5) - np.float32(1.0))
  ones = np.ones((6, 8, 8), np.uint8)
  np.testing.assert_array_equal(model.inpaint(x, ones, labels=labels, w=1.0, rng=0),
                                model.sample(labels, w=1.0, rng=0))


def test_inpaint_pastes_back_the_unmasked_pixels_exactly(workdir):
  wd, _ = workdir
  model = gdistill.load(wd, "progressive_1")
  x = _digits(4, seed=2)
  masks = np.zeros((4, 8, 8), np.uint8)
  masks[:, :4] = 1  # repaint the top half
  out = model.inpaint(x, masks, labels=[0, 1, 2, 3], w=2.0, rng=1)
  as_uint8 = np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(as_uint8[:, 4:], x[:, 4:])
  assert not np.array_equal(as_uint8[:, :4], x[:, :4])


def test_bad_edit_and_inpaint_inputs_are_refused_by_name(workdir):
  wd, _ = workdir
  model = gdistill.load(wd, "progressive_2")
  x = _digits(3)
  with pytest.raises(ValueError, match="3 images but 2 labels"):
    model.edit(x, labels=[1, 2])
  with pytest.raises(ValueError, match=r"images have shape \(3, 8, 8, 3\).*\[n, 8, 8, 1\]"):
    model.edit(np.zeros((3, 8, 8, 3), np.uint8), labels=[1, 2, 3])
  with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
    model.edit(np.full((3, 8, 8, 1), 2.0, np.float32), labels=[1, 2, 3])
  with pytest.raises(ValueError, match=r"strength=1.5: must lie in \(0, 1\]"):
    model.edit(x, labels=[1, 2, 3], strength=1.5)
  with pytest.raises(ValueError, match=r"masks have shape \(3, 4, 4\); expected \[3, 8, 8\]"):
    model.inpaint(x, np.zeros((3, 4, 4)), labels=[1, 2, 3])
  with pytest.raises(ValueError, match="only 0 \\(keep\\) and 1 \\(repaint\\)"):
    model.inpaint(x, np.full((3, 8, 8), 2), labels=[1, 2, 3])
  with pytest.raises(ValueError, match="pass labels"):
    model.edit(x, prompts=["a", "b", "c"])


def test_edit_and_inpaint_modes_write_npz_and_before_after_grids(workdir, tmp_path):
  wd, c = workdir
  x = _digits(5, seed=4)
  masks = np.zeros((5, 8, 8), np.uint8)
  masks[:, :, 4:] = 1
  src = tmp_path / "in.npz"
  np.savez(src, images=x, labels=np.arange(5, dtype=np.int32), masks=masks)
  c = c.copy_and_resolve_references()
  c.edit.update(dict(stage="progressive_2", input=str(src), strength=0.5, w=2.0,
                     out=str(tmp_path / "edited.npz")))
  info = edit_modes.edit_to_file(c, wd)
  assert info["nfe"] == 1 and info["start"] == 1 and info["num_images"] == 5
  with np.load(tmp_path / "edited.npz") as f:
    assert f["images"].shape == (5, 8, 8, 1) and f["images"].dtype == np.uint8
    np.testing.assert_array_equal(f["labels"], np.arange(5))
  assert os.path.getsize(tmp_path / "edited.png") > 0
  c.inpaint.update(dict(stage="progressive_2", input=str(src), w=2.0,
                        out=str(tmp_path / "filled.npz")))
  info = edit_modes.inpaint_to_file(c, wd)
  assert info["nfe"] == 2
  with np.load(tmp_path / "filled.npz") as f:
    np.testing.assert_array_equal(f["images"][:, :, :4], x[:, :, :4])  # pasted back
  assert os.path.getsize(tmp_path / "filled.png") > 0
  c.inpaint.input = str(tmp_path / "missing.npz")
  with pytest.raises(edit_modes.config_lib.ConfigError, match="inpaint.input"):
    edit_modes.inpaint_to_file(c, wd)
  np.savez(tmp_path / "nomask.npz", images=x, labels=np.arange(5, dtype=np.int32))
  c.inpaint.input = str(tmp_path / "nomask.npz")
  with pytest.raises(edit_modes.config_lib.ConfigError, match="'masks'"):
    edit_modes.inpaint_to_file(c, wd)
  assert api.finished_stages(wd)  # nothing was touched
