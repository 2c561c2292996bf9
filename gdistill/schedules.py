"""Noise schedules: time t in [0, 1] -> logSNR, and a discrete model's timestep input.

The losses and samplers work in continuous time on logSNR (PAPER.md). Two schedules:

  cosine         lambda(t) = -2 log tan(a t + b), clipped to [logsnr_min, logsnr_max]
                 (pixel-space models; their network sees logSNR itself).
  scaled_linear  Stable Diffusion's discrete schedule: T = 1000 steps,
  linear         betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (scaled_linear) or
                 linspace(beta_start, beta_end, T) (linear); alpha_bar_k = prod_{j<=k}(1 - beta_j);
                 lambda_k = log(alpha_bar_k / (1 - alpha_bar_k)), decreasing in k.
                 Time maps to a fractional index k(t) = T t - 1 ("trailing" spacing: the N-step
                 grid t_i = i / N lands on diffusers' DDIM trailing timesteps T i / N - 1), and
                 lambda(t) interpolates the lambda_k table linearly in k. The network of a
                 discrete model takes k: timestep(lambda) inverts the table by interpolation,
                 clipped to [0, T - 1] outside [lambda_{T-1}, lambda_0]; so timestep(lambda(t)) =
                 k(t) exactly on the grid, and for t < 1 / T (k < 0) lambda(t) = lambda_0.
See docs/SCHEDULES.md.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

from gdistill import diffusion

KINDS = ("cosine", "scaled_linear", "linear")


def betas(num_train_timesteps: int, beta_start: float, beta_end: float,
          beta_schedule: str) -> np.ndarray:
  """diffusers' betas (float64 [T]) for 'scaled_linear' or 'linear'."""
  t = int(num_train_timesteps)
  if beta_schedule == "scaled_linear":
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, t, dtype=np.float64) ** 2
  if beta_schedule == "linear":
    return np.linspace(beta_start, beta_end, t, dtype=np.float64)
  raise ValueError(f"beta_schedule={beta_schedule!r}; valid: 'scaled_linear', 'linear'")


def alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float,
                   beta_schedule: str) -> np.ndarray:
  """alpha_bar_k = prod_{j <= k} (1 - beta_j), float64 [T]."""
  return np.cumprod(1.0 - betas(num_train_timesteps, beta_start, beta_end, beta_schedule))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A noise schedule (hashable: samplers are cached by it)."""
  kind: str = "cosine"
  logsnr_min: float = -20.0
  logsnr_max: float = 20.0
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"schedule {self.kind!r}; valid: {KINDS}")

  @property
  def discrete(self) -> bool:
    return self.kind != "cosine"

  def logsnr_table(self) -> np.ndarray:
    """lambda_k, float64 [T] (discrete schedules)."""
    ab = alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end, self.kind)
    return np.log(ab) - np.log1p(-ab)

  def logsnr(self, t):
    """lambda(t) for t in [0, 1] (float32, any shape)."""
    t = jnp.asarray(t, jnp.float32)
    if not self.discrete:
      return diffusion.logsnr_schedule_cosine(t, self.logsnr_min, self.logsnr_max)
    table = self.logsnr_table()
    k = t * self.num_train_timesteps - 1.0
    return jnp.interp(k, jnp.arange(len(table), dtype=jnp.float32),
                      jnp.asarray(table, jnp.float32))

  def timestep(self, logsnr):
    """The fractional index k(lambda) in [0, T - 1] a discrete model takes (float32)."""
    if not self.discrete:
      raise ValueError("the cosine schedule has no discrete timesteps; its models take logSNR")
    table = self.logsnr_table()
    ks = np.arange(len(table), dtype=np.float64)
    return jnp.interp(jnp.asarray(logsnr, jnp.float32), jnp.asarray(table[::-1], jnp.float32),
                      jnp.asarray(ks[::-1], jnp.float32))

  def grid_timesteps(self, num_steps: int) -> np.ndarray:
    """k(t_i) for the N-step sampling grid t_i = i / N, i = N .. 1 (float64)."""
    i = np.arange(num_steps, 0, -1, dtype=np.float64)
    return i * self.num_train_timesteps / num_steps - 1.0

  def to_dict(self) -> dict:
    """What an export's metadata records (and from_dict reads)."""
    if not self.discrete:
      return {"name": "cosine", "logsnr_min": float(self.logsnr_min),
              "logsnr_max": float(self.logsnr_max)}
    return {"name": self.kind, "num_train_timesteps": int(self.num_train_timesteps),
            "beta_start": float(self.beta_start), "beta_end": float(self.beta_end),
            "timestep_spacing": "trailing"}


