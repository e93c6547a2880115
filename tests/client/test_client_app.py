"""The ClientApp's train handler, called directly: what leaves a site, and how the budget persists."""

import json
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.client_app import BUDGET_KEY, handle_train
from common.config import RunSpec, load
from common.model.denoiser import build_denoiser
from tests.run_configs import tiny_run_config


def _train_message(state, server_round):
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=1, message_type="train")


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages need a task identity, which Flower's runtimes set; outside one, set it as they do."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture
def spec(tiny_ptbxl, tmp_path):
    path = tiny_run_config(tiny_ptbxl.root, tmp_path)
    return RunSpec(str(path), (), str(tmp_path / "run"))


def test_reply_carries_only_model_arrays_and_scalar_metrics(spec):
    cfg = load(spec.config_path)
    state = build_denoiser(cfg.model).state_dict()
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    reply = handle_train(_train_message(state, 1), context, spec)
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics"}
    assert isinstance(content["arrays"], ArrayRecord) and isinstance(content["metrics"], MetricRecord)
    returned = content["arrays"].to_torch_state_dict()
    assert set(returned) == set(state)  # plain weights: no Opacus "_module." prefixes
    for key, value in content["metrics"].items():
        assert isinstance(value, (int, float)), f"metric {key} is not a scalar"
    metrics = dict(content["metrics"])
    assert metrics["steps"] == cfg.federation.local_steps
    assert 0 < metrics["epsilon"] <= cfg.privacy.target_epsilon
    # The accountant history survives in context.state and on disk, and the next round composes it.
    assert BUDGET_KEY in context.state
    on_disk = json.loads(next((Path(spec.run_dir) / "sites").rglob("privacy_budget.json")).read_text())
    assert on_disk["history"][0][2] == cfg.federation.local_steps
    second = handle_train(_train_message(returned, 2), context, spec)
    metrics2 = dict(second.content["metrics"])
    assert metrics2["steps-total"] == 2 * cfg.federation.local_steps
    assert metrics2["epsilon"] > metrics["epsilon"]


def test_spent_budget_answers_budget_exhausted_without_weights(spec):
    cfg = load(spec.config_path)
    state = build_denoiser(cfg.model).state_dict()
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(), run_config={})
    for server_round in range(1, cfg.federation.rounds + 1):
        reply = handle_train(_train_message(state, server_round), context, spec)
        state = reply.content["arrays"].to_torch_state_dict()
    extra = handle_train(_train_message(state, cfg.federation.rounds + 1), context, spec)
    assert set(extra.content.keys()) == {"metrics"}
    metrics = dict(extra.content["metrics"])
    assert metrics["budget-exhausted"] == 1 and metrics["steps"] == 0
    assert metrics["epsilon"] <= cfg.privacy.target_epsilon


def test_site_count_mismatch_is_a_clear_error(spec):
    cfg = load(spec.config_path)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 5}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="5 SuperNodes but the partition defines 2 sites"):
        handle_train(_train_message(build_denoiser(cfg.model).state_dict(), 1), context, spec)
