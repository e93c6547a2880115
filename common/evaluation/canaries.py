"""Canaries for the one-run privacy audit, and the calibrated membership score that finds them.

A canary set has m slots of two candidates each (see common/privacy/audit.py for why pairs). The
candidates are public: they come from `audit.seed` and from public records only, so the attacker is
assumed to know them; only which candidate of each slot was trained on (the coin) is secret. Two kinds:

- `ood`: a band-limited random waveform (0.5-6 Hz on every lead, unit RMS in the model's normalized
  space) with random statements and demographics: no ECG morphology, nothing the model could predict
  from the rest of the data, so a lower loss can only come from having trained on it;
- `relabelled`: a real record from the public pool (public sites' or the server's validation records,
  never a site's private record) with its statements replaced by three random ones and random
  demographics: a plausible ECG whose conditioning only training on it could teach.

Score of a candidate: the reduction of its denoising loss from the run's initial weights (the public base
or the seeded initialization, which every site can rebuild) to the final weights, each loss averaged
over several timesteps and noise draws. Calibrating against the initial model removes how hard a record
is to denoise in the first place; the two candidates of a slot are scored under identical noise, so
their difference measures training on one of them and little else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.data.demographics import DEMOGRAPHIC_FIELDS, encode_demographics
from common.evaluation.memorization import default_timesteps, diffusion_losses
from common.scp import SCP_CODES

CANARY_KINDS = ("ood", "relabelled")
OOD_BAND_HZ = (0.5, 6.0)
RELABEL_STATEMENTS = 3


@dataclass(frozen=True)
class CanarySet:
    """m slots x 2 candidates, in the model's normalized space."""

    signals: torch.Tensor  # [m, 2, 8, L] normalized
    labels: torch.Tensor  # [m, 2, 71]
    demographics: torch.Tensor  # [m, 2, 8] encoded
    kinds: tuple[str, ...]  # [m]

    def __len__(self) -> int:
        return int(self.signals.shape[0])

    def chosen(self, coins: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(signals, labels, demographics) of the candidate each coin selects: +1 -> first, -1 -> second."""
        pick = torch.as_tensor((np.asarray(coins) < 0).astype(np.int64))
        rows = torch.arange(len(self))
        return self.signals[rows, pick], self.labels[rows, pick], self.demographics[rows, pick]

    def candidate(self, which: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.signals[:, which], self.labels[:, which], self.demographics[:, which]


def _random_conditions(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((count, len(SCP_CODES)), dtype=np.float32)
    for row in labels:
        row[rng.choice(len(SCP_CODES), RELABEL_STATEMENTS, replace=False)] = 1.0
    demographics = np.zeros((count, len(DEMOGRAPHIC_FIELDS)), dtype=np.float64)
    demographics[:, 0] = rng.uniform(20, 85, count)
    demographics[:, 1] = rng.integers(0, 2, count)
    mask = np.zeros_like(demographics, dtype=bool)
    mask[:, :2] = True  # age and sex; height and weight missing, as in most PTB-XL records
    return labels, encode_demographics(demographics, mask).astype(np.float32)


def _ood_waveforms(rng: np.random.Generator, count: int, leads: int, length: int, rate_hz: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal((count, leads, length)), axis=-1)
    freqs = np.fft.rfftfreq(length, d=1.0 / rate_hz)
    spectrum[..., (freqs < OOD_BAND_HZ[0]) | (freqs > OOD_BAND_HZ[1])] = 0.0
    wave = np.fft.irfft(spectrum, n=length, axis=-1)
    return (wave / np.sqrt((wave**2).mean(axis=-1, keepdims=True))).astype(np.float32)


def build_canaries(pairs: int, kinds: tuple[str, ...], seed: int, leads: int, length: int, rate_hz: float,
                   public_pool: np.ndarray | None = None) -> CanarySet:
    """`pairs` slots; slot i is of kind kinds[i % len(kinds)]. public_pool: [N, 8, L] normalized public records."""
    if pairs < 1:
        raise ValueError(f"a canary set needs at least one slot, got {pairs}")
    unknown = sorted(set(kinds) - set(CANARY_KINDS))
    if not kinds or unknown:
        raise ValueError(f"canary kinds must be a non-empty subset of {CANARY_KINDS}, got {list(kinds)}")
    slot_kinds = tuple(kinds[i % len(kinds)] for i in range(pairs))
    relabelled = [i for i, k in enumerate(slot_kinds) if k == "relabelled"]
    rng = np.random.default_rng([seed, pairs])
    signals = _ood_waveforms(rng, 2 * pairs, leads, length, rate_hz).reshape(pairs, 2, leads, length)
    if relabelled:
        if public_pool is None or len(public_pool) < 2 * len(relabelled):
            have = 0 if public_pool is None else len(public_pool)
            raise ValueError(f"relabelled canaries need {2 * len(relabelled)} public records, the public pool has {have}; "
                             f"declare partition.public_sites, use more validation records, or audit.kinds: [ood]")
        picks = rng.choice(len(public_pool), 2 * len(relabelled), replace=False)
        signals[relabelled] = np.asarray(public_pool, dtype=np.float32)[picks].reshape(len(relabelled), 2, leads, length)
    labels, demographics = _random_conditions(rng, 2 * pairs)
    return CanarySet(
        signals=torch.from_numpy(signals),
        labels=torch.from_numpy(labels.reshape(pairs, 2, -1)),
        demographics=torch.from_numpy(demographics.reshape(pairs, 2, -1)),
        kinds=slot_kinds,
    )


def draw_coins(pairs: int, entropy: int) -> np.ndarray:
    """The secret: one fair coin per slot, from `entropy` (OS randomness kept at the site)."""
    return np.where(np.random.default_rng(entropy).random(pairs) < 0.5, 1, -1).astype(np.int64)


@dataclass(frozen=True)
class CanaryScores:
    per_candidate: np.ndarray  # [m, 2] loss reduction (initial - final) of each candidate, in spread units
    slot: np.ndarray  # [m] first minus second (standardized): > 0 says the first candidate was trained on

    def member_scores(self, coins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(trained-on candidates' scores, held-out candidates' scores), for AUC and TPR at low FPR."""
        first_in = np.asarray(coins) > 0
        rows = np.arange(len(first_in))
        return self.per_candidate[rows, np.where(first_in, 0, 1)], self.per_candidate[rows, np.where(first_in, 1, 0)]


def score_canaries(model: torch.nn.Module, reference: torch.nn.Module, diffusion: Any, canaries: CanarySet,
                   timesteps: int, noise_draws: int, seed: int = 0, batch_size: int = 64) -> CanaryScores:
    """Calibrated loss scores of every candidate (see the module docstring).

    Each timestep's scores are divided by their spread over the candidates before the timesteps are
    averaged: raw losses are largest at small t and would drown the other timesteps' evidence. The spread
    is taken over all candidates alike, without the coins.
    """
    per_candidate, slot = [], []
    def losses(net: torch.nn.Module, which: int, t: int) -> np.ndarray:
        return diffusion_losses(net, diffusion, *canaries.candidate(which), timesteps=[t], seed=seed,
                                batch_size=batch_size, noise_draws=noise_draws)

    for t in default_timesteps(diffusion.num_timesteps, timesteps):
        reduction = np.stack([losses(reference, w, t) - losses(model, w, t) for w in (0, 1)], axis=1)  # (m 2)
        difference = reduction[:, 0] - reduction[:, 1]
        per_candidate.append(reduction / _spread(reduction))
        slot.append(difference / _spread(difference))
    return CanaryScores(per_candidate=np.mean(per_candidate, axis=0), slot=np.mean(slot, axis=0))


def _spread(values: np.ndarray) -> float:
    spread = float(np.std(values))
    return spread if spread > 0 else 1.0
