"""Clinical coherence: interval measurements, lead-system consistency and demographic faithfulness.

A small ECG delineator for lead II at 100 Hz (no external ECG toolbox), in the Pan-Tompkins tradition:

1. R peaks. Band-pass 5-20 Hz (zero-phase Butterworth), derivative, square, 150 ms moving-window
   integration. Candidate peaks of the integrated energy at least `REFRACTORY_S` apart are accepted by an
   adaptive threshold NPK + 0.25 (SPK - NPK) with running signal/noise peak levels (SPK, NPK); a gap longer
   than 1.66 mean RR triggers a search-back at half the threshold. Each accepted energy peak is placed on
   the extreme of the 0.5-40 Hz signal within +-80 ms (the polarity that dominates the record).
2. QRS onset/offset. Slope |dx/dt| of the 0.5-40 Hz signal; the steepest slopes before/after R within
   100 ms; walking outwards, the first sample whose slope falls below 15 % of the steeper of the two.
3. P onset. In 0.5-15 Hz signal, the P peak is the largest deviation from the PR level (the value at QRS
   onset) 40-250 ms before QRS onset and after the previous T end; a P wave needs |amplitude| >= 0.03 mV, else PR is undefined (e.g.
   atrial fibrillation). P onset: walking back from the P peak (<= 120 ms), the first sample whose deviation
   is below 20 % of the P amplitude.
4. T end. T peak: the largest deviation from the PR level 80-450 ms after QRS offset (bounded by the next
   QRS onset); T end by the tangent method: the tangent at the steepest point of the descending limb
   (within 200 ms of the peak) crosses the PR level.

Resolution is one sample (10 ms). Per record: heart rate from the median RR, SDNN and RMSSD of RR (ms),
median QRS duration, PR and QT intervals (ms) and Bazett's QTc. A record's rhythm is regular when it has
at least `REGULAR_MIN_RR` RR intervals and every one lies within `REGULAR_RR_TOLERANCE` of their median
(no dropped, added or chaotic beats; sinus arrhythmia within that band passes). A beat is plausible when
its preceding RR lies in 0.3-2.0 s, QRS in 40-200 ms, QT in 200-600 ms and, where a P wave was found, PR
in 80-400 ms; beats missing RR, QRS or QT are implausible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import signal, stats

from common.data.demographics import fold_age

from . import fiducials

if TYPE_CHECKING:
    from .classifier import ClassifierConfig, ResNet1d

FS = 100
LEAD_II = 1  # index of lead II in common.data.leads.LEAD_NAMES order
REFRACTORY_S = 0.2
REGULAR_RR_TOLERANCE = 0.15  # |RR / median RR - 1| of every interval
REGULAR_MIN_RR = 3
FEATURES = ("heart_rate_bpm", "sdnn_ms", "rmssd_ms", "qrs_ms", "pr_ms", "qt_ms", "qtc_ms")
PLAUSIBLE = {
    "rr_s": (0.3, 2.0),
    "qrs_ms": (40.0, 200.0),
    "qt_ms": (200.0, 600.0),
    "pr_ms": (80.0, 400.0),
}


def detect_r_peaks(lead: np.ndarray, fs: int = FS) -> np.ndarray:
    """Sample indices of R peaks in one lead (1-D, mV). Empty for flat or too-short signals."""
    x = np.asarray(lead, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"detect_r_peaks expects one lead (1-D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("lead contains NaN or inf")
    if x.size < fs or np.ptp(x) < 1e-4:
        return np.zeros(0, dtype=np.int64)
    mwi = fiducials.integrated_energy(x, fs)
    refractory = int(round(REFRACTORY_S * fs))
    candidates, _ = signal.find_peaks(mwi, distance=refractory)
    if candidates.size == 0:
        return np.zeros(0, dtype=np.int64)
    accepted = fiducials.threshold_peaks(mwi, candidates, refractory, fs)
    if not accepted:
        return np.zeros(0, dtype=np.int64)
    r = fiducials.place_on_extreme(fiducials.zero_phase_filter(x, 0.5, 40.0, fs), accepted, fs)
    return fiducials.drop_close(r, refractory)


@dataclass
class Beats:
    """Fiducial points of one lead (sample indices; -1 where not found) and the sampling rate."""

    fs: int
    r: np.ndarray
    qrs_on: np.ndarray
    qrs_off: np.ndarray
    p_on: np.ndarray
    t_end: np.ndarray
    rr_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # RR before each beat; NaN for the first

    def intervals_ms(self) -> dict[str, np.ndarray]:
        """Per-beat QRS, PR and QT in ms (NaN where a fiducial point is missing) and RR in s."""
        ms = 1000.0 / self.fs

        def span(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            ok = (a >= 0) & (b >= 0)
            return np.where(ok, (b - a) * ms, np.nan)

        return {
            "qrs_ms": span(self.qrs_on, self.qrs_off),
            "pr_ms": span(self.p_on, self.qrs_on),
            "qt_ms": span(self.qrs_on, self.t_end),
            "rr_s": self.rr_s,
        }


def delineate(lead: np.ndarray, fs: int = FS) -> Beats:
    """R peaks, QRS onset/offset, P onset and T end of one lead (see the module docstring)."""
    x = np.asarray(lead, dtype=np.float64)
    r = detect_r_peaks(x, fs)
    n = r.size
    none = np.full(n, -1, dtype=np.int64)
    beats = Beats(fs, r, none.copy(), none.copy(), none.copy(), none.copy(),
                  np.concatenate([[np.nan], np.diff(r) / fs]) if n else np.zeros(0))
    if n == 0:
        return beats
    wide = fiducials.zero_phase_filter(x, 0.5, 40.0, fs)
    wave = fiducials.Filtered(slope=np.abs(np.gradient(wide)), low=fiducials.zero_phase_filter(x, 0.5, 15.0, fs), fs=fs)
    for i, rp in enumerate(r):
        qrs = fiducials.qrs_bounds(wave, rp)
        if qrs is None:
            continue  # no quiet segment found: QRS boundary undefined
        on, off = qrs
        beats.qrs_on[i], beats.qrs_off[i] = on, off
        iso = wave.low[on]  # the PR level
        # P wave before QRS onset; not into the previous beat: after its T wave when that was found.
        p_lo = on - wave.ms(250) if i == 0 else max(on - wave.ms(250), r[i - 1] + wave.ms(200), beats.t_end[i - 1] + 1)
        beats.p_on[i] = fiducials.p_onset(wave, iso, p_lo, on - wave.ms(40))
        # T wave after QRS offset, bounded by the next QRS.
        t_hi = off + wave.ms(450) if i + 1 == n else min(off + wave.ms(450), r[i + 1] - wave.ms(100))
        beats.t_end[i] = fiducials.t_end(wave, iso, off + wave.ms(80), min(t_hi, x.size - 1))
    return beats


def record_features(lead: np.ndarray, fs: int = FS) -> tuple[dict[str, float], Beats]:
    """Per-record features (FEATURES) of one lead and its delineation; NaN where undefined."""
    beats = delineate(lead, fs)
    iv = beats.intervals_ms()
    out = {name: float("nan") for name in FEATURES}
    rr = beats.rr_s[1:] if beats.r.size > 1 else np.zeros(0)
    if rr.size >= 1:
        median_rr = float(np.median(rr))
        out["heart_rate_bpm"] = 60.0 / median_rr
    if rr.size >= 2:
        out["sdnn_ms"] = float(np.std(rr * 1000.0, ddof=1))
        out["rmssd_ms"] = float(np.sqrt(np.mean(np.diff(rr * 1000.0) ** 2)))
    for name in ("qrs_ms", "pr_ms", "qt_ms"):
        vals = iv[name][np.isfinite(iv[name])]
        if vals.size:
            out[name] = float(np.median(vals))
    if np.isfinite(out["qt_ms"]) and rr.size >= 1:
        out["qtc_ms"] = float(out["qt_ms"] / np.sqrt(np.median(rr)))
    return out, beats


def regular_rhythm(beats: Beats) -> bool:
    """Every RR interval within REGULAR_RR_TOLERANCE of the record's median (at least REGULAR_MIN_RR of them)."""
    rr = beats.rr_s[1:] if beats.r.size > 1 else np.zeros(0)
    if rr.size < REGULAR_MIN_RR:
        return False
    return bool(np.all(np.abs(rr / np.median(rr) - 1.0) <= REGULAR_RR_TOLERANCE))


