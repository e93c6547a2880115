"""Patient-stable choices: each patient's place is decided from a keyed hash of that patient alone.

So adding or removing one patient changes no other patient's local-validation membership or chosen
record (DP's neighbouring datasets differ in one patient only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def _keyed_hash(seed: int, purpose: str, *values: int) -> int:
    """A 64-bit keyed hash of integer `values`, keyed by `seed` and `purpose`: a pseudo-random draw per
    value tuple that depends on nothing else (not on which other patients or records exist)."""
    key = hashlib.blake2b(f"fedecg:{purpose}:{int(seed)}".encode(), digest_size=32).digest()  # any seed size
    message = b"".join(int(v).to_bytes(8, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(message, digest_size=8, key=key).digest(), "little")


def _keyed_uniform(seed: int, purpose: str, *values: int) -> float:
    """`_keyed_hash` as a uniform draw in [0, 1)."""
    return _keyed_hash(seed, purpose, *values) / 2.0**64


_LOCAL_VAL_PURPOSE = "local-val"
_ONE_RECORD_PURPOSE = "one-record-per-patient"


def local_split(patients: np.ndarray, fraction: float, seed: int) -> tuple[set[int], set[int]]:
    """(train patients, local validation patients) of one site.

    A patient goes to local validation iff u(patient) < `fraction`, where u is a uniform in [0, 1) from a
    keyed hash of the partition seed and the patient id (the same for every site and scheme). Each
    patient's place is thus decided by that patient alone, and the validation share is `fraction` on
    average rather than exactly.

    Two fallbacks, both stable in the same sense: when `fraction` > 0, the site has two or more patients
    and none falls under the threshold, the patient with the smallest u goes to validation; and when
    every patient falls under it, the one with the largest u stays in training (a site always trains on
    someone; a one-patient site has no validation). Only these fallbacks make one patient's place depend
    on others: adding or removing a patient moves at most one other patient, and only in the degenerate
    case where at most one of the site's patients is on one side of the threshold (a tiny site, or a
    fraction near 0 or 1).
    """
    ids = sorted({int(p) for p in patients})
    if fraction <= 0 or not ids:
        return set(ids), set()
    u = {p: _keyed_uniform(seed, _LOCAL_VAL_PURPOSE, p) for p in ids}
    val = {p for p in ids if u[p] < fraction}
    if not val and len(ids) >= 2:
        val = {min(ids, key=lambda p: (u[p], p))}
    if len(val) == len(ids):
        val.discard(max(ids, key=lambda p: (u[p], p)))
    return set(ids) - val, val


def one_record_per_patient(ecg_ids: Iterable[int], patient_ids: Iterable[int], seed: int) -> np.ndarray:
    """One record per patient, in the order of `ecg_ids` (for privacy.unit=patient).

    Each patient keeps the record with the smallest keyed hash of (seed, patient_id, ecg_id): a seeded
    pseudo-random pick that depends only on that patient's own records, not on the order of the input
    nor on which other patients are present.
    """
    ids = np.asarray(list(ecg_ids), dtype=np.int64)
    patients = np.asarray(list(patient_ids), dtype=np.int64)
    if ids.shape != patients.shape:
        raise ValueError(f"one_record_per_patient: {len(ids)} ecg_ids but {len(patients)} patient_ids")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("one_record_per_patient: duplicate ecg_ids")
    best: dict[int, tuple[int, int]] = {}
    for ecg_id, patient in zip(ids.tolist(), patients.tolist()):
        rank = (_keyed_hash(seed, _ONE_RECORD_PURPOSE, patient, ecg_id), ecg_id)
        if patient not in best or rank < best[patient]:
            best[patient] = rank
    chosen = {ecg_id for _, ecg_id in best.values()}
    keep = np.fromiter((i in chosen for i in ids.tolist()), dtype=bool, count=len(ids))
    return ids[keep]
