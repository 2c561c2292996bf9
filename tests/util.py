"""Shared helpers for the tests: configs, subprocess runs, export comparison."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_config(**overrides):
  """configs/digits.py:quick with dotted-key overrides (e.g. {'teacher.num_steps': 30})."""
  sys.path.insert(0, ROOT)
  from configs import digits
  c = digits.get_config("quick")
  apply_overrides(c, overrides)
  return c


def toy_config(**overrides):
  """configs/toy2d.py:test (the MLP denoiser, whose steps compile in seconds) with dotted-key
  overrides: for tests of mechanisms that do not depend on the network."""
  sys.path.insert(0, ROOT)
  from configs import toy2d
  c = toy2d.get_config("test")
  apply_overrides(c, overrides)
  return c


# configs/shapes.py:quick shrunk to tiny models and the tiny variant of the data: the latent
# text-to-image tests' pipeline (tests/test_text_to_image.py's fixture, test_inpainting.py,
# test_text_models.py).
SHAPES_TINY = {
    "data.variant": "tiny", "vae.block_out_channels": (8, 16, 16), "vae.norm_num_groups": 4,
    "model.block_out_channels": (16, 32), "model.num_groups": 8,
    "model.attention_head_dim": 2, "model.time_cond_proj_dim": 16,
    "text.hidden_size": 16, "text.intermediate_size": 32, "text.num_hidden_layers": 1,
    "text.num_attention_heads": 2, "text.max_length": 16,
    "autoencoder.num_steps": 6, "autoencoder.batch_size": 16, "autoencoder.scale_examples": 64,
    "teacher.num_steps": 6, "teacher.batch_size": 16, "guided.num_steps": 3,
    "guided.batch_size": 16, "progressive.num_steps": 2, "progressive.batch_size": 16,
    "progressive.start_steps": 2, "checkpoint.every_steps": 1000, "log.every_steps": 3,
    "log.tensorboard": False, "log.sample_prompts": 2, "log.sample_w": (0.0, 3.0),
    "eval.steps": (1,), "eval.w": (0.0, 3.0), "eval.classifier_steps": 20,
    "eval.prompts_single": 8, "eval.prompts_two": 8, "eval.prompts_per_group": 2,
    "eval.batch_size": 48, "sample.num_samples": 6, "sample.batch_size": 6,
    "eval.edit_images": 8, "eval.edit_batch_size": 8, "eval.edit_strengths": (0.5, 1.0),
}


def shapes_config(data_dir, **overrides):
  """configs/shapes.py:quick with SHAPES_TINY, data under data_dir, and dotted-key overrides."""
  sys.path.insert(0, ROOT)
  from configs import shapes
  c = shapes.get_config("quick")
  return apply_overrides(c, {"data.data_dir": str(data_dir), **SHAPES_TINY, **overrides})


def apply_overrides(c, overrides):
  for k, v in overrides.items():
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    setattr(node, parts[-1], v)
  return c


def cli_args(overrides: dict) -> list[str]:
  out = []
  for k, v in overrides.items():
    if isinstance(v, (tuple, list)):
      v = "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    out.append(f"--config.{k}={v}")
  return out


def run_cli(workdir, overrides, *, config="configs/digits.py:quick", kill_on=None,
            sig=signal.SIGKILL, timeout=600, extra_env=None):
  """Runs gdistill.main in a subprocess; with kill_on (a substring of an output line) it sends
  `sig` as soon as that line appears. Returns (returncode, output, killed)."""
  env = dict(os.environ)
  env.update({"XLA_FLAGS": xla_env.xla_flags(1),
              "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
              "JAX_PLATFORMS": "cpu"})
  env.update(extra_env or {})
  cmd = [sys.executable, "-m", "gdistill.main", f"--config={os.path.join(ROOT, config)}",
         f"--workdir={workdir}", "--compilation_cache=" + os.environ.get(
             "GDISTILL_TEST_XLA_CACHE", "/tmp/gdistill_test_xla_cache")] + cli_args(overrides)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, killed, t0 = [], False, time.time()
  for line in proc.stdout:
    lines.append(line)
    if kill_on and not killed and kill_on in line:
      proc.send_signal(sig)
      killed = True
    if time.time() - t0 > timeout:
      proc.kill()
      raise TimeoutError("".join(lines[-50:]))
  rc = proc.wait()
  return rc, "".join(lines), killed


def forbid_network(monkeypatch):
  """Any attempt to open a network connection fails the test (offline guarantees are checked
  by what the code does, not by how long it takes)."""
  import socket

  def refuse(self, address, *a, **k):
    raise AssertionError(f"network access attempted: {address!r}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket.socket, "connect_ex", refuse)
  monkeypatch.setattr(socket, "create_connection",
                      lambda address, *a, **k: refuse(None, address))


def load_export(path):
  from gdistill import checkpoint
  params, meta = checkpoint.load_export_local(path)
  return jax.tree.map(np.asarray, params), meta


def assert_trees_identical(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------- a finished workdir without any training
TINY_N0 = 4
# The CLI overrides that make configs/digits.py:quick evaluate and sample like
# tiny_eval_config (the architecture comes from each export's metadata).
TINY_EVAL_CLI = {"progressive.start_steps": TINY_N0, "eval.num_samples": 48,
                 "eval.batch_size": 48, "eval.steps": (1, 2), "eval.w": (0.0, 2.0),
                 "eval.classifier_steps": 30, "sample.num_samples": 48,
                 "sample.batch_size": 48}


def tiny_eval_config():
  """configs/digits.py:quick with a tiny U-Net, N0 = 4 and a small evaluation."""
  c = quick_config()
  c.model.update(dict(ch=16, num_groups=8, attn_resolutions=()))
  return apply_overrides(c, TINY_EVAL_CLI)


def host_filled(abstract, seed: int):
  """Arrays in the shapes of an (abstract, boxed) init result, filled on the host
  (benchmark.random_tree: normal(0, 0.05), norm scales around 1), for tests that need some
  parameters, not the initialisers': jitting an init compiles the RNG of every parameter
  (4-5 s for a tiny U-Net at -O0)."""
  import flax.linen as nn
  from gdistill import benchmark
  return benchmark.random_tree(nn.unbox(abstract), seed)


def random_params(den, shape, seed: int):
  """A Denoiser's parameters, host_filled."""
  return host_filled(den.init_abstract(shape), seed)


