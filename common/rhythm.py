"""Beat times as a conditioning channel, and the public rhythm table the sampler draws them from.

A small denoiser trained on a few thousand records places plausible beats but not at regular intervals:
the rhythm is decided at the highest noise levels, where nothing in x_t says where the next beat falls
(README, quality section). A rhythm-conditioned model (`model.rhythm: true`, U-Net only) reads one more
input channel, `beat_map`: a narrow Gaussian bump at every R peak. In training the peaks are the record's
own (lead II, `detect_r_peaks`); in sampling they are drawn from a `RhythmTable`.

The table is a function of the public pool only. It keeps, per public record, its rhythm key (which of
RHYTHM_CODES it carries), its mean RR interval and the RR coefficient of variation. A draw for a requested
condition picks a public record with the same rhythm key (else one sharing the first rhythm statement of
the request, else any), and lays out beats with that mean RR and variability from a random phase. Only
`fedecg pretrain` on the public pool builds rhythm-conditioned models and tables, so nothing here reads a
federated site's records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.evaluation.clinical import LEAD_II, PLAUSIBLE, detect_r_peaks
from common.scp import SCP_CODES

__all__ = ["RHYTHM_CODES", "RHYTHM_FORMAT", "RhythmTable", "beat_map", "beat_maps", "record_beats",
           "require_public_pool"]

RHYTHM_FORMAT = "fedecg-rhythm/1"
# The 12 PTB-XL rhythm statements and the two ectopic-beat statements that change the RR sequence.
RHYTHM_CODES: tuple[str, ...] = ("SR", "AFIB", "STACH", "SARRH", "SBRAD", "PACE", "SVARR", "BIGU", "AFLT",
                                 "SVTAC", "PSVT", "TRIGU", "PVC", "PAC")
BEAT_WIDTH = 2.0  # samples (20 ms at 100 Hz): the standard deviation of each bump
MIN_RR_S, MAX_RR_S = PLAUSIBLE["rr_s"]  # drawn intervals stay inside the clinical module's plausible range
_KEY_COLUMNS = [SCP_CODES.index(code) for code in RHYTHM_CODES]


def require_public_pool(rhythm: bool, trained_on: str) -> None:
    """Refuse model.rhythm outside public pretraining: its table would release private records' rhythm."""
    if rhythm:
        raise ValueError(f"model.rhythm: a rhythm-conditioned model samples beat times from a table of its training "
                         f"records, so only public pretraining (`fedecg pretrain`) may train one, not {trained_on}")


def beat_map(peaks: np.ndarray, length: int, width: float = BEAT_WIDTH) -> np.ndarray:
    """float32 [length]: a unit-height Gaussian bump at each peak (sample index, may be fractional)."""
    grid = np.arange(length, dtype=np.float64)[:, None]
    peaks = np.asarray(peaks, dtype=np.float64).reshape(1, -1)
    if peaks.size == 0:
        return np.zeros(length, dtype=np.float32)
    bumps = np.exp(-0.5 * ((grid - peaks) / width) ** 2)  # (length peaks)
    return bumps.max(axis=1).astype(np.float32)


def beat_maps(peaks: Sequence[np.ndarray], length: int) -> np.ndarray:
    """float32 [N, 1, length]: `beat_map` of each record's peaks."""
    return np.stack([beat_map(p, length) for p in peaks])[:, None, :] if len(peaks) else \
        np.zeros((0, 1, length), dtype=np.float32)


def record_beats(signals8: np.ndarray, fs: int) -> list[np.ndarray]:
    """R-peak sample indices of each record's lead II (signals8 [N, 8, L] in mV, the model's leads)."""
    if signals8.ndim != 3:
        raise ValueError(f"record_beats: signals must be [N, 8, L], got {signals8.shape}")
    return [detect_r_peaks(record[LEAD_II], fs) for record in signals8]


def rhythm_keys(labels: np.ndarray) -> list[tuple[str, ...]]:
    """The RHYTHM_CODES each row of multi-hot labels [N, 71] carries."""
    present = np.asarray(labels)[:, _KEY_COLUMNS] > 0.5
    return [tuple(code for code, on in zip(RHYTHM_CODES, row) if on) for row in present]


