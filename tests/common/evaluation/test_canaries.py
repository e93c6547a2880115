"""Canary candidates and the site's secret coins: public candidates, secret and stable coins, fixed N."""

import numpy as np
import pytest
import torch

from client.audit import coins_for_run, with_canaries
from common.config import from_dict
from common.evaluation.canaries import build_canaries, draw_coins
from common.train import TrainingData

RUN_KEY = "0123456789abcdef0123456789abcdef"


def test_candidates_are_public_band_limited_and_of_both_kinds():
    pool = np.random.default_rng(0).standard_normal((10, 8, 1000)).astype(np.float32)
    a = build_canaries(4, ("ood", "relabelled"), seed=3, leads=8, length=1000, rate_hz=100.0, public_pool=pool)
    b = build_canaries(4, ("ood", "relabelled"), seed=3, leads=8, length=1000, rate_hz=100.0, public_pool=pool)
    assert torch.equal(a.signals, b.signals) and a.kinds == ("ood", "relabelled", "ood", "relabelled")
    assert a.signals.shape == (4, 2, 8, 1000) and a.labels.shape == (4, 2, 71) and a.demographics.shape == (4, 2, 8)
    assert (a.labels.sum(-1) == 3).all()
    ood = a.signals[0, 0, 0].numpy()
    power = np.abs(np.fft.rfft(ood)) ** 2
    freqs = np.fft.rfftfreq(1000, 0.01)
    assert power[(freqs > 6.5)].sum() < 1e-6 * power.sum()  # nothing above the band: no QRS-like edges
    assert np.sqrt((ood**2).mean()) == pytest.approx(1.0, rel=1e-4)
    relabelled = a.signals[1].reshape(2, -1).numpy()
    assert any(np.allclose(relabelled[0], row.reshape(-1)) for row in pool)
    with pytest.raises(ValueError, match="public records"):
        build_canaries(4, ("relabelled",), seed=3, leads=8, length=1000, rate_hz=100.0, public_pool=pool[:3])
    with pytest.raises(ValueError, match="kinds"):
        build_canaries(4, ("dirac",), seed=3, leads=8, length=1000, rate_hz=100.0)


def test_one_record_per_slot_whatever_the_coins():
    canaries = build_canaries(6, ("ood",), seed=0, leads=8, length=100, rate_hz=100.0)
    base = TrainingData(signals=torch.zeros(5, 8, 100), labels=torch.zeros(5, 71), demographics=torch.zeros(5, 8))
    coins = draw_coins(6, 11)
    flipped = -coins
    a, b = with_canaries(base, canaries, coins), with_canaries(base, canaries, flipped)
    assert len(a) == len(b) == 11
    for i, c in enumerate(coins):  # coin +1 trains the first candidate, -1 the second
        assert torch.equal(a.signals[5 + i], canaries.signals[i, 0 if c > 0 else 1])
        assert torch.equal(b.signals[5 + i], canaries.signals[i, 1 if c > 0 else 0])


def test_coins_are_drawn_once_per_run_and_kept_secret_at_the_site(tmp_path):
    cfg = from_dict({"audit": {"pairs_per_site": 200}})
    first = coins_for_run(cfg, tmp_path, RUN_KEY)
    assert np.array_equal(first, coins_for_run(cfg, tmp_path, RUN_KEY))  # every round, every restart
    assert 60 < (first > 0).sum() < 140
    other = coins_for_run(cfg, tmp_path, "f" * 32)
    assert not np.array_equal(first, other)  # OS entropy, not a public seed
    with pytest.raises(ValueError, match="hex"):
        coins_for_run(cfg, tmp_path, "../../etc")
    with pytest.raises(ValueError, match="200 canary slots"):
        coins_for_run(from_dict({"audit": {"pairs_per_site": 10}}), tmp_path, RUN_KEY)
