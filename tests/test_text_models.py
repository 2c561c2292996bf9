"""Latent text-to-image models without a trained pipeline: the fresh student is the conditional
teacher, and the benchmark of a text model. (tests/test_text_to_image.py holds the tests that
share its pipeline fixture; pytest-xdist runs one file per worker, so these run beside it.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdistill import conditioning, stage_setup
from gdistill.models.unet_cond import guidance_scale_embedding
import util


def test_stage_one_student_equals_the_conditional_teacher_at_init(tmp_path):
  """The w-embedding (diffusers' time_embedding.cond_proj) starts at zero, so the fresh
  student is the conditional teacher for every w; the teacher's guided prediction at w = 0
  is the conditional one."""
  c = util.shapes_config(tmp_path / "tfds")
  tok = conditioning.tokenizer_for(c, vocabulary=("a", "red", "circle"))
  teacher = stage_setup.denoiser_for(c, w_embedding=False, tokenizer=tok)
  student = stage_setup.denoiser_for(c, w_embedding=True, tokenizer=tok)
  shape = stage_setup.example_shape(c)
  tp = util.random_params(teacher, shape, seed=1)
  sp = util.student_from_teacher(student, tp, shape, seed=2)
  assert set(sp) == {"unet", "text_encoder"} and "cond_proj" in sp["unet"]["time_embedding"]
  assert not np.any(np.asarray(sp["unet"]["time_embedding"]["cond_proj"]["kernel"]))
  z = jax.random.normal(jax.random.key(3), (4,) + shape)
  logsnr = jnp.array([-4.0, 0.0, 2.0, 6.0])
  tokens = jnp.asarray(tok.encode(["a red circle", "red", "", "circle a"]))
  cond = jax.jit(teacher.encode_cond)(tp, tokens)
  x_t = jax.jit(teacher.x_pred)(tp, z, logsnr, cond)
  student_x = jax.jit(student.x_pred)
  # Two programs (the student adds its zero w-embedding), so float32 rounding differs; x =
  # (z - sigma eps) / alpha multiplies it by 1 / alpha ~ 7.4 at logsnr -4 (|x| up to ~20).
  tol = dict(rtol=1e-5, atol=1e-4)
  for w in (0.0, 3.0):
    np.testing.assert_allclose(student_x(sp, z, logsnr, cond, jnp.full((4,), w)), x_t, **tol)
  np.testing.assert_allclose(jax.jit(teacher.guided_x_pred)(tp, z, logsnr, cond,
                                                            jnp.zeros((4,))), x_t, **tol)
  # The null condition is the empty caption's encoding (Stable Diffusion's convention).
  np.testing.assert_allclose(jax.jit(teacher.null_cond, static_argnums=1)(tp, 2)[0],
                             cond[2], atol=1e-5)  # tokens[2] is ""
  # The w input is diffusers' guidance-scale embedding of w (float32, as theirs).
  emb = np.asarray(guidance_scale_embedding(jnp.array([3.0]), 16))
  half = 8
  f = np.exp(np.arange(half, dtype=np.float32) * -np.float32(np.log(10000.0) / (half - 1)))
  arg = np.float32(3000.0) * f
  # float32 sin of arguments up to 3000 rad: one ulp of the argument is 2.4e-4.
  np.testing.assert_allclose(emb[0], np.concatenate([np.sin(arg), np.cos(arg)]), atol=3e-4)


def test_benchmark_of_a_text_model_counts_with_xla(tmp_path):
  """`python -m gdistill.benchmark --config=configs/shapes.py` measures the SD-structured U-Net
  (which flops.py has no analytic count for: XLA's count stands in) on random captions' token
  ids, the guided teacher at 2 NFE per step."""
  from gdistill import benchmark
  c = util.shapes_config(tmp_path / "tfds")
  result = benchmark.run(c, kinds=("teacher", "sample"), steps=1, warmup=1, sample_repeats=1,
                         sample_steps=2, log=lambda s: None)
  rows = result["rows"]
  assert [r["name"] for r in rows] == ["teacher", "sample_teacher_guided_2",
                                       "sample_student_2", "sample_student_1"]
  assert [r.get("nfe") for r in rows[1:]] == [4, 2, 1]
  for r in rows:
    assert r["flops_source"] == "xla" and r["flops_per_image"] > 0, r["name"]
    assert r["images_per_s_per_device"] > 0 and np.isfinite(r["mfu"]), r["name"]
  # The guided teacher's 2 steps do twice the student's 2 steps' forward work.
  assert rows[1]["flops_per_image"] == pytest.approx(2 * rows[2]["flops_per_image"], rel=0.02)
  benchmark.write(result, str(tmp_path))
  assert "(XLA)" in (tmp_path / "benchmark.md").read_text()
