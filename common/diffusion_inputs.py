"""What callers hand GaussianDiffusion, checked (errors name the argument) and shaped into batch rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

MEL_TARGETS = ("posterior_mean", "x0")


def check_training_inputs(x0: Tensor, labels: Tensor, demographics: Tensor, mel_loss: Any, mel_weight: float,
                          mel_target: str, cond_dropout: float, k: Any) -> None:
    """The arguments of `training_losses`, before any draw: shapes, ranges and a mel loss where weighted."""
    if x0.dim() != 3:
        raise ValueError(f"training_losses: x0 must be [B, C, L], got {tuple(x0.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"training_losses: noise_multiplicity must be an integer >= 1, got {k!r}")
    if not 0.0 <= cond_dropout <= 1.0:
        raise ValueError(f"training_losses: cond_dropout must lie in [0, 1], got {cond_dropout}")
    if mel_target not in MEL_TARGETS:
        raise ValueError(f"training_losses: mel_target must be one of {MEL_TARGETS}, got {mel_target!r}")
    if mel_weight < 0:
        raise ValueError(f"training_losses: mel_weight must be >= 0, got {mel_weight}")
    if mel_weight > 0 and mel_loss is None:
        raise ValueError("training_losses: mel_weight > 0 needs a mel_loss")
    batch = x0.shape[0]
    if labels.shape[0] != batch or demographics.shape[0] != batch:
        raise ValueError(
            f"training_losses: labels {tuple(labels.shape)} and demographics {tuple(demographics.shape)} "
            f"must have the batch size {batch} of x0"
        )


def override_rows(value: Tensor | None, name: str, batch: int, k: int, per_row: tuple[int, ...],
                  device: torch.device) -> Tensor | None:
    """A caller's [B, K, ...] (or [B, ...] when K = 1) override as [B*K, ...] rows on `device`."""
    if value is None:
        return None
    allowed = [(batch, k, *per_row)] + ([(batch, *per_row)] if k == 1 else [])
    if tuple(value.shape) not in allowed:
        shapes = " or ".join(map(str, allowed))
        raise ValueError(f"training_losses: {name} must have shape {shapes}, got {tuple(value.shape)}")
    return value.reshape(batch * k, *per_row).to(device)


def sample_channels(model: Any, labels: Tensor, demographics: Tensor, length: int, channels: int | None) -> int:
    """Check the conditioning rows and the length; the channel count (default: model.in_channels)."""
    if labels.dim() != 2 or demographics.dim() != 2 or labels.shape[0] != demographics.shape[0]:
        raise ValueError(
            f"sample: labels [B, 71] and demographics [B, 8] must be 2-D with one row per sample, "
            f"got {tuple(labels.shape)} and {tuple(demographics.shape)}"
        )
    if length < 1:
        raise ValueError(f"sample: length must be positive, got {length}")
    if channels is None:
        channels = getattr(model, "in_channels", None)
        if channels is None:
            raise ValueError("sample: pass channels= for a model without an in_channels attribute")
    return channels
