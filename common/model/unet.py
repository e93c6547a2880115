"""Multi-scale conditional denoiser (a 1-D U-Net in the spirit of SaShiMi) for 8-lead ECGs.

    x [B, 8, L] -> patchify Conv1d(kernel = stride = P) -> down path, L/P -> L/(P f1) -> ...
                -> up path (+ skips) -> GroupNorm, SiLU, Conv1d -> zero-init Conv1d to 8P -> un-patchify [B, 8, L]

Each level runs `res_blocks` residual blocks on the way down and again on the way up, after the upsampled
features and the down path's skip are added (SaShiMi's additive skips: every block keeps its width, so no
1x1 shortcut convs). Levels in `s4_levels` add a bidirectional S4Block after their blocks on both paths; at
the coarsest level, the bottleneck, it sits between the down and the up blocks. Levels in `attention_levels`
add a self-attention block with rotary positions after that, in the same places. Downsampling is a strided
Conv1d (kernel = stride = factor). Upsampling is a 1x1 Conv1d and nearest-neighbour repetition: the same
function as Upsample-then-1x1-conv at 1/factor of the cost, and no ConvTranspose1d, for which Opacus has
no per-sample gradients.

Residual block (pre-norm, FiLM as in DDPM++/DiT):

    h = Conv1d_3(SiLU(GroupNorm(x)))
    h = GroupNorm_noaffine(h) * (1 + scale) + shift      (scale, shift) = Linear(SiLU(step + condition))
    out = x + Conv1d_3(SiLU(h))

Every block's (scale, shift) comes from one stacked Linear (one Opacus hook instead of one per block).
Compute sits at the two finest levels, parameters at the coarse ones where convolutions are cheap: per
sample this trains several times faster than the full-resolution SSSD stack.

Conditioning and classifier-free guidance are those of `Denoiser`: labels and demographics through
nn.Linear, summed; `cond_keep` [B] swaps in a learned null embedding, nn.Linear(1, D) of (1 - cond_keep);
the result is added to the step embedding (ADM's class + time embedding). Only layers with Opacus grad
samplers (Linear, Conv1d, GroupNorm, LayerNorm, S4DKernelConv) hold parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import ModelConfig
from common.model.denoiser import Denoiser, timestep_embedding
from common.model.s4 import S4Block

__all__ = ["UNET_PRESET", "UNetDenoiser", "UNetSpec", "build_unet", "resolve_unet_spec"]


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of the U-Net denoiser; signals must have a length divisible by `stride`."""

    patch: int = 4  # samples per token of the patchify stem
    channels: tuple[int, ...] = (64, 128, 192)  # width of each level, finest first
    factors: tuple[int, ...] = (2, 5)  # downsampling between consecutive levels
    res_blocks: int = 1  # residual blocks per level and path
    s4_levels: tuple[int, ...] = (2,)  # levels with an S4Block; must include the coarsest
    attention_levels: tuple[int, ...] = ()  # levels with a rotary self-attention block (after the S4Block)
    head_dim: int = 32  # channels per attention head
    state_dim: int = 32  # S4D state size N
    bidirectional: bool = True
    step_embed_dim: int = 64  # sinusoidal embedding width
    embed_dim: int = 256  # width of the step + condition embedding every FiLM reads
    groups: int = 8  # GroupNorm groups

    @property
    def stride(self) -> int:
        return self.patch * math.prod(self.factors)

    def validate(self) -> None:
        levels = len(self.channels)
        if self.patch < 1 or any(f < 2 for f in self.factors):
            raise ValueError(f"unet: patch must be >= 1 and factors >= 2, got {self.patch}, {self.factors}")
        if levels < 1 or len(self.factors) != levels - 1:
            raise ValueError(f"unet: need one factor between consecutive levels, got {self.channels}, {self.factors}")
        if self.res_blocks < 1:
            raise ValueError(f"unet: res_blocks (model.blocks) must be positive, got {self.res_blocks}")
        if any(c < 1 or c % self.groups for c in self.channels):
            raise ValueError(f"unet: channels {self.channels} must be positive multiples of groups={self.groups}")
        if levels - 1 not in self.s4_levels or any(not 0 <= i < levels for i in self.s4_levels):
            raise ValueError(f"unet: s4_levels {self.s4_levels} must lie in 0..{levels - 1} and include {levels - 1}")
        if any(not 0 <= i < levels for i in self.attention_levels):
            raise ValueError(f"unet: attention_levels {self.attention_levels} must lie in 0..{levels - 1}")
        if self.attention_levels and any(self.channels[i] % self.head_dim for i in self.attention_levels):
            raise ValueError(f"unet: channels {self.channels} at attention_levels must be multiples of head_dim={self.head_dim}")
        if self.head_dim % 2:
            raise ValueError(f"unet: head_dim must be even (rotary pairs), got {self.head_dim}")
        if self.state_dim < 2 or self.state_dim % 2:
            raise ValueError(f"unet: state_dim must be an even number >= 2, got {self.state_dim}")


