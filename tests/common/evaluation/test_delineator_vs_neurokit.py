"""The project's own lead II R-peak detector against neurokit2's, on real PTB-XL records at 100 Hz.

The clinical metrics (heart rate, RR variability, the interval features) rest on the detected beats, so the
detector should find the beats an established toolbox finds. Measured on the 60 records below (neurokit2 0.3):
95.5 % of neurokit2's R peaks have one of ours within 50 ms (96.3 % within 100 ms), 95.2 % of our beats
away from the record's edges are neurokit2 beats, heart rate (median RR) agrees within 5 bpm on 96.7 % of
records, and no record has 1.5x neurokit2's beats. Across eight random sets of 60 the figures ranged
94.8-98.3 %, 96.3-98.8 %, 94.9-99.3 %, 91.7-100 % and 0-5 % (the doubled records: a tall T wave taken
for a beat). The thresholds leave that spread as margin. The two disagree by design near the record's
edges (neurokit2 drops the first ~0.3 s) and on records whose QRS is mostly negative in lead II (ours
takes the dominant, negative extreme, up to ~70 ms from neurokit2's R).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from common.config import DataConfig
from common.data.dataset import load_dataset
from common.data.leads import MODEL_LEADS
from common.data.metadata import read_metadata
from common.evaluation.clinical import FS, detect_r_peaks

nk = pytest.importorskip("neurokit2")

pytestmark = pytest.mark.shared_data
RECORDS = 60
EDGE = 50  # samples (0.5 s) at each end where the two detectors' conventions differ


def neurokit_r_peaks(lead: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # neurokit2 warns about its own defaults on short signals
        warnings.simplefilter("ignore")
        _, info = nk.ecg_peaks(nk.ecg_clean(lead, sampling_rate=FS), sampling_rate=FS)
    return np.asarray(info["ECG_R_Peaks"], dtype=np.int64)


def nearest(points: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Distance (samples) from each point to the nearest of `others`; inf when there are none."""
    if others.size == 0:
        return np.full(points.size, np.inf)
    return np.abs(points[:, None] - others[None, :]).min(axis=1)


def heart_rate(peaks: np.ndarray) -> float:
    return 60.0 * FS / float(np.median(np.diff(peaks))) if peaks.size >= 2 else np.nan


@pytest.fixture(scope="module")
def detections(shared_ptbxl, tmp_path_factory):
    """(ours, neurokit2's) R peaks of lead II for a fixed random draw of real records of every diagnosis."""
    ids = np.sort(np.random.default_rng(0).choice(read_metadata(shared_ptbxl).index.to_numpy(), RECORDS, replace=False))
    cfg = DataConfig(root=str(shared_ptbxl), cache_dir=str(tmp_path_factory.mktemp("cache")))
    lead_ii = load_dataset(cfg, ecg_ids=ids, progress=False).signals[:, MODEL_LEADS.index("II")].astype(np.float64)
    return [(detect_r_peaks(lead), neurokit_r_peaks(lead)) for lead in lead_ii]


def test_neurokit2_beats_are_found_at_the_same_place(detections):
    ms50, ms100 = 0.05 * FS, 0.1 * FS
    distances = np.concatenate([nearest(ref, ours) for ours, ref in detections])
    assert distances.size > 10 * RECORDS  # a real cohort, ~70 bpm on average
    assert np.mean(distances <= ms50) >= 0.92
    assert np.mean(distances <= ms100) >= 0.94


def test_our_beats_away_from_the_edges_are_neurokit2_beats(detections):
    inner = [nearest(ours[(ours >= EDGE) & (ours < 10 * FS - EDGE)], ref) for ours, ref in detections]
    assert np.mean(np.concatenate(inner) <= 0.1 * FS) >= 0.92


def test_heart_rate_agrees_and_beats_are_rarely_double_counted(detections):
    difference = np.array([abs(heart_rate(ours) - heart_rate(ref)) for ours, ref in detections])
    assert np.mean(difference <= 5.0) >= 0.9
    doubled = np.array([ours.size >= 1.5 * ref.size for ours, ref in detections])
    assert doubled.mean() <= 0.1
