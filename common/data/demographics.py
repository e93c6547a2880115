"""Demographics: age, sex (0 male, 1 female, as in PTB-XL), height (cm), weight (kg), from tables and requests.

NaN where missing, with a mask that is True where the value is present. Age 300 (PTB-XL's code for
"over 89") -> 90. Encoded for the model as 4 standardized values (0 where missing) and the 4 presence
bits, so an all-zero vector means "nothing known" (what classifier-free guidance drops to).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

DEMOGRAPHIC_FIELDS: tuple[str, ...] = ("age", "sex", "height", "weight")
AGE_OVER_89_CODE = 300.0  # PTB-XL v1.0.3 codes ages above 89 as 300
AGE_OVER_89_VALUE = 90.0


def fold_age(age):
    """Ages in years with "over 89" folded to 90, as PTB-XL's training data has them (its 300 code included).

    Scalars, numpy arrays and pandas Series alike; NaN (missing) stays NaN.
    """
    return np.minimum(age, AGE_OVER_89_VALUE)

# Fixed standardization constants (PTB-XL population, rounded). Fixed rather than fitted so that every
# site, the server and a user's request encode demographics identically without sharing statistics.
DEMOGRAPHIC_MEAN = np.array([60.0, 0.5, 167.0, 70.0])
DEMOGRAPHIC_STD = np.array([17.0, 0.5, 10.0, 15.0])
# Plausible ranges for a user request (outside them a request is refused, not clipped).
_REQUEST_RANGE = {"age": (0.0, 120.0), "height": (40.0, 250.0), "weight": (2.0, 350.0)}


def demographics_from_metadata(meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, 4] (age, sex, height, weight; NaN where missing) and bool [N, 4] (True = present)."""
    values = meta.loc[:, list(DEMOGRAPHIC_FIELDS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    values[:, 0] = fold_age(values[:, 0])
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
        values[0] = fold_age(values[0])
    return values.astype(np.float32), ~np.isnan(values)