# Among the widths tried with simulations/benchmarks/bench_unet.py, the fastest to train (DP and non-DP)
# within 1-4M parameters; a wider coarsest level adds parameters (and DP cost) but little speed or compute.
UNET_PRESET = UNetSpec()


def resolve_unet_spec(cfg: ModelConfig) -> UNetSpec:
    """UNET_PRESET with the config's overrides: `channels` sets the finest width (coarser levels keep the
    preset's ratios), `blocks` the residual blocks per level, `s4_levels`, `state_dim` and `bidirectional`
    the S4 layers, `attention_levels` the self-attention blocks."""
    spec = UNET_PRESET
    if cfg.channels is not None:
        if cfg.channels < 1:
            raise ValueError(f"model.channels must be positive, got {cfg.channels}")
        base = spec.channels[0]
        spec = replace(spec, channels=tuple(round(cfg.channels * c / base) for c in spec.channels))
    overrides = {"res_blocks": cfg.blocks, "state_dim": cfg.state_dim, "bidirectional": cfg.bidirectional,
                 "s4_levels": cfg.s4_levels, "attention_levels": cfg.attention_levels}
    spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if not 0.0 <= cfg.cond_dropout <= 1.0:
        raise ValueError(f"model.cond_dropout must lie in [0, 1], got {cfg.cond_dropout}")
    if cfg.activation_checkpointing:
        raise ValueError("model.activation_checkpointing is not supported by model.size=unet")
    spec.validate()
    return spec


