"""Stable Diffusion checkpoints in diffusers layout, in and out. No torch: safetensors' numpy API.

In:  read(directory) -> Pipeline: the gdistill config sections (model, text, vae, diffusion)
     that rebuild the checkpoint's architecture, its schedule and parametrisation, the CLIP BPE
     tokenizer, and readers of the U-Net, text encoder and VAE weights that place each
     parameter straight into its sharding (`read_params(..., shardings)`: a process reads only
     the slices of its own devices, one tensor at a time).
Out: write(directory, ...) -> a diffusers directory: model_index.json, unet/ (with
     time_cond_proj_dim for a w-conditioned student: its w-embedding is
     time_embedding.cond_proj), vae/, text_encoder/, tokenizer/, scheduler/ (a DDIMScheduler,
     trailing spacing, that reproduces gdistill's sampler exactly: schedules.py).

The parameter renaming and layouts are gdistill/weight_map.py's table. What this cannot
represent is refused by name (read() lists every unsupported field):

  Stable Diffusion 1.x                          supported (epsilon, CLIP ViT-L/14)
  Stable Diffusion 2.x (512 and 768-v)          supported (epsilon or v_prediction; OpenCLIP-H
                                                with its last layer removed, as diffusers ships
                                                it: 23 layers, last_hidden_state)
  SDXL (text_encoder_2, added time / text ids)  refused: two text encoders and the
                                                addition embedding are not implemented
  inpainting U-Nets (in_channels 9)             supported (model.inpainting: latents 4, mask 1,
                                                masked-image latents 4, gdistill/inpainting.py;
                                                written back as StableDiffusionInpaintPipeline)
  .bin (pickle) weights                         refused: convert to safetensors
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional

import numpy as np

from gdistill import schedules, weight_map
from gdistill.clip_tokenizer import CLIPTokenizer

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline")
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors",
           "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}

# UNet2DConditionModel config fields and the values gdistill's U-Net implements (a field absent
# from a config takes diffusers' default, which is the value here).
_UNET_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
    "conv_in_kernel": 3, "conv_out_kernel": 3, "only_cross_attention": False,
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim_act": None, "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "reverse_transformer_layers_per_block": None, "attention_type": "default",
    "num_attention_heads": None, "transformer_layers_per_block": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "dropout": 0.0,
}
_VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
              "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None,
              "latents_std": None}
_TEXT_FIXED = {"layer_norm_eps": 1e-5}


class UnsupportedCheckpointError(ValueError):
  """A checkpoint gdistill cannot represent; the message names every reason."""


def _json(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: a diffusers Stable Diffusion directory has "
                            "model_index.json, unet/, vae/, text_encoder/, tokenizer/ and "
                            "scheduler/ (save_pretrained's layout)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _check_fixed(config: dict, fixed: dict, where: str) -> list[str]:
  out = []
  for key, want in fixed.items():
    got = config.get(key, want)
    if isinstance(got, list):
      got = tuple(got)
    if got != want and not (key == "transformer_layers_per_block" and isinstance(got, tuple)
                            and all(v == 1 for v in got)):
      out.append(f"{where}: {key}={got!r} (gdistill implements {want!r})")
  return out


def unet_sections(unet: dict, prediction: str) -> tuple[dict, list[str]]:
  """(config.model overrides, problems) of a UNet2DConditionModel config.json."""
  problems = _check_fixed(unet, _UNET_FIXED, "unet/config.json")
  if unet.get("addition_embed_type") not in (None, "text") or unet.get("addition_time_embed_dim"):
    problems.append(f"unet/config.json: addition_embed_type={unet.get('addition_embed_type')!r}"
                    " / addition_time_embed_dim (SDXL's added time and text conditions): "
                    "gdistill implements None and 'text' (TextTimeEmbedding)")
  cin, cout = int(unet.get("in_channels", 4)), int(unet.get("out_channels", 4))
  from gdistill import inpainting
  inpaint = cin == cout + inpainting.extra_channels(cout)   # SD inpainting: 9 = 4 + 1 + 4
  if cin != cout and not inpaint:
    problems.append(f"unet/config.json: in_channels={cin}, out_channels={cout}: only "
                    "in_channels == out_channels, or an inpainting U-Net's 2 out + 1 (9 for 4)")
  heads = unet.get("attention_head_dim", 8)
  model = dict(name="unet2d_condition", conditioning="text", channels=cout,
               inpainting=inpaint,
               image_size=int(unet.get("sample_size") or 64), num_classes=0,
               parametrization=prediction, dropout=0.0,
               num_groups=int(unet.get("norm_num_groups", 32)),
               block_out_channels=tuple(int(c) for c in unet["block_out_channels"]),
               down_block_types=tuple(unet["down_block_types"]),
               up_block_types=tuple(unet["up_block_types"]),
               layers_per_block=unet.get("layers_per_block", 2),
               attention_head_dim=tuple(heads) if isinstance(heads, list) else int(heads),
               use_linear_projection=bool(unet.get("use_linear_projection", False)))
  if isinstance(model["layers_per_block"], list):
    problems.append("unet/config.json: layers_per_block as a list is not supported")
  if unet.get("time_cond_proj_dim"):
    model["time_cond_proj_dim"] = int(unet["time_cond_proj_dim"])
  if unet.get("addition_embed_type") == "text":
    model["addition_embed_type"] = "text"
    model["addition_embed_type_num_heads"] = int(unet.get("addition_embed_type_num_heads", 64))
  return model, problems


def text_sections(text: dict, tokenizer: CLIPTokenizer) -> tuple[dict, list[str]]:
  """(config.text overrides, problems) of a CLIPTextModel config.json."""
  problems = _check_fixed(text, _TEXT_FIXED, "text_encoder/config.json")
  act = text.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    problems.append(f"text_encoder/config.json: hidden_act={act!r} (supported: quick_gelu, "
                    "gelu)")
  arch = text.get("architectures") or ["CLIPTextModel"]
  if arch[0] not in ("CLIPTextModel",):
    problems.append(f"text_encoder/config.json: architectures={arch} (supported: "
                    "CLIPTextModel; CLIPTextModelWithProjection is SDXL's second encoder)")
  positions = int(text.get("max_position_embeddings", 77))
  if tokenizer.max_length != positions:
    problems.append(f"tokenizer model_max_length {tokenizer.max_length} != text encoder "
                    f"max_position_embeddings {positions}")
  if tokenizer.vocab_size > int(text.get("vocab_size", 49408)):
    problems.append(f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the text "
                    f"encoder's vocab_size ({text.get('vocab_size')})")
  return dict(tokenizer="clip", vocab_size=int(text.get("vocab_size", 49408)),
              max_length=positions, hidden_size=int(text["hidden_size"]),
              intermediate_size=int(text["intermediate_size"]),
              num_hidden_layers=int(text["num_hidden_layers"]),
              num_attention_heads=int(text["num_attention_heads"]), hidden_act=act), problems


def vae_sections(vae: dict) -> tuple[dict, float, list[str]]:
  """(config.vae overrides, scaling_factor, problems) of an AutoencoderKL config.json."""
  problems = _check_fixed(vae, _VAE_FIXED, "vae/config.json")
  for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                    ("up_block_types", "UpDecoderBlock2D")):
    if any(t != kind for t in vae.get(key, [kind])):
      problems.append(f"vae/config.json: {key}={vae.get(key)} (supported: {kind} only)")
  out = dict(enabled=True, image_size=int(vae.get("sample_size") or 512),
             image_channels=int(vae.get("in_channels", 3)),
             block_out_channels=tuple(int(c) for c in vae["block_out_channels"]),
             layers_per_block=int(vae.get("layers_per_block", 1)),
             latent_channels=int(vae.get("latent_channels", 4)),
             norm_num_groups=int(vae.get("norm_num_groups", 32)))
  if int(vae.get("out_channels", 3)) != out["image_channels"]:
    problems.append("vae/config.json: in_channels != out_channels")
  return out, float(vae.get("scaling_factor", 0.18215)), problems


@dataclasses.dataclass
class Pipeline:
  """What read() found: gdistill config sections and where the weights are."""
  directory: str
  model: dict          # config.model overrides
  text: dict           # config.text overrides
  vae: dict            # config.vae overrides
  diffusion: dict      # config.diffusion overrides (schedule)
  schedule: schedules.Schedule
  parametrization: str
  scaling_factor: float
  tokenizer: CLIPTokenizer
  configs: dict        # the raw config.json of unet, vae, text_encoder, scheduler

  def weights(self, component: str) -> str:
    return os.path.join(self.directory, component, WEIGHTS[component])

  def apply_to(self, config) -> None:
    """Writes the checkpoint's architecture, schedule and tokenizer into a gdistill config.

    config.vae.image_size stays the config's (the dataset's images; the checkpoint's
    sample_size is only what it was trained at) and the U-Net's input size follows from it
    (the VAE halves the size at each block but the last)."""
    factor = 2 ** (len(self.vae["block_out_channels"]) - 1)
    with config.unlocked():
      config.model.update(self.model)
      config.text.update(self.text)
      config.text.tokenizer_path = os.path.join(self.directory, "tokenizer")
      config.vae.update({k: v for k, v in self.vae.items() if k != "image_size"})
      config.model.image_size = int(config.vae.image_size) // factor
      config.diffusion.update(self.diffusion)


def is_pipeline_dir(path: str) -> bool:
  """Whether path is a diffusers pipeline directory (it has model_index.json)."""
  return bool(path) and os.path.isfile(os.path.join(os.path.expanduser(path),
                                                    "model_index.json"))


def read(directory: str) -> Pipeline:
  """Reads a diffusers Stable Diffusion directory's configs and tokenizer (not the weights);
  raises UnsupportedCheckpointError listing every field gdistill cannot represent."""
  directory = os.path.abspath(os.path.expanduser(directory))
  index = _json(os.path.join(directory, "model_index.json"))
  problems = []
  cls = index.get("_class_name")
  if "text_encoder_2" in index or "tokenizer_2" in index:
    problems.append(f"model_index.json: {cls} has text_encoder_2 / tokenizer_2: SDXL (two "
                    "text encoders and added conditions) is not supported")
  elif cls not in PIPELINES:
    problems.append(f"model_index.json: _class_name={cls!r} (supported: {PIPELINES})")
  for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    if component not in index or not os.path.isdir(os.path.join(directory, component)):
      problems.append(f"component {component}/ is missing")
  if problems:
    raise UnsupportedCheckpointError(f"{directory}: " + "; ".join(problems))
  for component, name in WEIGHTS.items():
    path = os.path.join(directory, component, name)
    if not os.path.exists(path):
      others = sorted(os.listdir(os.path.join(directory, component)))
      hint = (" (only .bin pickle weights: convert them to safetensors with diffusers, "
              "gdistill reads no pickles)" if any(o.endswith(".bin") for o in others) else "")
      problems.append(f"{component}/{name} is missing{hint}; found {others}")
  scheduler = _json(os.path.join(directory, "scheduler", "scheduler_config.json"))
  try:
    schedule, prediction = schedules.from_diffusers(scheduler, "scheduler/scheduler_config.json")
  except ValueError as e:
    problems.append(str(e))
    schedule, prediction = schedules.Schedule("scaled_linear"), "eps"
  tokenizer = CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
  unet_cfg = _json(os.path.join(directory, "unet", "config.json"))
  text_cfg = _json(os.path.join(directory, "text_encoder", "config.json"))
  vae_cfg = _json(os.path.join(directory, "vae", "config.json"))
  model, p1 = unet_sections(unet_cfg, prediction)
  text, p2 = text_sections(text_cfg, tokenizer)
  vae, scale, p3 = vae_sections(vae_cfg)
  problems += p1 + p2 + p3
  if int(unet_cfg.get("cross_attention_dim", 768)) != text["hidden_size"]:
    problems.append(f"unet cross_attention_dim {unet_cfg.get('cross_attention_dim')} != text "
                    f"encoder hidden_size {text['hidden_size']}")
  if vae["latent_channels"] != model["channels"]:
    problems.append(f"vae latent_channels {vae['latent_channels']} != unet in_channels "
                    f"{model['channels']}")
  if problems:
    raise UnsupportedCheckpointError(
        f"{directory} cannot be loaded:\n  " + "\n  ".join(problems))
  diffusion = dict(schedule=schedule.kind, num_train_timesteps=schedule.num_train_timesteps,
                   beta_start=schedule.beta_start, beta_end=schedule.beta_end, clip_x=False)
  return Pipeline(directory, model, text, vae, diffusion, schedule, prediction, scale,
                  tokenizer, dict(unet=unet_cfg, vae=vae_cfg, text_encoder=text_cfg,
                                  scheduler=scheduler))


def read_params(path: str, template: Mapping, family: str,
                shardings: Optional[Mapping] = None) -> dict:
  """The parameters of a safetensors file in `template`'s structure (weight_map's table).

  shardings: a tree like template of jax Shardings: every leaf is built with
  jax.make_array_from_callback, so each process reads only the slices its devices hold, one
  tensor at a time (host memory: the largest slice, not the model). Without shardings the
  leaves are numpy arrays, in the template's dtypes."""
  from safetensors import safe_open
  with safe_open(path, framework="np") as f:
    keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def get(key, index):
      s = f.get_slice(key)
      return s[:] if index is None else s[index]

    place = None
    if shardings is not None:
      import jax
      flat_sh = weight_map.flatten(shardings)

      def place(path_, shape, dtype, read):
        del dtype  # read() returns the template's dtype
        return jax.make_array_from_callback(shape, flat_sh[path_], read)
    return weight_map.params_from_state(template, family, get, keys, source=path,
                                        place=place)


