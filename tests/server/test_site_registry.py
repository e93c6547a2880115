"""The site registry at the server: each site name bound to its authenticated node id, a false claim refused.

No processes: the registry file as the loopback deployment writes it, the ledger seeded from it, and a plain
round (the real server round, a fake grid) in which one node claims another site's name.
"""

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunSpec, from_dict
from common.privacy import plan_budget
from server.rounds import play_round
from server.site_registry import RegistryError, load_site_registry
from server.strategy import LedgerConflict, PrivacyLedger, build_strategy

REGISTRY = {"site-1": 11, "site-2": 12, "site-3": 13}


@pytest.fixture(autouse=True)
def flower_task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def test_the_server_reads_the_registry_the_loopback_deployment_writes(tmp_path):
    from simulations.deploy.sites import RegisteredSite, write_registry

    path = write_registry(tmp_path / "site_registry.json",
                          [RegisteredSite(i, name, node, f"ssh-key-{i}") for i, (name, node) in enumerate(REGISTRY.items())])
    assert load_site_registry(path) == REGISTRY
    assert RunSpec.from_run_config({"config-path": "c.yaml", "site-registry": str(path)}).site_registry == str(path)


@pytest.mark.parametrize("entries, problem", [
    ([{"name": "a", "node-id": 1}, {"name": "a", "node-id": 2}], "appears twice"),
    ([{"name": "a", "node-id": 1}, {"name": "b", "node-id": 1}], "appears twice"),
    ([{"name": "a"}], "not a site registry"),
    ([], "names no site"),
])
def test_a_malformed_registry_is_an_error_not_a_partial_mapping(tmp_path, entries, problem):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"sites": entries}))
    with pytest.raises(RegistryError, match=problem):
        load_site_registry(path)


def test_a_seeded_ledger_accepts_a_node_only_as_its_registered_site():
    ledger = PrivacyLedger()
    ledger.seed(REGISTRY)
    ledger.bind(12, "site-2")
    # The first to claim a name no longer gets it: site-1 is node 11's even before node 11 has answered.
    with pytest.raises(LedgerConflict, match="node 13 claims site site-1, registered to node 11; node 13 is registered as site-3"):
        ledger.bind(13, "site-1")
    with pytest.raises(LedgerConflict, match="site site-9, which the site registry does not name"):
        ledger.bind(13, "site-9")
    with pytest.raises(LedgerConflict, match="node 99 claims site site-1.*in no registry entry"):
        ledger.bind(99, "site-1")
    assert ledger.nodes == REGISTRY  # refusals bind nothing


class _Grid:
    def __init__(self, answer):
        self.answer = answer

    def get_node_ids(self):
        return list(REGISTRY.values())

    def send_and_receive(self, messages, timeout=None):
        return [Message(self.answer(m.metadata.dst_node_id), reply_to=m) for m in messages]


def _reply(cfg, claims: dict[int, str], dp: bool):
    def answer(node):
        name = claims[node]
        content = RecordDict({"metrics": MetricRecord({"num-records": 100, "steps": 10}),
                              "site": ConfigRecord({"name": name})})
        if dp:
            budget = plan_budget(name, cfg.privacy, 32, 100, 20)
            budget.steps = 10
            content["privacy"] = ConfigRecord({"budget": budget.to_json()})
        return content
    return answer


@pytest.mark.parametrize("dp", [True, False])
def test_a_round_with_a_node_claiming_another_sites_name_fails_before_anything_is_aggregated(dp):
    cfg = from_dict({"privacy": {"noise_multiplier": 1.0, "enabled": dp}, "federation": {"min_sites": 3},
                     "partition": {"num_sites": 3}})
    state = {"w": torch.zeros(3)}
    ledger = PrivacyLedger()
    ledger.seed(REGISTRY)
    impostor = {11: "site-1", 12: "site-2", 13: "site-1"}  # node 13 (registered as site-3) says it is site-1
    with pytest.raises(LedgerConflict, match="node 13 claims site site-1, registered to node 11"):
        play_round(_Grid(_reply(cfg, impostor, dp)), build_strategy(cfg), 1, ArrayRecord(state), "key",
                   cfg.federation, ledger)
    assert "site-3" not in ledger.sites and ledger.nodes == REGISTRY
    if dp:  # only the honest nodes' spends were recorded, under their own names
        assert set(ledger.sites) <= {"site-1", "site-2"}


def test_without_a_registry_the_first_node_to_report_a_name_keeps_it():
    ledger = PrivacyLedger()
    ledger.bind(5, "site-1")
    ledger.bind(6, "site-9")  # any name is accepted: the site's operator's word
    with pytest.raises(LedgerConflict, match="nodes 5 and 6 both claim site site-1"):
        ledger.bind(6, "site-1")
