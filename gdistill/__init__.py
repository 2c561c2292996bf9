"""gdistill: distillation of classifier-free guided diffusion models (Meng et al., CVPR 2023)."""
__version__ = "0.1.0"


def load(workdir: str, stage: str = "latest"):
  """gdistill.api.load: a finished stage of workdir, ready to .sample(labels, w=...)."""
  from gdistill import runtime
  runtime.configure_xla_cpu()  # the CLI's XLA CPU flags, if JAX has not started yet
  from gdistill import api  # imports JAX, Flax and orbax: only when used
  return api.load(workdir, stage)
