"""Networks: the ADM U-Net and a residual MLP (pixel space, class labels); Stable Diffusion's
U-Net, AutoencoderKL and CLIP text encoder with diffusers' / transformers' parameter names
(latent text-to-image)."""
from gdistill.models.autoencoder import AutoencoderKL
from gdistill.models.mlp import MLPDenoiser
from gdistill.models.text import CLIPTextTransformer
from gdistill.models.text_to_image import TextToImageDenoiser
from gdistill.models.unet import UNet
from gdistill.models.unet_cond import UNet2DConditionModel

__all__ = ["AutoencoderKL", "CLIPTextTransformer", "MLPDenoiser", "TextToImageDenoiser", "UNet",
           "UNet2DConditionModel"]
