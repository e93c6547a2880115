"""Privacy accounting: composition across rounds, calibration, budgets, and certificate verification."""

import copy

import pytest
from opacus.accountants import create_accountant

from common.config import from_dict
from common.privacy import (
    SiteBudget,
    affordable_steps,
    build_certificate,
    calibrate_noise,
    epsilon_of,
    plan_budget,
    verify_certificate,
)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_accountant_carried_across_rounds_equals_one_accountant(accountant):
    sigma, q, delta = 1.1, 0.02, 1e-5
    # Round by round, as a site does: a fresh Opacus accountant each round, history restored from JSON.
    budget = SiteBudget("s", 100.0, delta, accountant, sigma, 1.0, q, 30, 1000, 900, 2)
    for _ in range(3):
        restored = SiteBudget.from_json(budget.to_json())
        acc = create_accountant(mechanism=accountant)
        acc.history = list(restored.history)
        for _ in range(10):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        restored.history = [tuple(h) for h in acc.history]
        budget = restored
    one = create_accountant(mechanism=accountant)
    for _ in range(30):
        one.step(noise_multiplier=sigma, sample_rate=q)
    assert budget.steps == 30
    assert budget.epsilon() == pytest.approx(one.get_epsilon(delta=delta), rel=1e-9)
    # A per-round accountant (the Flower Opacus example) would report far less: one round only.
    assert epsilon_of([(sigma, q, 10)], delta, accountant) < budget.epsilon()


def test_calibration_spends_the_target_by_the_last_step():
    sigma = calibrate_noise(8.0, 1e-5, 0.01, 500, "rdp")
    eps = epsilon_of([(sigma, 0.01, 500)], 1e-5, "rdp")
    assert 7.9 <= eps <= 8.0
    assert epsilon_of([(sigma * 0.9, 0.01, 500)], 1e-5, "rdp") > 8.0


def test_affordable_steps_never_exceeds_target():
    sigma, q, delta, target = 0.8, 0.05, 1e-5, 3.0
    n = affordable_steps([], sigma, q, target, delta, "rdp", wanted=10_000)
    assert 0 < n < 10_000
    assert epsilon_of([(sigma, q, n)], delta, "rdp") <= target
    assert epsilon_of([(sigma, q, n + 1)], delta, "rdp") > target
    assert affordable_steps([(sigma, q, n)], sigma, q, target, delta, "rdp", wanted=5) == 0


@pytest.fixture(scope="module")
def certificate():
    cfg = from_dict({"privacy": {"accountant": "rdp", "target_epsilon": 5.0}})
    budgets = []
    for i, n in enumerate((800, 500)):
        b = plan_budget(f"site-{i}", cfg.privacy, 32, n, n - 50, 3, planned_steps=40)
        b.record(40)
        budgets.append(b)
    return build_certificate(cfg, budgets)


def test_certificate_verifies_and_release_is_max_over_sites(certificate):
    cert = certificate
    assert verify_certificate(cert) == []
    assert cert["release"]["epsilon"] == max(s["epsilon"] for s in cert["sites"])
    assert cert["release"]["epsilon"] <= 5.0
    assert "Record-level DP is not patient-level DP" in cert["release"]["statement"]
    assert set(cert["versions"]) >= {"flwr", "opacus", "torch"}
    assert len(cert["config_sha256"]) == 64


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c["sites"][0].__setitem__("epsilon", c["sites"][0]["epsilon"] * 0.5),
        lambda c: c["sites"][1].__setitem__("history", [[c["sites"][1]["noise_multiplier"] * 2, c["sites"][1]["sample_rate"], 40]]),
        lambda c: c["sites"][0].__setitem__("steps", 10),
        lambda c: c["release"].__setitem__("epsilon", 0.1),
        lambda c: c.__setitem__("delta", 1e-3),
    ],
)
def test_tampered_certificate_is_caught(certificate, tamper):
    cert = copy.deepcopy(certificate)
    tamper(cert)
    assert verify_certificate(cert), "a tampered certificate must not verify"
