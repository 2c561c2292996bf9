"""gdistill's latent modules against the reference implementations (diffusers, transformers).

Built offline: the configs of diffusers' own dummy Stable Diffusion components (its pipeline
tests' get_dummy_components), random weights (every parameter redrawn, so no zero-initialised
layer hides a mistake), saved in diffusers / transformers layout to a temp dir and read back
through gdistill/weight_map.py with safetensors' numpy API. Tolerance: max abs error <= 1e-4 in
float32. torch, diffusers and transformers are test-only (requirements-test.txt).
"""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from gdistill import weight_map
from gdistill.clip_tokenizer import CLIPTokenizer
from gdistill.models.autoencoder import AutoencoderKL
from gdistill.models.text import CLIPTextTransformer
from gdistill.models.unet_cond import UNet2DConditionModel, guidance_scale_embedding


class _Torch:
  """torch, imported on first use: every pytest-xdist worker collects this module, and only
  the one that runs it needs torch (1.5 CPU-s to import)."""

  def __getattr__(self, name):
    import torch as module  # pylint: disable=g-import-not-at-top
    module.set_num_threads(1)
    globals()["torch"] = module
    return getattr(module, name)


torch = _Torch()
TOL = 1e-4


def _randomize(module, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  return module.eval()


def _fields(cls):
  return set(cls.__dataclass_fields__) - {"dtype", "param_dtype", "parent", "name"}


def _kwargs(cls, config: dict) -> dict:
  """A reference config.json -> gdistill module kwargs (lists -> tuples, unknown keys out)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
          if k in _fields(cls)}


def _read(directory, filename, family, template):
  state = load_file(os.path.join(directory, filename))
  get = lambda key, index: state[key] if index is None else state[key][index]
  return weight_map.params_from_state(template, family, get,
                                      {k: v.shape for k, v in state.items()}), state


def _template(model, *args, method=None):
  init = lambda: model.init(jax.random.key(0), *args, method=method)
  return flax.linen.meta.unbox(jax.eval_shape(init)["params"])


def _dummy_unet(time_cond_proj_dim, in_channels=4, addition_embed_type=None):
  from diffusers import UNet2DConditionModel as Ref
  return Ref(block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
             in_channels=in_channels,
             out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
             time_cond_proj_dim=time_cond_proj_dim, norm_num_groups=2,
             addition_embed_type=addition_embed_type, addition_embed_type_num_heads=4)


@pytest.mark.parametrize("time_cond_proj_dim,addition_embed_type",
                         [(None, None), (256, None), (256, "text")])
def test_unet_matches_diffusers(tmp_path, time_cond_proj_dim, addition_embed_type):
  """Also with addition_embed_type 'text' (TextTimeEmbedding: the caption pooled into the
  timestep embedding, AttentionPooling's positional_embedding a leaf of its own name)."""
  ref = _randomize(_dummy_unet(time_cond_proj_dim, addition_embed_type=addition_embed_type), 0)
  ref.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  model = UNet2DConditionModel(**_kwargs(UNet2DConditionModel, config))
  rng = np.random.RandomState(0)
  x = rng.randn(2, 32, 32, 4).astype(np.float32)
  ctx = rng.randn(2, 7, 32).astype(np.float32)
  t = np.array([10.0, 731.5], np.float32)  # a fractional timestep too (our samplers send them)
  cond = (None if time_cond_proj_dim is None else
          np.array(guidance_scale_embedding(jnp.array([0.0, 3.0]), time_cond_proj_dim)))
  params, state = _read(tmp_path, "diffusion_pytorch_model.safetensors", "unet",
                        _template(model, x, t, ctx, cond))
  ours = np.asarray(model.apply({"params": params}, x, t, ctx, cond))
  with torch.no_grad():
    theirs = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                 torch.from_numpy(ctx),
                 timestep_cond=None if cond is None else torch.from_numpy(cond)).sample
  err = np.abs(ours - theirs.permute(0, 2, 3, 1).numpy()).max()
  assert err <= TOL, err
  # And back: the same keys, the same tensors (SD 1.x's 1x1-conv proj_in / proj_out).
  back = weight_map.state_from_params(
      params, "unet", conv_1x1=lambda path: path[-2] in ("proj_in", "proj_out"))
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_vae_matches_diffusers(tmp_path):
  from diffusers import AutoencoderKL as Ref
  ref = _randomize(Ref(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                       down_block_types=["DownEncoderBlock2D"] * 2,
                       up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                       norm_num_groups=2), 1)
  ref.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  model = AutoencoderKL(**_kwargs(AutoencoderKL, config))
  rng = np.random.RandomState(1)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  z = rng.randn(2, 16, 16, 4).astype(np.float32)
  params, state = _read(tmp_path, "diffusion_pytorch_model.safetensors", "vae",
                        _template(model, x))
  mean, logvar = model.apply({"params": params}, x, method=model.encode)
  decoded = model.apply({"params": params}, z, method=model.decode)
  nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  with torch.no_grad():
    dist = ref.encode(nchw(x)).latent_dist
    ref_decoded = ref.decode(nchw(z)).sample
  for ours, theirs in ((mean, dist.mean), (logvar, dist.logvar), (decoded, ref_decoded)):
    assert np.abs(np.asarray(ours) - nhwc(theirs)).max() <= TOL
  back = weight_map.state_from_params(params, "vae")
  assert set(back) == set(state)


def test_text_encoder_matches_transformers(tmp_path):
  from transformers import CLIPTextConfig, CLIPTextModel
  ref = _randomize(CLIPTextModel(CLIPTextConfig(
      bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
      layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, pad_token_id=1,
      vocab_size=1000)), 2)
  ref.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  model = CLIPTextTransformer(**_kwargs(CLIPTextTransformer, config))
  ids = np.random.RandomState(2).randint(0, 1000, (2, 77)).astype(np.int32)
  params, state = _read(tmp_path, "model.safetensors", "text", _template(model, ids))
  ours = np.asarray(model.apply({"params": params}, ids))
  with torch.no_grad():
    theirs = ref(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  assert np.abs(ours - theirs).max() <= TOL
  # Written with transformers 4's `text_model.` prefix (Stable Diffusion's files), which the
  # reference loads as well.
  back = weight_map.state_from_params(params, "text")
  assert all(k.startswith("text_model.") for k in back)
  from safetensors.numpy import save_file
  out = tmp_path / "exported"
  out.mkdir()
  save_file(back, str(out / "model.safetensors"))
  (out / "config.json").write_text(json.dumps(config))
  again = CLIPTextModel.from_pretrained(out).eval()
  with torch.no_grad():
    np.testing.assert_allclose(again(torch.from_numpy(ids).long()).last_hidden_state.numpy(),
                               theirs, atol=1e-6)


def _bytes_to_unicode() -> list[str]:
  """CLIP's / GPT-2's byte -> printable character table."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


@pytest.fixture
def tiny_bpe(tmp_path):
  """A tiny CLIP-style vocab.json / merges.txt: every byte, alone and word-final, a few
  merges, and the two special tokens."""
  chars = _bytes_to_unicode()
  merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"),
            ("circ", "l"), ("circl", "e</w>"), ("t", "h"), ("th", "e</w>"), ("s", "q"),
            ("sq", "u")]
  vocab = (chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
           + ["<|startoftext|>", "<|endoftext|>"])
  (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (tmp_path / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return tmp_path


def test_clip_tokenizer_matches_transformers(tiny_bpe):
  from transformers import CLIPTokenizer as Ref
  prompts = ["a red circle", "A  RED Circle, the square!", "", "naïve café 東京 😀",
             "it's 42 o'clock", "red " * 100]
  ours = CLIPTokenizer.from_pretrained(str(tiny_bpe))
  ref = Ref.from_pretrained(str(tiny_bpe))
  expected = ref(prompts, padding="max_length", max_length=77, truncation=True,
                 return_tensors="np").input_ids
  np.testing.assert_array_equal(ours.encode(prompts), expected)
  assert ours.decode(ours.encode(prompts[:2])) == ref.batch_decode(expected[:2],
                                                                   skip_special_tokens=True)
  assert CLIPTokenizer.from_json(ours.to_json()) == ours
  saved = tiny_bpe / "saved"
  ours.save_pretrained(str(saved))
  np.testing.assert_array_equal(Ref.from_pretrained(str(saved))(
      prompts, padding="max_length", max_length=77, truncation=True,
      return_tensors="np").input_ids, expected)


@pytest.mark.parametrize("addition", ["", "text"])
def test_unet_config_round_trips_through_diffusers(addition):
  """gdistill's config.model -> unet/config.json -> config.model; diffusers builds the same
  parameter shapes from the written file (with and without the text-pooled embedding)."""
  from diffusers import UNet2DConditionModel as Ref
  from gdistill import diffusers_io
  model = dict(name="unet2d_condition", channels=4, image_size=8, parametrization="eps",
               num_groups=8, block_out_channels=(16, 32),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
               attention_head_dim=2, addition_embed_type=addition,
               addition_embed_type_num_heads=4)
  written = diffusers_io.unet_config(model, {"hidden_size": 16}, 8)
  back, problems = diffusers_io.unet_sections(written, "eps")
  assert not problems, problems
  assert back.get("addition_embed_type", "") == addition
  ref = Ref(**{k: v for k, v in written.items() if not k.startswith("_")})
  ours = UNet2DConditionModel(**_kwargs(UNet2DConditionModel, written))
  template = _template(ours, np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,), np.float32),
                       np.zeros((1, 3, 16), np.float32), np.zeros((1, 8), np.float32))
  weight_map.check_keys(template, "unet", {k: tuple(v.shape)
                                           for k, v in ref.state_dict().items()})
  written["addition_embed_type"] = "text_time"
  assert "addition_embed_type='text_time'" in " ".join(diffusers_io.unet_sections(written,
                                                                                  "eps")[1])


def test_weight_map_names_what_does_not_fit():
  model = UNet2DConditionModel(**_kwargs(UNet2DConditionModel, _dummy_unet(None).config))
  template = _template(model, np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,), np.float32),
                       np.zeros((1, 3, 32), np.float32))
  state = weight_map.state_from_params(
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32), template), "unet")
  keys = {k: v.shape for k, v in state.items()}
  broken = dict(keys)
  del broken["conv_in.weight"]
  broken["mid_block.extra.weight"] = (3,)
  broken["conv_out.bias"] = (5,)
  with pytest.raises(weight_map.WeightMapError) as e:
    weight_map.check_keys(template, "unet", broken, "unet/x.safetensors")
  text = str(e.value)
  assert "missing conv_in.weight" in text
  assert "unused mid_block.extra.weight" in text
  assert "shape of conv_out.bias: (5,) in unet/x.safetensors, the model needs (4,)" in text
  weight_map.check_keys(template, "unet", keys)  # the intact table fits


def test_schedule_and_sampler_grid_equal_diffusers_ddim_trailing():
  from diffusers import DDIMScheduler
  from gdistill import diffusion, sampling, schedules
  sd15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
          "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
          "steps_offset": 1, "clip_sample": False}
  sched, param = schedules.from_diffusers(sd15)
  assert param == "eps" and sched.kind == "scaled_linear"
  for parametrization in ("eps", "v"):
    ref = DDIMScheduler.from_config(schedules.diffusers_scheduler_config(sched, parametrization))
    ab = schedules.alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear")
    np.testing.assert_allclose(ref.alphas_cumprod.double().numpy(), ab, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.logsnr_table()), np.log(ab / (1 - ab)))
    for n in (1, 2, 4, 8):
      ref.set_timesteps(n)
      np.testing.assert_array_equal(ref.timesteps.numpy(), sched.grid_timesteps(n))
      # The whole deterministic sampler: gdistill's loop (x from the model's output at
      # logSNR, DDIM in logSNR) against diffusers' DDIMScheduler.step, same model.
      model = lambda z, k, xp=jnp: xp.tanh(z) * 0.7 + 0.3 * xp.cos(k / 300.0)
      z1 = np.random.RandomState(n).randn(2, 4, 4, 3).astype(np.float32)

      def x_hat(z, logsnr):
        out = model(z, sched.timestep(logsnr)[:, None, None, None])
        return diffusion.x_from_output(out, z, logsnr, parametrization)

      ours = np.asarray(sampling.sample_loop(x_hat, jnp.asarray(z1), n, jax.random.key(0),
                                             kind="ddim", schedule=sched))
      sample = torch.from_numpy(z1)
      for t in ref.timesteps:
        out = torch.from_numpy(np.asarray(model(sample.numpy(), float(t), np), np.float32))
        sample = ref.step(out, t, sample).prev_sample
      # float32 both ways; at N = 1 an epsilon model's x is ~20 (alpha_999 = 0.068).
      np.testing.assert_allclose(ours, sample.numpy(), rtol=2e-6, atol=1e-5,
                                 err_msg=f"{parametrization}, N = {n}")


def test_unsupported_schedulers_are_refused_by_name():
  from gdistill import schedules
  with pytest.raises(ValueError, match="beta_schedule='squaredcos_cap_v2'"):
    schedules.from_diffusers({"beta_schedule": "squaredcos_cap_v2"})
  with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
    schedules.from_diffusers({"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True})
  with pytest.raises(ValueError, match="prediction_type='sample'"):
    schedules.from_diffusers({"beta_schedule": "scaled_linear", "prediction_type": "sample"})
  assert schedules.from_diffusers({"beta_schedule": "scaled_linear",
                                   "prediction_type": "v_prediction"})[1] == "v"


# ------------------------------------------------------------ a whole diffusers directory
def _tiny_sd(directory, bpe_dir, prediction_type="epsilon", inpainting=False):
  """diffusers' dummy StableDiffusionPipeline components (random weights) and the tiny BPE
  tokenizer, saved with save_pretrained: what a user's SD directory looks like (inpainting:
  a StableDiffusionInpaintPipeline, its U-Net taking 9 channels)."""
  from diffusers import AutoencoderKL as RefVAE, DDIMScheduler, StableDiffusionPipeline
  from diffusers import StableDiffusionInpaintPipeline
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer as RefTok
  tok = RefTok.from_pretrained(str(bpe_dir))
  text = _randomize(CLIPTextModel(CLIPTextConfig(
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, hidden_size=32,
      intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
      pad_token_id=tok.pad_token_id, vocab_size=len(tok))), 3)
  vae = _randomize(RefVAE(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                          down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                          norm_num_groups=2), 4)
  sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        prediction_type=prediction_type)
  cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
  pipe = cls(unet=_randomize(_dummy_unet(None, 9 if inpainting else 4), 5), vae=vae,
                                 text_encoder=text, tokenizer=tok, scheduler=sched,
                                 safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
  pipe.save_pretrained(str(directory))
  return pipe


def _gdistill_denoiser(found, w_embedding=False):
  from gdistill import config_lib
  from gdistill.denoiser import build_denoiser
  config = config_lib.base_config()
  found.apply_to(config)
  return build_denoiser(config.model, w_embedding=w_embedding, schedule=found.schedule,
                        text_cfg=config.text, tokenizer=found.tokenizer), config


def _load(found, den, config):
  from gdistill import diffusers_io
  boxed = den.init_abstract((16, 16, 4))
  template = flax.linen.meta.unbox(boxed)
  params = {"unet": diffusers_io.read_params(found.weights("unet"), template["unet"], "unet"),
            "text_encoder": diffusers_io.read_params(found.weights("text_encoder"),
                                                     template["text_encoder"], "text")}
  vae_model = AutoencoderKL(**_kwargs(AutoencoderKL, found.configs["vae"]))
  vae = diffusers_io.read_params(found.weights("vae"),
                                 _template(vae_model, np.zeros((1, 64, 64, 3), np.float32)),
                                 "vae")
  return params, vae_model, vae


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_diffusers_directory_loads_as_the_same_text_to_image_model(tmp_path, tiny_bpe,
                                                                      prediction_type):
  from gdistill import diffusers_io
  ref = _tiny_sd(tmp_path / "sd", tiny_bpe, prediction_type)
  found = diffusers_io.read(str(tmp_path / "sd"))
  assert found.parametrization == ("eps" if prediction_type == "epsilon" else "v")
  assert found.text["tokenizer"] == "clip" and found.vae["latent_channels"] == 4
  den, config = _gdistill_denoiser(found)
  params, _, _ = _load(found, den, config)
  prompts = ["a red circle", ""]
  ids = found.tokenizer.encode(prompts)
  np.testing.assert_array_equal(ids, ref.tokenizer(
      prompts, padding="max_length", max_length=77, truncation=True,
      return_tensors="np").input_ids)
  rng = np.random.RandomState(4)
  z = rng.randn(2, 16, 16, 4).astype(np.float32)
  k = np.array([999.0, 250.0], np.float32)
  logsnr = np.asarray(found.schedule.logsnr((k + 1.0) / 1000.0))
  out = np.asarray(den.module.apply({"params": params}, jnp.asarray(z), jnp.asarray(logsnr),
                                    jnp.asarray(ids)))
  with torch.no_grad():
    ctx = ref.text_encoder(torch.from_numpy(ids).long())[0]
    theirs = ref.unet(torch.from_numpy(z).permute(0, 3, 1, 2), torch.from_numpy(k), ctx).sample
  assert np.abs(out - theirs.permute(0, 2, 3, 1).numpy()).max() <= TOL


def test_unsupported_checkpoints_are_refused_naming_what_is_missing(tmp_path, tiny_bpe):
  from gdistill import diffusers_io
  _tiny_sd(tmp_path / "sd", tiny_bpe)
  index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
  index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
  (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
  with pytest.raises(diffusers_io.UnsupportedCheckpointError, match="SDXL"):
    diffusers_io.read(str(tmp_path / "sd"))
  del index["text_encoder_2"]
  (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
  unet = json.loads((tmp_path / "sd" / "unet" / "config.json").read_text())
  unet.update(in_channels=7, resnet_time_scale_shift="scale_shift")
  (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps(unet))
  os.rename(tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors",
            tmp_path / "sd" / "vae" / "diffusion_pytorch_model.bin")
  with pytest.raises(diffusers_io.UnsupportedCheckpointError) as e:
    diffusers_io.read(str(tmp_path / "sd"))
  text = str(e.value)
  assert "in_channels=7" in text and "resnet_time_scale_shift='scale_shift'" in text
  assert "vae/diffusion_pytorch_model.safetensors is missing (only .bin pickle" in text
  with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
    diffusers_io.read(str(tmp_path / "nothing"))


def _student_written_back(found, tmp_path):
  """A w-conditioned student of an imported checkpoint (its teacher's weights plus a random,
  nonzero w-embedding) written as a diffusers directory: (student, params, config, VAE
  module, VAE params, the directory)."""
  from gdistill import diffusers_io
  from gdistill.denoiser import student_params_from_teacher
  teacher, config = _gdistill_denoiser(found)
  params, vae_model, vae = _load(found, teacher, config)
  student, _ = _gdistill_denoiser(found, w_embedding=True)
  sparams = flax.linen.meta.unbox(student.init_abstract((16, 16, 4)))
  sparams = student_params_from_teacher(
      params, jax.tree.map(lambda s: np.zeros(s.shape, np.float32), sparams))
  cond_proj = sparams["unet"]["time_embedding"]["cond_proj"]
  cond_proj["kernel"] = np.random.RandomState(5).randn(
      *cond_proj["kernel"].shape).astype(np.float32) * 0.05
  out = tmp_path / "student"
  diffusers_io.write(str(out), model=config.model.to_dict(), text=config.text.to_dict(),
                     vae=config.vae.to_dict(), unet_params=sparams["unet"],
                     text_params=sparams["text_encoder"], vae_params=vae,
                     scaling_factor=found.scaling_factor, tokenizer=found.tokenizer,
                     schedule=found.schedule, parametrization=found.parametrization,
                     time_cond_proj_dim=int(config.model.time_cond_proj_dim))
  return student, sparams, config, vae_model, vae, out


def _student_images(found, student, sparams, vae_model, vae, cond_input, w, z1, n):
  """gdistill's N-step DDIM from z1, decoded, in [0, 1] (what diffusers' pipelines return)."""
  from gdistill import sampling
  spec = sampling.SamplerSpec(schedule=found.schedule, clip=None)
  cond = student.encode_cond(sparams, cond_input)
  latents = sampling.sample_loop(
      sampling._x_fn(student, spec, sparams, cond, jnp.full((len(z1),), w)), jnp.asarray(z1),
      n, jax.random.key(0), kind="ddim", schedule=found.schedule)
  ours = vae_model.apply({"params": vae}, latents / found.scaling_factor,
                         method=vae_model.decode)
  return (np.clip(np.asarray(ours), -1, 1) + 1) / 2


def test_an_exported_student_samples_the_same_images_in_diffusers(tmp_path, tiny_bpe):
  """Round trip: a w-conditioned student (the imported teacher plus a random, nonzero
  w-embedding) written as a diffusers directory, sampled by StableDiffusionPipeline with
  guidance_scale = 1 + w and num_inference_steps = N from the same initial latents, gives
  gdistill's images (max abs error <= 1e-3 in [0, 1] pixels)."""
  from diffusers import StableDiffusionPipeline
  from gdistill import diffusers_io, sampling
  _tiny_sd(tmp_path / "sd", tiny_bpe)
  found = diffusers_io.read(str(tmp_path / "sd"))
  student, sparams, config, vae_model, vae, out = _student_written_back(found, tmp_path)
  pipe = StableDiffusionPipeline.from_pretrained(str(out))
  assert pipe.unet.config.time_cond_proj_dim == int(config.model.time_cond_proj_dim)
  prompts, w, n = ["a red circle", "the square"], 3.0, 4
  z1 = np.random.RandomState(6).randn(2, 16, 16, 4).astype(np.float32)
  ids = jnp.asarray(found.tokenizer.encode(prompts))
  ours = _student_images(found, student, sparams, vae_model, vae, ids, w, z1, n)
  with torch.no_grad():
    theirs = pipe(prompts, guidance_scale=1 + w, num_inference_steps=n,
                  latents=torch.from_numpy(z1).permute(0, 3, 1, 2), output_type="np").images
  assert theirs.shape == ours.shape
  err = np.abs(ours - theirs).max()
  print(f"round trip: max abs error {err:.2e} in [0, 1] pixels")
  assert err <= 1e-3, err


