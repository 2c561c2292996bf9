"""gdistill: distillation of classifier-free guided diffusion models (Meng et al., CVPR 2023)."""
__version__ = "0.1.0"