def student_from_teacher(student, teacher_params, shape, seed: int = 3):
  """A fresh w-conditioned student as stage one starts it (stage_setup.init_state): its init
  with every teacher parameter copied in, jitted, so XLA drops the copied parameters' RNG and
  compiles only the w-embedding's initialiser."""
  import flax.linen as nn
  from gdistill.denoiser import student_params_from_teacher

  def init(rng, tp):
    return student_params_from_teacher(tp, nn.unbox(student.init_fn(shape)(rng)))
  return jax.jit(init)(jax.random.key(seed, impl="rbg"), teacher_params)


def write_untrained_workdir(c, workdir: str) -> None:
  """A finished pipeline workdir: config.json and one export per stage of the plan, from
  initial parameters the way run_stage derives them (the guided student from the teacher,
  each progressive round from its parent), so no training step compiles."""
  import flax.linen as nn
  from gdistill import checkpoint, driver, lineage, plan, stage_setup, train
  from gdistill.denoiser import student_params_from_teacher
  driver.prepare(c, workdir)
  shape = train.example_shape(c)
  params, parent = {}, None
  for st in plan.make_plan(c):
    den = stage_setup.student_model(c, st)
    if st.kind == "teacher":
      p = random_params(den, shape, seed=1)
    elif st.kind == "guided":  # the w-embedding at zero, as its zero-initialised last layer
      zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                           nn.unbox(den.init_abstract(shape)))
      p = student_params_from_teacher(params["teacher"], zeros)
    else:
      p = params[st.parent]
    params[st.name] = p
    meta = lineage.export_metadata(c, st, train_steps=1, parent=parent,
                                   parent_path=st.parent and train.export_dir(workdir, st.parent))
    checkpoint.save_export(train.export_dir(workdir, st.name), p, meta)
    parent = meta


