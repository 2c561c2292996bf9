"""Denoiser networks: the ADM U-Net for images and a residual MLP for 2-D toy data."""
from gdistill.models.mlp import MLPDenoiser
from gdistill.models.unet import UNet

__all__ = ["UNet", "MLPDenoiser"]
