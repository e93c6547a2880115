"""`fedecg data verify`: the layout of a PTB-XL folder checked without reading signals, and a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.data.demographics import AGE_OVER_89_CODE, DEMOGRAPHIC_FIELDS
from common.data.errors import DataError
from common.data.labels import (
    SUPERCLASSES,
    labels_from_scp_codes,
    superclasses_from_scp_codes,
)
from common.data.metadata import parse_table, read_scp_statements
from common.data.records import describe_missing, record_choice
from common.scp import SCP_CODES


def check_structure(root: str | Path) -> tuple[pd.DataFrame | None, list[str]]:
    """Check the layout of a PTB-XL folder without reading signals.

    Returns the metadata rows that passed (None when the table itself is unusable) and a list of
    problems (tables, malformed rows, rows whose record files are missing).
    """
    root = Path(root)
    if not root.is_dir():
        return None, [f"{root}: not a folder"]
    problems: list[str] = []
    try:
        read_scp_statements(root)
    except DataError as err:
        problems.append(str(err))
    try:
        meta, faults = parse_table(root / "ptbxl_database.csv")
    except DataError as err:
        return None, problems + [str(err)]
    problems += [f"ptbxl_database.csv: ecg_id {i}: {reason}" for i, reason in faults]
    meta = meta.drop(index=sorted({i for i, _ in faults}))
    for ecg_id, lr, hr in zip(meta.index.tolist(), meta["filename_lr"], meta["filename_hr"]):
        choice = record_choice(root, lr, hr, 100)
        if choice is None:
            problems.append(f"ecg_id {ecg_id}: {describe_missing(lr, hr)}")
        elif not (root / (choice[1] + ".dat")).is_file():
            problems.append(f"ecg_id {ecg_id}: signal file {choice[1]}.dat is missing")
    meta["patient_id"] = meta["patient_id"].astype(np.int64)
    meta["strat_fold"] = meta["strat_fold"].astype(np.int64)
    return meta, problems


def summarize_metadata(meta: pd.DataFrame, top: int = 10) -> dict[str, Any]:
    """Counts for a human: records, patients, sites, folds, labels, missing demographics."""
    site = meta["site"]
    site_counts = site.dropna().astype(np.int64).value_counts()
    labels = labels_from_scp_codes(meta["scp_codes"])
    supers = superclasses_from_scp_codes(meta["scp_codes"])
    statement_counts = sorted(zip(SCP_CODES, labels.sum(axis=0).astype(int).tolist()), key=lambda kv: -kv[1])
    return {
        "records": int(len(meta)),
        "patients": int(meta["patient_id"].nunique()),
        "records_per_patient_max": int(meta.groupby("patient_id").size().max()) if len(meta) else 0,
        "sites": int(site_counts.size),
        "top_sites": [(int(k), int(v)) for k, v in site_counts.head(top).items()],
        "site_missing": int(site.isna().sum()),
        "folds": {int(k): int(v) for k, v in meta["strat_fold"].value_counts().sort_index().items()},
        "superclasses": dict(zip(SUPERCLASSES, supers.sum(axis=0).astype(int).tolist())),
        "no_superclass": int((supers.sum(axis=1) == 0).sum()),
        "top_statements": [(code, n) for code, n in statement_counts[:top] if n > 0],
        "missing": {name: int(pd.to_numeric(meta[name], errors="coerce").isna().sum()) for name in DEMOGRAPHIC_FIELDS},
        "age_over_89": int((pd.to_numeric(meta["age"], errors="coerce") == AGE_OVER_89_CODE).sum()),
    }