def assert_diffusers_samples_like_gdistill(directory, model, prompts, w, images=None,
                                           masks=None):
  """StableDiffusionPipeline.from_pretrained(directory) with guidance_scale = 1 + w and
  num_inference_steps = N from the same initial latents gives the gdistill Model's images
  (max abs error <= 1e-3 in [0, 1] pixels). With images (uint8) and masks (float [n, H, W, 1]
  of whole f x f blocks): StableDiffusionInpaintPipeline against the inpainting model, given
  gdistill's masked-image latents (diffusers would draw a posterior sample there)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
  from gdistill import sampling
  n = model.default_steps
  z1 = np.random.RandomState(8).randn(len(prompts), *model.example_shape).astype(np.float32)
  cond_input = jnp.asarray(model.conditions(prompts=prompts))
  kw = {}
  nchw = lambda a: torch.from_numpy(np.array(a, np.float32)).permute(0, 3, 1, 2)
  if masks is not None:
    x = images / np.float32(127.5) - 1
    block = model.inpaint_condition(x, masks)
    cond_input = {"c": cond_input, "inpaint": block}
    h, w_px = images.shape[1:3]
    kw = dict(image=nchw(images / 255.0), mask_image=nchw(masks),
              masked_image_latents=nchw(block[..., 1:]), height=h, width=w_px, strength=1.0)
  pipe = (StableDiffusionPipeline if masks is None else
          StableDiffusionInpaintPipeline).from_pretrained(directory)
  cond = model.denoiser.encode_cond(model.params, cond_input)
  spec = sampling.SamplerSpec(schedule=model.schedule, clip=None)
  x_hat = sampling._x_fn(model.denoiser, spec, model.params, cond,
                         jnp.full((len(prompts),), w, jnp.float32))
  latents = sampling.sample_loop(x_hat, jnp.asarray(z1), n, jax.random.key(0), kind="ddim",
                                 schedule=model.schedule)
  ours = (model.decode(np.asarray(latents)) + 1) / 2
  with torch.no_grad():
    theirs = pipe(prompts, guidance_scale=1 + w, num_inference_steps=n, latents=nchw(z1),
                  output_type="np", **kw).images
  assert theirs.shape == ours.shape
  err = np.abs(ours - theirs).max()
  assert err <= 1e-3, err


def write_image_captions(directory, images, captions, *, layout="image_folder", shards=2,
                         image_format="png"):
  """Writes uint8 [N, H, W, 3] images + captions as your own dataset would be: a folder of
  KEY.png + KEY.txt (examples spread over two sub-folders; sorted paths keep the order), or
  webdataset shards (KEY.png + KEY.txt members, example i in shard i * shards // N)."""
  import io as io_lib
  import tarfile
  from PIL import Image
  os.makedirs(directory, exist_ok=True)
  n = len(images)
  for i, (image, caption) in enumerate(zip(images, captions)):
    key = f"part{i * 2 // n}/{i:05d}"
    buf = io_lib.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format=image_format)
    members = {f"{key}.{image_format}": buf.getvalue(), f"{key}.txt": str(caption).encode()}
    if layout == "image_folder":
      for name, payload in members.items():
        os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
        with open(os.path.join(directory, name), "wb") as f:
          f.write(payload)
    else:
      shard = os.path.join(directory, f"shard-{i * shards // n:05d}.tar")
      with tarfile.open(shard, "a") as tar:
        for name, payload in members.items():
          info = tarfile.TarInfo(name)
          info.size = len(payload)
          tar.addfile(info, io_lib.BytesIO(payload))
  return str(directory)


def assert_zero_and_full_masks(model, images, prompts, w=3.0):
  """A zero mask returns the input exactly (paste-back); a full mask without paste-back is
  sample() with the same rng, bit for bit."""
  n = len(images)
  zeros = np.zeros((n,) + images.shape[1:3], np.uint8)
  np.testing.assert_array_equal(model.inpaint(images, zeros, prompts=prompts, w=w),
                                images / np.float32(127.5) - np.float32(1.0))
  np.testing.assert_array_equal(
      model.inpaint(images, zeros + 1, prompts=prompts, w=w, rng=5, paste_back=False),
      model.sample(prompts=prompts, w=w, rng=5))


def inpaint_cli(config, workdir, tmp_path, images, masks, prompts):
  """--mode=inpaint (edit_modes.inpaint_to_file) on an .npz and a prompts file written to
  tmp_path: (info, the config used, the output arrays)."""
  from gdistill import edit_modes
  np.savez(tmp_path / "in.npz", images=images, masks=masks)
  (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
  config = config.copy_and_resolve_references()
  config.inpaint.update(dict(input=str(tmp_path / "in.npz"),
                             prompts_file=str(tmp_path / "p.txt"),
                             out=str(tmp_path / "o.npz")))
  info = edit_modes.inpaint_to_file(config, workdir)
  with np.load(tmp_path / "o.npz") as f:
    return info, config, dict(f)
