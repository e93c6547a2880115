"""PTB-XL in its official layout: metadata, labels, demographics, signals, normalization and cache.

    cfg = load("configs/quickstart.yaml").data
    meta = load_metadata(cfg)                      # validated table, scp_codes as dicts
    ds = load_dataset(cfg, ecg_ids=[...])          # ECGDataset of numpy arrays, cached on disk
    x12 = derive_leads(ds.signals)                 # the 4 limb leads the model does not learn

Conventions:
- Signals are in mV at `data.sampling_rate` (100 Hz, 1000 samples for 10 s). The model learns the 8
  independent leads I, II, V1-V6 (`MODEL_LEADS`); III, aVR, aVL, aVF are exact linear combinations of
  I and II (Einthoven/Goldberger) and are derived, never learned.
- Labels: the 71 SCP statements, multi-hot in the row order of scp_statements.csv. A statement counts as
  present when it is listed in `scp_codes`, whatever its likelihood (0 means "unknown likelihood" in
  PTB-XL, not "absent"); this is the convention of the PTB-XL paper and its example code.
  Superclasses NORM, MI, STTC, CD, HYP come from `diagnostic_class` of the diagnostic statements.
- Demographics: age, sex (0 male, 1 female, as in PTB-XL), height (cm), weight (kg); NaN where missing,
  with a mask that is True where the value is present. Age 300 (PTB-XL's code for "over 89") -> 90.
  Encoded for the model as 4 standardized values (0 where missing) and the 4 presence bits, so an
  all-zero vector means "nothing known" (what classifier-free guidance drops to).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import math
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from common.config import DataConfig
from common.scp import SCP_CODES

logger = logging.getLogger(__name__)

LEAD_NAMES: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
LEADS = LEAD_NAMES
MODEL_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
MODEL_LEAD_INDEX: tuple[int, ...] = tuple(LEAD_NAMES.index(name) for name in MODEL_LEADS)
SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")
NUM_STATEMENTS = len(SCP_CODES)
# diagnostic_class of PTB-XL's 44 diagnostic statements (scp_statements.csv); files are checked against it.
SCP_SUPERCLASS: dict[str, str] = {
    **dict.fromkeys(["NDT", "NST_", "DIG", "LNGQT", "ISC_", "ISCAL", "ISCIN", "ISCIL", "ISCAS", "ISCLA", "ANEUR",
                     "EL", "ISCAN"], "STTC"),
    "NORM": "NORM",
    **dict.fromkeys(["IMI", "ASMI", "ILMI", "AMI", "ALMI", "INJAS", "LMI", "INJAL", "IPLMI", "IPMI", "INJIN",
                     "INJLA", "PMI", "INJIL"], "MI"),
    **dict.fromkeys(["LVH", "LAO/LAE", "RVH", "RAO/RAE", "SEHYP"], "HYP"),
    **dict.fromkeys(["LAFB", "IRBBB", "1AVB", "IVCD", "CRBBB", "CLBBB", "LPFB", "WPW", "ILBBB", "3AVB", "2AVB"], "CD"),
}
DEMOGRAPHIC_FIELDS: tuple[str, ...] = ("age", "sex", "height", "weight")
RECORD_SECONDS = 10
AGE_OVER_89_CODE = 300.0  # PTB-XL v1.0.3 codes ages above 89 as 300
AGE_OVER_89_VALUE = 90.0
# Bump when preprocessing changes what the arrays contain: it is part of every cache key.
PREPROCESSING_VERSION = 1

# Fixed standardization constants (PTB-XL population, rounded). Fixed rather than fitted so that every
# site, the server and a user's request encode demographics identically without sharing statistics.
DEMOGRAPHIC_MEAN = np.array([60.0, 0.5, 167.0, 70.0])
DEMOGRAPHIC_STD = np.array([17.0, 0.5, 10.0, 15.0])
# Plausible ranges for a user request (outside them a request is refused, not clipped).
_REQUEST_RANGE = {"age": (0.0, 120.0), "height": (40.0, 250.0), "weight": (2.0, 350.0)}

_REQUIRED_COLUMNS = (
    "patient_id", "age", "sex", "height", "weight", "site", "scp_codes", "strat_fold", "filename_lr", "filename_hr",
)
# Columns read_metadata adds to the official table; writers of PTB-XL tables drop them again.
DERIVED_COLUMNS = ("superclasses",)
_NATIVE_RATE = {"filename_lr": 100, "filename_hr": 500}
_EXPECTED_HEADER_LEADS = tuple(name.upper() for name in LEAD_NAMES)
# Bytes per sample of the WFDB formats, to tell a truncated .dat from another read failure.
_BYTES_PER_SAMPLE = {"8": 1.0, "16": 2.0, "24": 3.0, "32": 4.0, "61": 2.0, "80": 1.0, "160": 2.0, "212": 1.5}


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the record or file and the fault."""