def from_config(dcfg) -> Schedule:
  """The schedule of a config's diffusion section."""
  return Schedule(kind=dcfg.schedule, logsnr_min=float(dcfg.logsnr_min),
                  logsnr_max=float(dcfg.logsnr_max),
                  num_train_timesteps=int(dcfg.num_train_timesteps),
                  beta_start=float(dcfg.beta_start), beta_end=float(dcfg.beta_end))


def from_dict(d: Optional[dict]) -> Schedule:
  """The schedule an export's metadata recorded (to_dict's output)."""
  d = dict(d or {"name": "cosine"})
  name = d.pop("name", "cosine")
  d.pop("timestep_spacing", None)
  return Schedule(kind=name, **d)


# diffusers' scheduler_config.json <-> Schedule (+ the model's parametrisation).
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}


def from_diffusers(scheduler_config: dict, source: str = "scheduler_config.json"
                   ) -> tuple[Schedule, str]:
  """(Schedule, parametrization 'eps' | 'v') of a Stable Diffusion scheduler config.

  Training and sampling need only the training schedule (num_train_timesteps, beta_schedule,
  beta_start, beta_end) and prediction_type; the file's own sampler settings (its class,
  timestep_spacing, steps_offset, clip_sample) do not enter: gdistill samples on its own grid
  (trailing spacing, module doc). What it cannot represent is refused, naming the key."""
  c = dict(scheduler_config)
  problems = []
  kind = c.get("beta_schedule", "linear")
  if kind not in ("scaled_linear", "linear"):
    problems.append(f"beta_schedule={kind!r} (supported: 'scaled_linear', 'linear')")
  if c.get("trained_betas") is not None:
    problems.append("trained_betas is set (explicit betas are not supported)")
  if c.get("rescale_betas_zero_snr"):
    problems.append("rescale_betas_zero_snr=true (zero-terminal-SNR schedules are not "
                    "supported)")
  pred = c.get("prediction_type", "epsilon")
  if pred not in PREDICTION_TYPES:
    problems.append(f"prediction_type={pred!r} (supported: {tuple(PREDICTION_TYPES)})")
  if problems:
    raise ValueError(f"{source}: " + "; ".join(problems))
  sched = Schedule(kind=kind, num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
                   beta_start=float(c.get("beta_start", 0.0001)),
                   beta_end=float(c.get("beta_end", 0.02)))
  return sched, PREDICTION_TYPES[pred]


def diffusers_scheduler_config(schedule: Schedule, parametrization: str) -> dict:
  """A DDIMScheduler config that reproduces gdistill's deterministic sampler exactly: the same
  alphas_cumprod, trailing timesteps T i / N - 1 (what grid_timesteps gives for N dividing T),
  eta 0, no clipping, and the last step landing on x (set_alpha_to_one). steps_offset 1 (what
  diffusers' pipelines expect of SD schedulers; trailing spacing does not use it)."""
  if not schedule.discrete:
    raise ValueError("a cosine-schedule model has no diffusers scheduler (its network takes "
                     "logSNR, not a discrete timestep)")
  inverse = {v: k for k, v in PREDICTION_TYPES.items()}
  if parametrization not in inverse:
    raise ValueError(f"parametrization {parametrization!r} has no diffusers prediction_type "
                     f"(supported: {tuple(inverse)})")
  return {"_class_name": "DDIMScheduler", "num_train_timesteps": schedule.num_train_timesteps,
          "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
          "beta_schedule": schedule.kind, "trained_betas": None, "clip_sample": False,
          "set_alpha_to_one": True, "steps_offset": 1,
          "prediction_type": inverse[parametrization], "thresholding": False,
          "timestep_spacing": "trailing", "rescale_betas_zero_snr": False}
