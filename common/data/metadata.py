"""PTB-XL's tables: where the folder is, and validated ptbxl_database.csv / scp_statements.csv.

Faults of individual rows are collected as (ecg_id, reason) and either raised together or, with
data.on_bad_record=skip, logged and the rows left out; faults of a whole table always raise.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.config import DataConfig
from common.data.errors import DataError
from common.data.labels import SCP_SUPERCLASS, SUPERCLASSES, superclasses_of
from common.scp import SCP_CODES

logger = logging.getLogger(__name__)

_REQUIRED_COLUMNS = (
    "patient_id", "age", "sex", "height", "weight", "site", "scp_codes", "strat_fold", "filename_lr", "filename_hr",
)
# Columns read_metadata adds to the official table; writers of PTB-XL tables drop them again.
DERIVED_COLUMNS = ("superclasses",)
Fault = tuple[int, str]  # (ecg_id, reason)


def resolve_root(cfg: DataConfig) -> Path:
    """The PTB-XL folder from `data.root`, else the PTBXL_DIR environment variable."""
    if cfg.root:
        root, origin = Path(cfg.root).expanduser(), "data.root"
    elif os.environ.get("PTBXL_DIR"):
        root, origin = Path(os.environ["PTBXL_DIR"]).expanduser(), "PTBXL_DIR"
    else:
        raise DataError(
            "no PTB-XL location: set data.root in the config or the environment variable PTBXL_DIR "
            "to a folder holding ptbxl_database.csv (download it with `fedecg data fetch --out DIR`)"
        )
    if not root.is_dir():
        raise DataError(f"{origin}={root}: not a folder")
    if not (root / "ptbxl_database.csv").is_file():
        raise DataError(
            f"{origin}={root}: no ptbxl_database.csv there; point data.root or PTBXL_DIR at the PTB-XL "
            "folder (the one holding ptbxl_database.csv, scp_statements.csv, records100/)"
        )
    return root.resolve()


def read_scp_statements(root: str | Path) -> pd.DataFrame:
    """scp_statements.csv indexed by statement code, checked against SCP_CODES (order) and SCP_SUPERCLASS."""
    path = Path(root) / "scp_statements.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing (scp_statements.csv defines the 71 SCP statements)")
    try:
        table = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV table: {err}") from err
    for column in ("diagnostic", "diagnostic_class"):
        if column not in table.columns:
            raise DataError(f"{path}: no column '{column}'")
    codes = tuple(str(c) for c in table.index)
    if codes != SCP_CODES:
        extra = sorted(set(codes) - set(SCP_CODES))
        absent = sorted(set(SCP_CODES) - set(codes))
        detail = f"unknown {extra}, missing {absent}" if extra or absent else "same codes in another order"
        raise DataError(f"{path}: the statements differ from PTB-XL's 71 ({detail}); labels would not match the model")
    diagnostic = table[table["diagnostic"] == 1]["diagnostic_class"]
    found = {str(code): str(cls) for code, cls in diagnostic.items() if str(cls) in SUPERCLASSES}
    if found != SCP_SUPERCLASS:
        differ = sorted(c for c in set(found) | set(SCP_SUPERCLASS) if found.get(c) != SCP_SUPERCLASS.get(c))
        raise DataError(f"{path}: diagnostic_class differs from PTB-XL's for {differ}")
    return table


def _parse_scp_codes(text: Any, known: set[str]) -> dict[str, float]:
    if not isinstance(text, str):
        raise ValueError(f"scp_codes is empty ({text!r})")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"scp_codes is not a Python dict literal: {text!r} ({err.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"scp_codes is not a dict: {text!r}")
    codes: dict[str, float] = {}
    for code, likelihood in value.items():
        if not isinstance(code, str) or isinstance(likelihood, bool) or not isinstance(likelihood, (int, float)):
            raise ValueError(f"scp_codes entry {code!r}: {likelihood!r} is not code: number")
        if code not in known:
            raise ValueError(f"scp_codes names unknown statement {code!r} (not one of PTB-XL's 71)")
        codes[code] = float(likelihood)
    return codes



def _read_csv(path: Path) -> pd.DataFrame:
    """The table indexed by integer ecg_id (sorted), with the required columns; table faults raise."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        meta = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV table: {err}") from err
    if "ecg_id" not in meta.columns:
        raise DataError(f"{path}: no column 'ecg_id'")
    missing = [c for c in _REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    ids = pd.to_numeric(meta["ecg_id"], errors="coerce")
    if ids.isna().any() or (ids != ids.round()).any():
        raise DataError(f"{path}: ecg_id must be integers (bad rows: {meta.index[ids.isna()].tolist()[:5]})")
    meta["ecg_id"] = ids.astype(np.int64)
    if meta["ecg_id"].duplicated().any():
        raise DataError(f"{path}: duplicate ecg_id {sorted(meta['ecg_id'][meta['ecg_id'].duplicated()].unique())[:10]}")
    return meta.set_index("ecg_id").sort_index()


def _parse_codes_column(meta: pd.DataFrame, faults: list[Fault]) -> None:
    """scp_codes parsed into dicts (None where malformed) and the derived superclasses column, in place."""
    known = set(SCP_CODES)
    parsed_codes: list[dict[str, float] | None] = []
    for ecg_id, text in meta["scp_codes"].items():
        try:
            parsed_codes.append(_parse_scp_codes(text, known))
        except ValueError as err:
            parsed_codes.append(None)
            faults.append((int(ecg_id), str(err)))
    meta["scp_codes"] = parsed_codes
    meta[DERIVED_COLUMNS[0]] = [superclasses_of(codes or {}) for codes in parsed_codes]


def _check_values(meta: pd.DataFrame, faults: list[Fault]) -> None:
    """Numeric columns as floats (NaN where missing), with a fault for each value that breaks a rule."""
    for column in ("patient_id", "age", "sex", "height", "weight", "site", "strat_fold"):
        values = pd.to_numeric(meta[column], errors="coerce")
        for ecg_id in meta.index[values.isna() & meta[column].notna()]:
            faults.append((int(ecg_id), f"{column} {meta.at[ecg_id, column]!r} is not a number"))
        meta[column] = values
    for column, rule, text in (
        ("patient_id", meta["patient_id"].isna(), "patient_id is missing"),
        ("strat_fold", meta["strat_fold"].isna() | (meta["strat_fold"] != meta["strat_fold"].round()),
         "strat_fold is not an integer"),
        ("sex", meta["sex"].notna() & ~meta["sex"].isin([0, 1]), "sex is not 0 (male) or 1 (female)"),
        ("age", meta["age"] < 0, "age is negative"),
        ("height", meta["height"] <= 0, "height is not positive"),
        ("weight", meta["weight"] <= 0, "weight is not positive"),
    ):
        for ecg_id in meta.index[rule]:
            faults.append((int(ecg_id), f"{text} ({meta.at[ecg_id, column]!r})"))
    no_file = meta["filename_lr"].isna() & meta["filename_hr"].isna()
    for ecg_id in meta.index[no_file]:
        faults.append((int(ecg_id), "neither filename_lr nor filename_hr is given"))


def parse_table(path: Path) -> tuple[pd.DataFrame, list[Fault]]:
    """A PTB-XL metadata table and the faults of individual rows (ecg_id, reason); table faults raise."""
    meta = _read_csv(path)
    faults: list[Fault] = []
    _parse_codes_column(meta, faults)
    _check_values(meta, faults)
    return meta, sorted(set(faults))


def raise_or_skip(faults: list[Fault], on_bad_record: str, where: str) -> set[int]:
    """Raise DataError for the faults, or log them (on_bad_record=skip) and return the ids to drop."""
    if not faults:
        return set()
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"data.on_bad_record={on_bad_record!r}: expected 'error' or 'skip'")
    listed = "; ".join(f"ecg_id {i}: {reason}" for i, reason in faults[:10])
    more = f" (and {len(faults) - 10} more)" if len(faults) > 10 else ""
    if on_bad_record == "error":
        raise DataError(f"{where}: {len(faults)} bad record(s): {listed}{more}. "
                        "Fix or remove them, or set data.on_bad_record=skip to leave them out")
    ids = sorted({i for i, _ in faults})
    logger.warning("%s: skipped %d bad record(s) (data.on_bad_record=skip): ids %s; %s%s",
                   where, len(ids), ids, listed, more)
    return set(ids)


