"""Config building blocks shared by configs/*.py: the sections and their defaults.

A config is an ml_collections ConfigDict with every key declared once and locked. Sections:
  stage, seed, init_from, workdir-independent settings;
  data, model, diffusion, mesh, logical_axis_rules, checkpoint, log;
  teacher, guided, progressive: one training section per stage kind (train_section below);
  sample, eval: the sample and evaluate modes.
gdistill/config_validation.py's `validate(config, ...)` checks everything it can before JAX
compiles anything and raises ConfigError (here) naming the key, the value and what would be
valid.
"""
from __future__ import annotations

import hashlib
import json

import ml_collections


class ConfigError(ValueError):
  """A config value that cannot work; the message names key, value and what is valid."""


def train_section(*, num_steps, batch_size, lr, warmup_steps=0, schedule="constant",
                  grad_clip=1.0, ema_decay=0.0, dropout=None, b1=0.9, b2=0.999,
                  max_nonfinite=10, weighting="", grad_accum=1, w_power=0.0):
  """One stage's training settings (teacher, guided or each progressive round).

  grad_accum: k micro-batches of batch_size / k per optimizer step (gradient accumulation,
  gdistill/train.py accumulated_grads): the update of the whole batch with the activation
  memory of one micro-batch.

  weighting: the loss weighting of this stage's x-loss ('' = diffusion.weighting), e.g. an
  epsilon-MSE teacher ('snr') distilled with the truncated-SNR weighting ('snr_trunc').

  w_power (stages of w-conditioned students): each example's loss is weighted by
  (1 + w)^-w_power, w its sampled guidance strength. 0 is the paper's plain mean over
  w ~ U[w_min, w_max]. The guided target (1 + w) x_c - w x_u grows with w and so does the
  student's error: at p = 0 the largest w make most of the loss and the small ones (w = 0, the
  conditional model) are fitted least (docs/TEXT_TO_IMAGE.md).
  """
  return ml_collections.ConfigDict(dict(
      num_steps=num_steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
      schedule=schedule, grad_clip=grad_clip, ema_decay=ema_decay,
      # None: the model's own dropout; progressive rounds default to 0.
      dropout=ml_collections.FieldReference(dropout, field_type=float),
      b1=b1, b2=b2, max_nonfinite=max_nonfinite, weighting=weighting,
      grad_accum=grad_accum, w_power=w_power))


def default_logical_axis_rules():
  """Logical axis -> mesh axis. FSDP shards the output features of every Dense/conv."""
  return (("embed", None), ("mlp", "fsdp"), ("vocab", None), ("norm", None), ("bias", None),
          ("conv_h", None), ("conv_w", None))


