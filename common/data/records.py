"""Reading PTB-XL's WFDB records: which file of a record to read, its checks, and the model leads in mV."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.config import DataConfig
from common.data.errors import DataError
from common.data.leads import LEAD_NAMES, MODEL_LEAD_INDEX, MODEL_LEADS
from common.data.metadata import Fault, raise_or_skip

RECORD_SECONDS = 10
_NATIVE_RATE = {"filename_lr": 100, "filename_hr": 500}
_EXPECTED_HEADER_LEADS = tuple(name.upper() for name in LEAD_NAMES)
# Bytes per sample of the WFDB formats, to tell a truncated .dat from another read failure.
_BYTES_PER_SAMPLE = {"8": 1.0, "16": 2.0, "24": 3.0, "32": 4.0, "61": 2.0, "80": 1.0, "160": 2.0, "212": 1.5}
RecordChoice = tuple[str, str]  # (filename column, base path relative to the PTB-XL folder)


def record_choice(root: Path, filename_lr: Any, filename_hr: Any, target_rate: int) -> RecordChoice | None:
    """(column, relative base path) of the file to read: the native-rate file first, else the other one."""
    candidates = [("filename_lr", filename_lr), ("filename_hr", filename_hr)]
    candidates.sort(key=lambda c: _NATIVE_RATE[c[0]] != target_rate)
    base = str(root)
    for column, rel in candidates:
        if isinstance(rel, str) and os.path.isfile(f"{base}/{rel}.hea"):  # plain strings: ~10x cheaper than Path
            return column, rel
    return None


def record_choices(root: Path, meta: pd.DataFrame, target_rate: int) -> list[RecordChoice | None]:
    return [record_choice(root, lr, hr, target_rate) for lr, hr in zip(meta["filename_lr"], meta["filename_hr"])]


def describe_missing(filename_lr: Any, filename_hr: Any) -> str:
    named = [f"{rel}.hea" for rel in (filename_lr, filename_hr) if isinstance(rel, str)]
    return f"no record file: {' nor '.join(named) or 'no filename given'} exists"


def _diagnose_unreadable(root: Path, rel: str, err: Exception) -> str:
    import wfdb

    dat = root / (rel + ".dat")
    if not dat.is_file():
        return f"signal file {rel}.dat is missing"
    try:
        header = wfdb.rdheader(str(root / rel))
        per_sample = sum(_BYTES_PER_SAMPLE.get(str(f), math.nan) for f in header.fmt)
        expected = math.ceil(per_sample * header.sig_len) if math.isfinite(per_sample) else None
    except Exception:  # the header itself is broken: report the original failure
        expected = None
    size = dat.stat().st_size
    if expected is not None and size < expected:
        return f"{rel}.dat is truncated: {size} bytes, expected {expected}"
    return f"unreadable WFDB record ({err.__class__.__name__}: {err})"


def _read_record(root: Path, column: str, rel: str, target_rate: int) -> np.ndarray:
    """float32 [8, target_rate * 10] model leads in mV; raises ValueError with the fault."""
    import wfdb
    from scipy.signal import resample_poly

    native = _NATIVE_RATE[column]
    try:
        record = wfdb.rdrecord(str(root / rel))
    except Exception as err:  # wfdb raises bare ValueErrors/OSErrors; say which file and why
        raise ValueError(_diagnose_unreadable(root, rel, err)) from err
    if record.fs != native:
        raise ValueError(f"sampling rate {record.fs:g} Hz, expected {native} Hz for {column}")
    names = tuple(str(n).upper() for n in record.sig_name)
    if sorted(names) != sorted(_EXPECTED_HEADER_LEADS) or len(set(names)) != len(names):
        raise ValueError(f"unexpected lead names {list(record.sig_name)}, expected {list(LEAD_NAMES)}")
    units = {str(u) for u in record.units}
    if units != {"mV"}:
        raise ValueError(f"unexpected units {sorted(units)}, expected mV")
    expected_len = RECORD_SECONDS * native
    signal = record.p_signal
    if record.sig_len != expected_len or signal is None or signal.shape != (expected_len, len(names)):
        shape = None if signal is None else signal.shape
        raise ValueError(
            f"{record.sig_len} samples (array {shape}), expected {expected_len} ({RECORD_SECONDS} s at {native} Hz)"
        )
    if not np.isfinite(signal).all():
        bad = np.argwhere(~np.isfinite(signal))[0]
        raise ValueError(f"non-finite sample (NaN/inf) in lead {record.sig_name[bad[1]]} at sample {bad[0]}")
    x = signal[:, [names.index(LEAD_NAMES[i].upper()) for i in MODEL_LEAD_INDEX]].T  # (8, T)
    if native != target_rate:
        g = math.gcd(target_rate, native)
        x = resample_poly(x, target_rate // g, native // g, axis=1)
    return x.astype(np.float32)


def read_signals(
    root: Path, meta: pd.DataFrame, choices: Sequence[RecordChoice | None], cfg: DataConfig, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ecg_ids read, their signals [N, 8, L], ecg_ids skipped as bad) of the chosen record files."""
    from tqdm import tqdm

    length = RECORD_SECONDS * cfg.sampling_rate
    signals = np.empty((len(meta), len(MODEL_LEADS), length), dtype=np.float32)
    kept = np.zeros(len(meta), dtype=bool)
    faults: list[Fault] = []
    rows = zip(meta.index.tolist(), meta["filename_lr"], meta["filename_hr"], choices)
    bar = tqdm(rows, total=len(meta), desc="reading PTB-XL records", unit="rec", disable=not progress)
    for i, (ecg_id, filename_lr, filename_hr, choice) in enumerate(bar):
        if choice is None:
            fault = (int(ecg_id), describe_missing(filename_lr, filename_hr))
        else:
            try:
                signals[i] = _read_record(root, choice[0], choice[1], cfg.sampling_rate)
                kept[i] = True
                continue
            except ValueError as err:
                fault = (int(ecg_id), f"{choice[1]}: {err}")
        if cfg.on_bad_record == "error":
            raise DataError(f"{root}: ecg_id {fault[0]}: {fault[1]}. "
                            "Fix or remove the record, or set data.on_bad_record=skip to leave it out")
        faults.append(fault)
    skipped = raise_or_skip(faults, cfg.on_bad_record, str(root))
    ids = meta.index.to_numpy(dtype=np.int64)
    return ids[kept], signals[kept] if not kept.all() else signals, np.array(sorted(skipped), dtype=np.int64)


def read_stored_leads(root: Path, meta: pd.DataFrame, leads: tuple[str, ...]) -> np.ndarray:
    """The leads as stored in the 100 Hz WFDB files (not re-derived), [N, len(leads), T] mV in `leads` order.

    For the lead-system check of the evaluation, which needs the four limb leads the loader derives.
    """
    import wfdb

    out = []
    for rel in meta["filename_lr"]:
        rec = wfdb.rdrecord(str(root / rel))
        names = [str(s).upper() for s in rec.sig_name]
        missing = [name for name in leads if name.upper() not in names]
        if missing:
            raise ValueError(f"{root / rel}: leads {missing} are not stored (has {rec.sig_name})")
        out.append(rec.p_signal[:, [names.index(name.upper()) for name in leads]].T)
    return np.asarray(out, dtype=np.float32)