def _finish_table(meta: pd.DataFrame, faults: list[Fault], on_bad_record: str, where: str) -> pd.DataFrame:
    drop = raise_or_skip(faults, on_bad_record, where)
    if drop:
        meta = meta.drop(index=sorted(drop))
    meta["patient_id"] = meta["patient_id"].astype(np.int64)
    meta["strat_fold"] = meta["strat_fold"].astype(np.int64)
    return meta


def read_metadata(root: str | Path, on_bad_record: str = "error") -> pd.DataFrame:
    """The validated ptbxl_database.csv of a PTB-XL folder, indexed by ecg_id (sorted).

    scp_codes are parsed into dicts {code: likelihood}; numeric columns are floats with NaN where
    missing (age keeps PTB-XL's 300 code; `demographics_from_metadata` maps it). An added column
    `superclasses` holds the tuple of diagnostic superclasses of each record. The folder's
    scp_statements.csv is checked against PTB-XL's 71 statements.
    """
    root = Path(root)
    read_scp_statements(root)
    path = root / "ptbxl_database.csv"
    meta, faults = parse_table(path)
    return _finish_table(meta, faults, on_bad_record, str(path))


def read_metadata_table(path: str | Path, on_bad_record: str = "error") -> pd.DataFrame:
    """Like `read_metadata`, for a PTB-XL-format table anywhere (no records or scp_statements.csv needed)."""
    path = Path(path)
    meta, faults = parse_table(path)
    return _finish_table(meta, faults, on_bad_record, str(path))


def load_metadata(cfg: DataConfig) -> pd.DataFrame:
    """`read_metadata` at the configured location, limited to the first `data.max_records` rows."""
    root = resolve_root(cfg)
    meta = read_metadata(root, cfg.on_bad_record)
    if cfg.max_records is not None:
        if cfg.max_records <= 0:
            raise DataError(f"data.max_records={cfg.max_records}: must be positive")
        meta = meta.iloc[: cfg.max_records]
    return meta

