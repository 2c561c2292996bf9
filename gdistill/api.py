"""Python API: load a finished stage of a workdir and sample from it.

  model = gdistill.load("workdirs/digits")               # the last finished stage
  x = model.sample(np.arange(10), w=2.0)                 # float32 [10, 8, 8, 1] in [-1, 1]
  teacher = gdistill.load("workdirs/digits", "teacher")  # guided DDIM, 2 NFE per step
  model = gdistill.load("workdirs/shapes")               # a latent text-to-image student
  x = model.sample(prompts=["a red circle in the top left"], w=3.0, steps=4, rng=0)
                                                         # decoded: float32 [1, 32, 32, 3]

The model is rebuilt from <workdir>/config.json (written by driver.prepare) with the
architecture and schedule each export records in its metadata.json; parameters are replicated
over all devices and every batch is split over them. One compiled sampler serves every step
count (N is traced) for a given sampler kind and batch size.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from gdistill import autoencoding, conditioning
from gdistill import checkpoint as ckpt_lib
from gdistill import paths, sampling, schedules, sharding
from gdistill.denoiser import Denoiser, build_denoiser
from gdistill.plan import STAGE_HELP, STAGE_RE, plan_order
from gdistill.stage_setup import data_shape, example_shape, export_dir, is_finished


class StageNotFoundError(FileNotFoundError):
  """The asked stage has no finished export in the workdir."""


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (<workdir>/config.json)."""
  path = os.path.join(workdir, "config.json")
  if not paths.exists(path):
    raise FileNotFoundError(f"{path} is missing: {workdir!r} is not a gdistill workdir "
                            "(train writes config.json before its first stage)")
  from gdistill import config_lib
  # Keys added to gdistill after the workdir was written take their defaults.
  return ml_collections.ConfigDict(_merge(config_lib.base_config().to_dict(),
                                          paths.read_json(path)))


def _merge(defaults: dict, saved: dict) -> dict:
  out = dict(defaults)
  for k, v in saved.items():
    out[k] = _merge(defaults[k], v) if isinstance(v, dict) and isinstance(
        defaults.get(k), dict) else v
  return out


def finished_stages(workdir: str) -> list[str]:
  """Names of the stages that sample (not the autoencoder) with a complete export, in plan
  order (teacher, guided, N desc)."""
  names = [n for n in paths.listdir(workdir) if STAGE_RE.match(n) and n != "autoencoder"
           and is_finished(workdir, n)]
  return sorted(names, key=plan_order)


def resolve_stage(workdir: str, stage: str = "latest") -> str:
  """The stage name `stage` means in this workdir; StageNotFoundError lists what exists."""
  available = finished_stages(workdir)
  if stage == "autoencoder":
    raise StageNotFoundError("stage 'autoencoder' does not sample: load a teacher or a student "
                             f"(finished in {workdir}: {available or 'none'}); its export "
                             "decodes their latents")
  if stage != "latest" and not STAGE_RE.match(stage):
    raise StageNotFoundError(f"stage={stage!r} is not a stage name; valid: {STAGE_HELP}. "
                             f"Finished exports in {workdir}: {available or 'none'}")
  if not available:
    raise StageNotFoundError(f"{workdir} has no finished export (no <stage>/export/"
                             "metadata.json); train a stage first")
  if stage == "latest":
    return available[-1]
  if stage not in available:
    raise StageNotFoundError(f"{workdir} has no finished export for stage {stage!r}; "
                             f"available: {available}")
  return stage