def test_an_inpainting_checkpoint_round_trips_through_diffusers_inpaint_pipeline(tmp_path,
                                                                                 tiny_bpe):
  """A Stable Diffusion inpainting directory (U-Net in_channels 9: latents 4, mask 1, masked
  image latents 4) loads as a gdistill inpainting model (model.inpainting); a w-conditioned
  student of it (random nonzero w-embedding) written back is a StableDiffusionInpaintPipeline
  whose inpainting of the same images, masks, prompts and initial latents (guidance_scale =
  1 + w, strength 1, masked-image latents passed in: diffusers would otherwise draw a
  posterior sample where gdistill takes the mean) equals gdistill's (<= 1e-3 in [0, 1])."""
  from diffusers import StableDiffusionInpaintPipeline
  from gdistill import diffusers_io, inpainting, sampling
  _tiny_sd(tmp_path / "sd", tiny_bpe, inpainting=True)
  found = diffusers_io.read(str(tmp_path / "sd"))
  assert found.model["inpainting"] and found.model["channels"] == 4
  teacher, config = _gdistill_denoiser(found)
  assert teacher.inpainting and config.model.inpainting
  student, sparams, config, vae_model, vae, out = _student_written_back(found, tmp_path)
  assert sparams["unet"]["conv_in"]["kernel"].shape[2] == 9
  index = json.loads((out / "model_index.json").read_text())
  assert index["_class_name"] == "StableDiffusionInpaintPipeline"
  pipe = StableDiffusionInpaintPipeline.from_pretrained(str(out))
  assert pipe.unet.config.in_channels == 9
  rng = np.random.RandomState(7)
  images = rng.rand(2, 32, 32, 3).astype(np.float32)
  masks = np.zeros((2, 32, 32, 1), np.float32)   # 2x2-pixel blocks: whole latents (f = 2)
  masks[0, 4:20, 8:24] = 1
  masks[1, :, 16:] = 1
  prompts, w, n = ["a red circle", "the square"], 2.0, 4
  z1 = rng.randn(2, 16, 16, 4).astype(np.float32)
  encode = lambda x: found.scaling_factor * vae_model.apply(
      {"params": vae}, x, method=vae_model.encode)[0]
  block = inpainting.condition(jnp.asarray(images * 2 - 1), jnp.asarray(masks), encode)
  ids = jnp.asarray(found.tokenizer.encode(prompts))
  ours = _student_images(found, student, sparams, vae_model, vae,
                         {"c": ids, "inpaint": block}, w, z1, n)
  nchw = lambda a: torch.from_numpy(np.array(a, np.float32)).permute(0, 3, 1, 2)
  with torch.no_grad():
    theirs = pipe(prompts, image=nchw(images), mask_image=nchw(masks),
                  masked_image_latents=nchw(block[..., 1:]), height=32, width=32,
                  strength=1.0, guidance_scale=1 + w, num_inference_steps=n,
                  latents=nchw(z1), output_type="np").images
  assert theirs.shape == ours.shape
  err = np.abs(ours - theirs).max()
  print(f"inpainting round trip: max abs error {err:.2e} in [0, 1] pixels")
  assert err <= 1e-3, err


