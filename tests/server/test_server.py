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
from common.privacy import build_certificate, plan_budget, verify_certificate
from server.artifacts import monitor
from server.strategy import LedgerConflict, PrivacyLedger, build_strategy, load_strategy_state, save_strategy_state
from tests.run_configs import tiny_run_config


@pytest.mark.parametrize("name, cls", [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)])
def test_strategies_are_selectable(name, cls):
    strategy = build_strategy(from_dict({"federation": {"strategy": name, "min_sites": 3}}))
    assert type(strategy) is cls
    assert strategy.min_train_nodes == 3
    # FedAvg weights by the declared record count (public under replace-one), never by realised batch sizes.
    assert strategy.weighted_by_key == "num-records"


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


def _reported(site, steps, cfg):
    budget = plan_budget(site, cfg.privacy, cfg.train.batch_size, 500, cfg.federation.rounds * cfg.federation.local_steps)
    budget.steps = steps
    return budget.to_json()


@pytest.fixture(scope="module")
def ledger_cfg():
    return from_dict({"privacy": {"noise_multiplier": 1.2}, "federation": {"rounds": 3, "local_steps": 10},
                      "partition": {"num_sites": 2}})


def test_ledger_builds_a_verifiable_certificate_from_site_reports(ledger_cfg):
    cfg = ledger_cfg
    ledger = PrivacyLedger()
    for node, (site, steps) in enumerate((("site-0", 20), ("site-1", 30))):
        ledger.update(node, site, _reported(site, steps, cfg))
    restored = PrivacyLedger.from_json(ledger.to_json())
    certificate = build_certificate(cfg, restored.budgets(), "federated", "0" * 64)
    assert verify_certificate(certificate) == []
    assert [s["steps"] for s in certificate["sites"]] == [20, 30]
    assert "site-1" in ledger.table()


def test_ledger_refuses_a_second_node_for_one_site_and_lost_steps(ledger_cfg):
    cfg = ledger_cfg
    ledger = PrivacyLedger()
    ledger.update(1, "site-0", _reported("site-0", 10, cfg))
    with pytest.raises(LedgerConflict, match="nodes 1 and 2 both claim site site-0"):
        ledger.update(2, "site-0", _reported("site-0", 10, cfg))
    with pytest.raises(LedgerConflict, match="lost state"):
        ledger.update(1, "site-0", _reported("site-0", 5, cfg))
    with pytest.raises(LedgerConflict, match="budget of site site-1"):
        ledger.update(1, "site-0", _reported("site-1", 20, cfg))
    ledger.update(1, "site-0", _reported("site-0", 20, cfg))
    assert ledger.budgets()[0].steps == 20