# ----------------------------------------------------------------------------------------------------
# Location and tables


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


def _read_table(path: Path) -> tuple[pd.DataFrame, list[tuple[int, str]]]:
    """A PTB-XL metadata table and the faults of individual rows (ecg_id, reason); table faults raise."""
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
    meta = meta.set_index("ecg_id").sort_index()

    known = set(SCP_CODES)
    faults: list[tuple[int, str]] = []
    parsed_codes: list[dict[str, float] | None] = []
    for ecg_id, text in meta["scp_codes"].items():
        try:
            parsed_codes.append(_parse_scp_codes(text, known))
        except ValueError as err:
            parsed_codes.append(None)
            faults.append((int(ecg_id), str(err)))
    meta["scp_codes"] = parsed_codes
    meta[DERIVED_COLUMNS[0]] = [
        tuple(c for c in SUPERCLASSES if codes and c in {SCP_SUPERCLASS.get(k) for k in codes})
        for codes in parsed_codes
    ]

    def numeric(column: str) -> pd.Series:
        values = pd.to_numeric(meta[column], errors="coerce")
        for ecg_id in meta.index[values.isna() & meta[column].notna()]:
            faults.append((int(ecg_id), f"{column} {meta.at[ecg_id, column]!r} is not a number"))
        return values

    for column in ("patient_id", "age", "sex", "height", "weight", "site", "strat_fold"):
        meta[column] = numeric(column)
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
    return meta, sorted(set(faults))


def _raise_or_skip(faults: list[tuple[int, str]], on_bad_record: str, where: str) -> set[int]:
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


def _finish(meta: pd.DataFrame, faults: list[tuple[int, str]], on_bad_record: str, where: str) -> pd.DataFrame:
    drop = _raise_or_skip(faults, on_bad_record, where)
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
    meta, faults = _read_table(path)
    return _finish(meta, faults, on_bad_record, str(path))


def read_metadata_table(path: str | Path, on_bad_record: str = "error") -> pd.DataFrame:
    """Like `read_metadata`, for a PTB-XL-format table anywhere (no records or scp_statements.csv needed)."""
    path = Path(path)
    meta, faults = _read_table(path)
    return _finish(meta, faults, on_bad_record, str(path))


def load_metadata(cfg: DataConfig) -> pd.DataFrame:
    """`read_metadata` at the configured location, limited to the first `data.max_records` rows."""
    root = resolve_root(cfg)
    meta = read_metadata(root, cfg.on_bad_record)
    if cfg.max_records is not None:
        if cfg.max_records <= 0:
            raise DataError(f"data.max_records={cfg.max_records}: must be positive")
        meta = meta.iloc[: cfg.max_records]
    return meta


# ----------------------------------------------------------------------------------------------------
# Labels and demographics


def labels_from_scp_codes(scp_codes: Iterable[dict[str, float]], codes: Sequence[str] = SCP_CODES) -> np.ndarray:
    """Multi-hot float32 [N, len(codes)]: 1 where the statement is listed in scp_codes (any likelihood)."""
    column = {code: i for i, code in enumerate(codes)}
    rows = list(scp_codes)
    labels = np.zeros((len(rows), len(column)), dtype=np.float32)
    for i, record_codes in enumerate(rows):
        for code in record_codes:
            if code not in column:
                raise DataError(f"row {i}: scp_codes names unknown statement {code!r}")
            labels[i, column[code]] = 1.0
    return labels


