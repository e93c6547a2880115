"""S4D layer: the FFT convolution against the state-space recurrence, the analytic kernel backward, and the
Opacus per-sample gradients (own sampler and functorch fallback) against a per-example loop."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

from common.model.s4 import (
    S4Block,
    S4DKernelConv,
    _FFTConvolution,
    _modes,
    _modes_vjp,
    _VandermondeKernel,
)
from common.privacy.samplers import modules_on_functorch_fallback, s4d_functorch_fallback





def _is_5_smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def _layer(channels: int = 3, state_dim: int = 8, bidirectional: bool = True, seed: int = 0) -> S4DKernelConv:
    torch.manual_seed(seed)
    layer = S4DKernelConv(channels, state_dim=state_dim, bidirectional=bidirectional).double()
    with torch.no_grad():  # move away from the symmetric initialisation so every parameter matters
        layer.log_A_real.add_(0.3 * torch.randn_like(layer.log_A_real))
        layer.A_imag.add_(0.3 * torch.randn_like(layer.A_imag))
        layer.log_dt.add_(torch.log(torch.tensor(5.0)))  # larger steps: kernels decay within a short L
    return layer


def _recurrence(layer: S4DKernelConv, u: torch.Tensor) -> torch.Tensor:
    """y by stepping the discretised SSM (ZOH, B = 1) sample by sample: an independent reference."""
    dt = torch.exp(layer.log_dt).unsqueeze(-1)  # (K H 1)
    A = torch.complex(-torch.exp(layer.log_A_real), layer.A_imag)  # (K H N)
    a_bar = torch.exp(dt * A)
    b_bar = (a_bar - 1) / A
    C = torch.view_as_complex(layer.C)

    def run(direction: int, signal: torch.Tensor) -> torch.Tensor:
        state = torch.zeros(signal.shape[0], signal.shape[1], A.shape[-1], dtype=A.dtype)
        out = []
        for step in range(signal.shape[-1]):
            state = a_bar[direction] * state + b_bar[direction] * signal[..., step : step + 1]
            out.append(2 * (C[direction] * state).sum(-1).real)
        return torch.stack(out, dim=-1)

    y = run(0, u) + layer.D.unsqueeze(-1) * u
    if layer.bidirectional:
        length = u.shape[-1]
        backward = run(1, u.flip(-1))  # backward[j] = sum_m k1[m] u[L-1-j+m]
        ahead = torch.zeros_like(u)
        ahead[..., : length - 1] = backward[..., : length - 1].flip(-1)  # y[l] += sum_m k1[m] u[l+1+m]
        y = y + ahead
    return y


def _plain_autograd_forward(layer: S4DKernelConv, u: torch.Tensor) -> torch.Tensor:
    """The layer's forward with PyTorch's own autograd throughout (a materialised Vandermonde, no custom
    backward), so per-sample gradients are checked against an independent derivation."""
    W, s = layer.modes()
    length = u.shape[-1]
    V = torch.exp(s.unsqueeze(-1) * torch.arange(length, dtype=torch.float64))  # (K H N L)
    k = 2 * torch.einsum("khn,khnl->khl", W, V).real  # (K H L)
    size = 2 * length
    k_full = torch.nn.functional.pad(k[0], (0, size - length))
    if layer.bidirectional:
        k_full = k_full + torch.nn.functional.pad(k[1].flip(-1), (size - length, 0))
    y = torch.fft.irfft(torch.fft.rfft(u, n=size) * torch.fft.rfft(k_full, n=size), n=size)[..., :length]
    return y + u * layer.D.unsqueeze(-1)


def test_fft_size_is_the_smallest_5_smooth_size_that_holds_both_kernel_halves() -> None:
    for length in range(1, 1050):
        size = S4DKernelConv.fft_size(length)
        assert size >= 2 * length and _is_5_smooth(size)
        assert not any(_is_5_smooth(m) for m in range(2 * length, size))
    assert S4DKernelConv.fft_size(1000) == 2000  # a 10 s record at 100 Hz: no padding beyond 2L


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fft_convolution_matches_the_state_space_recurrence(bidirectional: bool) -> None:
    layer = _layer(bidirectional=bidirectional)
    u = torch.randn(2, 3, 50, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(u), _recurrence(layer, u), atol=1e-10, rtol=1e-9)


def test_unidirectional_layer_is_causal_and_bidirectional_layer_looks_ahead() -> None:
    u = torch.randn(1, 3, 40, dtype=torch.float64)
    changed = u.clone()
    changed[..., 30:] += 1.0
    with torch.no_grad():
        causal = _layer(bidirectional=False)
        torch.testing.assert_close(causal(u)[..., :30], causal(changed)[..., :30])
        both = _layer(bidirectional=True)
        assert (both(u)[..., :30] - both(changed)[..., :30]).abs().max() > 1e-3


def test_analytic_kernel_backward_passes_gradcheck() -> None:
    layer = _layer(channels=2, state_dim=6)
    W, s = (v.detach().requires_grad_() for v in layer.modes())
    for length in (1, 7, 37):
        assert torch.autograd.gradcheck(lambda w, z: _VandermondeKernel.apply(w, z, length), (W, s))


def test_closed_form_modes_vjp_matches_vmapped_torch_func_vjp() -> None:
    layer = _layer(channels=4, state_dim=10)
    params = tuple(p.detach() for p in (layer.log_dt, layer.log_A_real, layer.A_imag, layer.C))
    cotangents = tuple(torch.randn(3, 2, 4, 5, dtype=torch.complex128) for _ in range(2))
    _, vjp = torch.func.vjp(_modes, *params)
    expected = torch.func.vmap(vjp)(cotangents)
    for got, want in zip(_modes_vjp(*params, *cotangents), expected):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_fft_convolution_backward_passes_gradcheck() -> None:
    u = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    k_full = torch.randn(3, 18, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_FFTConvolution.apply, (u, k_full))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_per_sample_gradients_match_a_per_example_loop(bidirectional: bool) -> None:
    layer = _layer(bidirectional=bidirectional)
    u = torch.randn(4, 3, 45, dtype=torch.float64)
    grad_y = torch.randn(4, 3, 45, dtype=torch.float64)
    per_sample = layer.per_sample_grads(u, grad_y)
    assert set(per_sample) == set(layer.parameters())
    for i in range(u.shape[0]):
        layer.zero_grad()
        (_plain_autograd_forward(layer, u[i : i + 1]) * grad_y[i : i + 1]).sum().backward()
        for name, param in layer.named_parameters():
            assert param.grad.abs().max() > 0, name
            torch.testing.assert_close(per_sample[param][i], param.grad, atol=1e-9, rtol=1e-6, msg=name)


def test_frozen_parameters_get_no_per_sample_gradient() -> None:
    layer = _layer()
    layer.A_imag.requires_grad_(False)
    u, grad_y = torch.randn(2, 3, 20, dtype=torch.float64), torch.randn(2, 3, 20, dtype=torch.float64)
    grads = layer.per_sample_grads(u, grad_y)
    assert layer.A_imag not in grads and layer.C in grads


@pytest.mark.parametrize("bidirectional", [False, True])
def test_opacus_hooks_match_microbatches_for_an_s4_block(bidirectional: bool) -> None:
    torch.manual_seed(1)
    block = S4Block(4, state_dim=8, bidirectional=bidirectional).double()
    assert modules_on_functorch_fallback(block) == []
    x = torch.randn(3, 4, 33, dtype=torch.float64)
    assert check_per_sample_gradients_are_correct(x, block, atol=1e-8, rtol=1e-6, grad_sample_mode="hooks")


def test_functorch_fallback_is_used_inside_the_context_and_agrees() -> None:
    torch.manual_seed(2)
    layer = _layer()
    u = torch.randn(3, 3, 30, dtype=torch.float64)
    reference = layer.per_sample_grads(u, torch.ones_like(u))
    with s4d_functorch_fallback():
        assert modules_on_functorch_fallback(layer) == ["S4DKernelConv"]
        wrapped = GradSampleModule(layer, loss_reduction="sum")
        assert hasattr(layer, "ft_compute_sample_grad")  # Opacus prepared the functorch path
        wrapped(u).sum().backward()
        for param in layer.parameters():
            torch.testing.assert_close(param.grad_sample, reference[param], atol=1e-9, rtol=1e-6)
        wrapped._close()
    assert modules_on_functorch_fallback(layer) == []  # the sampler is registered again


def test_bad_shapes_are_named() -> None:
    layer = S4DKernelConv(4, state_dim=8)
    with pytest.raises(ValueError, match=r"expected input \(B, 4, L\)"):
        layer(torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match="state_dim must be an even number"):
        S4DKernelConv(4, state_dim=7)
    with pytest.raises(ValueError, match="channels must be positive"):
        S4DKernelConv(0)


def test_parameters_only_no_buffers() -> None:
    block = S4Block(8, state_dim=16)
    assert list(block.buffers()) == []
    names = {name for name, _ in block.conv.named_parameters()}
    assert names == {"log_dt", "log_A_real", "A_imag", "C", "D"}
