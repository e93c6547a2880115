"""Fixtures for the evaluation tests: ECG-like signals with known beats, and small PTB-XL-format folders.

The signals are sums of Gaussian waves (P, Q, R, S, T) at a fixed heart rate per record, with per-lead
gains, so that the delineator has real beats to find and their positions are known exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_ptbxl import CODE_SETS, derive12, write_metadata, write_record, write_scp_statements

FS = 100
SAMPLES = 1000
# (offset from R in s, width in s, amplitude in mV) of the waves of one beat
WAVES = ((-0.16, 0.025, 0.12), (-0.025, 0.008, -0.10), (0.0, 0.010, 1.0), (0.025, 0.008, -0.25), (0.30, 0.045, 0.30))
# gain of the whole beat per model lead (I, II, V1..V6): V1 negative as in a normal precordial progression
LEAD_GAINS = np.array([0.6, 1.0, -0.7, -0.3, 0.4, 0.9, 1.1, 0.8])


def ecg_like(rng: np.random.Generator, n: int, heart_rates: np.ndarray | None = None, noise_mv: float = 0.01
             ) -> tuple[np.ndarray, list[np.ndarray]]:
    """[n, 8, 1000] mV signals and each record's R-peak sample indices."""
    t = np.arange(SAMPLES) / FS
    hr = rng.uniform(55, 95, size=n) if heart_rates is None else np.asarray(heart_rates, dtype=float)
    out = np.zeros((n, 8, SAMPLES))
    peaks = []
    for i in range(n):
        rr = 60.0 / hr[i]
        r_times = np.arange(rng.uniform(0.3, 0.3 + rr), 10.0 - 0.4, rr)
        beat = np.zeros(SAMPLES)
        for r in r_times:
            for offset, width, amp in WAVES:
                beat += amp * np.exp(-0.5 * ((t - r - offset) / width) ** 2)
        gains = LEAD_GAINS * rng.uniform(0.8, 1.2, size=8)
        out[i] = gains[:, None] * beat[None] + noise_mv * rng.standard_normal((8, SAMPLES))
        peaks.append(np.round(r_times * FS).astype(np.int64))
    return out.astype(np.float32), peaks


def write_folder(root: Path, signals8: np.ndarray, rows: list[dict]) -> Path:
    """A PTB-XL-format folder: ptbxl_database.csv, scp_statements.csv and records100/ (12 stored leads)."""
    root.mkdir(parents=True, exist_ok=True)
    write_scp_statements(root)
    for x8, row in zip(signals8, rows):
        write_record(root / row["filename_lr"], derive12(np.round(x8.T.astype(np.float64), 3)), fs=FS)
    write_metadata(root, rows)
    return root


def metadata_rows(rng: np.random.Generator, ecg_ids: list[int], folds: list[int]) -> list[dict]:
    rows = []
    for ecg_id, fold in zip(ecg_ids, folds):
        folder = f"{(ecg_id // 1000) * 1000:05d}"
        rows.append({
            "ecg_id": ecg_id, "patient_id": 5000 + ecg_id, "age": float(rng.integers(20, 90)), "sex": ecg_id % 2,
            "height": None, "weight": float(rng.integers(50, 110)), "site": ecg_id % 3, "device": "CS-12   E",
            "recording_date": "1990-01-01 10:00:00", "report": "fixture",
            "scp_codes": CODE_SETS[ecg_id % len(CODE_SETS)], "strat_fold": fold,
            "filename_lr": f"records100/{folder}/{ecg_id:05d}_lr", "filename_hr": f"records500/{folder}/{ecg_id:05d}_hr",
        })
    return rows


def make_eval_folders(base: Path, n_real: int = 72, n_synthetic: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """A real folder (folds 1..9, fold 9 the test fold) and a synthetic one that reuses the metadata rows of
    real training records (same ecg_ids) with new signals, as an evaluator's own paired folder may."""
    rng = np.random.default_rng(seed)
    ids = list(range(1, n_real + 1))
    folds = [i % 9 + 1 for i in ids]
    real_rows = metadata_rows(rng, ids, folds)
    real_signals, _ = ecg_like(rng, n_real)
    real_root = write_folder(base / "real", real_signals, real_rows)
    train_rows = [r for r in real_rows if r["strat_fold"] != 9]
    chosen = sorted(rng.choice(len(train_rows), n_synthetic, replace=False).tolist())
    syn_rows = [dict(train_rows[i]) for i in chosen]
    syn_signals, _ = ecg_like(rng, n_synthetic)
    synthetic_root = write_folder(base / "synthetic", syn_signals, syn_rows)
    return real_root, synthetic_root


@pytest.fixture
def one_torch_thread():
    """Train the small CNNs on one thread: on a shared 2-core machine, two OpenMP threads competing with
    other processes run many times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
