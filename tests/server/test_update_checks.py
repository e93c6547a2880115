"""Update checks on real Flower records, and a plain round that leaves a bad site out (or fails when too few are left)."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import ConfigError, from_dict
from common.privacy import plan_budget
from server.rounds import RoundFailed, play_round
from server.strategy import PrivacyLedger, build_strategy
from server.update_checks import check_update


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages need a task identity, which Flower's runtimes set; outside one, set it as they do."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _global() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 5), "conv.bias": torch.randn(4), "out.weight": torch.randn(2, 4)}


def _near(state, scale=1e-3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def test_an_update_near_the_global_model_passes():
    state = _global()
    assert check_update(ArrayRecord(_near(state)), ArrayRecord(state), max_update_norm=1.0) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_rejected_naming_the_array(value):
    state, update = _global(), _near(_global())
    update["conv.bias"][2] = value
    rejection = check_update(ArrayRecord(update), ArrayRecord(state), max_update_norm=1e9)
    assert rejection.check == "finite" and "conv.bias holds 1 NaN/inf" in rejection.reason


def test_missing_and_unexpected_names_are_rejected():
    state = _global()
    update = _near(state)
    del update["out.weight"]
    update["extra.weight"] = torch.zeros(3)
    rejection = check_update(ArrayRecord(update), ArrayRecord(state), max_update_norm=1.0)
    assert rejection.check == "names"
    assert "missing out.weight" in rejection.reason and "unexpected extra.weight" in rejection.reason


def test_a_wrong_shape_is_rejected():
    state = _global()
    update = _near(state)
    update["conv.weight"] = update["conv.weight"].reshape(4, 15)
    rejection = check_update(ArrayRecord(update), ArrayRecord(state), max_update_norm=1.0)
    assert rejection.check == "shape" and "(4, 15)" in rejection.reason and "(4, 3, 5)" in rejection.reason


def test_a_wrong_dtype_is_rejected():
    state = _global()
    update = _near(state)
    update["out.weight"] = update["out.weight"].double()
    rejection = check_update(ArrayRecord(update), ArrayRecord(state), max_update_norm=1.0)
    assert rejection.check == "dtype" and "float64" in rejection.reason


def test_weights_that_are_not_an_array_record_are_rejected():
    rejection = check_update(ConfigRecord({"w": 1.0}), ArrayRecord(_global()), max_update_norm=1.0)
    assert rejection.check == "names" and "ConfigRecord" in rejection.reason


def test_the_norm_bound_is_on_the_whole_update():
    state = _global()
    # Each array moves by 0.6 in L2: each alone is within 1.0, together sqrt(3) * 0.6 = 1.04 is not.
    update = {k: v + 0.6 * torch.nn.functional.normalize(torch.ones_like(v).flatten(), dim=0).reshape(v.shape)
              for k, v in state.items()}
    assert check_update(ArrayRecord(update), ArrayRecord(state), max_update_norm=1.1) is None
    rejection = check_update(ArrayRecord(update), ArrayRecord(state), max_update_norm=1.0)
    assert rejection.check == "norm" and "1.039" in rejection.reason and "max_update_norm = 1" in rejection.reason


def test_the_bound_and_secure_aggregation_parameters_are_validated():
    assert from_dict({}).federation.max_update_norm == 100.0
    with pytest.raises(ConfigError, match="max_update_norm must be > 0"):
        from_dict({"federation": {"max_update_norm": -1}})
    with pytest.raises(ConfigError, match=r"secagg_reconstruction_threshold must lie in \[2, secagg_num_shares\)"):
        from_dict({"federation": {"secagg_num_shares": 3, "secagg_reconstruction_threshold": 3}})
    with pytest.raises(ConfigError, match="secagg_num_shares must be at least 3"):
        from_dict({"federation": {"secagg_num_shares": 2, "secagg_reconstruction_threshold": 2}})
    with pytest.raises(ConfigError, match="secagg_clipping_range must be > 0"):
        from_dict({"federation": {"secagg_clipping_range": 0}})


class _Grid:
    """The two Grid calls a plain round makes; each node answers with what `answer(node, message)` builds."""

    def __init__(self, answer, nodes=(1, 2, 3)):
        self.answer, self.nodes = answer, list(nodes)

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        return [Message(self.answer(m.metadata.dst_node_id, m), reply_to=m) for m in messages]


def _cfg(min_sites):
    return from_dict({"privacy": {"noise_multiplier": 1.0}, "federation": {"min_sites": min_sites, "rounds": 2},
                      "partition": {"num_sites": 3}})


def _site_reply(cfg, poisoned):
    def answer(node, message):
        state = {k: torch.from_numpy(v.numpy().copy()) for k, v in message.content["arrays"].items()}
        state = {k: v + 0.01 * node for k, v in state.items()}
        if node == poisoned:
            state["conv.bias"][0] = float("nan")
        budget = plan_budget(f"site-{node}", cfg.privacy, 32, 100 * node, 20)
        budget.steps = 10
        return RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-records": 100 * node, "steps": 10}),
                           "site": ConfigRecord({"name": f"site-{node}"}),
                           "privacy": ConfigRecord({"budget": budget.to_json()})})
    return answer


def test_a_plain_round_leaves_the_bad_site_out_and_still_records_its_spend():
    cfg, state = _cfg(min_sites=2), _global()
    ledger = PrivacyLedger()
    played = play_round(_Grid(_site_reply(cfg, poisoned=3)), build_strategy(cfg), 1, ArrayRecord(state), "key",
                        cfg.federation, ledger)
    rows = {row["site"]: row for row in played.rows}
    assert rows["site-3"]["rejected"].startswith("finite: conv.bias holds 1 NaN/inf")
    assert "rejected" not in rows["site-1"] and "rejected" not in rows["site-2"]
    assert [b.site for b in ledger.budgets()] == ["site-1", "site-2", "site-3"]  # the rejected site trained: it spent
    # FedAvg of the two accepted sites, weighted by their declared N (100 and 200): global + (1*0.01 + 2*0.02) / 3.
    aggregated = played.arrays.to_torch_state_dict()
    for name, value in state.items():
        torch.testing.assert_close(aggregated[name], value + (100 * 0.01 + 200 * 0.02) / 300, rtol=0, atol=1e-6)


def test_a_plain_round_fails_clearly_when_rejections_leave_fewer_than_min_sites():
    cfg = _cfg(min_sites=3)
    with pytest.raises(RoundFailed, match="3 sites answered and 1 updates were rejected, fewer than min_sites=3") as err:
        play_round(_Grid(_site_reply(cfg, poisoned=2)), build_strategy(cfg), 1, ArrayRecord(_global()), "key",
                   cfg.federation, PrivacyLedger())
    rejected = {row["site"]: row.get("rejected", "")[:6] for row in err.value.rows}  # kept for metrics.csv
    assert rejected == {"site-1": "", "site-2": "finite", "site-3": ""}


def test_the_reference_values_can_be_given_once_per_round():
    state = _global()
    reference = {k: v.numpy() for k, v in state.items()}
    update = _near(state, scale=1.0)
    assert check_update(ArrayRecord(update), ArrayRecord(state), 0.5, reference).check == "norm"
    unchanged = {k: Array(np.asarray(v)) for k, v in reference.items()}
    assert check_update(ArrayRecord(unchanged), ArrayRecord(state), 0.5, reference) is None
