"""Signal fidelity of synthetic 12-lead ECGs against real ones.

All functions take float arrays [N, 12, T] in mV, leads in `common.data.leads.LEAD_NAMES` order, 100 Hz.

Definitions (the choices are ours where the seed paper leaves them open; see notes):

- Inter-lead correlation error. For each record, the 12x12 Pearson correlation matrix of its leads
  over time; a flat lead (std < 1e-6 mV) has correlation 0 with every other lead. The set's matrix is the
  mean over its records. The error is the mean over the 132 off-diagonal entries of
  |R_real - R_syn| (the diagonal is 1 in both and only dilutes the mean), and `_max` is the largest
  entry. The seed paper (MIDT-ECG, Huang et al. 2025) reports the "average absolute inter-lead correlation
  error" without published code; public re-implementations compute np.corrcoef per real/synthetic pair and
  average |difference| over all 144 entries. We compare set means because a synthetic record has no
  time-aligned real twin; `interlead_corr_error_paired` (per label-matched pair, off-diagonal) is reported
  as well for comparison with the paired convention. Off-diagonal mean = (144/132) x all-entries mean.
  Scale: on the 6,000-record PTB-XL subset, two patient-disjoint halves of the training folds differ by
  0.0085; 200 (500) real records against all of one half by 0.018 +- 0.007 (0.014 +- 0.005), so values
  near these are as good as real data at that sample size (simulations/benchmarks/bench_eval.py).
- PSD distance, per lead: Welch PSD (256-sample Hann segments, 50 % overlap) averaged over records;
  the log-spectral distance mean_f |10 log10 P_real(f) - 10 log10 P_syn(f)| in dB over 0.5-45 Hz.
- Paired RMSE and SNR (as in public MIDT evaluation code): for each (real, synthetic) pair,
  RMSE = sqrt(mean over leads and samples of (real - syn)^2) [mV] and, per lead,
  SNR = 20 log10(||real|| / ||real - syn||) [dB], averaged over leads, then over pairs. Pairs are the
  synthetic record and the real record whose labels (and demographics) it was conditioned on. Without
  time alignment these measure amplitude/morphology agreement only coarsely; read them comparatively.
- Frechet distance between Gaussian fits of classifier features (`classifier.embed`):
  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); biased upwards for small sets, so compare it with
  the real-vs-real reference computed on equally many records.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

FS = 100
FLAT_STD_MV = 1e-6
PSD_BAND_HZ = (0.5, 45.0)
PSD_NPERSEG = 256


def _check_signals(x: np.ndarray, name: str, leads: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"{name} must be [N, leads, T], got shape {x.shape}")
    if leads is not None and x.shape[1] != leads:
        raise ValueError(f"{name} must have {leads} leads on axis 1, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def lead_correlation_matrices(x: np.ndarray) -> np.ndarray:
    """Per-record Pearson correlation between leads: [N, L, T] -> [N, L, L]; flat leads correlate 0."""
    x = _check_signals(x, "signals")
    centered = x - x.mean(axis=-1, keepdims=True)  # (N L T)
    std = np.sqrt((centered**2).mean(axis=-1))  # (N L)
    flat = std < FLAT_STD_MV
    z = centered / np.where(flat, 1.0, std)[..., None]
    z[flat] = 0.0
    corr = np.einsum("nit,njt->nij", z, z) / x.shape[-1]  # (N L L)
    idx = np.arange(x.shape[1])
    corr[:, idx, idx] = 1.0
    return np.clip(corr, -1.0, 1.0)


def _offdiag(matrix: np.ndarray) -> np.ndarray:
    leads = matrix.shape[-1]
    mask = ~np.eye(leads, dtype=bool)
    return matrix[..., mask]


def interlead_correlation_error(real: np.ndarray, synthetic: np.ndarray) -> dict[str, float]:
    """Mean and max over off-diagonal entries of |mean_R(real) - mean_R(synthetic)|."""
    real = _check_signals(real, "real")
    synthetic = _check_signals(synthetic, "synthetic", real.shape[1])
    diff = np.abs(lead_correlation_matrices(real).mean(0) - lead_correlation_matrices(synthetic).mean(0))
    off = _offdiag(diff)
    return {"mean": float(off.mean()), "max": float(off.max())}


def paired_interlead_correlation_error(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Mean over pairs (real[i], synthetic[i]) of the off-diagonal mean |R_real_i - R_syn_i|."""
    real = _check_signals(real, "real")
    synthetic = _check_signals(synthetic, "synthetic", real.shape[1])
    if real.shape[0] != synthetic.shape[0]:
        raise ValueError(f"paired sets differ in size: {real.shape[0]} real vs {synthetic.shape[0]} synthetic")
    diff = np.abs(lead_correlation_matrices(real) - lead_correlation_matrices(synthetic))
    return float(_offdiag(diff).mean())


def interlead_correlation_error_by_class(
    real: np.ndarray,
    real_classes: np.ndarray,
    synthetic: np.ndarray,
    synthetic_classes: np.ndarray,
    class_names: tuple[str, ...] | list[str],
    min_records: int = 2,
) -> dict[str, float | None]:
    """Inter-lead correlation error (mean) per class; each set is filtered by its own 0/1 class matrix.

    None where either set has fewer than `min_records` records of that class.
    """
    real_classes = np.asarray(real_classes) > 0.5
    synthetic_classes = np.asarray(synthetic_classes) > 0.5
    if real_classes.shape != (len(real), len(class_names)) or synthetic_classes.shape != (len(synthetic), len(class_names)):
        raise ValueError(
            f"class matrices must be [N, {len(class_names)}]: got {real_classes.shape} for {len(real)} real and "
            f"{synthetic_classes.shape} for {len(synthetic)} synthetic records"
        )
    out: dict[str, float | None] = {}
    for k, name in enumerate(class_names):
        r, s = real_classes[:, k], synthetic_classes[:, k]
        if r.sum() < min_records or s.sum() < min_records:
            out[name] = None
        else:
            out[name] = interlead_correlation_error(real[r], synthetic[s])["mean"]
    return out


