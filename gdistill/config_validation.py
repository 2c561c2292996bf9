"""Config validation: `validate(config, ...)` refuses the first value that cannot work
(config_lib.ConfigError naming the key, the value and what is valid), before anything compiles.
The accepted values of the enumerated keys live here too; the defaults are gdistill/config_lib.py.
"""
from __future__ import annotations

import math

from gdistill import plan as plan_lib
from gdistill.config_lib import ConfigError

STAGES = ("autoencoder", "teacher", "guided", "progressive", "pipeline")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "cosine", "linear")
MODELS = ("unet", "mlp", "unet2d_condition")
DATASETS = ("digits", "toy2d", "cifar10", "imagenet64", "shapes", "image_folder", "webdataset")
FILE_DATASETS = ("image_folder", "webdataset")  # gdistill/data/files.py
CONDITIONING = ("label", "text")
BLOCK_TYPES = {"down": ("CrossAttnDownBlock2D", "DownBlock2D"),
               "up": ("CrossAttnUpBlock2D", "UpBlock2D")}



def _is_pow2(n) -> bool:
  return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def _need(ok: bool, key: str, value, valid: str):
  if not ok:
    raise ConfigError(f"config.{key}={value!r} is invalid: {valid}")


def _names_a_key(c, name: str) -> bool:
  """A dotted key of c ('teacher.lr'), or a key of one of its sections ('lr')."""
  node = c
  for part in name.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      break
    node = node[part]
  else:
    return True
  return "." not in name and any(hasattr(c[k], "keys") and name in c[k].keys() for k in c.keys())


def _validate_sd_unet(c):
  m = c.model
  n = len(m.block_out_channels)
  for key, kinds in (("down_block_types", BLOCK_TYPES["down"]),
                     ("up_block_types", BLOCK_TYPES["up"])):
    types = tuple(m[key])
    _need(len(types) == n and all(t in kinds for t in types), f"model.{key}", types,
          f"{n} entries (one per block_out_channels), each one of {kinds}")
  _need(m.image_size % 2 ** (n - 1) == 0, "model.image_size", m.image_size,
        f"must be divisible by 2^(levels-1) = {2 ** (n - 1)} for block_out_channels="
        f"{tuple(m.block_out_channels)}")
  heads = (m.attention_head_dim if isinstance(m.attention_head_dim, int)
           else tuple(m.attention_head_dim))
  for i, ch in enumerate(m.block_out_channels):
    _need(ch % m.num_groups == 0, "model.num_groups", m.num_groups,
          f"must divide every block's channels ({ch})")
    h = heads if isinstance(heads, int) else heads[i]
    _need(ch % h == 0, "model.attention_head_dim", m.attention_head_dim,
          f"the number of heads (diffusers' attention_head_dim) must divide the channels ({ch})")
  _need(m.conditioning == "text", "model.conditioning", m.conditioning,
        "model.name='unet2d_condition' is conditioned on text ('text')")
  _need(c.diffusion.schedule != "cosine", "diffusion.schedule", c.diffusion.schedule,
        "model.name='unet2d_condition' takes a discrete timestep: 'scaled_linear' or 'linear'")
  _need(m.time_cond_proj_dim >= 2, "model.time_cond_proj_dim", m.time_cond_proj_dim,
        "the students' w-embedding size, >= 2 (diffusers: 256)")
  t = c.text
  _need(m.addition_embed_type in ("", "text"), "model.addition_embed_type",
        m.addition_embed_type, "'' (none, SD 1.x / 2.x) or 'text' (diffusers' TextTimeEmbedding: "
        "the caption pooled into the timestep embedding)")
  _need(not m.addition_embed_type or (m.addition_embed_type_num_heads >= 1
        and t.hidden_size % m.addition_embed_type_num_heads == 0),
        "model.addition_embed_type_num_heads", m.addition_embed_type_num_heads,
        f"must divide text.hidden_size ({t.hidden_size})")
  _need(t.max_length >= 2 and t.hidden_size % t.num_attention_heads == 0, "text",
        (t.max_length, t.hidden_size, t.num_attention_heads),
        "max_length >= 2 and num_attention_heads dividing hidden_size")
  _need(t.hidden_act in ("quick_gelu", "gelu"), "text.hidden_act", t.hidden_act,
        "'quick_gelu' or 'gelu'")
  _need(t.tokenizer in ("word", "clip"), "text.tokenizer", t.tokenizer, "'word' or 'clip'")