def beat_plausibility(beats: Beats) -> np.ndarray:
    """Boolean per beat (see the module docstring for the ranges)."""
    iv = beats.intervals_ms()
    ok = np.ones(beats.r.size, dtype=bool)
    for name in ("rr_s", "qrs_ms", "qt_ms"):
        lo, hi = PLAUSIBLE[name]
        v = iv[name]
        ok &= np.isfinite(v) & (v >= lo) & (v <= hi)
    lo, hi = PLAUSIBLE["pr_ms"]
    pr = iv["pr_ms"]
    ok &= ~np.isfinite(pr) | ((pr >= lo) & (pr <= hi))
    return ok


def features_table(x12: np.ndarray, fs: int = FS, lead: int = LEAD_II, progress: bool = False) -> tuple[np.ndarray, dict[str, float]]:
    """Features [N, len(FEATURES)] (NaN where undefined) of lead `lead` and set-level beat statistics."""
    from tqdm.auto import tqdm

    x12 = np.asarray(x12, dtype=np.float64)
    if x12.ndim != 3 or x12.shape[1] <= lead:
        raise ValueError(f"signals must be [N, leads, T] with lead index {lead} present, got shape {x12.shape}")
    table = np.full((x12.shape[0], len(FEATURES)), np.nan)
    beats_total = plausible_total = records_with_beats = regular_records = 0
    for i in tqdm(range(x12.shape[0]), desc="delineate", disable=not progress, leave=False):
        feats, beats = record_features(x12[i, lead], fs)
        table[i] = [feats[name] for name in FEATURES]
        regular_records += regular_rhythm(beats)
        if beats.r.size >= 2:
            records_with_beats += 1
            ok = beat_plausibility(beats)[1:]  # the first beat has no preceding RR
            beats_total += ok.size
            plausible_total += int(ok.sum())
    n = max(x12.shape[0], 1)
    summary = {
        "plausible_beat_fraction": plausible_total / beats_total if beats_total else float("nan"),
        "records_with_beats_fraction": records_with_beats / n,
        "regular_rhythm_fraction": regular_records / n,
        "beats_per_record": beats_total / n,
    }
    return table, summary