@dataclass(frozen=True)
class RhythmTable:
    """Per public record: rhythm key, mean RR (s) and RR coefficient of variation."""

    fs: int
    keys: tuple[tuple[str, ...], ...]
    mean_rr_s: np.ndarray  # float64 [M]
    rr_cv: np.ndarray  # float64 [M]

    @classmethod
    def from_beats(cls, beats: Sequence[np.ndarray], labels: np.ndarray, fs: int) -> RhythmTable:
        """The table of records (the public pool's) given their R peaks (`record_beats`) and labels [N, 71];
        records with fewer than 3 beats are left out."""
        if len(beats) != len(labels):
            raise ValueError(f"RhythmTable: {len(beats)} beat lists for {len(labels)} label rows")
        keys, means, cvs = [], [], []
        for key, peaks in zip(rhythm_keys(labels), beats):
            rr = np.diff(peaks) / fs
            if rr.size < 2:
                continue
            keys.append(key)
            means.append(float(rr.mean()))
            cvs.append(float(rr.std() / rr.mean()))
        if not keys:
            raise ValueError("RhythmTable: no record with at least 3 detectable beats")
        return cls(fs, tuple(keys), np.asarray(means), np.asarray(cvs))

    def __len__(self) -> int:
        return len(self.keys)

    def draw(self, labels: np.ndarray, length: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Beat times (sample indices) for each row of labels [N, 71], `length` samples long."""
        by_key: dict[tuple[str, ...], np.ndarray] = {}
        out = []
        for key in rhythm_keys(labels):
            if key not in by_key:
                rows = np.flatnonzero([k == key for k in self.keys])
                if rows.size == 0 and key:
                    rows = np.flatnonzero([key[0] in k for k in self.keys])
                by_key[key] = rows if rows.size else np.arange(len(self.keys))
            row = int(rng.choice(by_key[key]))
            out.append(self._beats(self.mean_rr_s[row], self.rr_cv[row], length, rng))
        return out

    def _beats(self, mean_rr: float, cv: float, length: int, rng: np.random.Generator) -> np.ndarray:
        """Beats from a uniform phase, RR intervals drawn around mean_rr with coefficient of variation cv."""
        low, high = MIN_RR_S * self.fs, MAX_RR_S * self.fs
        count = int(np.ceil(length / max(mean_rr * self.fs, low))) + 2
        rr = np.clip(mean_rr * self.fs * (1.0 + cv * rng.standard_normal(count)), low, high)
        first = rng.uniform(0.0, rr[0])
        beats = first + np.concatenate([[0.0], np.cumsum(rr[1:])])
        return beats[beats < length]

    def to_dict(self) -> dict:
        return {"format": RHYTHM_FORMAT, "fs": self.fs, "codes": list(RHYTHM_CODES),
                "records": [{"key": list(k), "mean_rr_s": round(float(m), 4), "rr_cv": round(float(c), 4)}
                            for k, m, c in zip(self.keys, self.mean_rr_s, self.rr_cv)]}

    @classmethod
    def from_dict(cls, data: dict, source: str = "rhythm table") -> RhythmTable:
        if data.get("format") != RHYTHM_FORMAT or data.get("codes") != list(RHYTHM_CODES):
            raise ValueError(f"{source}: not a {RHYTHM_FORMAT} table of these rhythm codes")
        records = data["records"]
        if not records:
            raise ValueError(f"{source}: no records")
        keys = tuple(tuple(r["key"]) for r in records)
        if any(code not in RHYTHM_CODES for k in keys for code in k):
            raise ValueError(f"{source}: unknown rhythm code in a key")
        mean = np.asarray([r["mean_rr_s"] for r in records], dtype=np.float64)
        cv = np.asarray([r["rr_cv"] for r in records], dtype=np.float64)
        if not (np.isfinite(mean).all() and np.isfinite(cv).all() and (mean > 0).all() and (cv >= 0).all()):
            raise ValueError(f"{source}: mean RR must be positive and RR variation non-negative")
        return cls(int(data["fs"]), keys, mean, cv)

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1) + "\n").encode()

    @classmethod
    def read(cls, path: Path, sha256: str) -> RhythmTable:
        """The table at `path`, only if the file has exactly the hash its model was recorded with."""
        raw = Path(path).read_bytes()
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise ValueError(f"{path}: not the rhythm table its model was recorded with (sha256 differs)")
        return cls.from_dict(json.loads(raw), source=str(path))
