"""MIDT mel loss: the filterbank against the textbook triangle formula, per-sample behaviour, bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import MidtConfig
from common.losses import MelSpectrogramLoss, mel_filterbank





def _htk_mel(f: float) -> float:
    return 2595.0 * math.log10(1.0 + f / 700.0)


def _htk_hz(m: float) -> float:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def _triangle(freq: float, band: int, n_mels: int, f_min: float, f_max: float) -> float:
    """Weight of filter `band` at `freq`, written out from the definition (edges equally spaced in mel)."""
    lo_mel, hi_mel = _htk_mel(f_min), _htk_mel(f_max)
    step = (hi_mel - lo_mel) / (n_mels + 1)
    lower, centre, upper = (_htk_hz(lo_mel + (band + i) * step) for i in range(3))
    if lower <= freq <= centre:
        return (freq - lower) / (centre - lower)
    if centre < freq <= upper:
        return (upper - freq) / (upper - centre)
    return 0.0


def test_filterbank_matches_the_triangle_formula() -> None:
    n_fft, sample_rate, n_mels = 64, 100.0, 16
    bank = mel_filterbank(n_fft // 2 + 1, sample_rate, n_mels, 0.0, 50.0)
    assert bank.shape == (16, 33)
    for band in (0, 5, 15):
        for bin_index in range(33):
            freq = bin_index * sample_rate / n_fft
            assert bank[band, bin_index].item() == pytest.approx(_triangle(freq, band, n_mels, 0.0, 50.0), abs=1e-6)
    assert (bank.sum(dim=1) > 0).all()
    # A sub-range: nothing outside [f_min, f_max].
    narrow = mel_filterbank(33, 100.0, 4, 10.0, 30.0)
    freqs = torch.arange(33) * 100.0 / 64
    assert narrow[:, (freqs < 10.0) | (freqs > 30.0)].abs().max() == 0


def test_a_sine_lands_in_the_band_around_its_frequency() -> None:
    loss = MelSpectrogramLoss(MidtConfig())
    t = torch.arange(1000) / 100.0
    freq = 20.0
    x = torch.sin(2 * math.pi * freq * t).expand(1, 8, 1000)
    energy = loss.mel(x, 0)[0, 0].mean(dim=-1)  # (n_mels)
    bank = loss.filterbank_0
    strongest = int(energy.argmax())
    centre_bins = bank.argmax(dim=1).float() * 100.0 / 64
    assert abs(centre_bins[strongest].item() - freq) < 3.2  # within one band spacing (~2.9 Hz) plus a bin


def test_loss_is_zero_for_identical_signals_and_per_sample() -> None:
    loss = MelSpectrogramLoss(MidtConfig(n_fft=(64, 32), hop_length=(16, 8)))
    target = torch.randn(4, 8, 1000)
    assert torch.equal(loss(target, target), torch.zeros(4))
    estimate = target.clone()
    estimate[2] += 0.5 * torch.randn(8, 1000)
    values = loss(estimate, target)
    assert values.shape == (4,)
    assert values[2] > 0.05 and values[[0, 1, 3]].abs().max() == 0  # examples do not leak into each other


def test_multi_resolution_loss_is_the_mean_of_single_resolutions() -> None:
    estimate, target = torch.randn(2, 8, 1000), torch.randn(2, 8, 1000)
    both = MelSpectrogramLoss(MidtConfig(n_fft=(64, 32), hop_length=(16, 8), n_mels=8))(estimate, target)
    first = MelSpectrogramLoss(MidtConfig(n_fft=(64,), hop_length=(16,), n_mels=8))(estimate, target)
    second = MelSpectrogramLoss(MidtConfig(n_fft=(32,), hop_length=(8,), n_mels=8))(estimate, target)
    torch.testing.assert_close(both, (first + second) / 2)


def test_loss_is_log_l1_plus_l1_of_mel_magnitudes() -> None:
    loss = MelSpectrogramLoss(MidtConfig())
    target = torch.randn(1, 8, 1000)
    estimate = 2.0 * target
    mel_t = loss.mel(target, 0)
    log_term = (torch.log(2 * mel_t.clamp(min=1e-5 / 2)) - torch.log(mel_t.clamp(min=1e-5))).abs()
    expected = (log_term + mel_t.abs()).mean()  # |2m - m| = m
    torch.testing.assert_close(loss(estimate, target)[0], expected, rtol=1e-4, atol=1e-5)


def test_gradients_flow_to_the_estimate_only() -> None:
    loss = MelSpectrogramLoss(MidtConfig())
    estimate = torch.randn(2, 8, 1000, requires_grad=True)
    loss(estimate, torch.randn(2, 8, 1000)).sum().backward()
    assert torch.isfinite(estimate.grad).all() and estimate.grad.abs().max() > 0


def test_bad_settings_and_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="cover no FFT bin"):
        MelSpectrogramLoss(MidtConfig(n_fft=(16,), hop_length=(4,), n_mels=40))
    with pytest.raises(ValueError, match="equal length"):
        MelSpectrogramLoss(MidtConfig(n_fft=(64, 32), hop_length=(16,)))
    with pytest.raises(ValueError, match="f_max"):
        MelSpectrogramLoss(MidtConfig(f_max=80.0))
    with pytest.raises(ValueError, match="hop_length"):
        MelSpectrogramLoss(MidtConfig(hop_length=(100,)))
    loss = MelSpectrogramLoss(MidtConfig())
    with pytest.raises(ValueError, match=r"\[B, C, L\]"):
        loss(torch.randn(2, 8, 100), torch.randn(2, 8, 99))
    with pytest.raises(ValueError, match="too short"):
        loss(torch.randn(2, 8, 20), torch.randn(2, 8, 20))


def test_buffers_follow_the_module_but_stay_out_of_checkpoints() -> None:
    loss = MelSpectrogramLoss(MidtConfig()).double()
    assert loss.filterbank_0.dtype == torch.float64
    assert loss.state_dict() == {}