def welch_psd(x: np.ndarray, fs: int = FS) -> tuple[np.ndarray, np.ndarray]:
    """Mean Welch PSD over records: returns (freqs [F], psd [L, F]) in mV^2/Hz."""
    x = _check_signals(x, "signals")
    nperseg = min(PSD_NPERSEG, x.shape[-1])
    freqs, psd = signal.welch(x, fs=fs, nperseg=nperseg, axis=-1)  # (N L F)
    return freqs, psd.mean(axis=0)


def psd_distance(real: np.ndarray, synthetic: np.ndarray, fs: int = FS) -> np.ndarray:
    """Per-lead log-spectral distance [L] in dB between mean Welch PSDs over 0.5-45 Hz."""
    freqs, p_real = welch_psd(real, fs)
    _, p_syn = welch_psd(_check_signals(synthetic, "synthetic", p_real.shape[0]), fs)
    band = (freqs >= PSD_BAND_HZ[0]) & (freqs <= PSD_BAND_HZ[1])
    tiny = 1e-12  # floor so that an all-zero lead gives a large, finite distance
    db_real = 10 * np.log10(p_real[:, band] + tiny)
    db_syn = 10 * np.log10(p_syn[:, band] + tiny)
    return np.abs(db_real - db_syn).mean(axis=-1)


def paired_rmse_snr(real: np.ndarray, synthetic: np.ndarray) -> dict[str, float]:
    """RMSE [mV] and SNR [dB] of pairs (real[i], synthetic[i]); see the module docstring."""
    real = _check_signals(real, "real")
    synthetic = _check_signals(synthetic, "synthetic", real.shape[1])
    if real.shape != synthetic.shape:
        raise ValueError(f"paired sets differ in shape: real {real.shape} vs synthetic {synthetic.shape}")
    err = real - synthetic
    rmse = np.sqrt((err**2).mean(axis=(1, 2)))  # (N)
    eps = 1e-12
    snr = 20 * np.log10((np.linalg.norm(real, axis=-1) + eps) / (np.linalg.norm(err, axis=-1) + eps))  # (N L)
    return {"rmse_mv": float(rmse.mean()), "snr_db": float(snr.mean(axis=1).mean())}


def label_matched_pairs(
    real_labels: np.ndarray, synthetic_labels: np.ndarray, seed: int = 0
) -> np.ndarray:
    """For each synthetic record, the index of a real record with the identical 0/1 label vector.

    Falls back to the real record with the fewest differing labels (ties broken at random under seed).
    Returns int array [N_syn].
    """
    real_labels = np.asarray(real_labels) > 0.5
    synthetic_labels = np.asarray(synthetic_labels) > 0.5
    if real_labels.ndim != 2 or synthetic_labels.ndim != 2 or real_labels.shape[1] != synthetic_labels.shape[1]:
        raise ValueError(f"label matrices must be [N, K] with equal K, got {real_labels.shape} and {synthetic_labels.shape}")
    if len(real_labels) == 0:
        raise ValueError("no real records to pair with")
    rng = np.random.default_rng(seed)
    r = real_labels.astype(np.int32)
    out = np.empty(len(synthetic_labels), dtype=np.int64)
    for i, lab in enumerate(synthetic_labels.astype(np.int32)):
        hamming = np.abs(r - lab).sum(axis=1)
        best = np.flatnonzero(hamming == hamming.min())
        out[i] = rng.choice(best)
    return out


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two feature sets [N, D] (needs N >= 2 each)."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Frechet distance needs at least 2 records per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))): a symmetric PSD problem, stable even when
    # the covariances are singular (fewer records than feature dimensions).
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = float(np.sqrt(np.clip(inner, 0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(value, 0.0)


def quick_fidelity(synthetic12: np.ndarray, real12: np.ndarray) -> dict[str, float]:
    """Cheap fidelity summary for monitoring during training (no classifier; milliseconds for ~100 records).

    Keys: interlead_corr_error, interlead_corr_error_max, psd_distance_db (mean over leads),
    amplitude_ratio (RMS of synthetic / RMS of real; 1 is ideal), mean_abs_mv_synthetic, mean_abs_mv_real.
    """
    synthetic12 = _check_signals(synthetic12, "synthetic12")
    real12 = _check_signals(real12, "real12", synthetic12.shape[1])
    ilc = interlead_correlation_error(real12, synthetic12)
    rms_syn = float(np.sqrt((synthetic12**2).mean()))
    rms_real = float(np.sqrt((real12**2).mean()))
    return {
        "interlead_corr_error": ilc["mean"],
        "interlead_corr_error_max": ilc["max"],
        "psd_distance_db": float(psd_distance(real12, synthetic12).mean()),
        "amplitude_ratio": rms_syn / rms_real if rms_real > 0 else float("nan"),
        "mean_abs_mv_synthetic": float(np.abs(synthetic12).mean()),
        "mean_abs_mv_real": float(np.abs(real12).mean()),
    }
