"""MIDT's mel-spectrogram loss: per-sample, multi-resolution, DAC style, no torchaudio/librosa.

For every lead and every (n_fft, hop) resolution: |STFT| with a periodic Hann window (centred, reflect
padding), projected on a mel filterbank; the loss is

    mean |log(clamp(mel_est, 1e-5)) - log(clamp(mel_tgt, 1e-5))| + mean |mel_est - mel_tgt|

over leads, mel bands and frames, averaged over resolutions. It returns one value per example ([B]),
which DP-SGD clips per example. The weight lambda (midt.weight) is applied by the caller.

The filterbank uses the HTK mel scale, mel(f) = 2595 log10(1 + f / 700), with unnormalised triangles
(peak 1), the construction of torchaudio's `melscale_fbanks(norm=None, mel_scale="htk")`. Below 1 kHz the
HTK and Slaney scales are both nearly linear, so at ECG rates (0-50 Hz) the choice hardly matters.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from common.config import MidtConfig

__all__ = ["MelSpectrogramLoss", "hz_to_mel", "mel_filterbank", "mel_to_hz"]

LOG_CLAMP = 1e-5


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, sample_rate: float, n_mels: int, f_min: float, f_max: float) -> Tensor:
    """Triangular HTK-mel filters, float32 [n_mels, n_freqs], for one-sided spectra with n_freqs bins 0..sr/2.

    Filter m rises linearly from band edge m to its centre m+1 and falls to edge m+2, where the n_mels + 2
    edges are equally spaced on the mel scale between f_min and f_max.
    """
    if n_freqs < 2:
        raise ValueError(f"mel_filterbank: n_freqs must be >= 2, got {n_freqs}")
    if n_mels < 1:
        raise ValueError(f"mel_filterbank: n_mels must be >= 1, got {n_mels}")
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(
            f"mel_filterbank: need 0 <= f_min < f_max <= sample_rate/2 = {sample_rate / 2}, "
            f"got f_min={f_min}, f_max={f_max}"
        )
    bin_freqs = np.linspace(0.0, sample_rate / 2, n_freqs)  # (F)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # (M+2)
    widths = np.diff(edges)  # (M+1)
    offsets = edges[:, None] - bin_freqs[None, :]  # (M+2, F): edge - f
    rising = -offsets[:-2] / widths[:-1, None]  # (M, F): (f - lower) / (centre - lower)
    falling = offsets[2:] / widths[1:, None]  # (M, F): (upper - f) / (upper - centre)
    bank = np.maximum(0.0, np.minimum(rising, falling))  # (M, F)
    return torch.from_numpy(bank.astype(np.float32))


class MelSpectrogramLoss(nn.Module):
    """Per-sample multi-resolution mel loss between two signal batches [B, C, L] -> [B]."""

    def __init__(self, cfg: MidtConfig, sample_rate: float = 100.0) -> None:
        super().__init__()
        if len(cfg.n_fft) == 0 or len(cfg.n_fft) != len(cfg.hop_length):
            raise ValueError(
                "midt.n_fft and midt.hop_length must be non-empty lists of equal length, "
                f"got {cfg.n_fft} and {cfg.hop_length}"
            )
        for n_fft, hop in zip(cfg.n_fft, cfg.hop_length):
            if n_fft < 4:
                raise ValueError(f"midt.n_fft: each FFT size must be >= 4, got {n_fft}")
            if not 1 <= hop <= n_fft:
                raise ValueError(f"midt.hop_length: each hop must lie in [1, n_fft={n_fft}], got {hop}")
        self.sample_rate = float(sample_rate)
        self.resolutions = tuple(zip(cfg.n_fft, cfg.hop_length))
        for index, (n_fft, _) in enumerate(self.resolutions):
            bank = mel_filterbank(n_fft // 2 + 1, self.sample_rate, cfg.n_mels, cfg.f_min, cfg.f_max)
            empty = torch.nonzero(bank.sum(dim=1) == 0).flatten().tolist()
            if empty:
                raise ValueError(
                    f"midt: with n_fft={n_fft} at {self.sample_rate:g} Hz, mel bands {empty} of n_mels={cfg.n_mels} "
                    f"over {cfg.f_min}-{cfg.f_max} Hz cover no FFT bin; use fewer mels or a larger n_fft"
                )
            # Non-persistent: derived from the config, so checkpoints stay free of them but .to(device) moves them.
            self.register_buffer(f"filterbank_{index}", bank, persistent=False)
            self.register_buffer(f"window_{index}", torch.hann_window(n_fft), persistent=False)

    def mel(self, x: Tensor, index: int) -> Tensor:
        """Mel magnitudes [B, C, n_mels, frames] of x [B, C, L] at resolution `index`."""
        n_fft, hop = self.resolutions[index]
        batch, leads, length = x.shape
        spectrum = torch.stft(
            x.reshape(batch * leads, length),
            n_fft=n_fft,
            hop_length=hop,
            window=getattr(self, f"window_{index}").to(x.dtype),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        ).abs()  # (B*C F T)
        bank = getattr(self, f"filterbank_{index}").to(spectrum.dtype)  # (M F)
        mel = torch.einsum("mf,nft->nmt", bank, spectrum)  # (B*C M T)
        return mel.reshape(batch, leads, *mel.shape[1:])  # (B C M T)

    def forward(self, estimate: Tensor, target: Tensor) -> Tensor:
        if estimate.shape != target.shape or estimate.dim() != 3:
            raise ValueError(
                "MelSpectrogramLoss: estimate and target must both be [B, C, L], "
                f"got {tuple(estimate.shape)} and {tuple(target.shape)}"
            )
        longest = max(n_fft for n_fft, _ in self.resolutions)
        if estimate.shape[-1] <= longest // 2:
            raise ValueError(
                f"MelSpectrogramLoss: signals of length {estimate.shape[-1]} are too short for the reflect padding "
                f"of n_fft={longest} (need more than {longest // 2} samples)"
            )
        if estimate.dtype in (torch.float16, torch.bfloat16):
            estimate = estimate.float()  # no half-precision FFTs; float64 stays float64
        target = target.to(estimate.dtype)
        # Full precision also under autocast: log-mel differences of 1e-3 vanish in bf16.
        with torch.autocast(device_type=estimate.device.type, enabled=False):
            total = estimate.new_zeros(estimate.shape[0])
            for index in range(len(self.resolutions)):
                mel_est = self.mel(estimate, index)  # (B C M T)
                mel_tgt = self.mel(target, index)  # (B C M T)
                log_term = (torch.log(mel_est.clamp(min=LOG_CLAMP)) - torch.log(mel_tgt.clamp(min=LOG_CLAMP))).abs()
                linear_term = (mel_est - mel_tgt).abs()
                total = total + (log_term + linear_term).mean(dim=(1, 2, 3))  # (B)
            return total / len(self.resolutions)