def feature_distances(real_table: np.ndarray, synthetic_table: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Per feature: 1-D Wasserstein distance and medians of real and synthetic (finite values only)."""
    out: dict[str, dict[str, float | None]] = {}
    for k, name in enumerate(FEATURES):
        a = real_table[:, k][np.isfinite(real_table[:, k])]
        b = synthetic_table[:, k][np.isfinite(synthetic_table[:, k])]
        out[name] = {
            "wasserstein": float(stats.wasserstein_distance(a, b)) if a.size and b.size else None,
            "median_real": float(np.median(a)) if a.size else None,
            "median_synthetic": float(np.median(b)) if b.size else None,
            "defined_fraction_real": a.size / max(len(real_table), 1),
            "defined_fraction_synthetic": b.size / max(len(synthetic_table), 1),
        }
    return out


def einthoven_consistency(x12: np.ndarray) -> dict[str, float]:
    """Lead-system residuals relative to amplitude (0 for a consistent 12-lead record).

    Residuals (leads in LEAD_NAMES order): Einthoven I + III - II; Goldberger aVR + (I + II)/2,
    aVL - (I - III)/2, aVF - (II + III)/2. Each is mean |residual| / mean |limb leads I, II, III| per
    record, averaged over records; `max_relation` is the largest of the four.
    """
    x = np.asarray(x12, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] < 6:
        raise ValueError(f"einthoven_consistency needs [N, 12, T] signals with limb leads first, got {x.shape}")
    lead_i, lead_ii, lead_iii, avr, avl, avf = (x[:, k] for k in range(6))
    scale = np.abs(x[:, :3]).mean(axis=(1, 2))  # (N)
    scale = np.where(scale > 1e-9, scale, np.nan)
    residuals = {
        "einthoven": lead_i + lead_iii - lead_ii,
        "goldberger_avr": avr + (lead_i + lead_ii) / 2,
        "goldberger_avl": avl - (lead_i - lead_iii) / 2,
        "goldberger_avf": avf - (lead_ii + lead_iii) / 2,
    }
    out = {name: float(np.nanmean(np.abs(res).mean(axis=-1) / scale)) for name, res in residuals.items()}
    out["max_relation"] = max(out.values())
    return out


def normalize_age(age: np.ndarray) -> np.ndarray:
    """Ages as float64 years, PTB-XL's "over 89" (coded 300) folded to 90."""
    return fold_age(np.asarray(age, dtype=np.float64))


def train_demographic_predictors(
    x12: np.ndarray,
    age: np.ndarray,
    sex: np.ndarray,
    cfg: ClassifierConfig,
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[ResNet1d, ResNet1d]:
    """Age regressor and sex classifier (the shared CNN) trained on real records with known values.

    age in years (ages over 89 folded to 90), sex 0 male / 1 female; NaN marks missing and is skipped.
    """
    from .classifier import train_or_load

    age = normalize_age(age)
    sex = np.asarray(sex, dtype=np.float64)
    has_age, has_sex = np.isfinite(age), np.isfinite(sex)
    if has_age.sum() < 2 or has_sex.sum() < 2 or len(np.unique(sex[has_sex])) < 2:
        raise ValueError(
            f"demographic predictors need >= 2 records with age and both sexes: got {int(has_age.sum())} ages, "
            f"sexes {np.unique(sex[has_sex]).tolist()}"
        )
    age_model, _ = train_or_load(x12[has_age], age[has_age, None], "regression", cfg, cache_dir, progress, "age regressor")
    sex_model, _ = train_or_load(x12[has_sex], sex[has_sex, None], "binary", cfg, cache_dir, progress, "sex classifier")
    return age_model, sex_model


def demographic_scores(
    age_model: ResNet1d, sex_model: ResNet1d, x12: np.ndarray, age: np.ndarray, sex: np.ndarray
) -> dict[str, float | None]:
    """Age MAE (years) and sex AUROC/accuracy of the predictors on records with known target values."""
    from sklearn.metrics import roc_auc_score

    from .classifier import predict

    age = normalize_age(age)
    sex = np.asarray(sex, dtype=np.float64)
    out: dict[str, float | None] = {"age_mae_years": None, "sex_auroc": None, "sex_accuracy": None}
    has_age, has_sex = np.isfinite(age), np.isfinite(sex)
    if has_age.any():
        pred = predict(age_model, x12[has_age], "regression")[:, 0]
        out["age_mae_years"] = float(np.abs(pred - age[has_age]).mean())
    if has_sex.any():
        prob = predict(sex_model, x12[has_sex], "binary")[:, 0]
        truth = sex[has_sex] > 0.5
        out["sex_accuracy"] = float(((prob > 0.5) == truth).mean())
        if truth.any() and not truth.all():
            out["sex_auroc"] = float(roc_auc_score(truth, prob))
    out["n_age"] = float(has_age.sum())
    out["n_sex"] = float(has_sex.sum())
    return out
