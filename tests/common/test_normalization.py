"""The per-lead Normalizer (fit, round trip, JSON, numpy and torch, bad input) and the public constants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.data.errors import DataError
from common.data.leads import MODEL_LEADS
from common.normalization import PUBLIC_LEAD_SCALE_MV, Normalizer, federated_normalizer


def test_normalizer_fits_per_lead_and_round_trips_exactly():
    rng = np.random.default_rng(1)
    offsets = np.arange(8)[None, :, None]
    scales = (1 + np.arange(8))[None, :, None] / 4
    signals = (rng.normal(size=(30, 8, 200)) * scales + offsets).astype(np.float32)
    norm = Normalizer.fit(signals, chunk=7)  # chunking must not change the statistics
    np.testing.assert_allclose(norm.mean, signals.astype(np.float64).mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(norm.std, signals.astype(np.float64).std(axis=(0, 2)), rtol=1e-10)
    z = norm.normalize(signals.astype(np.float64))
    np.testing.assert_allclose(z.mean(axis=(0, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=(0, 2)), 1, atol=1e-12)
    x64 = signals.astype(np.float64)
    np.testing.assert_allclose(norm.denormalize(norm.normalize(x64)), x64, rtol=0, atol=1e-12)
    assert norm.normalize(signals).dtype == np.float32

    restored = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert np.array_equal(restored.mean, norm.mean) and np.array_equal(restored.std, norm.std)
    assert restored.leads == MODEL_LEADS
    as_torch = restored.normalize(torch.from_numpy(signals))
    assert as_torch.dtype == torch.float32
    np.testing.assert_allclose(as_torch.numpy(), norm.normalize(signals), rtol=0, atol=1e-6)
    np.testing.assert_allclose(restored.denormalize(as_torch).numpy(), signals, atol=1e-5)

    flat = signals.copy()
    flat[:, 3] = 0.25
    with pytest.raises(DataError, match="V2"):
        Normalizer.fit(flat)
    with pytest.raises(ValueError, match="keys leads, mean, std"):
        Normalizer.from_dict({"mean": [0.0] * 8})


@pytest.mark.parametrize("shape", [(8, 1000), (0, 8, 1000), (4, 12, 1000), (2, 4, 8, 100)])
def test_fitting_needs_records_by_leads_by_samples(shape):
    with pytest.raises(ValueError, match=r"expected \[N>0, 8, L\] signals, got shape"):
        Normalizer.fit(np.ones(shape, dtype=np.float32))


def test_signals_without_the_model_leads_on_axis_minus_two_are_refused():
    norm = federated_normalizer()
    for bad in (np.zeros((2, 1000, 8)), torch.zeros(2, 12, 1000)):  # time-major, or all 12 leads
        with pytest.raises(ValueError, match="expected 8 leads on axis -2"):
            norm.normalize(bad)
        with pytest.raises(ValueError, match="expected 8 leads on axis -2"):
            norm.denormalize(bad)


@pytest.mark.parametrize("mean, std, problem", [
    ([0.0] * 7, [1.0] * 8, "must both have 8 entries"),
    ([0.0] * 8, [1.0] * 7 + [0.0], "std finite and positive"),
    ([0.0] * 8, [1.0] * 7 + [-1.0], "std finite and positive"),
    ([0.0] * 7 + [float("nan")], [1.0] * 8, "mean must be finite"),
    ([0.0] * 8, [1.0] * 7 + [float("inf")], "std finite and positive"),
])
def test_statistics_that_cannot_be_inverted_are_refused(mean, std, problem):
    with pytest.raises(ValueError, match=problem):
        Normalizer(mean=np.array(mean), std=np.array(std))
    with pytest.raises(ValueError, match=problem):  # a damaged normalization.json fails the same way
        Normalizer.from_dict({"leads": list(MODEL_LEADS), "mean": mean, "std": std})


def test_the_federated_normalizer_is_the_public_constants_on_any_batch_shape():
    norm = federated_normalizer()
    assert norm.leads == MODEL_LEADS and np.array_equal(norm.mean, np.zeros(8))
    assert norm.std.tolist() == list(PUBLIC_LEAD_SCALE_MV)
    x = np.random.default_rng(0).normal(size=(3, 2, 8, 50))  # leading batch axes pass through
    z = norm.normalize(x)
    np.testing.assert_allclose(z * np.array(PUBLIC_LEAD_SCALE_MV)[:, None], x, rtol=1e-12)
    one = norm.normalize(x[0, 0])  # a single [8, L] record too
    np.testing.assert_allclose(one, z[0, 0], rtol=0, atol=0)
    assert federated_normalizer().to_dict() == norm.to_dict()  # the same at every site and the server
