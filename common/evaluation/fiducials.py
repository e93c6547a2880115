"""The delineator's steps for one lead: filters, Pan-Tompkins R-peak thresholding and placement, QRS
bounds, P onset and T end. clinical.py's docstring describes the method; `clinical.detect_r_peaks` and
`clinical.delineate` put these steps together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal


def _sos(low: float | None, high: float | None, fs: int, order: int = 2) -> np.ndarray:
    nyq = fs / 2
    if low is None:
        return signal.butter(order, high / nyq, btype="lowpass", output="sos")
    if high is None or high >= nyq:
        return signal.butter(order, low / nyq, btype="highpass", output="sos")
    return signal.butter(order, [low / nyq, high / nyq], btype="bandpass", output="sos")


def zero_phase_filter(x: np.ndarray, low: float | None, high: float | None, fs: int) -> np.ndarray:
    """Butterworth, forwards and backwards: low-pass (low None), high-pass (high None or >= Nyquist) or band-pass."""
    return signal.sosfiltfilt(_sos(low, high, fs), x, axis=-1)


def integrated_energy(x: np.ndarray, fs: int) -> np.ndarray:
    """Band-pass 5-20 Hz, derivative, square, 150 ms moving-window integration."""
    band = zero_phase_filter(x, 5.0, 20.0, fs)
    energy = np.gradient(band) ** 2
    window = max(1, int(round(0.15 * fs)))
    return np.convolve(energy, np.ones(window) / window, mode="same")


def threshold_peaks(mwi: np.ndarray, candidates: np.ndarray, refractory: int, fs: int) -> list[int]:
    """The candidates the adaptive threshold NPK + 0.25 (SPK - NPK) accepts, with search-back for missed beats."""
    heights = mwi[candidates]
    learn = candidates < 2 * fs
    spk = 0.25 * (heights[learn].max() if learn.any() else heights.max())
    npk = 0.5 * float(np.mean(mwi[: 2 * fs]))
    accepted: list[int] = []
    rr_mean: float | None = None
    for c, h in zip(candidates, heights):
        threshold = npk + 0.25 * (spk - npk)
        if accepted and c - accepted[-1] < refractory:
            continue
        if h > threshold:
            if rr_mean is not None and accepted and c - accepted[-1] > 1.66 * rr_mean:
                spk = _search_back(mwi, candidates, accepted, c, refractory, threshold, spk)
            accepted.append(int(c))
            spk = 0.125 * h + 0.875 * spk
            if len(accepted) >= 2:
                rr = np.diff(accepted[-9:])
                rr_mean = float(rr.mean())
        else:
            npk = 0.125 * h + 0.875 * npk
    return accepted


def _search_back(mwi: np.ndarray, candidates: np.ndarray, accepted: list[int], c: int, refractory: int,
                 threshold: float, spk: float) -> float:
    """Accept the best candidate between the last accepted peak and `c` if above half the threshold; new SPK."""
    lo, hi = accepted[-1] + refractory, c - refractory
    between = candidates[(candidates > lo) & (candidates < hi)]
    if between.size:
        best = between[np.argmax(mwi[between])]
        if mwi[best] > 0.5 * threshold:
            accepted.append(int(best))
            spk = 0.25 * mwi[best] + 0.75 * spk
    return spk


def place_on_extreme(wide: np.ndarray, accepted: list[int], fs: int) -> np.ndarray:
    """Each beat on the extreme of the broadband signal within +-80 ms, with the record's dominant polarity."""
    half = int(round(0.08 * fs))
    peaks_pos, peaks_neg = [], []
    for c in accepted:
        lo, hi = max(0, c - half), min(wide.size, c + half + 1)
        seg = wide[lo:hi]
        peaks_pos.append((lo + int(np.argmax(seg)), float(seg.max())))
        peaks_neg.append((lo + int(np.argmin(seg)), float(-seg.min())))
    use_pos = np.median([a for _, a in peaks_pos]) >= np.median([a for _, a in peaks_neg])
    chosen = [p for p, _ in (peaks_pos if use_pos else peaks_neg)]
    return np.unique(np.asarray(chosen, dtype=np.int64))


def drop_close(r: np.ndarray, refractory: int) -> np.ndarray:
    """Two energy peaks may land on the same R (notched QRS): keep peaks a refractory period apart."""
    keep = [r[0]]
    for p in r[1:]:
        if p - keep[-1] >= refractory:
            keep.append(p)
    return np.asarray(keep, dtype=np.int64)


@dataclass(frozen=True)
class Filtered:
    """One lead through the delineator's filters: |slope| at 0.5-40 Hz (QRS), 0.5-15 Hz (P and T waves)."""

    slope: np.ndarray
    low: np.ndarray
    fs: int

    @property
    def size(self) -> int:
        return self.low.size

    def ms(self, v: float) -> int:
        """Milliseconds to samples."""
        return int(round(v * self.fs / 1000.0))


def qrs_bounds(wave: Filtered, rp: int) -> tuple[int, int] | None:
    """(onset, offset): walking out from the steepest slopes within 100 ms of R until the slope is quiet."""
    ms, size, slope = wave.ms, wave.size, wave.slope
    lo = max(0, rp - ms(100))
    hi = min(size - 1, rp + ms(100))
    if rp - lo < 2 or hi - rp < 2:
        return None
    pre = lo + int(np.argmax(slope[lo:rp + 1]))
    post = rp + int(np.argmax(slope[rp:hi + 1]))
    thr = 0.15 * max(slope[pre], slope[post])
    on = pre
    limit_on = max(0, rp - ms(150))
    while on > limit_on and slope[on] > thr:
        on -= 1
    off = post
    limit_off = min(size - 1, rp + ms(150))
    while off < limit_off and slope[off] > thr:
        off += 1
    if on <= limit_on or off >= limit_off:
        return None
    return on, off


def p_onset(wave: Filtered, iso: float, p_lo: int, p_hi: int) -> int:
    """P onset in [p_lo, p_hi) (-1: no P wave of at least 0.03 mV there)."""
    if p_lo < 0 or p_hi - p_lo < 3:
        return -1
    low = wave.low
    dev = low[p_lo:p_hi] - iso
    k = int(np.argmax(np.abs(dev)))
    amp = dev[k]
    if abs(amp) < 0.03:
        return -1
    p_peak = p_lo + k
    j = p_peak
    stop = max(0, p_peak - wave.ms(120))
    while j > stop and abs(low[j] - iso) > 0.2 * abs(amp):
        j -= 1
    return j if j > stop else -1


def t_end(wave: Filtered, iso: float, t_lo: int, t_hi: int) -> int:
    """T end by the tangent method, the T peak searched in [t_lo, t_hi) (-1: not found)."""
    if t_hi - t_lo < 3:
        return -1
    low, ms = wave.low, wave.ms
    dev = low[t_lo:t_hi] - iso
    k = int(np.argmax(np.abs(dev)))
    t_peak = t_lo + k
    sign = np.sign(dev[k]) or 1.0
    d_hi = min(t_hi, t_peak + ms(200))
    if d_hi - t_peak < 2:
        return -1
    d = np.gradient(low[t_peak:d_hi + 1])
    m = int(np.argmax(-sign * d))  # steepest descent back towards the PR level
    steep = -sign * d[m]
    if steep <= 1e-6:
        return -1
    m_abs = t_peak + m
    end = m_abs + sign * (low[m_abs] - iso) / steep
    if t_peak < end <= min(wave.size - 1, t_peak + ms(300)):
        return int(round(end))
    return -1
