"""Pictures a person would rather look at than read: 12-lead ECG grids and curves per round."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.data.leads import LEAD_NAMES  # noqa: E402

# Clinical 3x4 layout: each column shows 2.5 s of its leads, as on a printed 12-lead ECG.
CLINICAL_LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ecg_grid(
    signals12: np.ndarray,
    path: str | Path,
    titles: Sequence[str] | None = None,
    sampling_rate: int = 100,
    max_records: int = 4,
) -> Path:
    """Plot up to `max_records` 12-lead ECGs [N, 12, L] (mV) in the clinical 3x4 layout with a rhythm strip."""
    signals12 = np.asarray(signals12)
    if signals12.ndim != 3 or signals12.shape[1] != 12:
        raise ValueError(f"expected [N, 12, L] signals, got shape {signals12.shape}")
    n = min(max_records, signals12.shape[0])
    length = signals12.shape[2]
    quarter = length // 4
    fig, axes = plt.subplots(n, 1, figsize=(12, 3.2 * n), squeeze=False)
    for row in range(n):
        ax = axes[row, 0]
        record = signals12[row]
        offset_step = 3.0  # mV between rows, like 30 mm at 10 mm/mV
        for r, names in enumerate(CLINICAL_LAYOUT + (("II",),)):
            baseline = -r * offset_step
            if len(names) == 1:  # rhythm strip: lead II over the whole record
                t = np.arange(length) / sampling_rate
                ax.plot(t, record[LEAD_NAMES.index("II")] + baseline, color="black", linewidth=0.6)
                ax.text(0.02, baseline + 0.9, "II", fontsize=7)
                continue
            for c, name in enumerate(names):
                segment = slice(c * quarter, (c + 1) * quarter)
                t = np.arange(segment.start, segment.stop) / sampling_rate
                ax.plot(t, record[LEAD_NAMES.index(name), segment] + baseline, color="black", linewidth=0.6)
                ax.text(t[0] + 0.02, baseline + 0.9, name, fontsize=7)
        ax.set_xlim(0, length / sampling_rate)
        ax.set_ylim(-3 * offset_step - 1.5, 1.8)
        # ECG paper: minor grid 0.04 s / 0.1 mV, major 0.2 s / 0.5 mV
        ax.set_xticks(np.arange(0, length / sampling_rate + 1e-9, 0.2))
        ax.set_yticks(np.arange(-3 * offset_step - 1.5, 1.81, 0.5))
        ax.grid(True, color="#f4a6a6", linewidth=0.4)
        ax.tick_params(labelbottom=row == n - 1, labelleft=False, length=0, labelsize=6)
        if titles is not None and row < len(titles):
            ax.set_title(titles[row], fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("time (s)")
    return _save(fig, path)


def plot_curves(
    rows: Sequence[dict[str, float]],
    x_key: str,
    y_keys: Sequence[str],
    path: str | Path,
    title: str = "",
    group_key: str | None = None,
) -> Path:
    """Line plot of metrics (one panel per y key), optionally one line per group (e.g. per site)."""
    fig, axes = plt.subplots(1, len(y_keys), figsize=(4.2 * len(y_keys), 3.2), squeeze=False)
    groups = sorted({str(r[group_key]) for r in rows}) if group_key else [None]
    for ax, key in zip(axes[0], y_keys):
        for group in groups:
            sel = [r for r in rows if group is None or str(r[group_key]) == group]
            xs = [float(r[x_key]) for r in sel if key in r and r[key] == r[key]]
            ys = [float(r[key]) for r in sel if key in r and r[key] == r[key]]
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=group)
        ax.set_xlabel(x_key)
        ax.set_title(key, fontsize=9)
        ax.grid(True, alpha=0.3)
        if group_key:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
