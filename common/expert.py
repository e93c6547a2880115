"""A public high-noise expert: a second denoiser that answers the sampling steps where the noise is large.

An eps model denoises best where the noise is small, but at the highest noise levels it reads the
record's layout (where the beats fall) out of whatever the starting noise holds. A model trained for x0
at high noise only (v-prediction, zero terminal SNR, `diffusion.train_timesteps: [100, 200]`) places the
layout there instead. `diffusion.expert` names such a `fedecg pretrain` run; sampling then asks it at the
timesteps t >= `diffusion.expert_from` and the generator's own network below.

The expert is trained centrally on the public pool only (the partition's public sites, patient-disjoint
from every federated site), is never fine-tuned by the federation, and so is a function of public data:
the certificate names it (weights hash, what it was trained on) and the release bundle carries it as
`expert.safetensors` + `expert.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.bundle import (
    RHYTHM_JSON,
    WEIGHTS,
    BundleError,
    checkpoint_rhythm,
    checkpoint_rhythm_sha256,
    load_weights,
    provenance_of,
    public_run,
    read_checkpoint,
    read_rhythm_table,
)
from common.config import Config, from_dict, to_dict
from common.diffusion import GaussianDiffusion
from common.hashing import sha256_file
from common.normalization import Normalizer
from common.rhythm import RhythmTable

EXPERT_WEIGHTS = "expert.safetensors"
EXPERT_JSON = "expert.json"
EXPERT_RHYTHM = "expert_rhythm.json"  # a rhythm-conditioned expert's public rhythm table
EXPERT_FORMAT = "fedecg-expert/1"


@dataclass
class PublicExpert:
    model: nn.Module
    diffusion: GaussianDiffusion
    provenance: dict[str, Any]  # provenance_of(its base.json)
    cfg: Config  # the expert's own training config (model and diffusion sections)
    weights: Path
    rhythm: RhythmTable | None = None  # where a rhythm-conditioned expert's beat times are drawn from


class SwitchedDenoiser(nn.Module):
    """An eps model for `low_diffusion`'s schedule: `low` below `switch`, `high` (any parameterisation, its
    own schedule) at and above it."""

    def __init__(self, low: nn.Module, low_diffusion, high: nn.Module, high_diffusion, switch: int) -> None:
        super().__init__()
        self.low, self.high, self.switch = low, high, switch
        self.low_diffusion, self.high_diffusion = low_diffusion, high_diffusion
        abar_low, abar_high = low_diffusion.table("alphas_cumprod"), high_diffusion.table("alphas_cumprod")
        self.register_buffer("high_step", (abar_low[:, None] - abar_high[None, :]).abs().argmin(dim=1), persistent=False)
        self.in_channels = low.in_channels

    def forward(self, x: Tensor, t: Tensor, labels: Tensor, demographics: Tensor, cond_keep: Tensor | None = None,
                rhythm: Tensor | None = None) -> Tensor:
        """`rhythm` [B, 1, L]: beat maps, handed to whichever of the two models reads them."""
        if rhythm is not None and not (getattr(self.low, "rhythm", False) or getattr(self.high, "rhythm", False)):
            raise ValueError("SwitchedDenoiser: beat maps given, but neither model reads them")
        eps = torch.empty_like(x)  # (B C L): every row is written by exactly one of the two models
        for rows, model, answer in ((t < self.switch, self.low, self._low_eps), (t >= self.switch, self.high, self._high_eps)):
            if rows.any():
                keep = None if cond_keep is None else cond_keep[rows]
                beats = {"rhythm": rhythm[rows]} if rhythm is not None and getattr(model, "rhythm", False) else {}
                eps[rows] = answer(x[rows], t[rows], labels[rows], demographics[rows], keep, beats).to(x.dtype)
        return eps

    def _low_eps(self, x: Tensor, t: Tensor, labels: Tensor, demographics: Tensor, keep: Tensor | None,
                 beats: dict[str, Tensor]) -> Tensor:
        return self.low(x, t, labels, demographics, keep, **beats)

    def _high_eps(self, x: Tensor, t: Tensor, labels: Tensor, demographics: Tensor, keep: Tensor | None,
                  beats: dict[str, Tensor]) -> Tensor:
        """The high model's x0 estimate at its nearest noise level, as the eps the low schedule implies."""
        t_high = self.high_step[t]
        output = self.high(x, t_high, labels, demographics, keep, **beats)
        x0_hat, _ = self.high_diffusion.split_output(x, t_high, output)
        signal = self.low_diffusion.table("sqrt_alphas_cumprod").to(x)[t].view(-1, 1, 1)
        noise = self.low_diffusion.table("sqrt_one_minus_alphas_cumprod").to(x)[t].view(-1, 1, 1)
        return (x - signal * x0_hat) / noise


