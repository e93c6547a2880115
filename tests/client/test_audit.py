"""The canary audit can fail: a non-private run shows more leakage than an epsilon-1 certificate allows,
and a run that really is epsilon-1 DP stays below it. The site's own functions, without Flower's transport
(tests/e2e/test_simulation.py runs `fedecg privacy audit` through the simulation engine)."""

import json
import secrets

import pytest

from client.site import audit_site, load_site, open_ledger, train_round
from common.bundle import initial_state
from common.config import load
from common.privacy.audit import audit_report
from tests.run_configs import tiny_run_config

# One site with folds 1-2 of the first 40 real records (about 7) plus 32 canary slots: the tiny model sees
# every record about 60 times, so without DP it remembers which candidates it trained on. Real ECGs, not
# the sinusoid fixture: against sums of sinusoids the band-limited canaries are in distribution and the
# model denoises them without remembering them. The guessing plan is fixed in advance: the more
# confident half of the slots.
PAIRS = 32
COIN_ENTROPY = 20231202  # the coins are the site's OS entropy; a test fixes them to be reproducible


def _audit(root, directory, private: bool) -> dict:
    config = tiny_run_config(
        root, directory,
        data={"max_records": 40},
        partition={"scheme": "iid", "num_sites": 1, "train_folds": [1, 2]},
        diffusion={"timesteps": 50, "beta_end": 0.2},
        midt={"enabled": False},
        train={"batch_size": 16, "lr": 3e-3},
        privacy={"enabled": private, "target_epsilon": 1.0},
        federation={"rounds": 1, "local_steps": 250, "min_sites": 1},
        audit={"pairs_per_site": PAIRS, "kinds": ["ood"], "timesteps": 8, "noise_draws": 4,
               "guess_fractions": [0.5]},
    )
    cfg = load(config)
    site = load_site(cfg, {"partition-id": 0, "num-partitions": 1})
    ledger = open_ledger(cfg, site, {})
    run_key = secrets.token_hex(16)
    (ledger.directory / "audit").mkdir(parents=True)
    (ledger.directory / "audit" / f"{run_key}.json").write_text(json.dumps({"pairs": PAIRS, "entropy": COIN_ENTROPY}))
    state, metrics, budget = train_round(cfg, site, ledger, initial_state(cfg)[0], 1, run_key, proximal_mu=0.0)
    assert metrics["num-records"] == len(site.train) + PAIRS  # one record per slot, whatever the coins say
    summary = audit_site(cfg, site, ledger, state, run_key)
    certified = budget.certified_epsilon() if budget else None
    return audit_report({site.name: summary}, cfg.audit.guess_fractions, cfg.privacy.delta, cfg.audit.confidence,
                        certified)


@pytest.mark.slow
@pytest.mark.shared_data
def test_a_non_private_run_is_caught_claiming_epsilon_one(shared_ptbxl, tmp_path):
    report = _audit(shared_ptbxl, tmp_path, private=False)
    assert report["certified_epsilon"] is None
    # An epsilon-1 certificate for this run would be refuted.
    assert report["empirical_epsilon_lower_bound"] > 1.0, report
    assert report["attack"]["mia_auc"] > 0.7, report


@pytest.mark.slow
@pytest.mark.shared_data
def test_an_epsilon_one_run_stays_below_its_certificate(shared_ptbxl, tmp_path):
    report = _audit(shared_ptbxl, tmp_path, private=True)
    assert report["certified_epsilon"] == pytest.approx(1.0, abs=0.05)
    assert report["empirical_epsilon_lower_bound"] < report["certified_epsilon"]
