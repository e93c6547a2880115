"""Checks on a site's update before it is aggregated: one bad site must not poison the global model.

A reply's weights must have the global model's names, shapes and dtypes, hold only finite values, and lie
within `federation.max_update_norm` of the global model (L2 over all arrays). A site that fails is left out of
the round with a logged reason naming it and the check; its privacy spend is still recorded (it trained).
Under secure aggregation the server sees no single update, so the same checks run on the aggregate instead
(a weighted mean of updates within the bound is within the bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

CHECKS = ("names", "shape", "dtype", "finite", "norm")


@dataclass(frozen=True)
class Rejection:
    check: str  # one of CHECKS
    reason: str

    def __str__(self) -> str:
        return f"{self.check}: {self.reason}"


def _short(names: set[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed[:3]) + (f" and {len(listed) - 3} more" if len(listed) > 3 else "")


def check_format(update: object, reference: ArrayRecord) -> Rejection | None:
    """Names, shapes and dtypes against the global model's ArrayRecord."""
    if not isinstance(update, ArrayRecord):
        return Rejection("names", f"the weights are a {type(update).__name__}, not an ArrayRecord")
    missing, extra = set(reference) - set(update), set(update) - set(reference)
    if missing or extra:
        parts = ([f"missing {_short(missing)}"] if missing else []) + ([f"unexpected {_short(extra)}"] if extra else [])
        return Rejection("names", "; ".join(parts))
    for name, ref in reference.items():
        got = update[name]
        if tuple(got.shape) != tuple(ref.shape):
            return Rejection("shape", f"{name} has shape {tuple(got.shape)}, the global model {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            return Rejection("dtype", f"{name} has dtype {got.dtype}, the global model {ref.dtype}")
    return None


def check_values(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 max_update_norm: float) -> Rejection | None:
    """Finite values, and ||update - reference||_2 (over all arrays) at most `max_update_norm`."""
    squared = 0.0
    for name, ref in reference.items():
        values = np.asarray(update[name])
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            return Rejection("finite", f"{name} holds {bad} NaN/inf values")
        squared += float(np.sum(np.square(values.astype(np.float64) - np.asarray(ref, dtype=np.float64))))
    norm = math.sqrt(squared)
    if norm > max_update_norm:
        return Rejection("norm", f"||update - global||_2 = {norm:.4g} exceeds federation.max_update_norm = "
                                 f"{max_update_norm:g}")
    return None


def check_update(update: object, reference: ArrayRecord, max_update_norm: float,
                 reference_values: Mapping[str, np.ndarray] | None = None) -> Rejection | None:
    """The first check `update` (a reply's weights) fails against the global `reference`, or None.
    `reference_values` (the reference as numpy arrays) saves decoding the global model once per site."""
    if reference_values is None:
        reference_values = {name: array.numpy() for name, array in reference.items()}
    return check_format(update, reference) or check_values(
        {name: array.numpy() for name, array in update.items()}, reference_values, max_update_norm)
