"""Flower ClientApp: context -> site data -> common.train -> weights + scalar metrics.

The accountant's history survives rounds in `context.state` and, for resumed runs and deployments,
in a JSON file under the node's state directory (node_config `state-dir`, else the run directory).
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import (
    budget_path,
    default_state_dir,
    evaluate_memorization,
    load_or_plan_budget,
    load_site,
    train_round,
)
from common.config import RunSpec

log = logging.getLogger("fedecg.client")
BUDGET_KEY = "fedecg-privacy"


def handle_train(msg: Message, context: Context, spec: RunSpec) -> Message:
    cfg = spec.load()
    site = load_site(cfg, dict(context.node_config))
    config = msg.content["config"]
    server_round = int(config["server-round"])
    budget = None
    state_file = None
    if cfg.privacy.enabled:
        state_dir = context.node_config.get("state-dir") or default_state_dir(spec.run_dir, context.run_id)
        state_file = budget_path(str(state_dir), site.name)
        stored = context.state[BUDGET_KEY]["budget"] if BUDGET_KEY in context.state else None
        budget = load_or_plan_budget(cfg, site, stored, state_file)
    global_state = msg.content["arrays"].to_torch_state_dict()
    state, metrics = train_round(
        cfg, site, global_state, server_round, budget, proximal_mu=float(config.get("proximal-mu", 0.0))
    )
    if budget is not None:
        text = budget.to_json()
        context.state[BUDGET_KEY] = ConfigRecord({"budget": text})
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(text)
    if metrics["budget-exhausted"] and metrics["steps"] == 0:
        log.warning("site %s: privacy budget exhausted, no step taken in round %d", site.name, server_round)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def handle_memorization(msg: Message, context: Context, spec: RunSpec) -> Message:
    cfg = spec.load()
    site = load_site(cfg, dict(context.node_config))
    metrics = evaluate_memorization(cfg, site, msg.content["arrays"].to_torch_state_dict())
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def build_client_app(spec: RunSpec | None = None) -> ClientApp:
    """A ClientApp bound to `spec`, or (for `flwr run`) reading it from the run config."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, spec or RunSpec.from_run_config(dict(context.run_config)))

    @app.evaluate("memorization")
    def memorization(msg: Message, context: Context) -> Message:
        return handle_memorization(msg, context, spec or RunSpec.from_run_config(dict(context.run_config)))

    return app


app = build_client_app()