def _stage_config(config, metadata: dict) -> ml_collections.ConfigDict:
  """A copy of config whose model has the architecture the export recorded (the params fit
  it even if config.json was rewritten since)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(metadata["model"])
  config.model.parametrization = metadata["parametrization"]  # a student's may differ
  if metadata.get("text"):
    config.text.update(metadata["text"])
  return config


# Stages of one architecture share denoisers and samplers: parameters are arguments, so a
# second stage (or a second Model of the same stage) compiles nothing new.
_DENOISERS: dict = {}
_SAMPLERS: dict = {}


def _denoiser(config, metadata: dict, tokenizer) -> Denoiser:
  w = bool(metadata["w_conditioned"])
  key = json.dumps([config.model.to_dict(), config.text.to_dict(), metadata["schedule"], w,
                    None if tokenizer is None else tokenizer.to_json()], sort_keys=True)
  if key not in _DENOISERS:
    _DENOISERS[key] = build_denoiser(config.model, w_embedding=w, dropout=0.0,
                                     schedule=schedules.from_dict(metadata["schedule"]),
                                     text_cfg=config.text, tokenizer=tokenizer)
  return _DENOISERS[key]


def _shared_sampler(den: Denoiser, spec: sampling.SamplerSpec, shape):
  key = (id(den), spec, tuple(shape))
  if key not in _SAMPLERS:
    _SAMPLERS[key] = sampling.make_sampler(den, spec, shape)
  return _SAMPLERS[key]


class Model:
  """One exported stage, ready to sample. Build it with `gdistill.load`.

  Class-conditional models sample from labels, text models from prompts (tokenized as the
  model was trained); a latent model's samples are decoded by its autoencoder, so sample()
  returns images either way.
  """

  def __init__(self, *, workdir: str, stage: str, config, metadata: dict, params, mesh,
               denoiser: Denoiser, tokenizer=None,
               latents: Optional[autoencoding.Latents] = None):
    self.workdir, self.stage, self.config, self.metadata = workdir, stage, config, metadata
    self.params, self.mesh, self.denoiser = params, mesh, denoiser
    self.tokenizer, self.latents = tokenizer, latents
    self.example_shape = example_shape(config)       # what the sampler produces
    self.image_shape = data_shape(config)            # what sample() returns
    self._decode = latents.decoder() if latents is not None else None
    self.schedule = schedules.from_dict(metadata["schedule"])
    self._clip = (-1.0, 1.0) if config.diffusion.clip_x else None
    self._blocks: dict = {}

  @property
  def inpainting(self) -> bool:
    """Whether this is an inpainting model (it takes the mask and the masked image)."""
    return bool(self.denoiser.inpainting)

  def inpaint_condition(self, x, masks):
    """An inpainting model's [mask, masked image] block (gdistill/inpainting.py) of images x
    [B, H, W, C] in [-1, 1] and masks [B, H, W, 1], on the devices (jitted once)."""
    if "block" not in self._blocks:
      from gdistill import inpainting  # pylint: disable=import-outside-toplevel
      if self.latents is None:
        fn = jax.jit(lambda p, x, m: inpainting.condition(x, m))
      else:
        fn = jax.jit(lambda p, x, m: inpainting.condition(
            x, m, lambda im: self.latents.encode(p, im)))
      self._blocks["block"] = fn
    params = None if self.latents is None else self.latents.params
    sh = (sharding.batch_sharding(self.mesh) if len(x) % self.mesh.devices.size == 0
          else sharding.replicated(self.mesh))
    return self._blocks["block"](params, jax.device_put(np.asarray(x, np.float32), sh),
                                 jax.device_put(np.asarray(masks, np.float32), sh))

  def generation_condition(self, batch: int):
    """The block of a full mask (plain generation) for a batch of `batch`, cached."""
    key = ("generation", int(batch))
    if key not in self._blocks:
      shape = (int(batch),) + tuple(self.image_shape)
      self._blocks[key] = self.inpaint_condition(np.zeros(shape, np.float32),
                                                 np.ones(shape[:-1] + (1,), np.float32))
    return self._blocks[key]

  def cond_batch(self, cond: np.ndarray, block=None):
    """What the sampler takes for one padded batch of conditions: the labels / token ids on
    the devices, for an inpainting model with its image block (block None: generation)."""
    c = jax.device_put(np.asarray(cond, np.int32), sharding.batch_sharding(self.mesh))
    if not self.inpainting:
      return c
    return {"c": c, "inpaint": self.generation_condition(len(cond)) if block is None
            else block}

  @property
  def kind(self) -> str:
    """'teacher' | 'guided' | 'progressive'."""
    return self.metadata["kind"]

  @property
  def is_teacher(self) -> bool:
    return not self.metadata["w_conditioned"]

  @property
  def default_steps(self) -> int:
    """N of a progressive student; config.progressive.start_steps (N0) otherwise."""
    return int(self.metadata.get("sampling_steps") or self.config.progressive.start_steps)

  @property
  def num_classes(self) -> int:
    return int(self.denoiser.num_classes)

  def nfe(self, steps: Optional[int] = None) -> int:
    """Network evaluations for one sample: 2 N for the guided teacher, N for a student."""
    steps = self.default_steps if steps is None else int(steps)
    return (2 if self.is_teacher else 1) * steps

  def spec(self, sampler: str = "ddim") -> sampling.SamplerSpec:
    """Any sampler; for the teacher it runs on the guided x_hat^w (2 NFE per step)."""
    return sampling.SamplerSpec(sampler, guided=self.is_teacher, clip=self._clip,
                                schedule=self.schedule)

  @property
  def w_range(self) -> Optional[tuple[float, float]]:
    """[w_min, w_max] a student was trained on (None for the teacher: any w)."""
    r = self.metadata.get("w_range")
    return None if r is None else (float(r[0]), float(r[1]))

  def w_outside_training(self, w) -> str:
    """'' if every w lies in the range the student was trained on, else a one-line warning."""
    if self.w_range is None:
      return ""
    w = np.asarray(w, np.float64).reshape(-1)
    lo, hi = self.w_range
    bad = w[(w < lo) | (w > hi)]
    if not bad.size:
      return ""
    return (f"w={bad[0]:g} lies outside the range stage {self.stage!r} was trained on "
            f"(w in [{lo:g}, {hi:g}]); its samples there are an extrapolation")

  def default_batch_size(self, n: int) -> int:
    return self.round_batch(min(n, int(self.config.eval.batch_size)))

  def round_batch(self, batch_size: int) -> int:
    """The batch rounded up to a multiple of the device count (it is split over devices)."""
    d = self.mesh.devices.size
    return max(d, -(-int(batch_size) // d) * d)

  @property
  def text_conditioned(self) -> bool:
    return self.denoiser.cond_field == "tokens"

  def conditions(self, labels=None, prompts=None) -> np.ndarray:
    """What the sampler takes: labels int32 [n] (class models) or token ids [n, L] of the
    prompts (text models); refuses the wrong kind or labels out of range."""
    if self.text_conditioned:
      if prompts is None or labels is not None:
        raise ValueError(f"stage {self.stage!r} is a text-to-image model: pass prompts=[...] "
                         "(a list of captions), not labels")
      if isinstance(prompts, str):
        prompts = [prompts]
      return self.tokenizer.encode([str(p) for p in prompts])
    if labels is None or prompts is not None:
      raise ValueError(f"stage {self.stage!r} is class-conditional: pass labels (ints in "
                       f"0..{self.num_classes - 1}), not prompts")
    labels = np.asarray(labels, np.int32).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"labels span {labels.min()}..{labels.max()}; the model has "
                       f"{self.num_classes} classes (0..{self.num_classes - 1})")
    return labels

  def sample(self, labels: Union[Sequence[int], np.ndarray, None] = None,
             w: Union[float, np.ndarray] = 0.0, steps: Optional[int] = None,
             sampler: str = "ddim", rng=None, batch_size: Optional[int] = None, *,
             prompts: Optional[Sequence[str]] = None) -> np.ndarray:
    """Samples float32 [n, *image_shape] in the data range ([-1, 1] for images), n =
    len(labels) or len(prompts); a latent model's samples come decoded.

    w: guidance strength (scalar or one per sample); x_w = (1 + w) x_cond - w x_uncond.
    steps: N (None: the stage's default). sampler: 'ddim' or 'stochastic'.
    rng: an int seed or a jax key (None: seed 0); batch b uses fold_in(rng, b), so the same
    rng, conditions and batch_size give the same samples. The last batch is padded. A w
    outside the range a student was trained on gives a UserWarning.
    """
    cond = self.conditions(labels, prompts)
    out = list(self.sample_batches(cond, w, steps, sampler, rng, batch_size))
    return np.concatenate(out) if out else np.zeros((0,) + self.image_shape, np.float32)

  def sample_batches(self, cond, w=0.0, steps: Optional[int] = None, sampler: str = "ddim",
                     rng=None, batch_size: Optional[int] = None, start_batch: int = 0,
                     warn_w: bool = True, decode: bool = True):
    """Yields sample()'s output batch by batch from batch `start_batch` (a resumable loop:
    batch b depends only on (rng, b, cond, w, steps), never on the batches before it).
    cond: conditions() of the labels or prompts. decode=False: a latent model's latents.

    With several processes every batch is split over all processes' devices and each process
    receives the whole batch (gathered), so every process gets the same samples.
    """
    if warn_w and self.w_outside_training(w):
      warnings.warn(self.w_outside_training(w), stacklevel=3)
    cond = np.asarray(cond, np.int32)
    n = cond.shape[0]
    if n == 0:
      return
    w = np.broadcast_to(np.asarray(w, np.float32), (n,))
    steps = self.default_steps if steps is None else int(steps)
    if steps < 1:
      raise ValueError(f"steps={steps}: must be >= 1")
    bs = self.round_batch(batch_size) if batch_size else self.default_batch_size(n)
    fn = self._sampler(sampler)
    key = sampling.as_key(rng)
    batch_sh = sharding.batch_sharding(self.mesh)
    for b, lo in enumerate(range(0, n, bs)):
      if b < start_batch:
        continue
      keep = min(bs, n - lo)
      c = np.zeros((bs,) + cond.shape[1:], np.int32)
      c[:keep] = cond[lo:lo + keep]
      ww = np.zeros((bs,), np.float32)
      ww[:keep] = w[lo:lo + keep]
      x = fn(self.params, jax.random.fold_in(key, b), self.cond_batch(c),
             jax.device_put(ww, batch_sh), np.int32(steps))
      if decode and self._decode is not None:
        x = self._decode(x)
      yield np.asarray(sharding.to_host(x), np.float32)[:keep]

  def edit(self, images, labels=None, prompts: Optional[Sequence[str]] = None, *,
           strength: float = 0.6, w: Union[float, np.ndarray] = 0.0,
           steps: Optional[int] = None, sampler: str = "ddim", rng=None,
           batch_size: Optional[int] = None) -> np.ndarray:
    """Image-to-image (SDEdit): float32 [n, *image_shape] in [-1, 1].

    images: uint8 [n, H, W, C] or float in [-1, 1]; labels or prompts: one per image. The
    input is diffused to t = k / N, k = floor(N * strength), and the stage's N-step grid
    runs its last k steps (i = k .. 1): a student's NFE is k (N = 4, strength 0.6: 2), the
    teacher's 2 k. strength in (0, 1]; steps None: the stage's N. gdistill/editing.py.
    """
    from gdistill import editing  # pylint: disable=import-outside-toplevel
    x = editing.as_images(images, self.image_shape)
    cond = self.conditions(labels, prompts)
    editing.check_counts(len(x), len(cond), "prompts" if self.text_conditioned else "labels")
    steps = self.default_steps if steps is None else int(steps)
    start = sampling.edit_start(steps, strength)
    if self.w_outside_training(w):
      warnings.warn(self.w_outside_training(w), stacklevel=2)
    return editing.run(self, x, cond, w=w, steps=steps, start=start, masks=None,
                       sampler=sampler, rng=rng, batch_size=batch_size)

  def inpaint(self, images, masks, labels=None, prompts: Optional[Sequence[str]] = None, *,
              w: Union[float, np.ndarray] = 0.0, steps: Optional[int] = None,
              sampler: str = "ddim", rng=None, batch_size: Optional[int] = None,
              paste_back: bool = True, method: Optional[str] = None) -> np.ndarray:
    """Inpainting: float32 [n, *image_shape] in [-1, 1].

    masks [n, H, W] in {0, 1}, 1 = repaint. All N steps run (NFE N for a student, 2 N for
    the teacher). method 'model' (the default for an inpainting model, model.inpainting):
    the network sees the mask and the masked image and samples from noise; 'replacement'
    (the default otherwise, any model): the kept region is reset to the input diffused to
    each step's time (an inpainting model then gets a full mask, as when it generates).
    paste_back: the output equals the input exactly where the mask is 0 (after decoding).
    A mask of zeros returns the input; with replacement a mask of ones is sample() with the
    same rng. gdistill/editing.py.
    """
    from gdistill import editing  # pylint: disable=import-outside-toplevel
    x = editing.as_images(images, self.image_shape)
    m = editing.as_masks(masks, len(x), self.image_shape)
    cond = self.conditions(labels, prompts)
    editing.check_counts(len(x), len(cond), "prompts" if self.text_conditioned else "labels")
    steps = self.default_steps if steps is None else int(steps)
    if steps < 1:
      raise ValueError(f"steps={steps}: must be >= 1")
    if self.w_outside_training(w):
      warnings.warn(self.w_outside_training(w), stacklevel=2)
    method = editing.check_method(self, method)
    return editing.run(self, x, cond, w=w, steps=steps, start=steps, masks=m,
                       sampler=sampler, rng=rng, batch_size=batch_size, paste_back=paste_back,
                       method=method)

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """A latent model's latents -> images in [-1, 1] (identity in pixel space)."""
    if self._decode is None:
      return np.asarray(latents, np.float32)
    return np.asarray(jax.device_get(self._decode(jax.numpy.asarray(latents))), np.float32)

  def compile(self, sampler: str = "ddim", batch_size: int = 1) -> None:
    """Compiles (by running one step) the sampler for this batch size, so timings skip it."""
    bs = self.round_batch(batch_size)
    cond = np.zeros((bs,) + jax.tree.leaves(self.denoiser.example_cond(
        1, self.example_shape))[0].shape[1:], np.int32)
    list(self.sample_batches(cond, steps=1, sampler=sampler, batch_size=batch_size,
                             warn_w=False))

  def _sampler(self, sampler: str):
    return _shared_sampler(self.denoiser, self.spec(sampler), self.example_shape)

  def __repr__(self) -> str:
    return (f"Model(stage={self.stage!r}, kind={self.kind!r}, default_steps="
            f"{self.default_steps}, nfe={self.nfe()}, workdir={self.workdir!r})")


def load(workdir: str, stage: str = "latest") -> Model:
  """The finished stage `stage` of workdir: 'teacher', 'guided', 'progressive_N' or 'latest'
  (the last finished stage in plan order: the smallest-N progressive student, else guided,
  else teacher). A relative workdir is taken from the current directory. Raises
  StageNotFoundError listing the finished exports."""
  workdir = paths.resolve(workdir)
  name = resolve_stage(workdir, stage)
  path = export_dir(workdir, name)
  metadata = ckpt_lib.load_export_metadata(path)
  config = _stage_config(read_config(workdir), metadata)
  tokenizer = conditioning.tokenizer_from_metadata(metadata.get("tokenizer"))
  den = _denoiser(config, metadata, tokenizer)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  rep = sharding.replicated(mesh)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                          nn.unbox(den.init_abstract(example_shape(config))))
  params, metadata = ckpt_lib.load_export(path, abstract)
  latents = autoencoding.maybe_load(config, workdir, data_shape(config), mesh)
  return Model(workdir=workdir, stage=name, config=config, metadata=metadata, params=params,
               mesh=mesh, denoiser=den, tokenizer=tokenizer, latents=latents)
