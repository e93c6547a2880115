"""Privacy accounting: relations, calibration, budgets, the lifetime ledger, and certificate verification."""

import copy
import multiprocessing
import warnings

import pytest
from opacus.accountants import create_accountant

from common.config import from_dict
from common.privacy import (
    LedgerError,
    SiteLedger,
    build_certificate,
    calibrate_noise,
    epsilon_of,
    plan_budget,
    verify_certificate,
)
from common.privacy.accounting import CALIBRATION_TOLERANCE, sample_rate_for


def test_add_remove_epsilon_agrees_with_opacus_prv_and_replace_one_is_larger():
    sigma, q, steps, delta = 0.9, 0.05, 200, 1e-5
    prv = create_accountant(mechanism="prv")
    prv.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus_eps = prv.get_epsilon(delta=delta)
    add_remove = epsilon_of([(sigma, q, steps)], delta, "add_remove")
    replace_one = epsilon_of([(sigma, q, steps)], delta, "replace_one")
    assert add_remove == pytest.approx(opacus_eps, abs=0.05)
    assert replace_one > add_remove * 1.01


def test_composition_is_the_sum_of_its_steps():
    sigma, q, delta = 1.1, 0.02, 1e-5
    assert epsilon_of([(sigma, q, 10)] * 3, delta) == pytest.approx(epsilon_of([(sigma, q, 30)], delta), rel=1e-6)
    assert epsilon_of([(sigma, q, 10)], delta) < epsilon_of([(sigma, q, 30)], delta)


def test_calibration_spends_the_target_under_replace_one():
    sigma = calibrate_noise(8.0, 1e-5, 0.05, 60)
    eps = epsilon_of([(sigma, 0.05, 60)], 1e-5)
    assert 8.0 - CALIBRATION_TOLERANCE <= eps <= 8.0
    assert epsilon_of([(sigma * 0.97, 0.05, 60)], 1e-5) > 8.0
    assert calibrate_noise(8.0, 1e-5, 0.05, 60) == sigma  # deterministic: verify recomputes it exactly


def test_affordable_steps_never_exceed_the_plan_or_the_target():
    # sigma 2 affords ~200 of the 1,000 planned steps; PLD accounting is cheaper at more noise.
    cfg = from_dict({"privacy": {"target_epsilon": 3.0, "noise_multiplier": 2.0}})
    budget = plan_budget("s", cfg.privacy, batch_size=20, num_records=400, planned_steps=1_000)
    n = budget.affordable(1_000)
    assert 0 < n < 1_000
    assert epsilon_of([(2.0, budget.sample_rate, n)], 1e-5) <= 3.0 < epsilon_of([(2.0, budget.sample_rate, n + 1)], 1e-5)
    budget.steps = n
    assert budget.affordable(5) == 0 and budget.exhausted
    small_plan = plan_budget("s", cfg.privacy, batch_size=20, num_records=400, planned_steps=4)
    assert small_plan.affordable(10) == 4  # never past the plan, even with budget left


def _plan(privacy_section=None, steps=20, n=300):
    cfg = from_dict({"privacy": {"target_epsilon": 5.0, **(privacy_section or {})}})
    return lambda: plan_budget("site-a", cfg.privacy, 32, n, steps)


def test_ledger_spans_runs_and_refuses_a_plan_past_the_lifetime_budget(tmp_path):
    ids = list(range(300))
    ledger = SiteLedger.open(tmp_path, "site-a", ids)
    with ledger.locked():
        budget = ledger.budget("run-1", _plan())
        assert ledger.reserve("run-1", budget, 20) == 20
    # A new run directory over the same records finds the same ledger, and its plan would double the spend.
    again = SiteLedger.open(tmp_path, "site-a", reversed(ids))
    assert again.directory == ledger.directory
    with pytest.raises(LedgerError, match="past the lifetime budget"):
        again.budget("run-2", _plan())
    # Raising the lifetime budget knowingly allows it, and the new run composes with the old one.
    second = again.budget("run-2", _plan({"lifetime_epsilon": 12.0}))
    assert second.prior_history == [(budget.noise_multiplier, budget.sample_rate, 20)]
    assert second.certified_epsilon() > budget.certified_epsilon()
    # Resuming run-1 finds its steps; an explicit reset forgets them.
    assert again.budget("run-1", _plan()).steps == 20
    again.reset("test")
    assert again.history() == [] and again.budget("run-3", _plan()).prior_history == []


