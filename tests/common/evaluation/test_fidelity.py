"""Fidelity metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from common.evaluation import fidelity
from tests.common.evaluation.eval_fixtures import ecg_like


def twelve_leads(n: int, seed: int = 0) -> np.ndarray:
    from tests.fixtures_ptbxl import derive12

    x8, _ = ecg_like(np.random.default_rng(seed), n)
    return np.stack([derive12(r.T).T for r in x8]).astype(np.float64)


def test_interlead_error_of_a_set_against_itself_is_zero():
    x = twelve_leads(6)
    out = fidelity.interlead_correlation_error(x, x.copy())
    assert out["mean"] == pytest.approx(0.0, abs=1e-12) and out["max"] == pytest.approx(0.0, abs=1e-12)
    assert fidelity.paired_interlead_correlation_error(x, x.copy()) == pytest.approx(0.0, abs=1e-12)


def test_interlead_error_with_swapped_leads_matches_hand_value():
    # Lead 0 and 1 identical (r = 1), lead 2 orthogonal to both (r = 0). Swapping leads 1 and 2 gives
    # off-diagonal differences |1-0|, |0-1|, |0-0| (each twice): mean 2/3, max 1.
    record = np.array([[1.0, 0.0, -1.0, 0.0], [1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
    real = record[None]
    swapped = record[[0, 2, 1]][None]
    out = fidelity.interlead_correlation_error(real, swapped)
    assert out["mean"] == pytest.approx(2 / 3)
    assert out["max"] == pytest.approx(1.0)


def test_interlead_error_matches_corrcoef_reference_on_12_leads():
    x = twelve_leads(5, seed=3)
    swapped = x[:, [0, 1, 2, 3, 4, 5, 9, 7, 8, 6, 10, 11]]  # V1 <-> V4
    r_real = np.mean([np.corrcoef(rec) for rec in x], axis=0)
    r_syn = np.mean([np.corrcoef(rec) for rec in swapped], axis=0)
    off = ~np.eye(12, dtype=bool)
    expected = np.abs(r_real - r_syn)[off].mean()
    assert expected > 0.05  # the swap really changes the matrix
    assert fidelity.interlead_correlation_error(x, swapped)["mean"] == pytest.approx(expected, abs=1e-9)


def test_flat_lead_correlates_zero_and_set_sizes_may_differ():
    x = twelve_leads(3)
    x[0, 4] = 0.25  # a constant lead
    corr = fidelity.lead_correlation_matrices(x)
    assert np.all(corr[0, 4, [k for k in range(12) if k != 4]] == 0.0)
    assert corr[0, 4, 4] == 1.0
    out = fidelity.interlead_correlation_error(x, twelve_leads(7, seed=1))  # 3 vs 7 records
    assert 0.0 <= out["mean"] <= out["max"] <= 2.0


def test_interlead_error_by_class_filters_each_set_by_its_own_labels():
    x = twelve_leads(6)
    classes = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0]])
    swapped = x[:, [0, 1, 2, 3, 4, 5, 9, 7, 8, 6, 10, 11]]
    syn = np.concatenate([x[:3], swapped[3:5]])
    out = fidelity.interlead_correlation_error_by_class(x, classes, syn, classes[:5], ("A", "B"))
    assert out["A"] == pytest.approx(0.0, abs=1e-12)
    assert out["B"] == pytest.approx(fidelity.interlead_correlation_error(x[3:5], swapped[3:5])["mean"])
    too_few = fidelity.interlead_correlation_error_by_class(x, classes, syn, classes[:5], ("A", "B"), min_records=3)
    assert too_few["B"] is None


def test_psd_distance_of_doubled_amplitude_is_six_db_per_lead():
    x = twelve_leads(4)
    assert np.allclose(fidelity.psd_distance(x, x.copy()), 0.0)
    assert np.allclose(fidelity.psd_distance(x, 2 * x), 20 * np.log10(2), atol=1e-6)


def test_paired_rmse_and_snr_by_hand():
    real = twelve_leads(3)
    half = 0.5 * real
    out = fidelity.paired_rmse_snr(real, half)
    # error = real / 2: SNR = 20 log10(||r|| / ||r/2||) = 20 log10 2; RMSE = RMS(real) / 2 per pair
    assert out["snr_db"] == pytest.approx(20 * np.log10(2), abs=1e-6)
    expected_rmse = np.mean([np.sqrt(np.mean((r / 2) ** 2)) for r in real])
    assert out["rmse_mv"] == pytest.approx(expected_rmse)
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity.paired_rmse_snr(real, real[:2])


def test_label_matched_pairs_prefers_identical_label_vectors():
    real = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1]])
    syn = np.array([[0, 1, 1], [1, 0, 0], [1, 1, 1]])
    pairs = fidelity.label_matched_pairs(real, syn)
    assert pairs[0] == 2 and pairs[1] == 0
    assert pairs[2] in (0, 1, 2, 3)  # no exact match: one of the closest (Hamming 1: rows 0, 2)
    assert pairs[2] in (0, 2)


def test_frechet_distance_of_shifted_features_is_squared_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 5))
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    assert fidelity.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fidelity.frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 records"):
        fidelity.frechet_distance(a[:1], a)


def test_quick_fidelity_is_ideal_on_identical_sets_and_flags_a_bad_one():
    x = twelve_leads(8)
    same = fidelity.quick_fidelity(x.copy(), x)
    assert same["interlead_corr_error"] == pytest.approx(0.0, abs=1e-12) and same["psd_distance_db"] == pytest.approx(0.0, abs=1e-9)
    assert same["amplitude_ratio"] == pytest.approx(1.0)
    noise = np.random.default_rng(1).standard_normal(x.shape) * 0.3
    bad = fidelity.quick_fidelity(noise, x)
    assert bad["interlead_corr_error"] > 0.2 and bad["psd_distance_db"] > 3.0
    assert all(isinstance(v, float) for v in bad.values())


def test_bad_inputs_name_the_fault():
    x = twelve_leads(2)
    with pytest.raises(ValueError, match="synthetic must have 12 leads"):
        fidelity.interlead_correlation_error(x, x[:, :8])
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="real contains NaN"):
        fidelity.interlead_correlation_error(nan, x)
    with pytest.raises(ValueError, match=r"\[N, leads, T\]"):
        fidelity.quick_fidelity(x[0], x)