def base_config():
  """Every key of a gdistill config with a neutral default; configs/*.py fill it in."""
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"
  c.seed = 0
  # init_from: an export dir to start stage guided/progressive from, or a diffusers Stable
  # Diffusion directory (model_index.json): its U-Net + text encoder become the teacher and its
  # VAE the autoencoder (gdistill/diffusers_io.py), so a pipeline distils it.
  c.init_from = ""
  # Hyperparameters a resumed stage may take although its checkpoint was written with other
  # values: comma-separated keys ('teacher.lr', or 'lr' for every section), 'all', or '' (none:
  # a changed lr, batch size, schedule... is refused on resume, naming old and new value).
  c.allow_changes = ""
  # normalize_on_device: the loader ships uint8 images and the device computes x / 127.5 - 1
  # (and the random flip), bit for bit the host formula; False: the loader thread does it.
  # tf_*: TensorFlow (TensorBoard writer, tensorflow_datasets) kept off the accelerators and to
  # small thread pools beside XLA's (gdistill/runtime.py configure_tensorflow; 0: TF's default).
  # variant: the dataset's tfds builder config ('' its default; shapes: 'tiny' for tests).
  # image_folder / webdataset (your own image-caption files in data_dir, gdistill/data/files.py):
  # image_size the training resolution (shorter side scaled, centre crop), holdout examples
  # held out as 'test', decode_threads per process.
  c.data = dict(name="digits", data_dir="", split="train", variant="", random_flip=False,
                num_classes=10, image_size=0, holdout=0, decode_threads=8,
                normalize_on_device=True, tf_intra_op_threads=1, tf_inter_op_threads=1,
                tf_hide_accelerators=True)
  # name 'unet' (ADM, logSNR input) / 'mlp': pixel space, class labels (conditioning 'label').
  # name 'unet2d_condition': Stable Diffusion's U-Net (diffusers' UNet2DConditionModel keys
  # below, discrete timestep input) conditioned on text through config.text's CLIP encoder;
  # time_cond_proj_dim: the students' w-embedding (diffusers' convention). channels and
  # image_size: what the network sees (the latents when config.vae.enabled).
  # attention_impl: '' (XLA) | 'cudnn' | 'reference' (jax.nn.dot_product_attention).
  # student_parametrization: what the w-conditioned students predict ('' = parametrization;
  # the same output channels, so they still start from the teacher's weights).
  # addition_embed_type: '' or 'text' (diffusers' TextTimeEmbedding: the caption pooled by
  # attention, addition_embed_type_num_heads heads, and added to the timestep embedding).
  c.model = dict(name="unet", conditioning="label", ch=64, ch_mult=(1, 2), num_res_blocks=2,
                 attn_resolutions=(4,), head_dim=32, dropout=0.1, num_groups=32,
                 resblock_updown=True, remat=False, num_classes=10, channels=1, image_size=8,
                 parametrization="v", w_scale=4.0, dtype="float32", param_dtype="float32",
                 block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                 attention_head_dim=4, time_cond_proj_dim=256, use_linear_projection=False,
                 attention_impl="", student_parametrization="", inpainting=False,
                 addition_embed_type="", addition_embed_type_num_heads=64)
  # model.inpainting: the network also takes the mask and the masked image (Stable Diffusion's
  # inpainting layout, gdistill/inpainting.py); its stages train on random masks of these
  # kinds, drawn with these weights (full: the whole image, so it still generates from text).
  c.masks = dict(box=0.4, stroke=0.2, border=0.2, full=0.2)
  # The text encoder of model.conditioning='text': CLIP's text transformer, trained jointly with
  # the teacher (GLIDE) and frozen afterwards; a word-level tokenizer of the dataset's vocabulary
  # with CLIP's conventions (BOS, EOS, EOS padding to max_length).
  # tokenizer 'word': the dataset's vocabulary; 'clip': CLIP's BPE ids (vocab_size 49408, the
  # tokenizer/ folder of a Stable Diffusion checkpoint; --mode=compile needs only the sizes).
  # tokenizer_path: a CLIP tokenizer/ folder (vocab.json + merges.txt or tokenizer.json) that
  # 'clip' encodes prompts with; set from the checkpoint when init_from is a diffusers directory.
  c.text = dict(tokenizer="word", vocab_size=49408, max_length=77, hidden_size=64,
                intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                hidden_act="quick_gelu", tokenizer_path="")
  # Latent diffusion (vae.enabled): every diffusion stage runs on scaling_factor * the
  # AutoencoderKL posterior mean of the images. The autoencoder is the plan's 'autoencoder' stage
  # (config.autoencoder: its training), or an existing autoencoder export (vae.init_from).
  # image_size/image_channels: the dataset's images (the autoencoder's input).
  c.vae = dict(enabled=False, init_from="", image_size=32, image_channels=3,
               block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
               norm_num_groups=8)
  c.autoencoder = train_section(num_steps=2000, batch_size=64, lr=1e-3, warmup_steps=100,
                                schedule="cosine", ema_decay=0.0)
  c.autoencoder.kl_weight = 1e-6      # KL(q(z|x) || N(0, I)) per latent element, vs pixel MSE
  c.autoencoder.l1_weight = 0.0       # pixel L1 (SD's VAE loss) added to the pixel MSE
  c.autoencoder.scale_examples = 4096  # training images whose latents set the scaling factor
  # schedule: 'cosine' (logsnr_min/max) or a discrete one, 'scaled_linear' | 'linear'
  # (num_train_timesteps, beta_start, beta_end): gdistill/schedules.py.
  c.diffusion = dict(schedule="cosine", logsnr_min=-20.0, logsnr_max=20.0,
                     num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     weighting="snr_trunc", clip_x=True,
                     p_uncond=0.1, w_min=0.0, w_max=4.0)
  c.teacher = train_section(num_steps=1000, batch_size=128, lr=3e-4, warmup_steps=100,
                            ema_decay=0.999, dropout=None)
  c.guided = train_section(num_steps=500, batch_size=128, lr=1e-4, warmup_steps=0,
                           ema_decay=0.999, dropout=0.0)
  c.progressive = train_section(num_steps=200, batch_size=128, lr=1e-4, schedule="linear",
                                ema_decay=0.0, dropout=0.0)
  c.progressive.start_steps = 64   # N0: the first round's teacher samples in N0 steps
  c.progressive.end_steps = 1
  # round_steps: ((N, steps), ...) trains the round whose student samples in N steps for that
  # many steps instead of num_steps (the hard rounds are the last ones: docs/TEXT_TO_IMAGE.md).
  c.progressive.round_steps = ()
  c.mesh = dict(data=-1, fsdp=1)   # -1: all remaining devices
  # --mode=compile: with device_memory_gib > 0 the report also proposes mesh.fsdp and each
  # stage's grad_accum for devices of that memory (gdistill/compile_check.py propose).
  # topology: compile for a TPU slice instead of this host's devices ('v5p-64', 'v4-64',
  # 'v5p:4x4x2', ...; needs libtpu installed here, no TPU: compile_check.tpu_topology).
  c.compile = dict(device_memory_gib=0.0, topology="")
  c.logical_axis_rules = default_logical_axis_rules()
  c.checkpoint = dict(every_steps=200, keep=3, async_save=True)
  # tensorboard=False: console, metrics.jsonl and PNG grids only (no TensorFlow import).
  # sample_prompts: a text model's grid columns (the first captions of the test split).
  c.log = dict(every_steps=50, sample_every_steps=0, sample_w=(0.0, 1.0, 4.0),
               samples_per_class=1, sample_prompts=8, sample_steps=0, tensorboard=True)
  # --mode=sample: stage 'latest' | 'teacher' | 'guided' | 'progressive_N'; steps 0 = the
  # stage's own N (N0 for teacher and guided); labels None = i % num_classes; out: '' writes
  # <workdir>/samples.npz; a path a user gives is taken as given (relative: to the current
  # directory).
  # Text models: prompts_file (one prompt per line; sample i uses prompt i mod P);
  # latents_out: also keep the undecoded latents there (.npz), '' = no.
  c.sample = dict(stage="latest", w=1.0, steps=0, sampler="ddim", num_samples=100,
                  labels=ml_collections.FieldReference(None, field_type=tuple), seed=0,
                  out="", batch_size=500, prompts_file="", latents_out="")
  # --mode=evaluate (gdistill/evaluate.py). num_samples per row and w: 200 keeps the digits
  # sweep within ~5 min on 2 CPU cores (cifar10/imagenet64 set 50k). inception_weights: the
  # converted FID Inception (.npz or .safetensors), needed for cifar10/imagenet64.
  # teacher_samplers: the guided teacher's rows (2 NFE per step) for each of these samplers.
  # Class models: num_samples per row and w. Text models (held-out captions of the test
  # split): prompts_single single-object and prompts_two two-object captions, and for the
  # diversity prompts_per_group samples of one colour-and-shape-only caption per group.
  # --mode=edit / --mode=inpaint (gdistill/edit_modes.py): input an .npz with 'images' (uint8
  # NHWC; inpaint also 'masks', uint8 NHW in {0, 1}, 1 = repaint; class models 'labels');
  # text models read prompts_file (one prompt per image, in order). steps 0: the stage's own N.
  # out '' writes <workdir>/edited.npz (inpainted.npz), a before/after PNG beside it.
  edit_common = dict(stage="latest", input="", prompts_file="", w=3.0, steps=0,
                     sampler="ddim", seed=0, batch_size=64, out="")
  c.edit = dict(edit_common, strength=0.6)
  # paste_back: the output is the input exactly where the mask is 0. method: '' (the model
  # itself for an inpainting model, else replacement), 'model' or 'replacement'.
  c.inpaint = dict(edit_common, paste_back=True, method="")
  c.eval = dict(w=(0.0, 1.0, 2.0, 4.0), steps=(1, 2, 4, 8, 16), samplers=("ddim", "stochastic"),
                teacher_samplers=("ddim",), num_samples=200, batch_size=500,
                classifier_steps=600, seed=0, inception_weights="",
                prompts_single=300, prompts_two=200, prompts_per_group=12,
                enabled=True,  # enabled: evaluate at a pipeline's end
                # edits: the editing / inpainting evaluation of shapes and digits
                # (gdistill/edit_eval.py): edit_images per task, at edit_w, the teacher (N0
                # steps) and the students of edit_steps, edits at each of edit_strengths, in
                # batches of edit_batch_size. The main sweep's results do not depend on these
                # keys: changing them on a finished workdir re-runs only the editing table.
                edits=True, edit_w=3.0, edit_strengths=(0.4, 0.6, 0.8), edit_steps=(1, 2, 4),
                edit_images=120, edit_batch_size=64)
  return c


