"""Per-lead normalization of signals: the Normalizer, and the fixed one federated training uses.

Fitting per-lead statistics across sites would release an aggregate of private records outside the
DP accounting. Instead every site and the server use the same constants: zero mean (ECG leads are
baseline-centred) and a per-lead scale of typical 12-lead amplitudes, taken once from the public PTB-XL
release (standard deviation of I, II, V1-V6 in mV, rounded). Central non-private runs fit their own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.data.errors import DataError
from common.data.leads import MODEL_LEADS, is_torch

# Order: I, II, V1, V2, V3, V4, V5, V6 (mV).
PUBLIC_LEAD_SCALE_MV = (0.16, 0.18, 0.22, 0.38, 0.35, 0.31, 0.29, 0.27)


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare .mean/.std explicitly
class Normalizer:
    """Per-lead mean/std (float64) of training signals; travels with the model as JSON (`to_dict`)."""

    mean: np.ndarray  # float64 [leads]
    std: np.ndarray  # float64 [leads], > 0
    leads: tuple[str, ...] = MODEL_LEADS

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        std = np.asarray(self.std, dtype=np.float64).reshape(-1)
        if mean.shape != (len(self.leads),) or std.shape != (len(self.leads),):
            raise ValueError(f"Normalizer: mean {mean.shape} and std {std.shape} must both have {len(self.leads)} entries")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"Normalizer: mean must be finite and std finite and positive (std={std.tolist()})")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def fit(cls, signals: np.ndarray, leads: Sequence[str] = MODEL_LEADS, chunk: int = 1024) -> Normalizer:
        """Fit on [N, leads, L] signals (two passes, float64 accumulation, no float64 copy of the data)."""
        if signals.ndim != 3 or signals.shape[1] != len(leads) or signals.shape[0] == 0:
            raise ValueError(f"Normalizer.fit: expected [N>0, {len(leads)}, L] signals, got shape {signals.shape}")
        count = signals.shape[0] * signals.shape[2]
        total = np.zeros(len(leads))
        for start in range(0, signals.shape[0], chunk):
            total += np.sum(signals[start:start + chunk], axis=(0, 2), dtype=np.float64)
        mean = total / count
        squares = np.zeros(len(leads))
        for start in range(0, signals.shape[0], chunk):
            centred = signals[start:start + chunk].astype(np.float64) - mean[None, :, None]
            squares += np.einsum("nlt,nlt->l", centred, centred)
        std = np.sqrt(squares / count)
        flat = [leads[i] for i in np.flatnonzero(std == 0)]
        if flat:
            raise DataError(f"Normalizer.fit: lead(s) {flat} are constant over the training signals")
        return cls(mean=mean, std=std, leads=tuple(leads))

    def _stats(self, x: Any) -> tuple[Any, Any]:
        if x.shape[-2] != len(self.leads):
            raise ValueError(f"Normalizer: expected {len(self.leads)} leads on axis -2, got shape {tuple(x.shape)}")
        if is_torch(x):
            torch = sys.modules["torch"]
            as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64, device=x.device)[:, None]  # noqa: E731
            return as_tensor(self.mean), as_tensor(self.std)
        return self.mean[:, None], self.std[:, None]

    def normalize(self, x: Any) -> Any:
        """(x - mean) / std per lead, computed in float64, returned in x's dtype (numpy or torch)."""
        mean, std = self._stats(x)
        wide = x.double() if is_torch(x) else np.asarray(x, dtype=np.float64)
        out = (wide - mean) / std
        return out.to(x.dtype) if is_torch(x) else out.astype(x.dtype, copy=False)

    def denormalize(self, z: Any) -> Any:
        """The inverse of `normalize`: z * std + mean per lead."""
        mean, std = self._stats(z)
        wide = z.double() if is_torch(z) else np.asarray(z, dtype=np.float64)
        out = wide * std + mean
        return out.to(z.dtype) if is_torch(z) else out.astype(z.dtype, copy=False)

    def to_dict(self) -> dict[str, Any]:
        # Python floats are float64 and JSON round-trips them exactly (repr is shortest-exact).
        return {"leads": list(self.leads), "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        try:
            return cls(mean=np.array(data["mean"], dtype=np.float64), std=np.array(data["std"], dtype=np.float64),
                       leads=tuple(data["leads"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"Normalizer.from_dict: expected keys leads, mean, std ({err})") from err


def federated_normalizer() -> Normalizer:
    return Normalizer(mean=np.zeros(len(MODEL_LEADS)), std=np.array(PUBLIC_LEAD_SCALE_MV), leads=MODEL_LEADS)
