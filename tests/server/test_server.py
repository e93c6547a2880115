"""Server pieces: strategies and their checkpointed state, the privacy ledger, round monitoring."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from common.config import from_dict, load
from common.model.denoiser import build_denoiser
from common.normalization import federated_normalizer
from common.privacy import build_certificate, epsilon_of, verify_certificate
from server.server_app import _monitor
from server.strategy import PrivacyLedger, build_strategy, load_strategy_state, save_strategy_state
from tests.run_configs import tiny_run_config


@pytest.mark.parametrize("name, cls", [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)])
def test_strategies_are_selectable(name, cls):
    strategy = build_strategy(from_dict({"federation": {"strategy": name, "min_sites": 3}}))
    assert type(strategy) is cls
    assert strategy.min_train_nodes == 3


def test_fedadam_moments_survive_a_checkpoint(tmp_path):
    cfg = from_dict({"federation": {"strategy": "fedadam"}})
    strategy = build_strategy(cfg)
    strategy.m_t = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    strategy.v_t = {"w": np.full((2, 3), 0.5, dtype=np.float32)}
    save_strategy_state(tmp_path / "s.safetensors", strategy)
    restored = build_strategy(cfg)
    load_strategy_state(tmp_path / "s.safetensors", restored)
    np.testing.assert_array_equal(restored.m_t["w"], strategy.m_t["w"])
    np.testing.assert_array_equal(restored.v_t["w"], strategy.v_t["w"])
    stateless = build_strategy(from_dict({}))
    save_strategy_state(tmp_path / "a.safetensors", stateless)
    load_strategy_state(tmp_path / "a.safetensors", stateless)
    assert getattr(stateless, "m_t", None) is None


def test_ledger_rebuilds_a_verifiable_certificate_from_scalar_metrics():
    cfg = from_dict({"privacy": {"accountant": "rdp"}})
    ledger = PrivacyLedger()
    for site, steps in (("site-0", 20), ("site-1", 30)):
        metrics = {"noise-multiplier": 1.2, "sample-rate": 0.02, "steps-total": steps, "target-epsilon": 10.0,
                   "delta": 1e-5, "max-grad-norm": 1.0, "planned-steps": 30, "num-records": 500, "num-patients": 450,
                   "max-records-per-patient": 3, "budget-exhausted": 0}
        metrics["epsilon"] = epsilon_of([(1.2, 0.02, steps)], 1e-5, "rdp")
        ledger.update(site, metrics)
    certificate = build_certificate(cfg, PrivacyLedger.from_json(ledger.to_json()).budgets(cfg))
    assert verify_certificate(certificate) == []
    assert certificate["release"]["epsilon"] == pytest.approx(ledger.sites["site-1"]["epsilon"])
    assert "site-1" in ledger.table()


def test_round_monitoring_scores_the_global_model(tiny_ptbxl, tmp_path):
    cfg = load(tiny_run_config(tiny_ptbxl.root, tmp_path))
    torch.manual_seed(0)
    arrays = ArrayRecord(build_denoiser(cfg.model).state_dict())
    _monitor(cfg, arrays, federated_normalizer(), tmp_path, server_round=2)
    rows = [json.loads(line) for line in (tmp_path / "monitoring.jsonl").read_text().splitlines()]
    assert rows[0]["round"] == 2
    assert 0.0 <= rows[0]["interlead_corr_error"] <= 2.0