def superclasses_from_scp_codes(scp_codes: Iterable[dict[str, float]]) -> np.ndarray:
    """Multi-hot float32 [N, 5] over SUPERCLASSES, from the diagnostic statements listed in scp_codes."""
    rows = list(scp_codes)
    out = np.zeros((len(rows), len(SUPERCLASSES)), dtype=np.float32)
    for i, record_codes in enumerate(rows):
        for code in record_codes:
            if code in SCP_SUPERCLASS:
                out[i, SUPERCLASSES.index(SCP_SUPERCLASS[code])] = 1.0
    return out


def demographics_from_metadata(meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, 4] (age, sex, height, weight; NaN where missing) and bool [N, 4] (True = present)."""
    values = meta.loc[:, list(DEMOGRAPHIC_FIELDS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    age = values[:, 0]
    age[age == AGE_OVER_89_CODE] = AGE_OVER_89_VALUE
    return values.astype(np.float32), ~np.isnan(values)


def encode_demographics(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The model's demographic input: float32 [N, 8] = standardized values (0 where missing), then 4 presence bits.

    values: [N, 4] age, sex, height, weight; mask: [N, 4] bool, True where present (values elsewhere are ignored).
    """
    values = np.asarray(values, dtype=np.float64)
    present = np.asarray(mask, dtype=bool)
    if values.ndim != 2 or values.shape[1] != len(DEMOGRAPHIC_FIELDS) or present.shape != values.shape:
        raise ValueError(
            f"encode_demographics: expected values and mask of shape [N, 4], got {values.shape} and {present.shape}"
        )
    nan_present = np.isnan(values) & present
    if nan_present.any():
        row, col = map(int, np.argwhere(nan_present)[0])
        raise ValueError(f"encode_demographics: {DEMOGRAPHIC_FIELDS[col]} of row {row} is NaN but marked present")
    standardized = np.where(present, (np.nan_to_num(values) - DEMOGRAPHIC_MEAN) / DEMOGRAPHIC_STD, 0.0)
    return np.concatenate([standardized, present.astype(np.float64)], axis=1).astype(np.float32)