class UNetResBlock(nn.Module):
    """Pre-norm residual block with FiLM conditioning; input and output (B, C, L)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(groups, channels)
        self.conv_in = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        self.norm_mid = nn.GroupNorm(groups, channels, affine=False)  # FiLM supplies scale and shift
        self.conv_out = nn.Conv1d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, film: Tensor) -> Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))  # (B C L)
        scale, shift = film.unsqueeze(-1).chunk(2, dim=1)  # (B C 1) each
        h = self.norm_mid(h) * (1 + scale) + shift  # (B C L)
        return x + self.conv_out(F.silu(h))  # (B C L)


def rotate(x: Tensor) -> Tensor:
    """Rotary position embedding (RoPE, Su et al. 2021) of x (B heads L d): pair i of the channels turns by
    position * 10000^(-2i/d), so the dot product of a query and a key depends on their offset, not on where
    they sit. A fixed function: no parameters, nothing for Opacus to see."""
    length, dim = x.shape[-2], x.shape[-1]
    freqs = torch.pow(10000.0, -torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)  # (d/2)
    angles = torch.arange(length, device=x.device, dtype=torch.float32).unsqueeze(1) * freqs  # (L d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (L d/2) each
    even, odd = x[..., 0::2], x[..., 1::2]  # (B heads L d/2) each
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)  # (B heads L d)


class UNetAttention(nn.Module):
    """Pre-norm multi-head self-attention with rotary positions, residual; input and output (B, C, L).

    Beats recur at each record's own RR interval. Convolutions and the S4 kernel mix by fixed offsets; a
    query with relative positions can find where the neighbouring beats sit and place its own between them.
    Projections are 1x1 Conv1d (exact per-sample gradients); the attention itself holds no parameters."""

    def __init__(self, channels: int, head_dim: int, groups: int) -> None:
        super().__init__()
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, length = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, 3, self.heads, channels // self.heads, length)  # (B 3 heads d L)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B heads L d) each
        h = F.scaled_dot_product_attention(rotate(q), rotate(k), v)  # (B heads L d)
        return x + self.proj(h.transpose(-1, -2).reshape(batch, channels, length))  # (B C L)


class UNetStage(nn.Module):
    """Residual blocks at one resolution, then an optional S4Block and an optional attention block;
    `film` is (B, film_width)."""

    def __init__(self, channels: int, spec: UNetSpec, with_s4: bool, with_attention: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(UNetResBlock(channels, spec.groups) for _ in range(spec.res_blocks))
        self.s4 = S4Block(channels, state_dim=spec.state_dim, bidirectional=spec.bidirectional) if with_s4 else None
        self.attention = UNetAttention(channels, spec.head_dim, spec.groups) if with_attention else None
        self.film_width = 2 * channels * spec.res_blocks

    def forward(self, h: Tensor, film: Tensor) -> Tensor:
        for block, block_film in zip(self.blocks, film.chunk(len(self.blocks), dim=1)):
            h = block(h, block_film)  # (B C L)
        if self.s4 is not None:
            h = self.s4(h)  # (B C L)
        return h if self.attention is None else self.attention(h)  # (B C L)


class UNetDenoiser(nn.Module):
    """Predicts eps from (x_t [B, 8, L], t [B] int64, labels [B, 71], demographics [B, 8], cond_keep [B] or None),
    with L divisible by spec.stride; same interface and conditioning semantics as `Denoiser`."""

    def __init__(self, spec: UNetSpec, in_channels: int = 8, num_labels: int = 71, demo_dim: int = 8,
                 rhythm: bool = False) -> None:
        super().__init__()
        spec.validate()
        if in_channels < 1 or num_labels < 1 or demo_dim < 1:
            raise ValueError(
                "UNetDenoiser: in_channels, num_labels and demo_dim must be positive, "
                f"got {in_channels}, {num_labels}, {demo_dim}"
            )
        self.spec = spec
        self.in_channels, self.num_labels, self.demo_dim = in_channels, num_labels, demo_dim
        self.rhythm = rhythm  # a beat-map channel (common/rhythm.py) enters the stem with the signal
        ch, width = spec.channels, spec.embed_dim
        self.step_mlp = nn.Sequential(nn.Linear(spec.step_embed_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.label_proj = nn.Linear(num_labels, width, bias=False)
        self.demo_proj = nn.Linear(demo_dim, width)
        self.null_cond = nn.Linear(1, width, bias=False)

        self.stem = nn.Conv1d(in_channels + int(rhythm), ch[0], kernel_size=spec.patch, stride=spec.patch)
        self.down = nn.ModuleList(
            UNetStage(c, spec, i in spec.s4_levels, i in spec.attention_levels) for i, c in enumerate(ch)
        )
        self.downsample = nn.ModuleList(
            nn.Conv1d(ch[i], ch[i + 1], kernel_size=f, stride=f) for i, f in enumerate(spec.factors)
        )
        self.upsample = nn.ModuleList(
            nn.Sequential(nn.Conv1d(ch[i + 1], ch[i], kernel_size=1), nn.Upsample(scale_factor=f, mode="nearest"))
            for i, f in enumerate(spec.factors)
        )
        # up[0] is the bottleneck's second half (its S4Block ran in down[-1]); up[j] then climbs to level L-1-j.
        self.up = nn.ModuleList(
            [UNetStage(ch[-1], spec, with_s4=False)]
            + [UNetStage(ch[i], spec, i in spec.s4_levels, i in spec.attention_levels) for i in reversed(range(len(ch) - 1))]
        )
        self.film_widths = [stage.film_width for stage in (*self.down, *self.up)]
        self.film = nn.Linear(width, sum(self.film_widths))
        self.head = nn.Sequential(
            nn.GroupNorm(spec.groups, ch[0]), nn.SiLU(), nn.Conv1d(ch[0], ch[0], 3, padding=1), nn.SiLU()
        )
        self.unpatchify = nn.Conv1d(ch[0], in_channels * spec.patch, kernel_size=1)
        nn.init.zeros_(self.unpatchify.weight)  # start as eps_hat = 0
        nn.init.zeros_(self.unpatchify.bias)

    def _embedding(self, t: Tensor, labels: Tensor, demographics: Tensor, cond_keep: Tensor | None) -> Tensor:
        """SiLU(step embedding + condition embedding) (B, E), the input of every block's FiLM."""
        dtype = self.stem.weight.dtype
        if cond_keep is None:
            cond_keep = torch.ones(t.shape[0], device=t.device, dtype=dtype)
        keep = cond_keep.to(dtype).unsqueeze(1)  # (B 1)
        cond = keep * (self.label_proj(labels.to(dtype)) + self.demo_proj(demographics.to(dtype)))  # (B E)
        cond = cond + self.null_cond(1.0 - keep)  # (B E): the null embedding where dropped
        step = self.step_mlp(timestep_embedding(t, self.spec.step_embed_dim).to(dtype))  # (B E)
        return F.silu(step + cond)  # (B E)

    def forward(
        self, x: Tensor, t: Tensor, labels: Tensor, demographics: Tensor, cond_keep: Tensor | None = None,
        rhythm: Tensor | None = None,
    ) -> Tensor:
        """`rhythm` [B, 1, L]: the beat map, required by (and only accepted by) a rhythm-conditioned model."""
        Denoiser._check_inputs(self, x, t, labels, demographics, cond_keep)  # the same input contract
        batch, _, length = x.shape
        if length % self.spec.stride:
            raise ValueError(f"UNetDenoiser: length {length} must be divisible by {self.spec.stride}")
        if self.rhythm != (rhythm is not None):
            raise ValueError("UNetDenoiser: a rhythm-conditioned model needs rhythm= [B, 1, L], others take none")
        if rhythm is not None and rhythm.shape != (batch, 1, length):
            raise ValueError(f"UNetDenoiser: rhythm must be [B, 1, L]=[{batch}, 1, {length}], got {tuple(rhythm.shape)}")
        films = iter(self.film(self._embedding(t, labels, demographics, cond_keep)).split(self.film_widths, dim=1))
        stem_in = x if rhythm is None else torch.cat([x, rhythm.to(x.dtype)], dim=1)  # (B 8[+1] L)
        h = self.stem(stem_in.to(self.stem.weight.dtype))  # (B C0 L/P)
        skips = []
        for level, stage in enumerate(self.down):
            h = stage(h, next(films))  # (B C_level L_level)
            if level < len(self.downsample):
                skips.append(h)
                h = self.downsample[level](h)  # (B C_level+1 L_level+1)
        h = self.up[0](h, next(films))  # (B C_last L_last)
        for level, stage in zip(reversed(range(len(skips))), self.up[1:]):
            h = stage(self.upsample[level](h) + skips[level], next(films))  # (B C_level L_level)
        out = self.unpatchify(self.head(h))  # (B 8P L/P)
        out = out.unflatten(1, (self.in_channels, self.spec.patch))  # (B 8 P L/P): channel = lead * P + offset
        return out.transpose(2, 3).reshape(batch, self.in_channels, length)  # (B 8 L)


def build_unet(cfg: ModelConfig, in_channels: int = 8, num_labels: int = 71, demo_dim: int = 8) -> UNetDenoiser:
    """The U-Net denoiser for model.size=unet (UNET_PRESET with the config's overrides)."""
    return UNetDenoiser(resolve_unet_spec(cfg), in_channels=in_channels, num_labels=num_labels, demo_dim=demo_dim,
                        rhythm=cfg.rhythm)
