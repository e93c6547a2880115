"""A SecAgg+ round in one process: the real server round and secaggplus_mod, sites whose training is a known shift.

The grid copies every message through Flower's wire format, as a network would, and runs the site's ClientApp
(its mods included) on it; only the local training is replaced, by adding `SHIFT * node` to every weight.
"""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto

from client.client_app import hold_update, release_held_update, secure_aggregation_mod
from common.config import from_dict
from server.rounds import RoundFailed, play_round
from server.secure_aggregation import quantization_bound
from server.strategy import PrivacyLedger, build_strategy

NODES = (1, 2, 3)
SHIFT = 0.01


@pytest.fixture(autouse=True)
def flower_task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _cfg(strategy="fedavg", secure=True):
    return from_dict({"privacy": {"enabled": False}, "federation": {"strategy": strategy, "secure_aggregation": secure,
                                                                     "min_sites": 2}})


def _site_app(cfg, broken_node=None) -> ClientApp:
    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if "fitins.config" in msg.content:
            return release_held_update(msg, context)
        node, server_round = context.node_id, int(msg.content["config"]["server-round"])
        global_state = msg.content["arrays"].to_torch_state_dict()
        trained = {k: v + SHIFT * node for k, v in global_state.items()}
        if node == broken_node:
            next(iter(trained.values())).view(-1)[0] = float("nan")
        content = RecordDict({"metrics": MetricRecord({"num-records": 100 * node}),
                              "site": ConfigRecord({"name": f"site-{node}"})})
        refused = hold_update(context, cfg, global_state, trained, server_round, 100 * node)
        content["update-refused" if refused else "update-held"] = ConfigRecord(
            {"check": refused[0], "reason": refused[1]} if refused else {"round": server_round})
        return Message(content, reply_to=msg)

    return app


class _InProcessGrid:
    def __init__(self, app: ClientApp, lost_in_masking: tuple[int, ...] = ()) -> None:
        self.app, self.lost_in_masking = app, lost_in_masking
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in NODES}
        self.calls = 0

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        self.calls += 1
        replies = []
        for message in messages:
            wired = message_from_proto(message_to_proto(message))
            if message.metadata.dst_node_id in self.lost_in_masking and "fitins.config" in wired.content:
                replies.append(Message(Error(code=0, reason="connection lost"), reply_to=wired))
                continue
            reply = self.app(wired, self.contexts[message.metadata.dst_node_id])
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies


def _global():
    torch.manual_seed(0)
    return {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(5)}


def _expected_fedavg(state, nodes):
    weights = {n: 100 * n for n in nodes}
    shift = sum(weights[n] * SHIFT * n for n in nodes) / sum(weights.values())
    return {k: v + shift for k, v in state.items()}


def test_the_secure_mean_is_the_weighted_mean_within_quantization_error():
    cfg, state = _cfg(), _global()
    grid = _InProcessGrid(_site_app(cfg))
    played = play_round(grid, build_strategy(cfg), 1, ArrayRecord(state), "key", cfg.federation, PrivacyLedger())
    assert grid.calls == 5  # the plain train message, then SecAgg+'s four stages
    bound = quantization_bound(cfg.federation, len(NODES))
    secure = played.arrays.to_torch_state_dict()
    for name, value in _expected_fedavg(state, NODES).items():
        torch.testing.assert_close(secure[name], value, rtol=0, atol=bound + 1e-6)
    assert all("rejected" not in row for row in played.rows)
    # Nothing is left at the sites once the masked update went out.
    assert all("fedecg.held-update" not in c.state for c in grid.contexts.values())


def test_a_site_whose_update_fails_its_own_check_is_left_out_of_the_secure_sum():
    cfg, state = _cfg(), _global()
    played = play_round(_InProcessGrid(_site_app(cfg, broken_node=2)), build_strategy(cfg), 1, ArrayRecord(state),
                        "key", cfg.federation, PrivacyLedger())
    rows = {row["site"]: row for row in played.rows}
    assert rows["site-2"]["rejected"].startswith("finite: ") and rows["site-2"]["rejected"].endswith("(checked at the site)")
    secure = played.arrays.to_torch_state_dict()
    bound = quantization_bound(cfg.federation, 2)
    for name, value in _expected_fedavg(state, (1, 3)).items():
        torch.testing.assert_close(secure[name], value, rtol=0, atol=bound + 1e-6)


def test_a_site_lost_while_masking_is_unmasked_from_its_neighbours_shares():
    cfg, state = _cfg(), _global()
    played = play_round(_InProcessGrid(_site_app(cfg), lost_in_masking=(3,)), build_strategy(cfg), 1, ArrayRecord(state),
                        "key", cfg.federation, PrivacyLedger())
    rows = {row["site"]: row for row in played.rows}
    assert rows["site-3"]["rejected"] == "secure-aggregation: dropped out before its masked update was summed"
    secure = played.arrays.to_torch_state_dict()
    for name, value in _expected_fedavg(state, (1, 2)).items():
        torch.testing.assert_close(secure[name], value, rtol=0, atol=quantization_bound(cfg.federation, 2) + 1e-6)


def test_too_few_sites_left_to_unmask_fails_the_round_with_every_spend_on_record():
    cfg = _cfg()
    with pytest.raises(RoundFailed, match="secure aggregation halted before unmasking") as err:
        play_round(_InProcessGrid(_site_app(cfg), lost_in_masking=(2, 3)), build_strategy(cfg), 1,
                   ArrayRecord(_global()), "key", cfg.federation, PrivacyLedger())
    assert sorted(row["site"] for row in err.value.rows) == ["site-1", "site-2", "site-3"]


def test_a_server_optimizer_steps_from_the_secure_mean_as_from_the_plain_replies():
    state = _global()
    secure_cfg = _cfg("fedadam")
    secure = play_round(_InProcessGrid(_site_app(secure_cfg)), build_strategy(secure_cfg), 1, ArrayRecord(state), "key",
                        secure_cfg.federation, PrivacyLedger()).arrays.to_torch_state_dict()
    plain_cfg = _cfg("fedadam", secure=False)
    strategy = build_strategy(plain_cfg)
    strategy.configure_train(1, ArrayRecord(state), ConfigRecord({}), _InProcessGrid(_site_app(plain_cfg)))
    mean = _expected_fedavg(state, NODES)
    reply = Message(RecordDict({"arrays": ArrayRecord(mean), "metrics": MetricRecord({"num-records": 600})}),
                    dst_node_id=0, message_type="train")
    plain, _ = strategy.aggregate_train(1, [reply])
    plain = plain.to_torch_state_dict()
    moved = max(float((plain[k] - state[k]).abs().max()) for k in state)
    assert moved > 1e-3  # FedAdam took a real step
    for name in state:
        np.testing.assert_allclose(secure[name].numpy(), plain[name].numpy(), rtol=0,
                                   atol=quantization_bound(secure_cfg.federation, len(NODES)) + 1e-6)
