"""Per-sample gradients for Opacus: the S4D and Conv1d grad samplers, the functorch fallback switch, and the
merge of noise-multiplicity rows.

Importing this module registers `S4DKernelConv.per_sample_grads` (exact, closed form; see s4.py) with both
of Opacus' hook registries, so no layer of the denoiser falls back to functorch, and a Conv1d sampler that
replaces Opacus' im2col (Opacus unfolds a Conv1d as a 2-D image: 36 % of a DP step of the `unet` preset on
2 CPU cores, measured with torch.profiler).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from opacus.grad_sample import GradSampleModule, register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from torch import Tensor, nn
from torch.nn import functional as F

from common.model.s4 import S4DKernelConv


@register_grad_sampler(S4DKernelConv)
def _s4d_grad_sampler(layer: S4DKernelConv, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    return layer.per_sample_grads(activations[0], backprops)


@register_grad_sampler(nn.Conv1d)
def _conv1d_grad_sampler(layer: nn.Conv1d, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Exact per-sample Conv1d gradients from a strided view of the input, contracted in one einsum.

    grad_w[n, o, i, j] = sum_t backprops[n, o, t] * x_padded[n, i, t * stride + j * dilation]. Grouped
    convolutions, string or non-zero padding modes and empty batches go to Opacus' own sampler.
    """
    x = activations[0].to(backprops.dtype)
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str) or x.shape[0] == 0:
        return compute_conv_grad_sample(layer, activations, backprops)
    (pad,), (stride,), (dilation,), (taps,) = layer.padding, layer.stride, layer.dilation, layer.kernel_size
    if pad:
        x = F.pad(x, (pad, pad))
    windows = x.unfold(2, (taps - 1) * dilation + 1, stride)[:, :, : backprops.shape[-1], ::dilation]  # N Cin T taps
    grads: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = torch.einsum("not,nitj->noij", backprops, windows)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(dim=2)
    return grads


_REGISTRIES = (GradSampleHooks.GRAD_SAMPLERS, GradSampleHooksFastGradientClipping.GRAD_SAMPLERS)


@contextlib.contextmanager
def s4d_functorch_fallback() -> Iterator[None]:
    """Unregister the S4D grad sampler so Opacus falls back to functorch for it (for benchmarks and tests).

    Opacus reads its registry both when it wraps a model and in every backward hook, so keep the
    context open for the whole life of the wrapped model.
    """
    saved = [registry.pop(S4DKernelConv, None) for registry in _REGISTRIES]
    try:
        yield
    finally:
        for registry, sampler in zip(_REGISTRIES, saved):
            if sampler is not None:
                registry[S4DKernelConv] = sampler


def modules_on_functorch_fallback(model: nn.Module) -> list[str]:
    """Names of modules with trainable parameters of their own that have no registered Opacus grad sampler.

    Opacus computes their per-sample gradients with functorch (slower, re-runs their forward). An empty list
    means every layer uses a dedicated sampler.
    """
    fallback = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in GradSampleModule.GRAD_SAMPLERS:
            fallback.append(name or type(module).__name__)
    return fallback


def merge_noise_draws(model: nn.Module, multiplicity: int) -> None:
    """Average Opacus per-row gradients over each example's K noise draws: grad_sample [B*K, ...] -> [B, ...].

    The engine calls this between backward and the optimizer step. The loss is mean_i mean_k l_ik, so
    Opacus' rows are grad l_ik and the per-example gradient of mean_k l_ik is their mean over k. Parameters without per-sample gradients are left alone. No-op for K = 1.
    """
    if multiplicity < 1:
        raise ValueError(f"merge_noise_draws: multiplicity must be >= 1, got {multiplicity}")
    if multiplicity == 1:
        return
    for name, param in model.named_parameters():
        grad_sample = getattr(param, "grad_sample", None)
        if grad_sample is None:
            continue
        if isinstance(grad_sample, list):
            raise RuntimeError(
                f"merge_noise_draws: {name} holds per-sample gradients of several backward passes; "
                "merge the draws after every backward pass"
            )
        rows = grad_sample.shape[0]
        if rows % multiplicity:
            raise ValueError(
                f"merge_noise_draws: {name} has {rows} per-sample gradient rows, not a multiple of K={multiplicity}"
            )
        param.grad_sample = grad_sample.reshape(rows // multiplicity, multiplicity, *grad_sample.shape[1:]).mean(1)
