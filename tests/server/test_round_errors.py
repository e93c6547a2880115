"""A site the SuperLink reports as gone: the server's log names the node the message was sent to."""

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.config import from_dict
from server.rounds import play_round
from server.strategy import PrivacyLedger, build_strategy

NODES = (11, 12, 13)
SUPERLINK_NODE_ID = 1  # what Flower's SuperLink puts as the source of the error it answers for an offline node


@pytest.fixture(autouse=True)
def flower_task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class _GridWithADeadNode:
    """Node 11 died mid-round: the SuperLink answers for it, as its own node; 12 and 13 reply."""

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as the grid does when it pushes
            node = message.metadata.dst_node_id
            if node == 11:
                reply = Message(Error(code=3, reason="Node Unavailable"), reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                assert reply.metadata.src_node_id == SUPERLINK_NODE_ID
            else:
                state = {k: v + 0.01 for k, v in message.content["arrays"].to_torch_state_dict().items()}
                reply = Message(RecordDict({"arrays": ArrayRecord(state),
                                            "metrics": MetricRecord({"num-records": 10, "steps": 1}),
                                            "site": ConfigRecord({"name": f"site-{node}"})}), reply_to=message)
            replies.append(reply)
        return replies


def test_a_node_the_superlink_reports_offline_is_named_by_its_own_id_and_the_round_goes_on(caplog):
    cfg = from_dict({"privacy": {"enabled": False}, "federation": {"min_sites": 2}})
    state = {"w": torch.zeros(3)}
    with caplog.at_level(logging.ERROR, logger="fedecg.server"):
        played = play_round(_GridWithADeadNode(), build_strategy(cfg), 1, ArrayRecord(state), "key", cfg.federation,
                            PrivacyLedger())
    assert sorted(row["site"] for row in played.rows) == ["site-12", "site-13"]
    assert torch.allclose(played.arrays.to_torch_state_dict()["w"], torch.full((3,), 0.01))
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures == ["round 1: node 11 failed: Node Unavailable"], failures
