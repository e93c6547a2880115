"""The lead II delineator (on fixtures with known beats and on real PTB-XL records) and the other
clinical-coherence metrics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from common.evaluation import clinical
from tests.common.evaluation.eval_fixtures import ecg_like, one_torch_thread  # noqa: F401 (fixture)
from tests.fixtures_ptbxl import derive12


def test_r_peaks_and_heart_rate_on_beats_at_known_positions():
    rng = np.random.default_rng(0)
    rates = np.array([48.0, 60.0, 75.0, 100.0, 140.0])
    x8, truth = ecg_like(rng, len(rates), heart_rates=rates)
    for lead, peaks, rate in zip(x8[:, 1], truth, rates):
        found = clinical.detect_r_peaks(lead)
        assert len(found) == len(peaks)
        assert np.abs(found - peaks).max() <= 1  # within one sample (10 ms)
        feats, _ = clinical.record_features(lead)
        assert feats["heart_rate_bpm"] == pytest.approx(rate, rel=0.03)
        assert feats["sdnn_ms"] < 15  # regular rhythm
        assert 40 <= feats["qrs_ms"] <= 120
        if rate <= 100:  # faster, the P wave of the fixture runs into the previous T wave
            assert 80 <= feats["pr_ms"] <= 250  # P peak 160 ms before R
            assert 250 <= feats["qt_ms"] <= 500  # T peak 300 ms after R


def test_flat_or_noise_only_leads_give_no_beats():
    assert clinical.detect_r_peaks(np.zeros(1000)).size == 0
    feats, beats = clinical.record_features(np.zeros(1000))
    assert beats.r.size == 0 and all(np.isnan(v) for v in feats.values())
    with pytest.raises(ValueError, match="one lead"):
        clinical.detect_r_peaks(np.zeros((2, 1000)))


def test_beat_plausibility_by_hand():
    beats = clinical.Beats(
        fs=100,
        r=np.array([100, 180, 400, 600]),
        qrs_on=np.array([95, 175, 395, 595]),
        qrs_off=np.array([103, 200, 403, 603]),  # beat 1: QRS 250 ms -> implausible
        p_on=np.array([80, -1, 380, 520]),  # beat 3: PR 750 ms -> implausible; beat 1 no P: allowed
        t_end=np.array([130, 215, 435, 640]),  # QT 350, 400, 400, 450 ms
        rr_s=np.array([np.nan, 0.8, 2.2, 2.0]),  # beat 2: RR 2.2 s -> implausible; beat 0: no RR
    )
    assert beat_flags(beats) == [False, False, False, False]
    beats.qrs_off[1] = 185  # QRS 100 ms: beat 1 now plausible
    beats.rr_s[2] = 1.0  # beat 2 now plausible
    assert beat_flags(beats) == [False, True, True, False]


def test_regular_rhythm_needs_every_rr_near_the_median():
    def beats(rr_s: list[float]) -> clinical.Beats:
        r = np.round(np.cumsum([0.3] + rr_s) * 100).astype(np.int64)
        empty = np.full(r.size, -1)
        return clinical.Beats(fs=100, r=r, qrs_on=empty, qrs_off=empty, p_on=empty, t_end=empty,
                              rr_s=np.concatenate([[np.nan], np.diff(r) / 100]))

    assert clinical.regular_rhythm(beats([0.8, 0.82, 0.78, 0.85, 0.8]))  # sinus arrhythmia within 15 %
    assert not clinical.regular_rhythm(beats([0.8, 0.8, 1.6, 0.8, 0.8]))  # a dropped beat
    assert not clinical.regular_rhythm(beats([0.8, 0.8, 0.4, 0.4, 0.8]))  # an added beat
    assert not clinical.regular_rhythm(beats([0.8, 0.8]))  # too few intervals to tell
    rng = np.random.default_rng(1)
    x8, _ = ecg_like(rng, 6)
    x12 = derive12(x8)
    _, summary = clinical.features_table(x12)
    assert summary["regular_rhythm_fraction"] == 1.0
    pause = x12.copy()
    for rec in pause:  # a 1.5 s pause mid-record: every beat there flattened
        rec[:, 400:550] = rec[:, 400:401]
    _, summary = clinical.features_table(pause)
    assert summary["regular_rhythm_fraction"] == 0.0


def beat_flags(beats: clinical.Beats) -> list[bool]:
    return [bool(v) for v in clinical.beat_plausibility(beats)]


def test_einthoven_consistency_is_zero_for_derived_leads_and_measures_a_fault():
    x8, _ = ecg_like(np.random.default_rng(1), 4)
    x12 = np.stack([derive12(r.T).T for r in x8]).astype(np.float64)
    clean = clinical.einthoven_consistency(x12)
    assert clean["max_relation"] < 1e-6  # float32 rounding only
    broken = x12.copy()
    broken[:, 2] += 0.1  # lead III off by 0.1 mV: I + III - II = 0.1 everywhere
    scale = np.abs(broken[:, :3]).mean(axis=(1, 2))
    out = clinical.einthoven_consistency(broken)
    assert out["einthoven"] == pytest.approx(np.mean(0.1 / scale), rel=1e-9)
    assert out["goldberger_avl"] == pytest.approx(np.mean(0.05 / scale), rel=1e-9)  # aVL - (I - III)/2 = 0.05
    assert out["goldberger_avr"] < 1e-6  # untouched relation: float32 rounding only


def test_feature_distances_by_hand():
    a = np.full((10, len(clinical.FEATURES)), np.nan)
    a[:, 0] = np.arange(10) + 60.0
    b = a.copy()
    b[:, 0] += 10.0
    out = clinical.feature_distances(a, b)
    assert out["heart_rate_bpm"]["wasserstein"] == pytest.approx(10.0)
    assert out["heart_rate_bpm"]["median_synthetic"] - out["heart_rate_bpm"]["median_real"] == pytest.approx(10.0)
    assert out["qrs_ms"]["wasserstein"] is None and out["qrs_ms"]["defined_fraction_real"] == 0.0


@pytest.mark.slow
def test_demographic_predictors_learn_a_planted_signal(one_torch_thread):
    from common.evaluation.classifier import ClassifierConfig

    rng = np.random.default_rng(2)
    n = 96
    sex = (np.arange(n) % 2).astype(float)
    age = rng.uniform(20, 80, n)
    x8, _ = ecg_like(rng, n, heart_rates=40 + age)  # heart rate carries age
    x8[sex == 1] *= 0.5  # amplitude carries sex
    x12 = np.stack([derive12(r.T).T for r in x8]).astype(np.float32)
    age_with_gap = age.copy()
    age_with_gap[0] = np.nan  # missing values are skipped, not trained on
    cfg = ClassifierConfig(widths=(16, 32), epochs=30, batch_size=32, lr=1e-2)
    age_model, sex_model = clinical.train_demographic_predictors(x12[:64], age_with_gap[:64], sex[:64], cfg, None, False)
    scores = clinical.demographic_scores(age_model, sex_model, x12[64:], age[64:], sex[64:])
    assert scores["sex_auroc"] > 0.9
    assert scores["age_mae_years"] < 12.0  # a uniform 20-80 guess would be ~15
    assert scores["n_age"] == 32 and scores["n_sex"] == 32
    with pytest.raises(ValueError, match="both sexes"):
        clinical.train_demographic_predictors(x12[:8], age[:8], np.zeros(8), cfg, None, False)


# ----------------------------------------------------------------------------------------------------
# Real records


@pytest.fixture(scope="module")
def real_records(shared_ptbxl):
    from common.config import DataConfig
    from common.data.dataset import load_dataset
    from common.data.metadata import read_metadata

    meta = read_metadata(shared_ptbxl)
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(meta.index.to_numpy(), 240, replace=False))
    return load_dataset(DataConfig(root=str(shared_ptbxl)), ecg_ids=ids, progress=False)


def reference_peak_count(lead: np.ndarray) -> int:
    """A simple reference on clean records: peaks of the high-passed lead above half its maximum."""
    hp = signal.sosfiltfilt(signal.butter(2, 0.5 / 50, "highpass", output="sos"), lead)
    hp = hp if hp.max() >= -hp.min() else -hp
    peaks, _ = signal.find_peaks(hp, height=0.5 * hp.max(), distance=30)
    return len(peaks)


def test_r_peak_counts_agree_with_a_simple_reference_on_clean_real_records(real_records):
    meta = real_records.meta
    noise_free = meta[["baseline_drift", "static_noise", "burst_noise", "electrodes_problems"]].isna().all(axis=1)
    normal = np.array([set(codes) <= {"NORM", "SR"} and "NORM" in codes for codes in meta["scp_codes"]])
    clean = np.flatnonzero(noise_free.to_numpy() & normal)
    assert len(clean) >= 20
    lead_ii = real_records.signals[:, 1]
    agree = [abs(len(clinical.detect_r_peaks(lead_ii[i])) - reference_peak_count(lead_ii[i])) <= 1 for i in clean]
    assert np.mean(agree) >= 0.9


def test_delineation_of_real_records_lies_in_physiological_ranges(real_records):
    table, summary = clinical.features_table(real_records.signals12())
    col = {name: table[:, k] for k, name in enumerate(clinical.FEATURES)}

    def share_within(values: np.ndarray, lo: float, hi: float) -> float:
        return float(np.mean(np.isfinite(values) & (values >= lo) & (values <= hi)))

    assert share_within(col["heart_rate_bpm"], 40, 150) >= 0.9
    assert share_within(col["qrs_ms"], 40, 160) >= 0.9
    assert share_within(col["qt_ms"], 250, 550) >= 0.85
    assert share_within(col["pr_ms"], 80, 300) >= 0.75  # no P wave in atrial fibrillation
    assert summary["records_with_beats_fraction"] >= 0.98
    assert summary["plausible_beat_fraction"] >= 0.75
    assert summary["regular_rhythm_fraction"] >= 0.6  # most PTB-XL records are in sinus rhythm


def test_stored_real_twelve_leads_are_nearly_einthoven_consistent(shared_ptbxl, real_records):
    from common.data.leads import LEAD_NAMES
    from common.data.records import read_stored_leads

    stored = read_stored_leads(shared_ptbxl, real_records.meta.iloc[:40], LEAD_NAMES)
    out = clinical.einthoven_consistency(stored)
    assert out["max_relation"] < 0.02  # quantization only (1 uV steps), relative to ~0.1 mV amplitudes
    swapped = stored[:, [0, 2, 1] + list(range(3, 12))]  # leads II and III swapped: inconsistent
    assert clinical.einthoven_consistency(swapped)["einthoven"] > 0.5