def test_ledger_reserves_steps_before_training_and_never_reuses_seeds(tmp_path):
    ledger = SiteLedger.open(tmp_path, "site-a", range(300))
    with ledger.locked():
        budget = ledger.budget("run", _plan())
        ledger.reserve("run", budget, 7)
        first, second = ledger.next_randomness(), ledger.next_randomness()
    # On disk before any step: a crash mid-round still counts them.
    assert SiteLedger.open(tmp_path, "site-a", range(300)).history() == [(budget.noise_multiplier, budget.sample_rate, 7)]
    assert first != second and len({first.noise, first.sampling, first.training}) == 3
    # A fresh ledger (new secret key from OS entropy) draws other seeds; a copied key replays them.
    other = SiteLedger.open(tmp_path / "other", "site-a", range(300))
    assert other.next_randomness() != first
    copy_dir = SiteLedger.open(tmp_path / "copy", "site-a", range(300))
    (copy_dir.directory / "secret.key").write_bytes((ledger.directory / "secret.key").read_bytes())
    assert copy_dir.next_randomness() == first
    assert (ledger.directory / "secret.key").stat().st_mode & 0o077 == 0  # readable by the site's operator only


def _hold_lock(directory, ready, release):
    ledger = SiteLedger.open(directory, "site-a", range(10))
    with ledger.locked():
        ready.set()
        release.wait(10)


@pytest.mark.slow
def test_a_second_process_training_the_same_site_is_refused(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(LedgerError, match="another process is training"):
            with SiteLedger.open(tmp_path, "site-a", range(10)).locked():
                pass
    finally:
        release.set()
        holder.join(10)


@pytest.fixture(scope="module")
def certificate():
    cfg = from_dict({"privacy": {"target_epsilon": 5.0}, "federation": {"rounds": 4, "local_steps": 10},
                     "partition": {"num_sites": 2}, "train": {"batch_size": 32}})
    budgets = []
    for i, n in enumerate((800, 500)):
        b = plan_budget(f"site-{i}", cfg.privacy, 32, n, planned_steps=40)
        b.steps = 40
        budgets.append(b)
    return build_certificate(cfg, budgets, "federated", "0" * 64)


def test_certificate_verifies_and_states_the_relation(certificate):
    cert = certificate
    assert verify_certificate(cert) == []
    assert cert["neighbouring_relation"] == "replace_one"
    assert cert["release"]["epsilon"] == max(s["epsilon"] for s in cert["sites"]) <= 5.0
    assert all(s["epsilon"] > s["epsilon_add_remove"] for s in cert["sites"])
    assert "Record-level DP is not patient-level DP" in cert["release"]["statement"]
    assert any("replace-one" in item for item in cert["not_covered"])
    assert set(cert["versions"]) >= {"flwr", "opacus", "torch", "dp-accounting"}


def _recompute_release(c):
    c["release"]["epsilon"] = max(s["epsilon"] for s in c["sites"])
    c["release"]["epsilon_add_remove"] = max(s["epsilon_add_remove"] for s in c["sites"])


def _cut_steps(c):
    site = c["sites"][0]
    site["steps"] = 10
    site["planned_steps"] = 10
    site["history"] = [[site["noise_multiplier"], site["sample_rate"], 10]]
    hist = [(site["noise_multiplier"], site["sample_rate"], 10)]
    site["epsilon"] = site["epsilon_spent"] = epsilon_of(hist, c["delta"])
    site["epsilon_add_remove"] = epsilon_of(hist, c["delta"], "add_remove")
    _recompute_release(c)


def _raise_sigma(c):
    site = c["sites"][1]
    site["noise_multiplier"] *= 1.5
    hist = [(site["noise_multiplier"], site["sample_rate"], 40)]
    site["history"] = [list(h) for h in hist]
    site["epsilon"] = site["epsilon_spent"] = epsilon_of(hist, c["delta"])
    site["epsilon_add_remove"] = epsilon_of(hist, c["delta"], "add_remove")
    _recompute_release(c)


def _remove_site(c):
    worst = max(range(len(c["sites"])), key=lambda i: c["sites"][i]["epsilon"])
    del c["sites"][worst]
    _recompute_release(c)


def _switch_unit(c):
    c["unit"] = c["release"]["unit"] = "patient"


def _shrink_n(c):
    c["sites"][1]["num_records"] = 5000  # a larger N would mean a smaller q than the one trained with


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c["sites"][0].__setitem__("epsilon", c["sites"][0]["epsilon"] * 0.5),
        lambda c: c["sites"][0].__setitem__("steps", 10),
        lambda c: c["release"].__setitem__("epsilon", 0.1),
        lambda c: c.__setitem__("delta", 1e-3),
        lambda c: c.__setitem__("neighbouring_relation", "add_remove"),
        lambda c: c["config"]["federation"].__setitem__("rounds", 1),
        _cut_steps,
        _raise_sigma,
        _remove_site,
        _switch_unit,
        _shrink_n,
    ],
    ids=["epsilon", "steps", "release", "delta", "relation", "config", "steps-cut", "sigma-raised", "site-removed",
         "unit-patient", "records"],
)
def test_forged_certificates_are_refused(certificate, tamper):
    cert = copy.deepcopy(certificate)
    tamper(cert)
    assert verify_certificate(cert), "a forged certificate must not verify"


def test_sample_rate_follows_the_declared_record_count():
    assert sample_rate_for(100, 32) == 1 / 4
    assert sample_rate_for(10, 32) == 1.0
    with pytest.raises(ValueError):
        sample_rate_for(0, 32)