# ------------------------------------------------------------------------------------- out
def unet_config(model: Mapping, text: Mapping, time_cond_proj_dim: Optional[int]) -> dict:
  """diffusers' UNet2DConditionModel config.json of a gdistill config.model / config.text."""
  heads = model["attention_head_dim"]
  from gdistill import diffusion, inpainting
  out_channels = diffusion.output_channels(model["parametrization"], int(model["channels"]))
  return {"_class_name": "UNet2DConditionModel", "sample_size": int(model["image_size"]),
          "in_channels": int(model["channels"]) + (inpainting.extra_channels(
              int(model["channels"])) if model.get("inpainting") else 0),
          "out_channels": int(out_channels),
          "down_block_types": list(model["down_block_types"]),
          "up_block_types": list(model["up_block_types"]),
          "block_out_channels": [int(c) for c in model["block_out_channels"]],
          "layers_per_block": int(model["layers_per_block"]),
          "cross_attention_dim": int(text["hidden_size"]),
          "attention_head_dim": list(heads) if isinstance(heads, (list, tuple)) else int(heads),
          "norm_num_groups": int(model["num_groups"]), "norm_eps": 1e-5,
          "use_linear_projection": bool(model.get("use_linear_projection", False)),
          "time_cond_proj_dim": time_cond_proj_dim, "flip_sin_to_cos": True, "freq_shift": 0,
          "addition_embed_type": model.get("addition_embed_type") or None,
          "addition_embed_type_num_heads": int(model.get("addition_embed_type_num_heads", 64))}