def test_sharded_read_places_each_slice_on_its_device(tmp_path):
  """read_params with shardings: every parameter is built shard by shard (each device's slice
  read from the file and laid out), equal to the whole-array read; kernels split over 8
  devices along their output channels where they divide."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from gdistill import diffusers_io
  ref = _randomize(_dummy_unet(None), 7)
  ref.save_pretrained(tmp_path)
  model = UNet2DConditionModel(**_kwargs(UNet2DConditionModel, ref.config))
  template = _template(model, np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,), np.float32),
                       np.zeros((1, 3, 32), np.float32))
  path = str(tmp_path / "diffusion_pytorch_model.safetensors")
  whole = diffusers_io.read_params(path, template, "unet")
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))

  def spec(leaf):
    if leaf.ndim >= 2 and leaf.shape[-1] % 8 == 0:
      return NamedSharding(mesh, P(*([None] * (leaf.ndim - 1)), "fsdp"))
    return NamedSharding(mesh, P())
  shardings = jax.tree.map(spec, template)
  sharded = diffusers_io.read_params(path, template, "unet", shardings)
  split = 0
  for (p, a), (_, b) in zip(weight_map.flatten(whole).items(),
                            weight_map.flatten(sharded).items()):
    assert b.sharding == weight_map.flatten(shardings)[p]
    np.testing.assert_array_equal(np.asarray(b), a, err_msg="/".join(p))
    split += len({str(s.index) for s in b.addressable_shards}) == 8
  assert split > 50  # most kernels are really split 8 ways


# Both slow (~3.5 min each; `pytest -m slow`): the default run checks the same import, export and
# round trips on the modules (above) and the train loop on the shapes pipelines.
@pytest.mark.slow
@pytest.mark.parametrize("inpainting", [False, True])
def test_a_pipeline_distils_a_diffusers_directory(tmp_path, tiny_bpe, capsys, inpainting):
  """--config.init_from=<a diffusers SD directory> on your own image-caption files: the tiny SD
  becomes the teacher and the autoencoder, then stage one and two progressive rounds (4 and 2
  steps) train on a folder of 64x64 images + .txt captions (shapes, enlarged), each batch
  encoded to 32x32x4 latents by its VAE on the device; the students sample prompts through the
  API; a rerun finds everything done and imports nothing again. inpainting (`pytest -m slow`):
  the same for an SD inpainting checkpoint (in_channels 9; random masks in every batch), its
  student inpainting through the API and, exported, in StableDiffusionInpaintPipeline."""
  import importlib
  import gdistill
  from gdistill import driver
  import util
  from gdistill.data import shapes
  _tiny_sd(tmp_path / "sd", tiny_bpe, inpainting=inpainting)
  d = shapes.generate(40, seed=11)
  util.write_image_captions(tmp_path / "pictures", d["image"].repeat(2, 1).repeat(2, 2),
                            d["caption"], image_format="jpeg")

  def config():
    c = importlib.import_module("configs.shapes").get_config("quick")
    return util.apply_overrides(c, {
        "data.name": "image_folder", "data.data_dir": str(tmp_path / "pictures"),
        "data.image_size": 64, "data.holdout": 4, "vae.image_size": 64,
        "init_from": str(tmp_path / "sd"), "guided.num_steps": 3, "guided.batch_size": 8,
        "progressive.num_steps": 2, "progressive.batch_size": 8,
        "progressive.start_steps": 8, "progressive.end_steps": 2,
        "checkpoint.every_steps": 1000, "log.every_steps": 3, "log.tensorboard": False,
        "log.sample_prompts": 2, "log.sample_w": (3.0,), "eval.enabled": False})
  wd = str(tmp_path / "wd")
  driver.train_and_evaluate(config(), wd, devices=jax.devices()[:1])
  out = capsys.readouterr().out
  assert "[import]" in out and "[guided] starting" in out and "[teacher] starting" not in out
  for stage in ("teacher", "autoencoder", "guided", "progressive_4", "progressive_2"):
    assert os.path.exists(os.path.join(wd, stage, "export", "metadata.json")), stage
  saved = json.load(open(os.path.join(wd, "config.json")))  # what sample / evaluate read
  assert saved["init_from"] == os.path.join(wd, "teacher", "export")
  assert saved["vae"]["init_from"] == os.path.join(wd, "autoencoder", "export")
  student = gdistill.load(wd, "progressive_2")
  assert student.nfe() == 2 and student.text_conditioned
  images = student.sample(prompts=["a red circle", "a blue square"], w=3.0, rng=0)
  assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
  teacher = gdistill.load(wd, "teacher")
  np.testing.assert_array_equal(teacher.conditions(prompts=["a red circle"]),
                                student.conditions(prompts=["a red circle"]))
  created = json.load(open(os.path.join(wd, "teacher", "export", "metadata.json")))["created"]
  driver.train_and_evaluate(config(), wd, devices=jax.devices()[:1])  # the same command again
  out = capsys.readouterr().out
  assert "starting" not in out and "[progressive_2] finished earlier" in out
  assert json.load(open(os.path.join(wd, "teacher", "export", "metadata.json")))[
      "created"] == created  # the import was reused, not redone
  # And back out: the 2-step student through the export command, sampled by diffusers.
  from gdistill import export
  out_dir = str(tmp_path / "student")
  assert export.main(["--workdir", wd, "--stage", "progressive_2", "--format", "diffusers",
                      "--out", out_dir]) == 0
  assert "num_inference_steps = 2 (2 NFE)" in capsys.readouterr().out
  if not inpainting:
    util.assert_diffusers_samples_like_gdistill(out_dir, student,
                                                ["a red circle", "a blue square"], w=3.0)
    return
  assert student.inpainting and teacher.inpainting
  pics = d["image"][:2].repeat(2, 1).repeat(2, 2)
  masks = np.zeros((2, 64, 64, 1), np.float32)   # whole 2x2-pixel latents (f = 2)
  masks[0, 8:40, 16:48] = 1
  masks[1, 32:] = 1
  filled = student.inpaint(pics, masks, prompts=["a red circle", "a blue square"], w=3.0)
  keep = np.broadcast_to(masks == 0, filled.shape)
  np.testing.assert_array_equal(filled[keep], (pics / np.float32(127.5) - 1)[keep])
  util.assert_diffusers_samples_like_gdistill(out_dir, student,
                                              ["a red circle", "a blue square"], w=3.0,
                                              images=pics, masks=masks)


def test_word_tokenizer_as_bpe_encodes_every_caption_alike():
  from gdistill import export
  from gdistill.data import shapes
  from gdistill.tokenizer import WordTokenizer
  tok = WordTokenizer(shapes.VOCAB, max_length=16)
  table = np.random.RandomState(0).randn(tok.vocab_size, 8).astype(np.float32)
  bpe, params = export.word_tokenizer_as_bpe(
      tok, {"embeddings": {"token_embedding": {"embedding": table}}})
  captions = [str(c) for c in shapes.generate(300, seed=3)["caption"]] + [""]
  np.testing.assert_array_equal(bpe.encode(captions), tok.encode(captions))
  grown = params["embeddings"]["token_embedding"]["embedding"]
  assert grown.shape == (bpe.vocab_size, 8)
  np.testing.assert_array_equal(grown[:tok.vocab_size], table)
  np.testing.assert_array_equal(grown[tok.vocab_size:], np.broadcast_to(
      table[tok.unk_id], (bpe.vocab_size - tok.vocab_size, 8)))
  # An unknown word: every piece carries <|unk|>'s embedding (several tokens, not one).
  ids = bpe.encode(["a zebra circle"])[0]
  assert all(np.array_equal(grown[i], table[tok.unk_id]) for i in ids[2:-1][:1])