def demographics_from_request(
    age: float | None = None, sex: str | int | None = None, height: float | None = None, weight: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One user's request as float32 [4] values and bool [4] presence mask (None = not given).

    sex: "male"/"female" (also "m"/"f", any case) or PTB-XL's 0 (male) / 1 (female).
    Ages above 89 are coded 90 as in the training data.
    """
    values = np.full(len(DEMOGRAPHIC_FIELDS), np.nan, dtype=np.float64)
    if sex is not None:
        names = {"male": 0.0, "m": 0.0, "female": 1.0, "f": 1.0}
        if isinstance(sex, str) and sex.strip().lower() in names:
            values[1] = names[sex.strip().lower()]
        elif not isinstance(sex, (str, bool)) and isinstance(sex, (int, float, np.integer, np.floating)) and sex in (0, 1):
            values[1] = float(sex)
        else:
            raise ValueError(f"sex={sex!r}: expected 'male', 'female', 0 (male) or 1 (female)")
    for index, name, value in ((0, "age", age), (2, "height", height), (3, "weight", weight)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r}: expected a finite number")
        low, high = _REQUEST_RANGE[name]
        if not low <= value <= high:
            raise ValueError(f"{name}={value!r}: outside the plausible range [{low:g}, {high:g}]")
        values[index] = float(value)
    if not np.isnan(values[0]):
        values[0] = min(values[0], AGE_OVER_89_VALUE)
    return values.astype(np.float32), ~np.isnan(values)


# ----------------------------------------------------------------------------------------------------
# Leads


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def derive_leads(x8: Any) -> Any:
    """12 leads (I, II, III, aVR, aVL, aVF, V1..V6) from the 8 model leads (I, II, V1..V6); lead axis -2.

    Exact: III = II - I, aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2. numpy or torch in, same out.
    """
    if x8.ndim < 2 or x8.shape[-2] != len(MODEL_LEADS):
        raise ValueError(f"derive_leads: expected [..., 8, L] (leads {', '.join(MODEL_LEADS)}), got shape {tuple(x8.shape)}")
    lead_i, lead_ii, chest = x8[..., 0:1, :], x8[..., 1:2, :], x8[..., 2:, :]
    limb = [lead_i, lead_ii, lead_ii - lead_i, -(lead_i + lead_ii) / 2, lead_i - lead_ii / 2, lead_ii - lead_i / 2, chest]
    if _is_torch(x8):
        return sys.modules["torch"].cat(limb, dim=-2)
    return np.concatenate(limb, axis=-2)


def select_model_leads(x12: Any) -> Any:
    """The 8 model leads (I, II, V1..V6) out of 12 standard-order leads; lead axis -2."""
    if x12.ndim < 2 or x12.shape[-2] != len(LEAD_NAMES):
        raise ValueError(f"select_model_leads: expected [..., 12, L], got shape {tuple(x12.shape)}")
    return x12[..., list(MODEL_LEAD_INDEX), :]


# ----------------------------------------------------------------------------------------------------
# Normalization


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare .mean/.std explicitly
class Normalizer:
    """Per-lead mean/std (float64) of training signals; travels with the model as JSON (`to_dict`)."""

    mean: np.ndarray  # float64 [leads]
    std: np.ndarray  # float64 [leads], > 0
    leads: tuple[str, ...] = MODEL_LEADS

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        std = np.asarray(self.std, dtype=np.float64).reshape(-1)
        if mean.shape != (len(self.leads),) or std.shape != (len(self.leads),):
            raise ValueError(f"Normalizer: mean {mean.shape} and std {std.shape} must both have {len(self.leads)} entries")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"Normalizer: mean must be finite and std finite and positive (std={std.tolist()})")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def fit(cls, signals: np.ndarray, leads: Sequence[str] = MODEL_LEADS, chunk: int = 1024) -> "Normalizer":
        """Fit on [N, leads, L] signals (two passes, float64 accumulation, no float64 copy of the data)."""
        if signals.ndim != 3 or signals.shape[1] != len(leads) or signals.shape[0] == 0:
            raise ValueError(f"Normalizer.fit: expected [N>0, {len(leads)}, L] signals, got shape {signals.shape}")
        count = signals.shape[0] * signals.shape[2]
        total = np.zeros(len(leads))
        for start in range(0, signals.shape[0], chunk):
            total += np.sum(signals[start:start + chunk], axis=(0, 2), dtype=np.float64)
        mean = total / count
        squares = np.zeros(len(leads))
        for start in range(0, signals.shape[0], chunk):
            centred = signals[start:start + chunk].astype(np.float64) - mean[None, :, None]
            squares += np.einsum("nlt,nlt->l", centred, centred)
        std = np.sqrt(squares / count)
        flat = [leads[i] for i in np.flatnonzero(std == 0)]
        if flat:
            raise DataError(f"Normalizer.fit: lead(s) {flat} are constant over the training signals")
        return cls(mean=mean, std=std, leads=tuple(leads))

    def _stats(self, x: Any) -> tuple[Any, Any]:
        if x.shape[-2] != len(self.leads):
            raise ValueError(f"Normalizer: expected {len(self.leads)} leads on axis -2, got shape {tuple(x.shape)}")
        if _is_torch(x):
            torch = sys.modules["torch"]
            as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64, device=x.device)[:, None]  # noqa: E731
            return as_tensor(self.mean), as_tensor(self.std)
        return self.mean[:, None], self.std[:, None]

    def normalize(self, x: Any) -> Any:
        """(x - mean) / std per lead, computed in float64, returned in x's dtype (numpy or torch)."""
        mean, std = self._stats(x)
        wide = x.double() if _is_torch(x) else np.asarray(x, dtype=np.float64)
        out = (wide - mean) / std
        return out.to(x.dtype) if _is_torch(x) else out.astype(x.dtype, copy=False)

    def denormalize(self, z: Any) -> Any:
        """The inverse of `normalize`: z * std + mean per lead."""
        mean, std = self._stats(z)
        wide = z.double() if _is_torch(z) else np.asarray(z, dtype=np.float64)
        out = wide * std + mean
        return out.to(z.dtype) if _is_torch(z) else out.astype(z.dtype, copy=False)

    def to_dict(self) -> dict[str, Any]:
        # Python floats are float64 and JSON round-trips them exactly (repr is shortest-exact).
        return {"leads": list(self.leads), "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Normalizer":
        try:
            return cls(mean=np.array(data["mean"], dtype=np.float64), std=np.array(data["std"], dtype=np.float64),
                       leads=tuple(data["leads"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"Normalizer.from_dict: expected keys leads, mean, std ({err})") from err


# ----------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class ECGDataset:
    """Preprocessed PTB-XL records; every array has N rows in the same order as `ecg_ids`."""

    ecg_ids: np.ndarray  # int64 [N]
    patient_ids: np.ndarray  # int64 [N]
    signals: np.ndarray  # float32 [N, 8, L] mV, leads MODEL_LEADS
    labels: np.ndarray  # float32 [N, 71] SCP statements, order of `codes`
    superclasses: np.ndarray  # float32 [N, 5] SUPERCLASSES
    demographics: np.ndarray  # float32 [N, 4] age, sex, height, weight; NaN where missing
    demographics_mask: np.ndarray  # bool [N, 4], True where present
    strat_fold: np.ndarray  # int64 [N]
    site: np.ndarray  # int64 [N], -1 where the site is not recorded
    codes: tuple[str, ...]  # the 71 statement codes (SCP_CODES)
    meta: pd.DataFrame  # the metadata rows, indexed by ecg_id, same order

    def __len__(self) -> int:
        return int(self.ecg_ids.shape[0])

    def subset(self, ecg_ids: Iterable[int]) -> "ECGDataset":
        """The records with these ecg_ids, in the order given."""
        wanted = np.asarray(list(ecg_ids), dtype=np.int64)
        rows = _positions(self.ecg_ids, wanted, "ECGDataset.subset")
        return ECGDataset(
            ecg_ids=self.ecg_ids[rows], patient_ids=self.patient_ids[rows], signals=self.signals[rows],
            labels=self.labels[rows], superclasses=self.superclasses[rows], demographics=self.demographics[rows],
            demographics_mask=self.demographics_mask[rows], strat_fold=self.strat_fold[rows], site=self.site[rows],
            codes=self.codes, meta=self.meta.iloc[rows],
        )

    def signals12(self) -> np.ndarray:
        """float32 [N, 12, L]: the 12 standard leads derived from the 8 model leads."""
        return derive_leads(self.signals)

    def encoded_demographics(self) -> np.ndarray:
        """float32 [N, 8]: `encode_demographics` of this dataset (the model's demographic input)."""
        return encode_demographics(self.demographics, self.demographics_mask)


def _positions(available: np.ndarray, wanted: np.ndarray, where: str) -> np.ndarray:
    if len(np.unique(wanted)) != len(wanted):
        values, counts = np.unique(wanted, return_counts=True)
        raise DataError(f"{where}: duplicate ecg_ids {values[counts > 1][:10].tolist()}")
    order = np.argsort(available, kind="stable")
    found = np.searchsorted(available, wanted, sorter=order)
    found = np.minimum(found, len(available) - 1) if len(available) else found
    rows = order[found] if len(available) else found
    unknown = wanted[(rows >= len(available)) | (available[rows] != wanted)] if len(available) else wanted
    if len(unknown):
        raise DataError(f"{where}: {len(unknown)} ecg_id(s) not available: {unknown[:10].tolist()}")
    return rows


# ----------------------------------------------------------------------------------------------------
# Reading records


def _record_choice(root: Path, filename_lr: Any, filename_hr: Any, target_rate: int) -> tuple[str, str] | None:
    """(column, relative base path) of the file to read: the native-rate file first, else the other one."""
    candidates = [("filename_lr", filename_lr), ("filename_hr", filename_hr)]
    candidates.sort(key=lambda c: _NATIVE_RATE[c[0]] != target_rate)
    base = str(root)
    for column, rel in candidates:
        if isinstance(rel, str) and os.path.isfile(f"{base}/{rel}.hea"):  # plain strings: ~10x cheaper than Path
            return column, rel
    return None


def _record_choices(root: Path, meta: pd.DataFrame, target_rate: int) -> list[tuple[str, str] | None]:
    return [_record_choice(root, lr, hr, target_rate) for lr, hr in zip(meta["filename_lr"], meta["filename_hr"])]


def _describe_missing(filename_lr: Any, filename_hr: Any) -> str:
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


# ----------------------------------------------------------------------------------------------------
# Cache


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Files changed less than this long ago also contribute their content hash: file times come from a
# coarse kernel clock (one tick is 1-10 ms; some network filesystems keep whole seconds), so two writes
# within one tick can leave identical times (git's "racy clean" problem). Older files change times on
# any later write, so size + times + inode identify their contents.
_RACY_SECONDS = 3.0


def _stat_token(path: str, now: float) -> str:
    # ctime is set by the kernel on every write and cannot be set back by tools (unlike mtime), so a
    # record rewritten in place, even with its size and mtime restored, gets a new token (git's index
    # uses the same test). A false miss (e.g. after chmod or a copy) only costs a rebuild.
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "absent"
    token = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
    if max(st.st_mtime, st.st_ctime) > now - _RACY_SECONDS:
        token += ":" + _file_sha256(Path(path))
    return token


def cache_key(root: Path, meta: pd.DataFrame, choices: Sequence[tuple[str, str] | None], cfg: DataConfig) -> str:
    """Hash of the inputs' contents/identity and of the preprocessing parameters of this selection."""
    now = time.time()
    digest = hashlib.sha256()
    digest.update(f"v{PREPROCESSING_VERSION}|rate={cfg.sampling_rate}|bad={cfg.on_bad_record}\n".encode())
    for name in ("ptbxl_database.csv", "scp_statements.csv", "SHA256SUMS.txt"):
        path = root / name
        digest.update(f"{name}={_file_sha256(path) if path.is_file() else 'absent'}\n".encode())
    for ecg_id, choice in zip(meta.index.tolist(), choices):
        if choice is None:
            digest.update(f"{ecg_id}:none\n".encode())
            continue
        rel = choice[1]
        tokens = [_stat_token(f"{root}/{rel}{ext}", now) for ext in (".hea", ".dat")]
        digest.update(f"{ecg_id}:{rel}:{tokens[0]}:{tokens[1]}\n".encode())
    return digest.hexdigest()


_CACHED_ARRAYS = ("ecg_ids", "signals", "skipped_ids")


def _cache_path(cfg: DataConfig, key: str) -> Path:
    return Path(cfg.cache_dir).expanduser() / f"ptbxl-{key[:24]}.npz"


def _load_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return {name: data[name] for name in _CACHED_ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        # A broken cache file is rebuilt, never trusted.
        logger.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, err)
        return None


def _save_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle_fd, partial = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")  # unique per writer
    try:
        with os.fdopen(handle_fd, "wb") as handle:
            np.savez(handle, key=np.array(key), **arrays)
        os.replace(partial, path)  # atomic: a reader sees the old file or the whole new one
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------
# Loading


def _read_signals(
    root: Path, meta: pd.DataFrame, choices: Sequence[tuple[str, str] | None], cfg: DataConfig, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from tqdm import tqdm

    length = RECORD_SECONDS * cfg.sampling_rate
    signals = np.empty((len(meta), len(MODEL_LEADS), length), dtype=np.float32)
    kept = np.zeros(len(meta), dtype=bool)
    faults: list[tuple[int, str]] = []
    rows = zip(meta.index.tolist(), meta["filename_lr"], meta["filename_hr"], choices)
    bar = tqdm(rows, total=len(meta), desc="reading PTB-XL records", unit="rec", disable=not progress)
    for i, (ecg_id, filename_lr, filename_hr, choice) in enumerate(bar):
        if choice is None:
            fault = (int(ecg_id), _describe_missing(filename_lr, filename_hr))
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
    skipped = _raise_or_skip(faults, cfg.on_bad_record, str(root))
    ids = meta.index.to_numpy(dtype=np.int64)
    return ids[kept], signals[kept] if not kept.all() else signals, np.array(sorted(skipped), dtype=np.int64)


def load_dataset(cfg: DataConfig, ecg_ids: Iterable[int] | None = None, progress: bool = True) -> ECGDataset:
    """Load (or read from the cache) the records, in ecg_id order or in the order of `ecg_ids`.

    With data.on_bad_record=skip, bad records are left out (a warning lists them): use the returned
    `ecg_ids`, which may be fewer than asked.
    """
    if cfg.sampling_rate <= 0:
        raise DataError(f"data.sampling_rate={cfg.sampling_rate}: must be a positive number of Hz")
    root = resolve_root(cfg)
    meta = load_metadata(cfg)
    requested = None
    if ecg_ids is not None:
        requested = np.asarray(list(ecg_ids), dtype=np.int64)
        rows = _positions(meta.index.to_numpy(dtype=np.int64), requested,
                          f"load_dataset ({root}, max_records={cfg.max_records})")
        meta = meta.iloc[np.sort(rows)]

    choices = _record_choices(root, meta, cfg.sampling_rate)
    key = cache_key(root, meta, choices, cfg)
    path = _cache_path(cfg, key)
    cached = _load_cache(path, key)
    if cached is None:
        ids, signals, skipped = _read_signals(root, meta, choices, cfg, progress)
        _save_cache(path, key, {"ecg_ids": ids, "signals": signals, "skipped_ids": skipped})
    else:
        ids, signals, skipped = cached["ecg_ids"], cached["signals"], cached["skipped_ids"]
        logger.info("loaded %d records from cache %s", len(ids), path)
        if len(skipped):
            logger.warning("%s: skipped %d bad record(s) (data.on_bad_record=skip, cached): ids %s",
                           root, len(skipped), skipped.tolist())
    meta = meta.loc[ids]
    demographics, present = demographics_from_metadata(meta)
    dataset = ECGDataset(
        ecg_ids=ids, patient_ids=meta["patient_id"].to_numpy(dtype=np.int64), signals=signals,
        labels=labels_from_scp_codes(meta["scp_codes"]), superclasses=superclasses_from_scp_codes(meta["scp_codes"]),
        demographics=demographics, demographics_mask=present,
        strat_fold=meta["strat_fold"].to_numpy(dtype=np.int64),
        site=meta["site"].fillna(-1).to_numpy(dtype=np.int64),
        codes=SCP_CODES, meta=meta,
    )
    if requested is not None:
        skipped_set = set(skipped.tolist())
        dataset = dataset.subset([i for i in requested.tolist() if i not in skipped_set])
    return dataset


# ----------------------------------------------------------------------------------------------------
# Checks and summaries (`fedecg data verify`)


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
        meta, faults = _read_table(root / "ptbxl_database.csv")
    except DataError as err:
        return None, problems + [str(err)]
    problems += [f"ptbxl_database.csv: ecg_id {i}: {reason}" for i, reason in faults]
    meta = meta.drop(index=sorted({i for i, _ in faults}))
    for ecg_id, lr, hr in zip(meta.index.tolist(), meta["filename_lr"], meta["filename_hr"]):
        choice = _record_choice(root, lr, hr, 100)
        if choice is None:
            problems.append(f"ecg_id {ecg_id}: {_describe_missing(lr, hr)}")
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
