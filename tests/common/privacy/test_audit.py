"""The one-run audit's statistics: the bound is valid (never above the truth too often), bites, and pools."""

import math

import numpy as np
import pytest

from common.privacy.audit import (
    audit_report,
    audit_table,
    best_bound,
    epsilon_lower_bound,
    guess_counts,
    p_value,
)


def test_p_value_is_the_binomial_tail_without_delta():
    from scipy import stats

    q = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(stats.binom.sf(39, 50, q))
    assert p_value(100, 50, 0, 1.0, 1e-5) == 1.0
    assert p_value(100, 50, 40, 1.0, 1e-3) > p_value(100, 50, 40, 1.0, 0.0)  # delta only weakens the test


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses():
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5) == 0.0
    bounds = [epsilon_lower_bound(1000, 1000, v, 1e-5) for v in (600, 700, 800, 900)]
    assert bounds[0] > 0 and all(a < b for a, b in zip(bounds, bounds[1:]))
    # All 64 right at delta 1e-5: the most 64 slots can show, about ln(q / (1 - q)) with q = 0.05 ** (1 / 64).
    q = 0.05 ** (1 / 64)
    assert epsilon_lower_bound(64, 64, 64, 1e-5) == pytest.approx(math.log(q / (1 - q)), rel=0.05)


def test_bound_is_valid_for_randomized_response_with_known_epsilon():
    """eps-randomized response is exactly eps-DP: the 95 % bound may exceed eps in at most ~5 % of runs."""
    rng = np.random.default_rng(0)
    eps, slots, trials = 2.0, 400, 200
    q = math.exp(eps) / (1 + math.exp(eps))
    correct = [int(rng.binomial(slots, q)) for _ in range(trials)]
    bound_of = {c: epsilon_lower_bound(slots, slots, c, 0.0) for c in set(correct)}  # a function of the count
    bounds = np.array([bound_of[c] for c in correct])
    assert np.mean(bounds > eps) <= 0.08
    assert np.median(bounds) > 0.6 * eps  # and it is not vacuous


def test_guesses_take_the_most_confident_slots_and_count_right_signs():
    scores = np.array([5.0, -4.0, 0.1, -0.2, 3.0, 0.0])
    coins = np.array([1, -1, -1, 1, -1, 1])
    counts = guess_counts(scores, coins, (1 / 3, 0.5, 1.0))
    assert counts[0] == (2, 2)  # |5| and |-4|: both right
    assert counts[1] == (3, 2)  # + the 3.0 slot, wrong
    assert counts[2] == (5, 2)  # a zero score abstains
    with pytest.raises(ValueError, match="coins"):
        guess_counts(scores, np.zeros(6), (1.0,))
    with pytest.raises(ValueError, match="NaN"):
        guess_counts(np.array([np.nan]), np.array([1]), (1.0,))


def test_best_bound_pays_for_trying_several_fractions():
    one = best_bound(200, [(200, 170)], (1.0,), 1e-5)
    four = best_bound(200, [(20, 18), (50, 40), (100, 80), (200, 170)], (0.1, 0.25, 0.5, 1.0), 1e-5)
    assert four.fractions_tried == 4
    assert four.epsilon_lower_bound < one.epsilon_lower_bound  # the same counts, a stricter per-test level


def test_report_pools_sites_and_prints_the_table():
    def site(slots, correct):
        return {"audit-slots": slots, "audit-guesses-0": slots, "audit-correct-0": correct, "audit-mia_auc": 0.9,
                "audit-mia_tpr_at_0p1pct_fpr": 0.2, "audit-mia_tpr_at_1pct_fpr": 0.3}

    report = audit_report({"a": site(100, 95), "b": site(100, 93)}, (1.0,), 1e-5, 0.95, certified_epsilon=1.0)
    assert report["bound"]["slots"] == 200 and report["bound"]["correct"] == 188
    assert report["empirical_epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(200, 200, 188, 1e-5))
    assert report["empirical_epsilon_lower_bound"] > report["certified_epsilon"]  # this "certificate" would be caught
    table = audit_table(report)
    assert "certified epsilon" in table and "0.900" in table
    with pytest.raises(ValueError, match="no site"):
        audit_report({}, (1.0,), 1e-5, 0.95, None)
