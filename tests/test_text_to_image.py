"""Latent text-to-image: the shapes pipeline end to end on tiny models and the tiny variant of
the data (autoencoder -> teacher -> guided -> progressive rounds -> evaluation), the frozen
text encoder, prompts in the API and in --mode=sample. (The fresh student and the benchmark,
which need no trained pipeline: tests/test_text_models.py.)"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdistill
from gdistill import driver, evaluate, optim, plan
import util

@pytest.fixture(scope="module")
def shapes_workdir(tmp_path_factory):
  base = tmp_path_factory.mktemp("shapes")
  c = util.shapes_config(base / "tfds")
  wd = str(base / "wd")
  driver.train_and_evaluate(c, wd, devices=jax.devices()[:1])
  return wd, c


def test_the_plan_of_a_latent_text_model():
  c = util.shapes_config("/x", **{"progressive.start_steps": 4})
  names = [s.name for s in plan.make_plan(c)]
  assert names == ["autoencoder", "teacher", "guided", "progressive_2", "progressive_1"]
  p = {s.name: s for s in plan.make_plan(c)}
  assert not p["autoencoder"].latent and p["teacher"].latent and p["progressive_1"].latent
  assert p["teacher"].frozen == () and p["guided"].frozen == ("text_encoder",)
  c.vae.init_from = "/some/autoencoder/export"       # an autoencoder trained elsewhere
  assert [s.name for s in plan.make_plan(c)][0] == "teacher"


def test_a_text_pooled_time_embedding_is_checked_and_recorded():
  """model.addition_embed_type 'text' (diffusers' TextTimeEmbedding): refused by name when
  unknown or when its heads do not divide the text width; the export's architecture records
  it, and models without it keep their hash."""
  from gdistill import config_lib, config_validation
  for over, named in (({"model.addition_embed_type": "image"}, "model.addition_embed_type"),
                      ({"model.addition_embed_type": "text",
                        "model.addition_embed_type_num_heads": 3},
                       "model.addition_embed_type_num_heads=3")):
    with pytest.raises(config_lib.ConfigError, match=named):
      config_validation.validate(util.shapes_config("/x", **over), num_devices=1)
  plain = util.shapes_config("/x", **{"model.addition_embed_type": ""})
  pooled = util.shapes_config("/x", **{"model.addition_embed_type": "text",
                                  "model.addition_embed_type_num_heads": 2})
  config_validation.validate(pooled, num_devices=1)
  assert "addition_embed_type" not in config_lib.arch_dict(plain.model)
  assert config_lib.arch_dict(pooled.model)["addition_embed_type"] == "text"


def test_frozen_groups_get_no_update_and_no_optimizer_state():
  c = util.quick_config()
  opt = optim.make_optimizer(c.guided, frozen=("text_encoder",))
  params = {"unet": {"w": jnp.ones((3,))}, "text_encoder": {"e": jnp.ones((2,))}}
  state = opt.init(params)
  assert "text_encoder" not in str(jax.tree_util.tree_structure(state))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = opt.update(grads, state, params)
  assert not np.any(np.asarray(updates["text_encoder"]["e"]))
  assert np.all(np.asarray(updates["unet"]["w"]) != 0)


def test_shapes_pipeline_end_to_end(shapes_workdir):
  wd, c = shapes_workdir
  meta = {n: util.load_export(os.path.join(wd, n, "export")) for n in
          ("autoencoder", "teacher", "guided", "progressive_1")}
  ae = meta["autoencoder"][1]
  assert ae["kind"] == "autoencoder" and ae["scaling_factor"] > 0 and "psnr_test" in ae
  t = meta["teacher"][1]
  assert t["schedule"]["name"] == "scaled_linear" and t["parametrization"] == "eps"
  assert t["latent"] and t["text"]["hidden_size"] == 16 and t["tokenizer"]["vocab"]
  # The text encoder trained with the teacher is frozen in every later stage.
  te = meta["teacher"][0]["text_encoder"]
  for name in ("guided", "progressive_1"):
    util.assert_trees_identical(meta[name][0]["text_encoder"], te)
    assert "cond_proj" in meta[name][0]["unet"]["time_embedding"]
  results = evaluate.paths.read_json(os.path.join(wd, "eval", "results.json"))
  # Rows: the teacher at N0 = 2 and at N = 1 (2 NFE per step), stage one, the 1-step student.
  assert results["task"] == "text" and len(results["rows"]) == 2 * 4
  for r in results["rows"]:
    assert 0 <= r["adh1"] <= 1 and 0 <= r["adh2"] <= 1 and np.isfinite(r["fd"])
    assert np.isfinite(r["div"]) and r["div"] >= 0
  md = open(os.path.join(wd, "eval", "results.md")).read()
  assert "| Method | Stage | Sampler | N | NFE | w=0 1-obj | w=0 2-obj | w=0 div | w=0 FD |" in md
  for f in ("adh2_vs_div.png", "fd_vs_nfe.png", "grids/progressive_1-ddim-N1.png"):
    assert os.path.getsize(os.path.join(wd, "eval", f)) > 0, f
  # Editing and inpainting, scored by the attribute classifier (gdistill/edit_eval.py).
  edits = evaluate.paths.read_json(os.path.join(wd, "eval", "edits.json"))
  got = {(r["stage"], r["task"], r["strength"]) for r in edits["rows"]}
  assert {("teacher", "recolour", 0.5), ("teacher", "remove", None), ("teacher", "fill", None),
          ("progressive_1", "recolour", 1.0), ("progressive_1", "fill", None)} <= got
  for r in edits["rows"]:
    if r["success"] is not None:
      assert 0 <= r["success"] <= 1 and 0 <= r["preservation"] <= 1
    if r["task"] != "recolour":
      assert r["psnr_keep"] > 0


def test_prompts_in_the_api_and_in_sample_mode(shapes_workdir, tmp_path):
  wd, c = shapes_workdir
  model = gdistill.load(wd)
  assert model.stage == "progressive_1" and model.text_conditioned
  prompts = ["a red circle in the top left", "a blue square left of a green triangle"]
  x = model.sample(prompts=prompts, w=3.0, steps=1, rng=0)
  assert x.shape == (2, 32, 32, 3) and np.all(np.abs(x) <= 1.0)
  np.testing.assert_array_equal(x, model.sample(prompts=prompts, w=3.0, steps=1, rng=0))
  with pytest.raises(ValueError, match="pass prompts"):
    model.sample([1, 2])
  pfile = tmp_path / "p.txt"
  pfile.write_text("\n".join(prompts) + "\n\n")
  c = c.copy_and_resolve_references()
  c.sample.update(dict(prompts_file=str(pfile), out=str(tmp_path / "s.npz"), w=3.0,
                       latents_out=str(tmp_path / "z.npz")))
  info = evaluate.sample_to_file(c, wd)
  assert info["nfe"] == 1 and os.path.getsize(tmp_path / "s.png") > 0
  with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
    assert f["images"].shape == (6, 32, 32, 3) and f["images"].dtype == np.uint8
    assert list(f["prompts"]) == [prompts[i % 2] for i in range(6)]
  with np.load(tmp_path / "z.npz", allow_pickle=False) as f:
    assert f["latents"].shape == (6, 8, 8, 4)
  c.sample.prompts_file = str(tmp_path / "missing.txt")
  with pytest.raises(evaluate.config_lib.ConfigError, match="prompts_file"):
    evaluate.sample_to_file(c, wd)


def test_latents_are_cached_once_and_scaled_to_unit_variance(shapes_workdir):
  """The training images are encoded once into W/latents/ (the diffusion stages' data); the
  autoencoder's scaling factor makes them unit-variance; decoding inverts the scale."""
  wd, c = shapes_workdir
  files = os.listdir(os.path.join(wd, "latents"))
  assert len(files) == 1 and files[0].startswith("train-")
  from gdistill import autoencoding, paths, sharding
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  lat = autoencoding.load(c, wd, (32, 32, 3), mesh)
  cached = autoencoding.encode_split(lat, c, wd, "train")
  assert cached.shape == (512, 8, 8, 4) and cached.dtype == np.float32
  assert abs(float(np.std(cached)) - 1.0) < 0.25, np.std(cached)
  images = evaluate.scoring.data.load_captioned(c.data, "train")["image"][:8]
  np.testing.assert_allclose(np.asarray(jax.jit(lat.encode)(lat.params, images)), cached[:8],
                             rtol=1e-4, atol=1e-4)
  x = np.asarray(lat.decoder()(jnp.asarray(cached[:8])))
  assert x.shape == (8, 32, 32, 3) and np.all(np.abs(x) <= 1.0)
  assert paths.load_npz(os.path.join(wd, "latents", files[0]))["latents"].shape == cached.shape


def test_a_shapes_student_exports_to_diffusers(shapes_workdir, tmp_path, capsys):
  """python -m gdistill.export on the word-tokenizer shapes student: diffusers'
  StableDiffusionPipeline samples the same images (the word tokenizer written as CLIP BPE)."""
  from gdistill import export
  wd, _ = shapes_workdir
  out = str(tmp_path / "diffusers")
  assert export.main(["--workdir", wd, "--stage", "progressive_1", "--out", out]) == 0
  assert "num_inference_steps = 1 (1 NFE)" in capsys.readouterr().out
  util.assert_diffusers_samples_like_gdistill(
      out, gdistill.load(wd, "progressive_1"), ["a red circle in the top left",
                                                "small blue square, bottom"], w=3.0)
  # A workdir without a finished stage: refused with the reason (exit 2, no traceback).
  assert export.main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
  assert "no finished export" in capsys.readouterr().err


def test_a_latent_student_edits_and_inpaints_prompts(shapes_workdir, tmp_path):
  """Editing and inpainting of a latent text model: encoded, edited in latent space, decoded;
  a zero mask returns the input exactly, a full mask is sample() with the same rng; the
  latent mask is the pixel mask max-pooled (a latent repainted if any of its pixels is)."""
  from gdistill import edit_modes, inpainting
  from gdistill.data import shapes
  wd, c = shapes_workdir
  model = gdistill.load(wd, "progressive_1")
  d = shapes.generate(4, seed=9)
  prompts = ["a blue circle in the top left"] * 4
  edited = model.edit(d["image"], prompts=prompts, strength=1.0, w=3.0, rng=0)
  assert edited.shape == (4, 32, 32, 3) and np.abs(edited).max() <= 1.0
  util.assert_zero_and_full_masks(model, d["image"], prompts)
  zeros = np.zeros((4, 32, 32), np.uint8)
  m = np.zeros((1, 32, 32, 1), np.float32)
  m[0, 5, 30] = 1  # one pixel: the latent (1, 7) of 4x4 pixels each
  lm = inpainting.pool_mask(m, (8, 8))
  assert lm.shape == (1, 8, 8, 1) and lm.sum() == 1 and lm[0, 1, 7, 0] == 1
  masks = zeros.copy()
  masks[:, :16, :16] = 1
  info, c, out = util.inpaint_cli(c, wd, tmp_path, d["image"], masks, prompts)
  assert info["nfe"] == 1 and info["method"] == "replacement"
  np.testing.assert_array_equal(out["images"][:, 16:], d["image"][:, 16:])
  assert list(out["prompts"]) == prompts
  (tmp_path / "p.txt").write_text("one prompt\n")
  with pytest.raises(edit_modes.config_lib.ConfigError, match="holds 1 prompts for 4 images"):
    edit_modes.inpaint_to_file(c, wd)