# Every config key that holds a path (resolve_paths makes them absolute at the entry points).
PATH_KEYS = ("init_from", "data.data_dir", "sample.out", "eval.inception_weights",
             "vae.init_from", "sample.prompts_file", "sample.latents_out", "text.tokenizer_path",
             "edit.input", "edit.prompts_file", "edit.out", "inpaint.input",
             "inpaint.prompts_file", "inpaint.out")


def resolve_paths(c):
  """The config with every PATH_KEYS value resolved (gdistill/paths.py: relative -> absolute
  against the current directory, '~' expanded, remote and empty paths unchanged). In place;
  returns c. Idempotent, so every entry point may call it."""
  from gdistill import paths
  for key in PATH_KEYS:
    node, parts = c, key.split(".")
    for part in parts[:-1]:
      node = node[part]
    value = node[parts[-1]]
    if isinstance(value, str):
      node[parts[-1]] = paths.resolve(value)
  return c


def config_hash(section) -> str:
  """Stable short hash of a ConfigDict section (or any JSON-able value)."""
  d = section.to_dict() if hasattr(section, "to_dict") else section
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


ARCH_KEYS = ("name", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "head_dim",
             "num_groups", "resblock_updown", "num_classes", "channels", "image_size",
             "parametrization", "w_scale", "param_dtype")
