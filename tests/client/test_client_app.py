"""The ClientApp's handlers, called directly: what leaves a site, secret noise, and the site's own ledger."""

import json
import shutil

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import HELD, handle_memorization, handle_train, hold_update
from client.site import _SITE_CACHE
from common.config import RunSpec, load
from common.model.denoiser import build_denoiser
from tests.fixtures_ptbxl import derive12, write_record
from tests.run_configs import tiny_run_config

pytestmark = pytest.mark.slow  # whole site rounds on a tiny PTB-XL: left out of make test-fast

PUBLIC_METRICS = {"site-index", "num-records", "steps", "steps-total", "planned-steps", "epsilon", "budget-exhausted"}


def _train_message(state, server_round, run_key="run-a", secure=False):
    config = ConfigRecord({"server-round": server_round, "run-key": run_key, "secure-aggregation": secure})
    return Message(RecordDict({"arrays": ArrayRecord(state), "config": config}), dst_node_id=1, message_type="train")


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages need a task identity, which Flower's runtimes set; outside one, set it as they do."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    _SITE_CACHE.clear()


@pytest.fixture
def spec(tiny_ptbxl, tmp_path):
    path = tiny_run_config(tiny_ptbxl.root, tmp_path)
    return RunSpec(str(path), (), str(tmp_path / "run"))


def _context(partition_id=0, **node_config):
    return Context(run_id=1, node_id=1, node_config={"partition-id": partition_id, "num-partitions": 2, **node_config},
                   state=RecordDict(), run_config={})


def _weights(reply):
    return reply.content["arrays"].to_torch_state_dict()


def _initial_state(spec):
    torch.manual_seed(0)
    return build_denoiser(load(spec.config_path).model).state_dict()


def test_reply_carries_weights_and_public_plan_numbers_only(spec, tmp_path):
    cfg = load(spec.config_path)
    reply = handle_train(_train_message(_initial_state(spec), 1), _context(), spec)
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site", "privacy"}
    assert set(_weights(reply)) == set(_initial_state(spec))  # plain weights: no Opacus "_module." prefixes
    metrics = dict(content["metrics"])
    assert set(metrics) == PUBLIC_METRICS  # no loss, no realised batch size, no timing
    assert metrics["steps"] == cfg.federation.local_steps
    assert 0 < metrics["epsilon"] <= cfg.privacy.target_epsilon
    budget = json.loads(content["privacy"]["budget"])
    assert budget["steps"] == cfg.federation.local_steps and budget["prior_history"] == []
    # Losses stay in the site's own log.
    log = next((tmp_path / "sites").glob("*/train_log.csv")).read_text().splitlines()
    assert log[0].startswith("time,round,steps,loss") and len(log) == 2


def test_what_leaves_a_site_does_not_depend_on_its_records_contents(spec, tiny_ptbxl, tmp_path):
    first = handle_train(_train_message(_initial_state(spec), 1), _context(), spec)
    # Same ids, same count, other signals: every number the site sends must be the same.
    for row in tiny_ptbxl.rows:
        write_record(tiny_ptbxl.root / row["filename_lr"], derive12(3.0 * tiny_ptbxl.signals8[row["ecg_id"]].T), fs=100)
    other = RunSpec(spec.config_path, ("data.cache_dir=" + str(tmp_path / "cache2"),
                                       "federation.site_state_dir=" + str(tmp_path / "sites2")), spec.run_dir)
    _SITE_CACHE.clear()
    second = handle_train(_train_message(_initial_state(spec), 1), _context(), other)
    assert dict(first.content["metrics"]) == dict(second.content["metrics"])
    assert first.content["privacy"]["budget"] == second.content["privacy"]["budget"]
    assert first.content["site"]["name"] == second.content["site"]["name"]


