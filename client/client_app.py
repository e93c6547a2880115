"""Flower ClientApp: context -> site data -> common.train -> weights + public numbers.

The site's privacy ledger and secret key live in its state directory (node_config `state-dir`, else
`federation.site_state_dir`), keyed by its records, so they span rounds, restarts and runs.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import audit_site, evaluate_memorization, load_site, open_ledger, train_round
from common.config import RunSpec

log = logging.getLogger("fedecg.client")


def handle_train(msg: Message, context: Context, spec: RunSpec) -> Message:
    cfg = spec.load()
    node_config = dict(context.node_config)
    site = load_site(cfg, node_config)
    ledger = open_ledger(cfg, site, node_config)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    if "run-key" not in config:
        raise ValueError("the server sent no run-key: it names this run in the site's ledger")
    state, metrics, budget = train_round(
        cfg, site, ledger, msg.content["arrays"].to_torch_state_dict(), server_round, str(config["run-key"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    if budget is not None:
        content["privacy"] = ConfigRecord({"budget": budget.to_json()})
    if state is None:
        log.warning("site %s: privacy budget exhausted, no step taken in round %d", site.name, server_round)
    else:
        content["arrays"] = ArrayRecord(state)
    return Message(content, reply_to=msg)


def handle_memorization(msg: Message, context: Context, spec: RunSpec) -> Message:
    """The check runs on the site's records and its report stays there; the server learns that it ran."""
    cfg = spec.load()
    node_config = dict(context.node_config)
    site = load_site(cfg, node_config)
    path = evaluate_memorization(cfg, site, open_ledger(cfg, site, node_config), msg.content["arrays"].to_torch_state_dict())
    log.info("site %s: memorization report written to %s", site.name, path)
    content = RecordDict({"metrics": MetricRecord({"site-index": site.index, "memorization-checked": 1}),
                          "site": ConfigRecord({"name": site.name})})
    return Message(content, reply_to=msg)


def handle_audit(msg: Message, context: Context, spec: RunSpec) -> Message:
    """Score this site's canaries under the final weights; only the audit's summary is sent back."""
    cfg = spec.load()
    node_config = dict(context.node_config)
    site = load_site(cfg, node_config)
    summary = audit_site(cfg, site, open_ledger(cfg, site, node_config), msg.content["arrays"].to_torch_state_dict(),
                         str(msg.content["config"]["run-key"]))
    content = RecordDict({"metrics": MetricRecord({"site-index": site.index, **summary}),
                          "site": ConfigRecord({"name": site.name})})
    return Message(content, reply_to=msg)


def build_client_app(spec: RunSpec | None = None) -> ClientApp:
    """A ClientApp bound to `spec`, or (for `flwr run`) reading it from the run config."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, spec or RunSpec.from_run_config(dict(context.run_config)))

    @app.evaluate("memorization")
    def memorization(msg: Message, context: Context) -> Message:
        return handle_memorization(msg, context, spec or RunSpec.from_run_config(dict(context.run_config)))

    @app.evaluate("audit")
    def audit(msg: Message, context: Context) -> Message:
        return handle_audit(msg, context, spec or RunSpec.from_run_config(dict(context.run_config)))

    return app


app = build_client_app()