def vae_config(vae: Mapping, scaling_factor: float) -> dict:
  n = len(vae["block_out_channels"])
  return {"_class_name": "AutoencoderKL", "in_channels": int(vae["image_channels"]),
          "out_channels": int(vae["image_channels"]),
          "down_block_types": ["DownEncoderBlock2D"] * n,
          "up_block_types": ["UpDecoderBlock2D"] * n,
          "block_out_channels": [int(c) for c in vae["block_out_channels"]],
          "layers_per_block": int(vae["layers_per_block"]),
          "latent_channels": int(vae["latent_channels"]),
          "norm_num_groups": int(vae["norm_num_groups"]),
          "sample_size": int(vae["image_size"]), "scaling_factor": float(scaling_factor)}


def text_config(text: Mapping, tokenizer: CLIPTokenizer) -> dict:
  return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
          "vocab_size": int(text["vocab_size"]), "hidden_size": int(text["hidden_size"]),
          "intermediate_size": int(text["intermediate_size"]),
          "num_hidden_layers": int(text["num_hidden_layers"]),
          "num_attention_heads": int(text["num_attention_heads"]),
          "max_position_embeddings": int(text["max_length"]),
          "hidden_act": text["hidden_act"], "layer_norm_eps": 1e-5,
          "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
          "pad_token_id": tokenizer.pad_id, "torch_dtype": "float32"}