def test_replaying_a_round_from_public_information_does_not_reproduce_it(spec, tmp_path):
    state = _initial_state(spec)
    original = _weights(handle_train(_train_message(state, 1), _context(), spec))
    # The server (or anyone with the config, the certificate and the messages) replays the round elsewhere.
    replay = RunSpec(spec.config_path, ("federation.site_state_dir=" + str(tmp_path / "attacker"),), spec.run_dir)
    replayed = _weights(handle_train(_train_message(state, 1), _context(), replay))
    assert any(not torch.equal(original[k], replayed[k]) for k in original)
    # Asking the site for the same round from other weights draws fresh noise, never the same noise twice.
    moved = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    again = _weights(handle_train(_train_message(moved, 1), _context(), spec))
    assert any(not torch.equal(original[k] + 0.01, again[k]) for k in original)


def _site_ledger(tmp_path):
    return json.loads(next((tmp_path / "sites").glob("*/ledger.json")).read_text())


def test_a_round_asked_for_again_from_the_same_weights_gets_its_first_release_at_no_new_spend(spec, tmp_path):
    """A server that died before its checkpoint resends the round: the site sends what it released for it."""
    state = _initial_state(spec)
    first = handle_train(_train_message(state, 1), _context(), spec)
    spent = _site_ledger(tmp_path)
    again = handle_train(_train_message(state, 1), _context(), spec)
    assert all(torch.equal(_weights(first)[k], _weights(again)[k]) for k in state)
    assert dict(again.content["metrics"]) == dict(first.content["metrics"])
    assert again.content["privacy"]["budget"] == first.content["privacy"]["budget"]
    assert _site_ledger(tmp_path) == spent  # no steps reserved, no draw taken
    # The next round trains and pays; round 1 is kept no more: asked for after it, the site would have to
    # train again, and the plan's two rounds are spent, so it answers without weights.
    handle_train(_train_message(_weights(first), 2), _context(), spec)
    late = handle_train(_train_message(state, 1), _context(), spec)
    assert "arrays" not in late.content and dict(late.content["metrics"])["budget-exhausted"] == 1


def test_under_secure_aggregation_a_round_asked_for_again_is_trained_anew(spec, tmp_path):
    """A second SecAgg+ session over one update could unmask it; the site spends again instead."""
    state = _initial_state(spec)
    handle_train(_train_message(state, 1, secure=True), _context(), spec)
    spent = _site_ledger(tmp_path)
    handle_train(_train_message(state, 1, secure=True), _context(), spec)
    assert _site_ledger(tmp_path)["draws"] == spent["draws"] + 1
    assert not list((tmp_path / "sites").glob("*/released/*"))  # nothing kept that would never be sent


def test_the_site_secret_alone_replays_a_round_bit_for_bit(spec, tmp_path):
    state = _initial_state(spec)
    original = _weights(handle_train(_train_message(state, 1), _context(), spec))
    site_dir = next((tmp_path / "sites").iterdir())
    twin_root = tmp_path / "twin"
    (twin_root / site_dir.name).mkdir(parents=True)
    shutil.copy(site_dir / "secret.key", twin_root / site_dir.name / "secret.key")
    twin = RunSpec(spec.config_path, ("federation.site_state_dir=" + str(twin_root),), spec.run_dir)
    replayed = _weights(handle_train(_train_message(state, 1), _context(), twin))
    assert all(torch.equal(original[k], replayed[k]) for k in original)


def test_spent_budget_answers_budget_exhausted_without_weights(spec):
    cfg = load(spec.config_path)
    state = _initial_state(spec)
    context = _context(partition_id=1)
    for server_round in range(1, cfg.federation.rounds + 1):
        state = _weights(handle_train(_train_message(state, server_round), context, spec))
    extra = handle_train(_train_message(state, cfg.federation.rounds + 1), context, spec)
    assert "arrays" not in extra.content
    metrics = dict(extra.content["metrics"])
    assert metrics["budget-exhausted"] == 1 and metrics["steps"] == 0
    assert metrics["epsilon"] <= cfg.privacy.target_epsilon