def _build(expert_cfg: Config, state: dict[str, Tensor], provenance: dict[str, Any], weights: Path,
           rhythm: RhythmTable | None) -> PublicExpert:
    from common.model.denoiser import build_denoiser

    if expert_cfg.diffusion.expert:
        raise ValueError(f"{weights}: an expert must not name an expert of its own (diffusion.expert)")
    if expert_cfg.model.rhythm != (rhythm is not None):
        raise BundleError(f"{weights}: a rhythm-conditioned expert comes with its rhythm table, others with none")
    model = build_denoiser(expert_cfg.model)
    model.load_state_dict(state)
    model.eval()
    return PublicExpert(model, GaussianDiffusion(expert_cfg.diffusion), provenance, expert_cfg, weights, rhythm)


def load_expert_run(path: str | Path, cfg: Config, normalizer: Normalizer) -> PublicExpert:
    """The expert of `diffusion.expert`: a `fedecg pretrain` run on exactly the public pool that `cfg`'s
    partition excludes from the federation, normalized like the generator."""
    checkpoint, base = public_run(path, cfg, "diffusion.expert")
    state, expert_cfg, expert_normalizer, _ = read_checkpoint(checkpoint)
    if expert_normalizer.to_dict() != normalizer.to_dict():
        raise BundleError(f"diffusion.expert={path}: normalizes signals differently from this generator")
    if checkpoint_rhythm_sha256(checkpoint) != base.get("rhythm_sha256"):
        raise BundleError(f"diffusion.expert={path}: its rhythm table is not the one base.json describes")
    return _build(expert_cfg, state, provenance_of(base), checkpoint / WEIGHTS, checkpoint_rhythm(checkpoint))


def expert_provenance(cfg: Config, normalizer: Normalizer) -> dict[str, Any] | None:
    """What the certificate and the model card say of the configured expert (None: none configured)."""
    if not cfg.diffusion.expert:
        return None
    expert = load_expert_run(cfg.diffusion.expert, cfg, normalizer)
    return {**expert.provenance, "answers_from_step": cfg.diffusion.expert_from}


def expert_bundle_files(expert: PublicExpert) -> dict[str, bytes | Path]:
    """The bundle's copy of the expert: its weights and what is needed to rebuild and check them."""
    plain = to_dict(expert.cfg)
    record = {"format": EXPERT_FORMAT, **expert.provenance,
              "model": plain["model"], "diffusion": plain["diffusion"], "partition": plain["partition"]}
    files: dict[str, bytes | Path] = {EXPERT_WEIGHTS: expert.weights, EXPERT_JSON: json.dumps(record, indent=2).encode()}
    if expert.rhythm is not None:
        files[EXPERT_RHYTHM] = expert.weights.parent / RHYTHM_JSON  # the file its provenance hashes
    return files


def load_expert_files(directory: Path) -> PublicExpert:
    """The expert a bundle carries (its files already checked against the manifest)."""
    record = json.loads((directory / EXPERT_JSON).read_text())
    if record.get("format") != EXPERT_FORMAT:
        raise BundleError(f"{directory / EXPERT_JSON}: unknown format {record.get('format')!r}")
    weights = directory / EXPERT_WEIGHTS
    if sha256_file(weights) != record["weights_sha256"]:
        raise BundleError(f"{weights}: not the weights {EXPERT_JSON} describes")
    expert_cfg = from_dict({k: record[k] for k in ("model", "diffusion", "partition")}, source=str(directory / EXPERT_JSON))
    sha256 = record.get("rhythm_sha256")
    rhythm = read_rhythm_table(directory / EXPERT_RHYTHM, sha256) if sha256 else None
    return _build(expert_cfg, load_weights(weights), provenance_of(record), weights, rhythm)


def sampling_denoiser(model: nn.Module, diffusion: GaussianDiffusion, expert: PublicExpert | None) -> nn.Module:
    """What the sampler calls: the generator's network, with the expert at the high-noise steps if any."""
    if expert is None:
        return model
    return SwitchedDenoiser(model, diffusion, expert.model, expert.diffusion, diffusion.cfg.expert_from)
