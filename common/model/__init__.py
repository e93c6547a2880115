"""The generator's denoiser: S4D state-space layers (s4.py) in an SSSD-style residual stack (denoiser.py)
or a multi-scale U-Net (unet.py)."""

from common.model.denoiser import PRESETS, Denoiser, DenoiserSpec, build_denoiser, count_parameters, resolve_spec
from common.model.s4 import S4Block, S4DKernelConv
from common.model.unet import UNET_PRESET, UNetDenoiser, UNetSpec, build_unet, resolve_unet_spec

__all__ = [
    "PRESETS",
    "UNET_PRESET",
    "Denoiser",
    "DenoiserSpec",
    "S4Block",
    "S4DKernelConv",
    "UNetDenoiser",
    "UNetSpec",
    "build_denoiser",
    "build_unet",
    "count_parameters",
    "resolve_spec",
    "resolve_unet_spec",
]