# unet2d_condition adds these (pixel models keep their hash: old exports still fit).
SD_ARCH_KEYS = ("conditioning", "block_out_channels", "down_block_types", "up_block_types",
                "layers_per_block", "attention_head_dim", "time_cond_proj_dim",
                "use_linear_projection")
TEXT_ARCH_KEYS = ("max_length", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "hidden_act")
VAE_ARCH_KEYS = ("image_channels", "block_out_channels", "layers_per_block", "latent_channels",
                 "norm_num_groups")


def _pick(section, keys) -> dict:
  d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  return {k: (list(d[k]) if isinstance(d[k], (tuple, list)) else d[k]) for k in keys}


def arch_dict(model_cfg) -> dict:
  """The model keys that fix the parameters (not dropout, compute dtype or remat)."""
  keys = ARCH_KEYS + (SD_ARCH_KEYS if model_cfg["name"] == "unet2d_condition" else ())
  # An inpainting model records it (other models keep their hash: old exports still fit).
  keys += ("inpainting",) if model_cfg.get("inpainting") else ()
  # So does a text-pooled timestep embedding (diffusers' addition_embed_type 'text').
  keys += (("addition_embed_type", "addition_embed_type_num_heads")
           if model_cfg.get("addition_embed_type") else ())
  return _pick(model_cfg, keys)


def text_arch_dict(text_cfg) -> dict:
  return _pick(text_cfg, TEXT_ARCH_KEYS)


def vae_arch_dict(vae_cfg) -> dict:
  return _pick(vae_cfg, VAE_ARCH_KEYS)


def arch_hash(model_cfg) -> str:
  return config_hash(arch_dict(model_cfg))