def _validate_file_data(c):
  d, m = c.data, c.model  # data_dir is checked when the files are opened (not for compile)
  want = c.vae.image_size if c.vae.enabled else m.image_size
  _need(d.image_size == want, "data.image_size", d.image_size,
        f"the resolution images are cropped to: {want} "
        f"({'vae.image_size' if c.vae.enabled else 'model.image_size'})")
  _need(d.holdout >= 0 and d.decode_threads >= 1, "data.holdout/decode_threads",
        (d.holdout, d.decode_threads), "holdout >= 0 and decode_threads >= 1")
  _need(m.conditioning == "text", "model.conditioning", m.conditioning,
        f"data.name={d.name!r} has captions, no labels: 'text'")
  _need(c.text.tokenizer == "clip", "text.tokenizer", c.text.tokenizer,
        "'clip' (with text.tokenizer_path, or init_from a diffusers directory): the word "
        "tokenizer needs the closed vocabulary of an embedded dataset, these captions are "
        "free text")
  _need(not (c.stage == "pipeline" and c.eval.enabled),
        "eval.enabled", c.eval.enabled,
        f"False: the evaluation table scores samples with an embedded dataset's own classifier "
        f"(digits, shapes); data.name={d.name!r} has none")
  _need(not (plan_lib.trains_autoencoder(c) and c.stage in ("pipeline", "autoencoder"))
        or d.holdout >= 1, "data.holdout", d.holdout,
        ">= 1: the autoencoder stage reports its PSNR on held-out images")


