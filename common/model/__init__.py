"""The generator's denoiser: S4D state-space layers (s4.py) in an SSSD-style residual stack (denoiser.py)."""

from common.model.denoiser import PRESETS, Denoiser, DenoiserSpec, build_denoiser, count_parameters, resolve_spec
from common.model.s4 import S4Block, S4DKernelConv

__all__ = [
    "PRESETS",
    "Denoiser",
    "DenoiserSpec",
    "S4Block",
    "S4DKernelConv",
    "build_denoiser",
    "count_parameters",
    "resolve_spec",
]
