"""The PNG plots of an evaluation (headless matplotlib); each returns the path it wrote."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_correlation(real_mean: np.ndarray, syn_mean: np.ndarray, leads: tuple[str, ...], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = ((real_mean, "real", "RdBu_r", (-1, 1)), (syn_mean, "synthetic", "RdBu_r", (-1, 1)),
              (np.abs(real_mean - syn_mean), "|real - synthetic|", "magma", (0, 1)))
    for ax, (m, title, cmap, (lo, hi)) in zip(axes, panels):
        im = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_xticks(range(len(leads)), leads, rotation=90, fontsize=7)
        ax.set_yticks(range(len(leads)), leads, fontsize=7)
        ax.set_title(f"mean inter-lead correlation: {title}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_psd(freqs: np.ndarray, real_psd: np.ndarray, syn_psd: np.ndarray, leads: tuple[str, ...], path: Path) -> Path:
    fig, axes = plt.subplots(3, 4, figsize=(14, 8), sharex=True)
    for k, ax in enumerate(axes.flat[: len(leads)]):
        ax.semilogy(freqs, real_psd[k] + 1e-12, label="real", color="black", lw=1)
        ax.semilogy(freqs, syn_psd[k] + 1e-12, label="synthetic", color="tab:red", lw=1)
        ax.set_title(leads[k], fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("Hz")
    fig.suptitle("Welch PSD (mean over records, mV^2/Hz)", fontsize=10)
    return _save(fig, path)


def plot_features(real_table: np.ndarray, syn_table: np.ndarray, names: tuple[str, ...], path: Path) -> Path:
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.2 * rows))
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        a = real_table[:, k][np.isfinite(real_table[:, k])]
        b = syn_table[:, k][np.isfinite(syn_table[:, k])]
        both = np.concatenate([a, b])
        if both.size:
            lo, hi = np.percentile(both, [1, 99])
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
            ax.hist(a, bins=bins, density=True, alpha=0.5, label="real", color="black")
            ax.hist(b, bins=bins, density=True, alpha=0.5, label="synthetic", color="tab:red")
        ax.set_title(names[k], fontsize=9)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Lead II delineation: per-record features", fontsize=10)
    return _save(fig, path)


def plot_dcr(d_syn_train: np.ndarray, d_syn_hold: np.ndarray, d_hold_train: np.ndarray, threshold: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    allv = np.concatenate([d_syn_train, d_syn_hold, d_hold_train])
    bins = np.linspace(0, np.percentile(allv, 99.5) if allv.size else 1, 40)
    ax.hist(d_syn_train, bins=bins, alpha=0.5, density=True, label="synthetic -> train (subset)")
    ax.hist(d_syn_hold, bins=bins, alpha=0.5, density=True, label="synthetic -> holdout")
    ax.hist(d_hold_train, bins=bins, histtype="step", density=True, color="black", label="holdout -> train (real)")
    ax.axvline(threshold, color="tab:red", ls="--", label="near-copy threshold")
    ax.set_xlabel("distance to closest record (RMS, normalized units)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, auc: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"loss attack (AUC {auc:.3f})")
    grid = np.logspace(-3, 0, 100)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")  # TPR = FPR, drawn on the log axis
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_xlabel("false positive rate (log)")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_utility(utility: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names, values = [], []
    for key, label in (("trtr", "TRTR"), ("trtr_matched", "TRTR matched"), ("tstr", "TSTR")):
        res = utility.get(key)
        if res and res.get("macro_auroc_superclasses") is not None:
            names.append(f"{label}\n(n={res['n_train']})")
            values.append(res["macro_auroc_superclasses"])
    axes[0].bar(names, values, color=["black", "gray", "tab:red"][: len(values)])
    axes[0].set_ylim(0.0, 1.0)
    axes[0].axhline(0.5, color="k", lw=0.5, ls="--")  # chance
    axes[0].set_title("macro AUROC, superclasses (real test)", fontsize=9)
    rows = utility.get("low_data", [])
    if rows:
        n = [r["n_real"] for r in rows]
        axes[1].plot(n, [r["real_macro_auroc_superclasses"] for r in rows], "o-", color="black", label="real subset")
        axes[1].plot(n, [r["mixed_macro_auroc_superclasses"] for r in rows], "o-", color="tab:red", label="real subset + synthetic")
        axes[1].set_xscale("log")
        axes[1].set_xticks(n, [str(v) for v in n])
        axes[1].minorticks_off()
        axes[1].legend(fontsize=7)
    axes[1].set_xlabel("real training records")
    axes[1].set_title("low-data regime: macro AUROC, superclasses", fontsize=9)
    return _save(fig, path)