def _validate_vae(c):
  v, m = c.vae, c.model
  f = 2 ** (len(v.block_out_channels) - 1)
  _need(v.image_size % f == 0, "vae.image_size", v.image_size,
        f"must be divisible by the autoencoder's downsampling factor {f}")
  _need((m.image_size, m.channels) == (v.image_size // f, v.latent_channels),
        "model.image_size/channels", (m.image_size, m.channels),
        f"the latents of vae={v.image_size}x{v.image_size} / {f} with {v.latent_channels} "
        f"channels: ({v.image_size // f}, {v.latent_channels})")
  for ch in v.block_out_channels:
    _need(ch % v.norm_num_groups == 0, "vae.norm_num_groups", v.norm_num_groups,
          f"must divide every block's channels ({ch})")
  _need(not c.data.random_flip or c.data.name in FILE_DATASETS, "data.random_flip",
        c.data.random_flip, "must be False for a latent model on an embedded dataset (its "
        "training images are encoded once; image-caption files are encoded batch by batch)")


def validate(c, *, num_devices: int, num_processes: int = 1, dataset_info=None):
  """Raises ConfigError for the first value that cannot work. Call before any compile."""
  _need(c.stage in STAGES, "stage", c.stage, f"one of {STAGES}")
  m, dcfg = c.model, c.diffusion
  _need(m.name in MODELS, "model.name", m.name, f"one of {MODELS}")
  _need(c.data.name in DATASETS, "data.name", c.data.name, f"one of {DATASETS}")
  _need(c.data.variant in (("", "full", "tiny") if c.data.name == "shapes" else ("",)),
        "data.variant", c.data.variant,
        "'' (the dataset's own), or for shapes 'full' / 'tiny' (512 images, for tests)")
  if c.data.name in FILE_DATASETS:
    _validate_file_data(c)
  for k in ("normalize_on_device", "tf_hide_accelerators", "random_flip"):
    _need(isinstance(c.data[k], bool), f"data.{k}", c.data[k], "True or False")
  for k in ("tf_intra_op_threads", "tf_inter_op_threads"):
    _need(isinstance(c.data[k], int) and not isinstance(c.data[k], bool) and c.data[k] >= 0,
          f"data.{k}", c.data[k], "an integer >= 0 (0: TensorFlow's default, one per core)")
  from gdistill import diffusion
  _need(m.parametrization in diffusion.PARAMETRIZATIONS, "model.parametrization",
        m.parametrization, f"one of {diffusion.PARAMETRIZATIONS}")
  _need(dcfg.weighting in diffusion.WEIGHTINGS, "diffusion.weighting", dcfg.weighting,
        f"one of {diffusion.WEIGHTINGS}")
  for name in ("teacher", "guided", "progressive"):
    _need(c[name].weighting in ("",) + diffusion.WEIGHTINGS, f"{name}.weighting",
          c[name].weighting, f"'' (diffusion.weighting) or one of {diffusion.WEIGHTINGS}")
  for name in ("guided", "progressive"):
    _need(isinstance(c[name].w_power, (int, float)) and not isinstance(c[name].w_power, bool)
          and c[name].w_power >= 0, f"{name}.w_power", c[name].w_power,
          "a number >= 0 (0: the paper's unweighted mean over w)")
  sp = m.student_parametrization
  same_width = tuple(p for p in diffusion.PARAMETRIZATIONS if p != "both")
  _need(sp == "" or (sp in same_width and m.parametrization in same_width)
        or sp == m.parametrization, "model.student_parametrization", sp,
        f"'' (model.parametrization) or, for a teacher predicting one of {same_width}, another "
        "of them (the students start from the teacher's weights)")
  for k in ("dtype", "param_dtype"):
    _need(m[k] in DTYPES, f"model.{k}", m[k], f"one of {DTYPES}")
  _need(0.0 <= dcfg.p_uncond < 1.0, "diffusion.p_uncond", dcfg.p_uncond, "must lie in [0, 1)")
  _need(dcfg.w_min <= dcfg.w_max, "diffusion.w_min", dcfg.w_min,
        f"must be <= diffusion.w_max={dcfg.w_max}")
  _need(dcfg.w_min >= 0.0, "diffusion.w_min", dcfg.w_min, "guidance strength w must be >= 0")
  _need(dcfg.logsnr_min < dcfg.logsnr_max, "diffusion.logsnr_min", dcfg.logsnr_min,
        f"must be < diffusion.logsnr_max={dcfg.logsnr_max}")
  from gdistill import schedules
  _need(dcfg.schedule in schedules.KINDS, "diffusion.schedule", dcfg.schedule,
        f"one of {schedules.KINDS}")
  _need(dcfg.num_train_timesteps >= 2, "diffusion.num_train_timesteps",
        dcfg.num_train_timesteps, "must be >= 2")
  _need(0.0 < dcfg.beta_start < dcfg.beta_end < 1.0, "diffusion.beta_start", dcfg.beta_start,
        f"need 0 < beta_start < beta_end={dcfg.beta_end} < 1")
  _need(m.w_scale > 0, "model.w_scale", m.w_scale, "must be > 0")
  _need(isinstance(m.inpainting, bool), "model.inpainting", m.inpainting, "True or False")
  if m.inpainting:
    _need(m.name != "mlp", "model.inpainting", m.inpainting,
          "an image model ('unet' or 'unet2d_condition'; 'mlp' takes flat vectors)")
    weights = c.masks.to_dict()
    _need(all(v >= 0 for v in weights.values()) and sum(weights.values()) > 0, "masks",
          weights, "weights of the mask kinds >= 0 and not all 0 (e.g. --config.masks.box=0.4)")
  p = c.progressive
  _need(_is_pow2(p.start_steps), "progressive.start_steps", p.start_steps,
        "must be a power of two >= 2 (e.g. 1024)")
  _need(p.start_steps >= 2, "progressive.start_steps", p.start_steps, "must be >= 2")
  _need(_is_pow2(p.end_steps), "progressive.end_steps", p.end_steps,
        "must be a power of two (e.g. 1)")
  _need(p.end_steps < p.start_steps, "progressive.end_steps", p.end_steps,
        f"must be < progressive.start_steps={p.start_steps}")
  rounds = [r.student_steps for r in plan_lib.progressive_rounds(p.start_steps, p.end_steps,
                                                                  None)]
  rs = p.get("round_steps", ())
  _need(isinstance(rs, (tuple, list)) and all(
      isinstance(e, (tuple, list)) and len(e) == 2
      and all(isinstance(v, int) and not isinstance(v, bool) for v in e)
      and e[0] in rounds and e[1] >= 1 for e in rs)
        and len({e[0] for e in rs}) == len(rs), "progressive.round_steps", rs,
        f"pairs (N, steps), N one of this plan's rounds {tuple(rounds)} at most once and "
        f"steps >= 1, e.g. '(({rounds[-1] if rounds else 2}, 800),)', or '()' for none")
  sections = (("autoencoder",) * plan_lib.trains_autoencoder(c)
              + ("teacher", "guided", "progressive"))
  for name in sections:
    s = c[name]
    _need(s.schedule in SCHEDULES, f"{name}.schedule", s.schedule, f"one of {SCHEDULES}")
    _need(s.num_steps >= 1, f"{name}.num_steps", s.num_steps, "must be >= 1")
    _need(0.0 <= s.ema_decay < 1.0, f"{name}.ema_decay", s.ema_decay, "must lie in [0, 1)")
    _need(s.lr > 0, f"{name}.lr", s.lr, "must be > 0")
    _need(s.dropout is None or 0.0 <= s.dropout < 1.0, f"{name}.dropout", s.dropout,
          "None (the model's) or in [0, 1)")
    _need(s.batch_size % num_devices == 0, f"{name}.batch_size", s.batch_size,
          f"the global batch must be divisible by the {num_devices} devices")
    _need(s.batch_size % num_processes == 0, f"{name}.batch_size", s.batch_size,
          f"the global batch must be divisible by the {num_processes} processes")
    _need(s.grad_accum >= 1 and s.batch_size % (s.grad_accum * num_devices) == 0,
          f"{name}.grad_accum", s.grad_accum,
          f"must be >= 1 and split {name}.batch_size={s.batch_size} into micro-batches that "
          f"the {num_devices} devices share evenly (batch_size divisible by grad_accum x "
          f"{num_devices})")
  mesh_data, mesh_fsdp = c.mesh.data, c.mesh.fsdp
  _need(mesh_fsdp >= 1 and num_devices % mesh_fsdp == 0, "mesh.fsdp", mesh_fsdp,
        f"must divide the {num_devices} devices")
  want = num_devices // mesh_fsdp
  _need(mesh_data in (-1, want), "mesh.data", mesh_data,
        f"-1 or {want} (devices {num_devices} / fsdp {mesh_fsdp})")
  rule_names = {r[0] for r in c.logical_axis_rules}
  from gdistill.models.layers import LOGICAL_AXES
  missing = [a for a in LOGICAL_AXES if a not in rule_names]
  _need(not missing, "logical_axis_rules", c.logical_axis_rules,
        f"must map every logical axis; missing {missing}")
  for name, target in c.logical_axis_rules:
    _need(target in (None, "data", "fsdp"), "logical_axis_rules", (name, target),
          "mesh axis must be None, 'data' or 'fsdp'")
  if m.name == "unet":
    levels = len(m.ch_mult)
    _need(m.image_size % (2 ** (levels - 1)) == 0, "model.image_size", m.image_size,
          f"must be divisible by 2^(levels-1) = {2 ** (levels - 1)} for ch_mult={tuple(m.ch_mult)}")
    reached = {m.image_size // 2 ** i for i in range(levels)}
    bad = [r for r in m.attn_resolutions if r not in reached]
    _need(not bad, "model.attn_resolutions", tuple(m.attn_resolutions),
          f"resolutions {bad} are never reached; the U-Net has {sorted(reached, reverse=True)}")
    for mult in list(m.ch_mult) + [1]:
      ch = m.ch * mult
      _need(ch % m.num_groups == 0, "model.num_groups", m.num_groups,
            f"must divide every level's channels (ch {m.ch} x mult {mult} = {ch})")
      _need(not m.attn_resolutions or ch % m.head_dim == 0, "model.head_dim", m.head_dim,
            f"must divide the channels of attention levels (ch {m.ch} x mult {mult} = {ch})")
  if m.name == "unet2d_condition":
    _validate_sd_unet(c)
  _need(m.conditioning in CONDITIONING, "model.conditioning", m.conditioning,
        f"one of {CONDITIONING}")
  _need(m.conditioning == "label" or m.name == "unet2d_condition", "model.conditioning",
        m.conditioning, f"'text' needs model.name='unet2d_condition', not {m.name!r}")
  if c.vae.enabled:
    _validate_vae(c)
  ac = c.autoencoder
  _need(ac.kl_weight >= 0 and ac.l1_weight >= 0 and ac.scale_examples >= 2,
        "autoencoder.kl_weight/l1_weight/scale_examples",
        (ac.kl_weight, ac.l1_weight, ac.scale_examples),
        "kl_weight >= 0, l1_weight >= 0 and scale_examples >= 2")
  if dataset_info is not None:
    if c.vae.enabled:
      want_shape = (c.vae.image_size, c.vae.image_size, c.vae.image_channels)
      key, value = "vae.image_size/image_channels", (c.vae.image_size, c.vae.image_channels)
    else:
      want_shape = ((m.image_size, m.image_size, m.channels) if m.name != "mlp"
                    else (m.channels,))
      key, value = "model.image_size/channels", (m.image_size, m.channels)
    _need(tuple(dataset_info.shape) == want_shape, key, value,
          f"dataset {dataset_info.name!r} has examples of shape {tuple(dataset_info.shape)}, "
          f"the {'autoencoder' if c.vae.enabled else 'model'} expects {want_shape}")
    if m.conditioning == "text":
      _need(dataset_info.captioned, "model.conditioning", m.conditioning,
            f"dataset {dataset_info.name!r} has class labels, no captions (use 'label')")
    else:
      _need(not dataset_info.captioned, "model.conditioning", m.conditioning,
            f"dataset {dataset_info.name!r} has captions: use 'text'")
      _need(dataset_info.num_classes == m.num_classes, "model.num_classes", m.num_classes,
            f"dataset {dataset_info.name!r} has {dataset_info.num_classes} classes")
  from gdistill import sampling
  _need(c.sample.sampler in sampling.SAMPLERS, "sample.sampler", c.sample.sampler,
        f"one of {sampling.SAMPLERS}")
  for key in ("samplers", "teacher_samplers"):
    for s in c.eval[key]:
      _need(s in sampling.SAMPLERS, f"eval.{key}", tuple(c.eval[key]),
            f"each one of {sampling.SAMPLERS}")
  _need(math.isfinite(c.sample.w) and c.sample.w >= 0, "sample.w", c.sample.w, "must be >= 0")
  _need(c.sample.stage == "latest" or bool(plan_lib.STAGE_RE.match(c.sample.stage)),
        "sample.stage", c.sample.stage, plan_lib.STAGE_HELP)
  _need(c.sample.steps >= 0, "sample.steps", c.sample.steps, "must be >= 0 (0: the stage's own)")
  for k in ("num_samples", "batch_size"):
    _need(c.sample[k] >= 1, f"sample.{k}", c.sample[k], "must be >= 1")
  _need(c.sample.out == "" or c.sample.out.endswith(".npz"), "sample.out", c.sample.out,
        "must be an .npz path ('' for <workdir>/samples.npz)")
  for entry in (a.strip() for a in str(c.allow_changes).split(",") if a.strip()):
    _need(entry == "all" or _names_a_key(c, entry), "allow_changes", c.allow_changes,
          f"{entry!r} is not a config key: comma-separated keys such as 'teacher.lr' or 'lr' "
          "(that key in every section), or 'all'")
  e = c.eval
  _need(len(e.samplers) >= 1, "eval.samplers", tuple(e.samplers), "must name a sampler")
  _need(len(e.w) >= 1 and all(math.isfinite(w) and w >= 0 for w in e.w), "eval.w", tuple(e.w),
        "a non-empty tuple of guidance strengths >= 0")
  _need(len(e.steps) >= 1 and all(isinstance(n, int) and n >= 1 for n in e.steps),
        "eval.steps", tuple(e.steps), "a non-empty tuple of step counts >= 1")
  _need(e.num_samples >= 2, "eval.num_samples", e.num_samples, "must be >= 2 (FID needs a "
        "covariance)")
  for k in ("batch_size", "classifier_steps"):
    _need(e[k] >= 1, f"eval.{k}", e[k], "must be >= 1")