def test_round_monitoring_appends_a_row_per_round_scored_against_the_server_reference(tiny_ptbxl, tmp_path):
    from server.reference import reference_set

    cfg = load(tiny_run_config(tiny_ptbxl.root, tmp_path))
    torch.manual_seed(0)
    arrays = ArrayRecord(build_denoiser(cfg.model).state_dict())
    for server_round in (2, 4):
        monitor(cfg, arrays, federated_normalizer(), tmp_path, server_round=server_round)
    rows = [json.loads(line) for line in (tmp_path / "monitoring.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [2, 4]  # appended, so a run's curve survives each round
    # The real side is the server's reference set (validation folds), never a site's records.
    reference = reference_set(cfg).signals12()
    assert rows[0]["mean_abs_mv_real"] == pytest.approx(float(np.abs(reference).mean()), rel=1e-5)
    assert all(np.isfinite(value) for row in rows for value in row.values())


def test_a_resumed_run_keeps_the_metrics_columns_it_started_with(tmp_path):
    from server.artifacts import METRIC_FIELDS, RunArtifacts, read_metrics

    older = [f for f in METRIC_FIELDS if f != "rejected"]  # a run begun before the column existed
    (tmp_path / "metrics.csv").write_text(",".join(older) + "\n" + ",".join(["1", "site-0"] + [""] * (len(older) - 2)) + "\n")
    RunArtifacts(tmp_path, from_dict({})).append_metrics([{"round": 2, "site": "site-0", "rejected": "finite: x"}])
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == older and len({line.count(",") for line in lines}) == 1
    assert [row["round"] for row in read_metrics(tmp_path / "metrics.csv")] == ["1", "2"]
    fresh = tmp_path / "fresh"
    RunArtifacts(fresh, from_dict({})).append_metrics([{"round": 1, "site": "site-0", "rejected": "finite: x"}])
    assert read_metrics(fresh / "metrics.csv")[0]["rejected"] == "finite: x"


def test_resuming_sets_aside_the_metrics_of_rounds_after_the_checkpoint_so_no_round_is_counted_twice(tmp_path):
    """A server killed after writing round 2's rows but before its checkpoint replays round 2 when resumed."""
    from flwr.app import ArrayRecord

    from server.artifacts import RunArtifacts, read_metrics
    from server.strategy import PrivacyLedger, build_strategy

    cfg = load(tiny_run_config(tmp_path / "ptb-xl", tmp_path))
    artifacts = RunArtifacts(tmp_path / "run", cfg)
    strategy = build_strategy(cfg)
    state = {k: v.detach() for k, v in build_denoiser(cfg.model).state_dict().items()}
    artifacts.append_metrics([{"round": 1, "site": "iid-0", "steps": 2}, {"round": 1, "site": "global"}])
    artifacts.checkpoint(1, ArrayRecord(state), strategy, PrivacyLedger(), "key")
    artifacts.append_metrics([{"round": 2, "site": "iid-0", "steps": 2}, {"round": 2, "site": "global"}])  # then killed

    _, _, done, run_key = RunArtifacts(tmp_path / "run", cfg).resume(build_strategy(cfg))
    assert (done, run_key) == (1, "key")
    assert [(r["round"], r["site"]) for r in read_metrics(tmp_path / "run" / "metrics.csv")] == [
        ("1", "iid-0"), ("1", "global")]
    assert [(r["round"], r["site"]) for r in read_metrics(tmp_path / "run" / "metrics_discarded.csv")] == [
        ("2", "iid-0"), ("2", "global")]
    artifacts.append_metrics([{"round": 2, "site": "iid-0", "steps": 2}])  # the replayed round
    assert [r["round"] for r in read_metrics(tmp_path / "run" / "metrics.csv")] == ["1", "1", "2"]
    assert RunArtifacts(tmp_path / "run", cfg).set_aside_metrics_after(2) == 0  # nothing later: untouched


def test_the_certificate_names_the_public_expert_pinned_when_the_run_started(tmp_path):
    from common.bundle import save_checkpoint
    from common.expert import expert_provenance
    from common.run_dir import write_latest
    from server.artifacts import RunArtifacts
    from tests.run_configs import write_public_run

    partition = {"scheme": "site", "num_sites": 2, "public_sites": [0]}
    expert_cfg = from_dict({"partition": partition, "diffusion": {"prediction": "v", "zero_terminal_snr": True}})
    expert = write_public_run(tmp_path / "expert", expert_cfg)
    cfg = from_dict({"privacy": {"noise_multiplier": 1.2}, "federation": {"rounds": 3, "local_steps": 10},
                     "partition": partition, "diffusion": {"expert": str(expert), "expert_from": 150}})
    artifacts = RunArtifacts(tmp_path / "run", cfg)
    artifacts.save_public_models(None, expert_provenance(cfg, artifacts.normalizer))
    state = build_denoiser(cfg.model).state_dict()
    save_checkpoint(artifacts.checkpoints / "round_0001", state, cfg, artifacts.normalizer, {"round": 1})
    write_latest(artifacts.run_dir, "round_0001")
    ledger = PrivacyLedger()
    for node, site in enumerate(("site-1", "site-2")):
        ledger.update(node, site, _reported(site, 30, cfg))
    artifacts.certify(ledger)
    certificate = json.loads((artifacts.run_dir / "privacy.json").read_text())
    named = json.loads((expert / "base.json").read_text())["weights_sha256"]
    assert certificate["public_expert"]["weights_sha256"] == named
    assert certificate["public_expert"]["answers_from_step"] == 150
    assert verify_certificate(certificate) == []
