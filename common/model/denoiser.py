"""SSSD-style conditional denoiser eps_theta(x_t, t, labels, demographics) for 8-lead ECGs.

    x [B, 8, L] -> 1x1 conv + ReLU -> residual blocks -> sum of skips / sqrt(n) -> 1x1 conv, ReLU, zero-init 1x1 conv

Each residual block (SSSD-ECG, Alcaraz & Strodthoff 2023):

    h = x + Linear(step_embedding)            per-block diffusion-step projection, [B, C, 1]
    h = Conv1d(C, 2C, 3)(h)
    h = S4Block(h)                            S4 before the conditioning ...
    h = h + Linear(conditioning)              labels and demographics, [B, 2C, 1]
    h = S4Block(h)                            ... and after it
    out = tanh(h[:C]) * sigmoid(h[C:])        gated activation
    residual, skip = Conv1d(C, 2C, 1)(out)    one 1x1 conv for both (SSSD has two)
    x_next = (x + residual) / sqrt(2)

The per-block step and conditioning Linears are stacked into one Linear each (same function, fewer Opacus
hooks and parameter tensors: DP-SGD on a GPU is bound by per-module and per-tensor overhead). The last
block's conv has no residual half (its output would feed nothing, and Opacus needs every parameter on
the loss path). SSSD's weight norm is left out: Opacus has no per-sample gradients for parametrized layers.

Conditioning: labels (multi-hot [B, 71]) and demographics ([B, 8]) each go through an nn.Linear (never a
multi-hot @ weight product, which would bypass Opacus' hooks) and are summed. Classifier-free guidance
drops all conditioning per example via `cond_keep`; the dropped examples get a learned null embedding,
realised as nn.Linear(1, D, bias=False) applied to (1 - cond_keep), so its per-sample gradient comes
from Opacus' Linear sampler like every other layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from common.config import ModelConfig
from common.model.s4 import S4Block

__all__ = ["Denoiser", "DenoiserSpec", "PRESETS", "build_denoiser", "count_parameters", "resolve_spec"]


@dataclass(frozen=True)
class DenoiserSpec:
    """The resolved architecture (a preset with the config's overrides applied)."""

    channels: int  # residual and skip channels C
    blocks: int  # residual blocks
    state_dim: int  # S4D state size N
    bidirectional: bool
    step_embed_dim: int  # sinusoidal embedding width
    step_hidden_dim: int  # width of the step MLP and of what each block projects from
    cond_dim: int  # width of the label + demographics embedding


PRESETS: dict[str, DenoiserSpec] = {
    # Unit tests: well under 1M parameters, a forward pass on [8, 8, 1000] in milliseconds.
    "tiny": DenoiserSpec(
        channels=32, blocks=2, state_dim=16, bidirectional=True, step_embed_dim=32, step_hidden_dim=64, cond_dim=32
    ),
    # CPU experiments: a few million parameters.
    "small": DenoiserSpec(
        channels=96, blocks=8, state_dim=32, bidirectional=True, step_embed_dim=64, step_hidden_dim=256, cond_dim=128
    ),
    # SSSD-ECG's published configuration (36 blocks x 256 channels, S4 state 64, bidirectional, embeddings 128/512).
    "sssd": DenoiserSpec(
        channels=256, blocks=36, state_dim=64, bidirectional=True, step_embed_dim=128, step_hidden_dim=512, cond_dim=128
    ),
}


def resolve_spec(cfg: ModelConfig) -> DenoiserSpec:
    """The preset named by cfg.size with cfg.channels / blocks / state_dim / bidirectional applied when set."""
    if cfg.size not in PRESETS:
        raise ValueError(f"model.size: unknown preset {cfg.size!r} (known: {', '.join(PRESETS)})")
    spec = PRESETS[cfg.size]
    overrides = {
        name: getattr(cfg, name)
        for name in ("channels", "blocks", "state_dim", "bidirectional")
        if getattr(cfg, name) is not None
    }
    spec = replace(spec, **overrides)
    if cfg.s4_levels is not None:
        raise ValueError(f"model.s4_levels applies to model.size=unet; every block of '{cfg.size}' has an S4 layer")
    if cfg.attention_levels is not None:
        raise ValueError(f"model.attention_levels applies to model.size=unet, not '{cfg.size}'")
    if spec.channels < 1:
        raise ValueError(f"model.channels must be positive, got {spec.channels}")
    if spec.blocks < 1:
        raise ValueError(f"model.blocks must be positive, got {spec.blocks}")
    if spec.state_dim < 2 or spec.state_dim % 2:
        raise ValueError(f"model.state_dim must be an even number >= 2 (conjugate mode pairs), got {spec.state_dim}")
    if not 0.0 <= cfg.cond_dropout <= 1.0:
        raise ValueError(f"model.cond_dropout must lie in [0, 1], got {cfg.cond_dropout}")
    return spec


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (a complex S4D mode counts as two)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of diffusion steps [B] -> [B, dim] (sin half, cos half), as in SSSD/DiffWave."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    )  # (half)
    angles = t.float().unsqueeze(1) * frequencies.unsqueeze(0)  # (B half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B dim)


class ResidualBlock(nn.Module):
    """One SSSD residual block; its step and conditioning projections come precomputed from the Denoiser."""

    def __init__(self, spec: DenoiserSpec, has_residual: bool) -> None:
        super().__init__()
        c = spec.channels
        self.channels = c
        self.has_residual = has_residual
        self.in_conv = nn.Conv1d(c, 2 * c, kernel_size=3, padding=1)
        self.s4_before = S4Block(2 * c, state_dim=spec.state_dim, bidirectional=spec.bidirectional)
        self.s4_after = S4Block(2 * c, state_dim=spec.state_dim, bidirectional=spec.bidirectional)
        # Residual and skip 1x1 convs as one conv (DiffWave's output projection); the last block has no residual.
        self.out_conv = nn.Conv1d(c, 2 * c if has_residual else c, kernel_size=1)
        nn.init.kaiming_normal_(self.in_conv.weight)
        nn.init.kaiming_normal_(self.out_conv.weight)

    def forward(self, x: Tensor, step_bias: Tensor, cond_bias: Tensor) -> tuple[Tensor | None, Tensor]:
        h = x + step_bias.unsqueeze(-1)  # (B C L)
        h = self.in_conv(h)  # (B 2C L)
        h = self.s4_before(h)  # (B 2C L)
        h = h + cond_bias.unsqueeze(-1)  # (B 2C L)
        h = self.s4_after(h)  # (B 2C L)
        out = torch.tanh(h[:, : self.channels]) * torch.sigmoid(h[:, self.channels :])  # (B C L)
        out = self.out_conv(out)  # (B 2C L) or (B C L)
        if not self.has_residual:
            return None, out
        residual, skip = out[:, : self.channels], out[:, self.channels :]  # (B C L) each
        return (x + residual) * math.sqrt(0.5), skip


class Denoiser(nn.Module):
    """Predicts the noise eps from (x_t [B, C_in, L], t [B] int64, labels [B, 71], demographics [B, 8]).

    `cond_keep` [B] (1 keep, 0 drop) selects per example between the conditioning embedding and the learned
    null embedding; None keeps all conditioning.
    """

    def __init__(
        self,
        spec: DenoiserSpec,
        in_channels: int = 8,
        num_labels: int = 71,
        demo_dim: int = 8,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_labels < 1 or demo_dim < 1:
            raise ValueError(
                "Denoiser: in_channels, num_labels and demo_dim must be positive, "
                f"got {in_channels}, {num_labels}, {demo_dim}"
            )
        self.spec = spec
        self.in_channels = in_channels
        self.num_labels = num_labels
        self.demo_dim = demo_dim
        self.activation_checkpointing = activation_checkpointing
        c = spec.channels
        self.input_proj = nn.Conv1d(in_channels, c, kernel_size=1)
        self.step_mlp = nn.Sequential(
            nn.Linear(spec.step_embed_dim, spec.step_hidden_dim),
            nn.SiLU(),
            nn.Linear(spec.step_hidden_dim, spec.step_hidden_dim),
            nn.SiLU(),
        )
        self.label_proj = nn.Linear(num_labels, spec.cond_dim, bias=False)
        self.demo_proj = nn.Linear(demo_dim, spec.cond_dim)
        self.null_cond = nn.Linear(1, spec.cond_dim, bias=False)
        # SSSD gives every block its own Linear for the step and for the conditioning; stacking them into two
        # Linears computes the same thing with 2 Opacus hooks instead of 2 per block.
        self.step_to_blocks = nn.Linear(spec.step_hidden_dim, spec.blocks * c)
        self.cond_to_blocks = nn.Linear(spec.cond_dim, spec.blocks * 2 * c)
        self.blocks = nn.ModuleList(ResidualBlock(spec, has_residual=i < spec.blocks - 1) for i in range(spec.blocks))
        self.skip_proj = nn.Conv1d(c, c, kernel_size=1)
        self.output_proj = nn.Conv1d(c, in_channels, kernel_size=1)
        nn.init.zeros_(self.output_proj.weight)  # start as eps_hat = 0 (SSSD's ZeroConv1d)
        nn.init.zeros_(self.output_proj.bias)

    def _check_inputs(
        self, x: Tensor, t: Tensor, labels: Tensor, demographics: Tensor, cond_keep: Tensor | None
    ) -> None:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"Denoiser: x must be [B, {self.in_channels}, L], got {tuple(x.shape)}")
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"Denoiser: t must be [B]=[{batch}], got {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"Denoiser: t must hold integer diffusion steps, got dtype {t.dtype}")
        if labels.shape != (batch, self.num_labels):
            raise ValueError(
                f"Denoiser: labels must be [B, {self.num_labels}]=[{batch}, {self.num_labels}], "
                f"got {tuple(labels.shape)}"
            )
        if demographics.shape != (batch, self.demo_dim):
            raise ValueError(
                f"Denoiser: demographics must be [B, {self.demo_dim}]=[{batch}, {self.demo_dim}], "
                f"got {tuple(demographics.shape)}"
            )
        if cond_keep is not None and cond_keep.shape != (batch,):
            raise ValueError(f"Denoiser: cond_keep must be [B]=[{batch}] or None, got {tuple(cond_keep.shape)}")

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        labels: Tensor,
        demographics: Tensor,
        cond_keep: Tensor | None = None,
    ) -> Tensor:
        self._check_inputs(x, t, labels, demographics, cond_keep)
        batch = x.shape[0]
        dtype = self.input_proj.weight.dtype
        if cond_keep is None:
            cond_keep = torch.ones(batch, device=x.device, dtype=dtype)
        keep = cond_keep.to(dtype).unsqueeze(1)  # (B 1)
        cond = keep * (self.label_proj(labels.to(dtype)) + self.demo_proj(demographics.to(dtype)))  # (B D)
        cond = cond + self.null_cond(1.0 - keep)  # (B D): the null embedding where dropped
        step = self.step_mlp(timestep_embedding(t, self.spec.step_embed_dim).to(dtype))  # (B E)
        step_biases = self.step_to_blocks(step).chunk(len(self.blocks), dim=1)  # blocks x (B C)
        cond_biases = self.cond_to_blocks(cond).chunk(len(self.blocks), dim=1)  # blocks x (B 2C)

        h = F.relu(self.input_proj(x.to(dtype)))  # (B C L)
        skips = None
        use_checkpoint = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block, step_bias, cond_bias in zip(self.blocks, step_biases, cond_biases):
            if use_checkpoint:
                h_next, skip = checkpoint(block, h, step_bias, cond_bias, use_reentrant=False)
            else:
                h_next, skip = block(h, step_bias, cond_bias)
            skips = skip if skips is None else skips + skip
            if h_next is not None:
                h = h_next
        out = skips * math.sqrt(1.0 / len(self.blocks))  # (B C L)
        out = F.relu(self.skip_proj(out))  # (B C L)
        return self.output_proj(out)  # (B C_in L)


def build_denoiser(cfg: ModelConfig, in_channels: int = 8, num_labels: int = 71, demo_dim: int = 8) -> nn.Module:
    """The denoiser described by the `model` config section (preset plus overrides)."""
    if cfg.size == "unet":
        from common.model.unet import build_unet  # unet.py builds on this module

        return build_unet(cfg, in_channels=in_channels, num_labels=num_labels, demo_dim=demo_dim)
    return Denoiser(
        resolve_spec(cfg),
        in_channels=in_channels,
        num_labels=num_labels,
        demo_dim=demo_dim,
        activation_checkpointing=cfg.activation_checkpointing,
    )