def _save(state: dict, path: str) -> None:
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, path,
            metadata={"format": "pt"})


def _write_json(path: str, obj: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def write(directory: str, *, model: Mapping, text: Mapping, vae: Mapping,
          unet_params: Mapping, text_params: Mapping, vae_params: Mapping,
          scaling_factor: float, tokenizer: CLIPTokenizer, schedule: schedules.Schedule,
          parametrization: str, time_cond_proj_dim: Optional[int]) -> None:
  """Writes a diffusers StableDiffusionPipeline directory (see the module doc)."""
  if not isinstance(tokenizer, CLIPTokenizer):
    raise TypeError(f"a diffusers pipeline needs a CLIP BPE tokenizer; this model's is "
                    f"{tokenizer!r}")
  if parametrization not in schedules.PREDICTION_TYPES.values():
    raise ValueError(f"parametrization {parametrization!r} has no diffusers prediction_type")
  conv_1x1 = None
  if not model.get("use_linear_projection", False):
    conv_1x1 = lambda path: path[-2] in ("proj_in", "proj_out")
  _save(weight_map.state_from_params(unet_params, "unet", conv_1x1=conv_1x1),
        os.path.join(directory, "unet", WEIGHTS["unet"]))
  _write_json(os.path.join(directory, "unet", "config.json"),
              unet_config(model, text, time_cond_proj_dim))
  _save(weight_map.state_from_params(vae_params, "vae"),
        os.path.join(directory, "vae", WEIGHTS["vae"]))
  _write_json(os.path.join(directory, "vae", "config.json"), vae_config(vae, scaling_factor))
  _save(weight_map.state_from_params(text_params, "text"),
        os.path.join(directory, "text_encoder", WEIGHTS["text_encoder"]))
  _write_json(os.path.join(directory, "text_encoder", "config.json"),
              text_config(text, tokenizer))
  tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
  _write_json(os.path.join(directory, "scheduler", "scheduler_config.json"),
              schedules.diffusers_scheduler_config(schedule, parametrization))
  _write_json(os.path.join(directory, "model_index.json"), {
      "_class_name": PIPELINES[int(bool(model.get("inpainting")))],
      "_diffusers_version": "0.42.1",
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
      "feature_extractor": [None, None], "image_encoder": [None, None],
      "requires_safety_checker": False})