def test_a_new_run_over_the_same_records_is_refused_by_the_lifetime_budget(spec):
    cfg = load(spec.config_path)
    state = _initial_state(spec)
    for server_round in range(1, cfg.federation.rounds + 1):
        handle_train(_train_message(state, server_round), _context(), spec)
    with pytest.raises(RuntimeError, match="past the lifetime budget"):
        handle_train(_train_message(state, 1, run_key="run-b"), _context(), spec)


def test_memorization_report_stays_at_the_site(spec, tmp_path):
    reply = handle_memorization(Message(RecordDict({"arrays": ArrayRecord(_initial_state(spec))}), dst_node_id=1,
                                        message_type="evaluate.memorization"), _context(), spec)
    assert dict(reply.content["metrics"]) == {"site-index": 0, "memorization-checked": 1}
    report = json.loads(next((tmp_path / "sites").glob("*/memorization.json")).read_text())
    assert 0.0 <= report["mia_auc"] <= 1.0


def test_site_count_mismatch_is_a_clear_error(spec):
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 5}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="5 SuperNodes but the partition defines 2 sites"):
        handle_train(_train_message(_initial_state(spec), 1), context, spec)


def _masked_stage_request(server_round):
    """What SecAggPlusWorkflow's "collect masked vectors" stage hands the train handler (after secaggplus_mod)."""
    from flwr.common import FitIns, Parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    fitins = FitIns(Parameters(tensors=[], tensor_type=""), {"server-round": server_round})
    return Message(fitins_to_recorddict(fitins, keep_input=False), dst_node_id=1, message_type="train")


def test_under_secure_aggregation_the_update_is_held_and_released_once_for_masking(spec):
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    state, context = _initial_state(spec), _context()
    reply = handle_train(_train_message(state, 1, secure=True), context, spec)
    assert set(reply.content.keys()) == {"metrics", "site", "privacy", "update-held"}  # no weights in the clear
    assert HELD in context.state
    with pytest.raises(ValueError, match="update of round 2; this site holds round 1"):
        handle_train(_masked_stage_request(2), context, spec)
    fitres = recorddict_to_fitres(handle_train(_masked_stage_request(1), context, spec).content, keep_input=True)
    assert fitres.num_examples == dict(reply.content["metrics"])["num-records"]
    update = parameters_to_ndarrays(fitres.parameters)
    assert [u.shape for u in update] == [tuple(v.shape) for v in state.values()]
    assert 0 < max(float(abs(u).max()) for u in update) <= load(spec.config_path).federation.secagg_clipping_range
    with pytest.raises(ValueError, match="this site holds none"):  # sent once: a replayed request finds nothing
        handle_train(_masked_stage_request(1), context, spec)


def test_a_site_whose_config_asks_for_secure_aggregation_refuses_to_send_weights_in_the_clear(spec):
    secure = RunSpec(spec.config_path, ("federation.secure_aggregation=true",), spec.run_dir)
    with pytest.raises(ValueError, match="asked for the site's weights in the clear; refusing"):
        handle_train(_train_message(_initial_state(spec), 1), _context(), secure)


def _moved(state, first_coordinate=None, everywhere=0.0):
    moved = {k: v.clone() + everywhere for k, v in state.items()}
    if first_coordinate is not None:
        next(iter(moved.values())).view(-1)[0] += first_coordinate
    return moved


@pytest.mark.parametrize("moved, check", [
    (lambda s: _moved(s, first_coordinate=float("nan")), "finite"),
    (lambda s: _moved(s, first_coordinate=2.0), "clipping-range"),  # beyond secagg_clipping_range 1.0
    (lambda s: _moved(s, everywhere=0.5), "norm"),  # 0.5 * sqrt(68,744 parameters) = 131 > max_update_norm 100
])
def test_an_update_secure_aggregation_would_mangle_is_refused_before_it_is_held(spec, moved, check):
    cfg, state, context = load(spec.config_path), _initial_state(spec), _context()
    refused = hold_update(context, cfg, state, moved(state), 1, 10)
    assert refused is not None and refused[0] == check
    assert HELD not in context.state
    assert hold_update(context, cfg, state, _moved(state, everywhere=0.01), 1, 10) is None
    assert HELD in context.state
